"""RMSNorm in five forms: HF Llama-style, Gemma-style (``1 + w``), fp32 with an optional weight (unweighted
norms, Gemma 3n/4's ``with_scale``), gated by ``silu(gate)`` (Qwen3-Next / 3.5) and ``torch.nn.functional.rms_norm``.

FlagGems ``rms_norm(x, normalized_shape, weight, eps)`` normalises in fp32, multiplies by the weight in
fp32, and returns x's dtype; it requires a weight and has its own backward. That is how Gemma and
torch's ``F.rms_norm`` compute too (equal up to fp32 rounding). HF Llama instead rounds the normalised
value to x's dtype *before* multiplying by the weight and returns the promoted dtype: ``gems_hf`` returns
HF's dtype, but its values differ from HF's by that one rounding (within fp16/bf16 tolerance).
"""

from __future__ import annotations

import torch
from torch.utils.weak import WeakIdKeyDictionary

from fl_patch.kernels import gems

FAMILY = "rms_norm"  # routing keys of this module: "rms_norm.<form>" (fl_patch.device.routing)

# Gemma's (1 + weight) in fp32, per weight tensor: (weight._version when computed, value).
_gemma_scale_cache = WeakIdKeyDictionary()
# F.rms_norm's eps when None, per input dtype: the epsilon of the compute dtype.
_default_eps: dict = {}
# A weight of ones per (size, dtype, device), for FlagGems' rms_norm, which requires one.
_ones: dict = {}


