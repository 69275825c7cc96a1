"""W8A8 linear with per-channel weight scales: LightX2V's ``fp8-*`` / ``int8-*`` per-channel checkpoints.

The weight is int8 or fp8 (e4m3) ``[out, in]`` with one scale per output channel (``[out, 1]``, LightX2V's
``weight_scale``); the activation is quantised per token (one scale per row), dynamically, at each call, then
``out = (q_x @ q_w.T) * s_x * s_w.T (+ bias)`` in the requested dtype (fp32 accumulation; int32 for int8).

- gems: activations by FlagGems' ``per_token_group_quant_fp8`` with one group per row (fp8), or by torch ops
  (int8: FlagGems 5.0.2 has no int8 activation quantiser); the GEMM is FlagGems' ``cutlass_scaled_mm`` (a
  Triton kernel despite its name: per-token x per-channel scales, fp8 and int8, bias added after the output
  cast), whose 5.0.2 code runs on sm90 only and raises NotImplementedError elsewhere. ``fp8_matmul`` and
  ``w8a8_block_fp8_matmul`` take 128x128 block scales only, so they do not fit per-channel checkpoints.
- reference: the same activation quantisation in torch, then the dequantised product in fp32. It is also
  where every call the kernel can't take goes (CPU, another chip, a shape or layout the kernel refuses).

Activation quantisation, as FlagGems does it: fp8 ``s = max(|x|, 1e-10) / 448``, ``q = clamp(x / s, -448,
448)`` rounded to e4m3; int8 ``s = max(|x|, 1e-10) / 127``, ``q = round(x / s)`` (half to even), both in fp32.
"""

from __future__ import annotations

import torch

