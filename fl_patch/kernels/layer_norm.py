"""LayerNorm: ``F.layer_norm`` on FlagGems' ``layer_norm``, which returns ``(y, mean, rstd)``.

FlagGems normalises in fp32 and stores in x's dtype, as torch does for fp16/bf16. Its kernel has no
autograd when called directly: calls that need gradients are routed away.
"""

from __future__ import annotations

import torch

from fl_patch.kernels import gems as _gems

FAMILY = "layer_norm"  # routing keys of this module: "layer_norm.<form>" (fl_patch.device.routing)


def reference(
    x: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.layer_norm`` semantics by explicit math: biased variance over the last
    ``len(normalized_shape)`` dims, in fp32 for fp16/bf16 (x's dtype otherwise), result in x's dtype."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    centered = h - h.mean(dims, keepdim=True)
    out = centered * torch.rsqrt(centered.pow(2).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.to(h.dtype)
    if bias is not None:
        out = out + bias.to(h.dtype)
    return out.to(x.dtype)


def gems(
    x: torch.Tensor,
    normalized_shape,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``reference`` on FlagGems; returns y only."""
    return _gems.composed(_gems.ops(), "layer_norm", gems_y)(x, _as_shape(normalized_shape), weight, bias, eps)


def gems_y(flag_gems, x: torch.Tensor, normalized_shape: tuple, weight, bias, eps: float) -> torch.Tensor:
    """FlagGems' ``layer_norm`` keeping y of its ``(y, mean, rstd)``. On the fast launch path it is bound as one call
    (``gems.composed``): the mean and rstd nobody reads are then scratch, reused per stream for FlagGems' single
    launch instead of two allocations a call."""
    return flag_gems.layer_norm(x, normalized_shape, weight, bias, eps)[0]


def unsupported(
    provider: str, x: torch.Tensor, normalized_shape, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> str | None:
    """None when `provider` can take ``F.layer_norm(x, normalized_shape, weight, bias, eps)``, else a reason.

    Both providers: x ends in ``normalized_shape``; weight and bias None or of that shape. gems also:
    device, fp16/bf16, weight and bias in x's dtype, no autograd, no empty input.
    """
    if provider == "gems":
        reason = _gems.tensor_reason(x)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    shape = _as_shape(normalized_shape)
    if (
        x.shape[x.dim() - len(shape):] != shape
        or (weight is not None and weight.shape != shape)
        or (bias is not None and bias.shape != shape)
    ):
        return "shape mismatch"
    if provider == "gems":
        if (weight is not None and weight.dtype != x.dtype) or (bias is not None and bias.dtype != x.dtype):
            return "mixed dtypes"
        if torch.is_grad_enabled() and (
            x.requires_grad
            or (weight is not None and weight.requires_grad)
            or (bias is not None and bias.requires_grad)
        ):
            return "requires grad"
    return None


def _as_shape(normalized_shape) -> tuple:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