def reference_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``LlamaRMSNorm.forward`` exactly: normalise in fp32, cast to x's dtype, then ``weight * h``."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def gems_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference_hf`` on FlagGems: HF's dtype; values within one rounding of x's dtype of HF's."""
    out = gems.ops().rms_norm(x, (x.shape[-1],), weight, eps)
    if weight.dtype != x.dtype:
        out = out.to(torch.promote_types(weight.dtype, x.dtype))
    return out


def native_hf(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference_hf`` as torch's own fused ``rms_norm``, for calls too small to pay FlagGems' host overhead.

    On CUDA that is one launch (10 µs of host time on an H200) against the seven of HF's body (69 µs) and
    FlagGems' 48 µs, and it rounds like ``gems_hf`` (fp32 throughout, one rounding at the end), so a model's
    numbers don't depend on which path a call took. A weight the fused op can't take as HF would (another dtype
    than x, another shape: small calls get here before the shape checks) runs ``reference_hf``.
    ``torch.rms_norm``, not ``F.rms_norm``: the latter may be fl_patch's own replacement (the torch row).
    """
    if not _fused_takes(x, weight):
        return reference_hf(x, weight, eps)
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def _fused_takes(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``torch.rms_norm(x, (x.shape[-1],), weight)`` computes what HF's code would for these inputs."""
    if weight is None:
        return x.dim() > 0
    return weight.dtype == x.dtype and weight.dim() == 1 and x.dim() > 0 and weight.shape[0] == x.shape[-1]


def unsupported_hf(provider: str, x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when `provider` can take ``rms_norm_hf(x, weight, eps)``, else a short reason."""
    if provider == "gems":
        reason = gems.tensor_reason(x)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if weight.dim() != 1 or x.dim() == 0 or weight.shape[0] != x.shape[-1]:
        return "weight shape"
    return None


def reference_gemma(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``GemmaRMSNorm.forward`` exactly: all in fp32, ``norm(x) * (1 + weight)``, cast back to x's dtype."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    out = out * (1.0 + weight.float())
    return out.type_as(x)


def gems_gemma(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference_gemma`` on FlagGems, with ``1 + weight`` in fp32 as the kernel's weight.

    ``1 + weight`` is cached per weight tensor (recomputed when the weight changes in place, and not
    cached when autograd needs it, for inference tensors, whose changes can't be seen, or under torch.compile).
    """
    return gems.ops().rms_norm(x, (x.shape[-1],), _gemma_scale(weight), eps)


def unsupported_gemma(provider: str, x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when `provider` can take ``rms_norm_gemma(x, weight, eps)``, else a short reason."""
    return unsupported_hf(provider, x, weight)


def _gemma_scale(weight: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # in a graph: part of it (dynamo can't trace the cache)
        return 1.0 + weight.float()
    if weight.is_inference() or (weight.requires_grad and torch.is_grad_enabled()):
        return 1.0 + weight.float()
    version = weight._version
    cached = _gemma_scale_cache.get(weight)
    if cached is not None and cached[0] == version:
        return cached[1]
    scale = 1.0 + weight.float()
    _gemma_scale_cache[weight] = (version, scale)
    return scale


def reference_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """Normalise in fp32, multiply by the weight in fp32 when there is one, cast back to x's dtype: NanoChat's
    unweighted norm, and Gemma 3n/4's with or without ``with_scale``."""
    h = x.float()
    out = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        out = out * weight.float()
    return out.type_as(x)


def gems_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``reference_fp32`` on FlagGems (fp32 throughout, one rounding); no weight runs with a cached one of ones."""
    if weight is None:
        weight = _ones_like_last_dim(x)
    return gems.ops().rms_norm(x, (x.shape[-1],), weight, eps).to(x.dtype)


def native_fp32(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``reference_fp32`` as torch's fused ``rms_norm`` (see ``native_hf``), which computes the same way; inputs it
    can't take as HF would run ``reference_fp32``."""
    if not _fused_takes(x, weight):
        return reference_fp32(x, weight, eps)
    return torch.rms_norm(x, (x.shape[-1],), weight, eps)


def unsupported_fp32(provider: str, x: torch.Tensor, weight: torch.Tensor | None) -> str | None:
    """None when `provider` can take ``rms_norm_fp32(x, weight, eps)``, else a short reason."""
    if provider == "gems":
        reason = gems.tensor_reason(x)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if x.dim() == 0 or (weight is not None and (weight.dim() != 1 or weight.shape[0] != x.shape[-1])):
        return "weight shape"
    return None


def _ones_like_last_dim(x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():  # in a graph: a constant of it, no cache
        return torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    key = (x.shape[-1], x.dtype, x.device)
    ones = _ones.get(key)
    if ones is None:
        ones = _ones[key] = torch.ones(x.shape[-1], dtype=x.dtype, device=x.device)
    return ones


def reference_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3-Next's ``RMSNormGated.forward`` exactly: ``reference_hf``, then times ``silu(gate)`` in fp32, cast
    back to x's dtype."""
    normed = reference_hf(x, weight, eps)
    return (normed * torch.nn.functional.silu(gate.to(torch.float32))).to(x.dtype)


def gems_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference_gated`` as two FlagGems kernels: ``rms_norm``, then ``silu_and_mul(gate, normed)`` (silu and
    product in fp32, one rounding). x, gate and weight share one dtype (``unsupported_gated``)."""
    flag_gems = gems.ops()
    return flag_gems.silu_and_mul(gate, flag_gems.rms_norm(x, (x.shape[-1],), weight, eps))


def native_gated(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``reference_gated`` in four torch launches instead of HF's eleven: the fused ``rms_norm`` (see
    ``native_hf``), then ``silu(gate)`` and the product in fp32; inputs it can't take as HF would run
    ``reference_gated``."""
    if not _fused_takes(x, weight) or gate.shape != x.shape:
        return reference_gated(x, gate, weight, eps)
    normed = torch.rms_norm(x, (x.shape[-1],), weight, eps)
    return (normed * torch.nn.functional.silu(gate.float())).to(x.dtype)


def unsupported_gated(provider: str, x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor) -> str | None:
    """None when `provider` can take ``rms_norm_gated(x, gate, weight, eps)``, else a short reason."""
    reason = unsupported_hf(provider, x, weight)
    if reason is not None:
        return reason
    if gate.shape != x.shape:
        return "gate shape"
    if provider == "gems" and (gate.dtype != x.dtype or weight.dtype != x.dtype):
        return "mixed dtypes"
    return None


def reference_torch(
    x: torch.Tensor, normalized_shape, weight: torch.Tensor | None, eps: float | None
) -> torch.Tensor:
    """``F.rms_norm`` as torch 2.13 computes it: normalise the last ``len(normalized_shape)`` dims in fp32
    (x's dtype if wider), multiply by the weight in that precision, return x's dtype; eps None means the
    machine epsilon of the compute dtype (fp32's for fp16/bf16 inputs)."""
    dims = tuple(range(-len(_as_shape(normalized_shape)), 0))
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    out = h * torch.rsqrt(h.pow(2).mean(dims, keepdim=True) + _eps_or_default(eps, x.dtype))
    if weight is not None:
        out = out * weight
    return out.to(x.dtype)


def gems_torch(x: torch.Tensor, normalized_shape, weight: torch.Tensor, eps: float | None) -> torch.Tensor:
    """``reference_torch`` on FlagGems (weight required: ``unsupported_torch`` routes None away)."""
    return gems.ops().rms_norm(x, _as_shape(normalized_shape), weight, _eps_or_default(eps, x.dtype))


def unsupported_torch(provider: str, x: torch.Tensor, normalized_shape, weight: torch.Tensor | None) -> str | None:
    """None when `provider` can take ``F.rms_norm(x, normalized_shape, weight, eps)``, else a short reason."""
    if provider == "gems":
        reason = gems.tensor_reason(x)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if weight is None:
        return "no weight"
    shape = _as_shape(normalized_shape)
    if weight.shape != shape or x.shape[x.dim() - len(shape):] != shape:
        return "shape mismatch"
    return None


def _as_shape(normalized_shape) -> tuple:
    return (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)


def _eps_or_default(eps: float | None, dtype: torch.dtype) -> float:
    if eps is not None:
        return eps
    default = _default_eps.get(dtype)
    if default is None:
        default = _default_eps[dtype] = torch.finfo(torch.promote_types(dtype, torch.float32)).eps
    return default