from fl_patch.kernels import gems as _gems

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
INT8_MAX = 127.0
EPS = 1e-10  # FlagGems' per_token_group_quant_fp8 default
HALF = (torch.float16, torch.bfloat16)
WEIGHT_DTYPES = {"fp8": FP8, "int8": torch.int8}
# No performance routing (fl_patch.device.routing) for these forms: the alternative to the kernel is not a faster native
# op but the dequantised fp32 reference (an fp32 copy of the weight and an fp32 GEMM per call);
# tests/gpu/lightx2v_quant_gpu.py times both at Wan's 512-token text GEMMs (``reference_ms``).
FAMILY = None


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token fp8 quantisation of a 2-D ``x`` in torch (FlagGems' formula): ``(q [M, K] e4m3, s [M, 1] fp32)``."""
    rows = x.float()
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp_(min=EPS).div_(FP8_MAX)
    return (rows / scale).clamp_(-FP8_MAX, FP8_MAX).to(FP8), scale


def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 quantisation of a 2-D ``x``: ``(q [M, K] int8, s [M, 1] fp32)``; five torch ops
    on a device (the max of |x| in one reduction, no fp32 copy of x before it)."""
    scale = torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, keepdim=True, dtype=torch.float32)
    scale = scale.clamp_(min=EPS).div_(INT8_MAX)
    return torch.div(x, scale).round_().clamp_(-INT8_MAX - 1, INT8_MAX).to(torch.int8), scale


def reference_fp8(x, weight, weight_scale, bias, out_dtype):
    """``x [..., K]`` times the fp8 ``weight [N, K]`` (scales ``[N, 1]`` or one), per-token fp8 activations."""
    return _reference(quantize_fp8, x, weight, weight_scale, bias, out_dtype)


def reference_int8(x, weight, weight_scale, bias, out_dtype):
    """``x [..., K]`` times the int8 ``weight [N, K]`` (scales ``[N, 1]`` or one), per-token int8 activations."""
    return _reference(quantize_int8, x, weight, weight_scale, bias, out_dtype)


def gems_fp8(x, weight, weight_scale, bias, out_dtype):
    """``reference_fp8`` on FlagGems: ``per_token_group_quant_fp8`` (a group per row), ``cutlass_scaled_mm``."""
    flag_gems = _gems.ops()
    rows = _rows(x)
    q, scale = flag_gems.per_token_group_quant_fp8(rows, rows.shape[-1], dtype=FP8)
    return _scaled_mm(flag_gems, x, q, scale, weight, weight_scale, bias, out_dtype)


def gems_int8(x, weight, weight_scale, bias, out_dtype):
    """``reference_int8`` with the GEMM on FlagGems' ``cutlass_scaled_mm`` (activations quantised by torch)."""
    flag_gems = _gems.ops()
    q, scale = quantize_int8(_rows(x))
    return _scaled_mm(flag_gems, x, q, scale, weight, weight_scale, bias, out_dtype)


def unsupported_fp8(provider, x, weight, weight_scale, bias, out_dtype) -> str | None:
    """None when `provider` can take ``reference_fp8``'s call, else a short reason."""
    return _unsupported("fp8", provider, x, weight, weight_scale, bias, out_dtype)


def unsupported_int8(provider, x, weight, weight_scale, bias, out_dtype) -> str | None:
    """None when `provider` can take ``reference_int8``'s call, else a short reason."""
    return _unsupported("int8", provider, x, weight, weight_scale, bias, out_dtype)


def _unsupported(form, provider, x, weight, weight_scale, bias, out_dtype) -> str | None:
    """Both providers: a 2-D weight of the form's dtype matching x's last dim, one scale per output channel
    (or one in all), bias None or ``(N,)``. gems also (FlagGems' asserts and its sm90-only dispatch): the chip,
    an fp16/bf16 output, fp32 contiguous scales, a contiguous bias, a row-major weight with a row stride and
    N that are multiples of 16, no autograd."""
    reason = _gems.tensor_reason(x) if provider == "gems" else None  # first: see gems.tensor_reason
    if reason is not None:
        return reason
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return "weight shape"
    if weight.dtype != WEIGHT_DTYPES[form]:
        return "weight dtype"
    out_features = weight.shape[0]
    if weight_scale.numel() not in (1, out_features):
        return "scale shape"
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        return "bias shape"
    if provider != "gems":
        return None
    reason = _chip_reason(x)
    if reason is not None:
        return reason
    if out_dtype not in HALF:
        return "out dtype"
    if weight_scale.dtype != torch.float32 or not weight_scale.is_contiguous():
        return "scale dtype"
    if bias is not None and not bias.is_contiguous():
        return "bias layout"
    if weight.stride(1) != 1:
        return "weight layout"
    if weight.stride(0) % 16 or out_features % 16:  # FlagGems asserts 16-aligned strides of b and of the output
        return "alignment"
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return "requires grad"
    return None


_chip_reasons: dict = {}


def _chip_reason(x: torch.Tensor) -> str | None:
    """None on the chips where FlagGems 5.0.2's ``cutlass_scaled_mm`` runs (NVIDIA sm90: its other
    architectures raise NotImplementedError), else ``"not sm90"``; cached per device."""
    device = x.device
    if device not in _chip_reasons:
        reason = "not sm90"
        if device.type == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(device)[0] == 9:
            reason = None
        _chip_reasons[device] = reason
    return _chip_reasons[device]


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous ``[tokens, K]`` matrix (a view when it already is one)."""
    return (x if x.dim() == 2 else x.reshape(-1, x.shape[-1])).contiguous()


def _scaled_mm(flag_gems, x, q, scale, weight, weight_scale, bias, out_dtype):
    out = torch.empty((q.shape[0], weight.shape[0]), dtype=out_dtype, device=q.device)
    if bias is not None and bias.dtype != out_dtype:
        # FlagGems 5.0.2's kernel adds the bias after its output cast, and fails to compile (CompilationError "at
        # 94:4", its `c += bias`) for a bias of another dtype (an H200, triton 3.6): give it the bias in out's dtype
        bias = bias.to(out_dtype)
    flag_gems.cutlass_scaled_mm(out, q, weight.t(), scale, weight_scale, bias)  # b: the column-major [K, N] view
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])


def _reference(quantize, x, weight, weight_scale, bias, out_dtype):
    q, scale = quantize(_rows(x))
    out = (q.float() @ weight.float().t()).mul_(scale).mul_(weight_scale.float().reshape(1, -1))
    if bias is not None:
        out = out.add_(bias.float())
    out = out.to(out_dtype)
    return out if x.dim() == 2 else out.view(*x.shape[:-1], weight.shape[0])
