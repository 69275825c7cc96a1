"""Linear layers: ``F.linear`` (weight ``[out, in]``) and LightX2V's transposed weight (``[in, out]``).

FlagGems has no ``linear``: the gems paths run ``mm`` / ``addmm`` on the 2-D view of the input (a copy
only if the leading dims can't be flattened) and give the result the input's leading dims back. These
kernels have no autograd: calls that need gradients are routed away. FlagGems autotunes its GEMM per
shape (on Hopper per exact token count): the first call at a new token count took 2.6 s on an H200.
"""

from __future__ import annotations

import torch

from fl_patch.kernels import gems as _gems

FAMILY = "linear"  # routing keys of this module: "linear.<form>" (fl_patch.device.routing)


def reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)``: ``x @ weight.T + bias`` over any leading dims, by explicit mm/addmm."""
    return _matmul(torch.mm, torch.addmm, x, weight.t(), bias)


def gems(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``reference`` on FlagGems' ``mm`` / ``addmm``."""
    flag_gems = _gems.ops()
    return _matmul(flag_gems.mm, flag_gems.addmm, x, weight.t(), bias)


def unsupported(
    provider: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """None when `provider` can take ``F.linear(x, weight, bias)``, else a short reason.

    Both providers: 2-D weight matching x's last dim; bias None or ``(out,)``. gems also: device,
    fp16/bf16, one dtype for x, weight and bias, no autograd, no empty input.
    """
    reason = _tensor_reason(provider, x)
    if reason is not None:
        return reason
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return "weight shape"
    return _common_reason(provider, x, weight, bias, weight.shape[0])


def reference_in_out(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight_t + bias`` with the weight stored ``[in, out]`` (LightX2V's ``torch.addmm(bias, x, w)``)."""
    return _matmul(torch.mm, torch.addmm, x, weight_t, bias)


def gems_in_out(x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``reference_in_out`` on FlagGems' ``mm`` / ``addmm``."""
    flag_gems = _gems.ops()
    return _matmul(flag_gems.mm, flag_gems.addmm, x, weight_t, bias)


def unsupported_in_out(
    provider: str, x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None
) -> str | None:
    """None when `provider` can take ``x @ weight_t (+ bias)`` with weight ``[in, out]``, else a reason."""
    reason = _tensor_reason(provider, x)
    if reason is not None:
        return reason
    if weight_t.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight_t.shape[0]:
        return "weight shape"
    return _common_reason(provider, x, weight_t, bias, weight_t.shape[1])


def _matmul(mm, addmm, x: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    flat = x.dim() == 2
    rows = x if flat else x.reshape(-1, x.shape[-1])
    out = mm(rows, weight_in_out) if bias is None else addmm(bias, rows, weight_in_out)
    return out if flat else out.view(x.shape[:-1] + out.shape[1:])


def _tensor_reason(provider: str, x: torch.Tensor) -> str | None:
    """gems' per-call tensor check, made before the shape checks: see gems.tensor_reason."""
    return _gems.tensor_reason(x) if provider == "gems" else None


def _common_reason(
    provider: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> str | None:
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out_features):
        return "bias shape"
    if provider == "gems":
        if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
            return "mixed dtypes"
        if torch.is_grad_enabled() and (
            x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)
        ):
            return "requires grad"
    return None
