"""Torch versions of the Triton kernels behind ``fp8-triton`` / ``int8-triton`` (upstream ``triton_kernels.py``).

Same signatures and the same arithmetic as upstream's kernels, including two of their quirks that change
numbers: the int8 activation quantiser truncates toward zero (its ``+0.5`` rounding step is cast to int8,
i.e. adds nothing, and the store into int8 truncates), and the fp8 one returns its per-row scales in
bfloat16 while it divided by the float32 scale. GEMMs accumulate in float32 (exact int32 sums for int8 in
float64 here), multiply by the row and column scales, add the float32 bias, and cast once to
``output_dtype`` (float16 when None).
"""

import torch

FP8_DTYPES = tuple(getattr(torch, name) for name in ("float8_e4m3fn", "float8_e4m3fnuz") if hasattr(torch, name))


def int8_quantize_triton(x):
    """Per row of ``x [..., K]``: ``q = trunc(x * 127 / max|x|)`` as int8, scales ``max|x| / 127`` (float32,
    shape ``x.shape[:-1]``). A row of zeros gives NaN scales, as upstream (no epsilon)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    inverse = 127.0 / rows.abs().amax(dim=-1, keepdim=True)
    quantized = (rows * inverse).to(torch.int8)  # float -> int8 truncates, as the kernel's store
    return quantized.view(x.shape), (1 / inverse).view(x.shape[:-1])


def fp8_quantize_triton(x):
    """Per row of ``x [..., K]``: ``s = max(max|x|, 1e-8) / 448``, ``q = clamp(x / s, +-448)`` as e4m3; the
    scales come back in bfloat16 (shape ``x.shape[:-1]``)."""
    rows = x.reshape(-1, x.shape[-1]).float()
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 448.0
    quantized = (rows / scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return quantized.view(x.shape), scale.to(torch.bfloat16).view(x.shape[:-1])


def int8_gemm_bias_triton(a, b, bias, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    """``(a @ b.T) * a_scales * b_scales + bias`` for int8 ``a [..., K]`` and ``b [N, K]``."""
    return _scaled_gemm(a, b, bias, a_scales, b_scales, fuse_gelu, output_dtype)


def int8_gemm_triton(a, b, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    """``int8_gemm_bias_triton`` without a bias."""
    return _scaled_gemm(a, b, None, a_scales, b_scales, fuse_gelu, output_dtype)


def fp8_gemm_bias_triton(a, b, bias, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    """``(a @ b.T) * a_scales * b_scales + bias`` for e4m3 ``a [..., K]`` and ``b [N, K]`` (asserted, as upstream)."""
    _check_fp8(a, b)
    return _scaled_gemm(a, b, bias, a_scales, b_scales, fuse_gelu, output_dtype)


def fp8_gemm_triton(a, b, a_scales, b_scales, fuse_gelu=False, output_dtype=None):
    """``fp8_gemm_bias_triton`` without a bias."""
    _check_fp8(a, b)
    return _scaled_gemm(a, b, None, a_scales, b_scales, fuse_gelu, output_dtype)


def _check_fp8(a, b):
    assert a.dtype in FP8_DTYPES, f"a.dtype={a.dtype} is not FP8 E4M3"
    assert b.dtype in FP8_DTYPES, f"b.dtype={b.dtype} is not FP8 E4M3"


def _scaled_gemm(a, b, bias, a_scales, b_scales, fuse_gelu, output_dtype):
    rows = a.reshape(-1, a.shape[-1])
    assert rows.shape[1] == b.shape[1], f"incompatible dimensions {rows.shape} and {tuple(b.t().shape)}"
    accumulator = torch.mm(rows.double(), b.double().t()).float()
    out = accumulator * a_scales.float().reshape(-1, 1) * b_scales.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    if fuse_gelu:
        out = out * torch.sigmoid(out * 1.702)
    return out.to(output_dtype or torch.float16).view(*a.shape[:-1], b.shape[0])
