"""Attention: ``F.scaled_dot_product_attention`` and flash-style variable-length attention.

``gems_sdpa`` picks one of two FlagGems kernels:

- no mask (and causal only with equal query/key lengths, where top-left and bottom-right alignment agree):
  ``flash_attention_forward`` on the ``(B, S, H, D)`` view of the inputs, a free transpose of HF's layout.
  Its autotuning depends on the head dim only, so new sequence lengths cost no retuning. Its split-KV
  variant is only used where its combine step writes the output right (one-query GQA calls).
- with a mask, or causal with unequal lengths: ``scaled_dot_product_attention``, whose 5.0.2 kernel reads
  a bool mask inverted, adds a float mask after scaling scores to log2 units (so it is weighted by ln 2),
  and indexes a mask by its own strides as if it were ``(B, Hq, Sq, Skv)``. The mask is therefore
  translated first: to fp32 in log2 units (bool: 0 kept / -1e6 masked; float: ``mask * log2(e)``, clamped
  at -1e6 so that ``-inf`` and ``finfo.min`` stay finite) and expanded (stride 0, no copy) to
  ``(B, Hq, Sq, Skv)``. Its autotuning is keyed by the exact key length: each new key length costs a
  tuning run the first time on a machine (3.6 s on an H200; FlagGems caches the result on disk).

Deviation: a query row whose mask keeps no key gives zeros in torch but a finite average in FlagGems
(never NaN, so nothing spreads to other rows); such rows are padding that callers discard.

The FlagGems attention kernels have no usable autograd here (flash has none; sdpa's backward ignores the
mask): calls that need gradients are routed away.
"""

from __future__ import annotations

import math

import torch

from fl_patch.kernels import gems

FAMILY = "attention"  # routing keys of this module: "attention.<form>" (fl_patch.device.routing)

FLASH_HEAD_DIMS = frozenset({32, 64, 96, 128, 192, 256})
SDPA_HEAD_DIMS = frozenset({16, 32, 64, 128, 256})
MAX_VARLEN_HEAD_DIM = 256

# Masked calls go to the original by default: FlagGems 5.0.2 retunes its masked sdpa kernel for every new
# key length (3.6 s each on an H200, cached on disk afterwards), which stalls padded generation at every
# step the first time. The translated-mask path below is correct (tests/gpu) and is used when this is True.
ROUTE_MASKS_TO_GEMS = False

_LOG2E = 1.4426950408889634
# A masked score in FlagGems' log2 units: exp2 of it next to any kept score is exactly 0.
_MASKED_LOG2 = -1.0e6


def reference_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` semantics by explicit math in fp32 on ``(..., H, S, D)``.

    bool mask: True = attend; float mask: added to the scaled scores; ``is_causal``: top-left aligned
    (query i sees keys j <= i), combined with a mask if both are given; ``enable_gqa``: key/value heads
    shared by ``Hq // Hkv`` consecutive query heads; a row that attends to nothing gives zeros (torch's
    safe softmax). No dropout: ``unsupported_sdpa`` routes ``dropout_p > 0`` away.
    """
    if dropout_p:
        raise ValueError("reference_sdpa has no dropout; unsupported_sdpa routes dropout_p > 0 away")
    q_len, kv_len = query.shape[-2], key.shape[-2]
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        groups = query.shape[-3] // key.shape[-3]
        key = key.repeat_interleave(groups, dim=-3)
        value = value.repeat_interleave(groups, dim=-3)
    scores = torch.matmul(query.float(), key.float().transpose(-2, -1)) * scale
    if is_causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask.float()
    return _safe_softmax_times(scores, value.float()).to(query.dtype)


def _safe_softmax_times(scores: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    probs = torch.softmax(scores, dim=-1)
    probs = probs.masked_fill(torch.isneginf(scores).all(dim=-1, keepdim=True), 0.0)
    return torch.matmul(probs, value)


def gems_sdpa(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``reference_sdpa`` on FlagGems for ``(B, H, S, D)`` inputs that ``unsupported_sdpa`` accepts."""
    flag_gems = gems.ops()
    q_len, kv_len, head_dim = query.shape[2], key.shape[2], query.shape[3]
    if _takes_flash(attn_mask, is_causal, q_len, kv_len, head_dim):
        out = flag_gems.flash_attention_forward(
            _flash_layout(query), _flash_layout(key), _flash_layout(value),
            None, None, q_len, kv_len, 0.0, is_causal, False, scale=scale,
            disable_splitkv=not _split_kv_combines_right(q_len, query.shape[1], key.shape[1]),
        )[0]
        return out.transpose(1, 2)
    if attn_mask is not None:
        attn_mask = _kernel_mask(attn_mask, query, key)
    return flag_gems.scaled_dot_product_attention(query, key, value, attn_mask, 0.0, is_causal, scale, enable_gqa)


def _takes_flash(attn_mask, is_causal: bool, q_len: int, kv_len: int, head_dim: int) -> bool:
    return attn_mask is None and (not is_causal or q_len == kv_len) and head_dim in FLASH_HEAD_DIMS


def _split_kv_combines_right(q_len: int, q_heads: int, kv_heads: int) -> bool:
    """Whether FlagGems 5.0.2's split-KV path may be used.

    Its combine step writes rows in (batch, head, query) order at a row stride of the head dim, which
    is the output's layout only for one-query GQA calls (which it regroups into that layout); for any
    other call it scrambles the output (seen on GPU: NaN and wrong values), so split-KV is turned off.
    """
    return q_len == 1 and q_heads > kv_heads


def _flash_layout(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, S, D)`` -> ``(B, S, H, D)`` view; the flash kernel needs only the last dim contiguous."""
    x = x.transpose(1, 2)
    return x if x.stride(-1) == 1 else x.contiguous()


def _kernel_mask(attn_mask: torch.Tensor, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    """The additive fp32 mask in log2 units that FlagGems' sdpa kernel reads right, expanded to
    ``(B, Hq, Sq, Skv)`` with stride 0 on broadcast dims."""
    if attn_mask.dtype == torch.bool:
        mask = torch.where(attn_mask, 0.0, _MASKED_LOG2)
    else:
        mask = attn_mask.to(torch.float32) * _LOG2E
        mask.clamp_(min=_MASKED_LOG2)
    return mask.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])


def unsupported_sdpa(
    provider: str,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    is_causal: bool,
    scale: float | None,
    enable_gqa: bool,
) -> str | None:
    """None when `provider` can take this ``F.scaled_dot_product_attention`` call, else a short reason.

    Both providers: no dropout; 4-D q, k, v with one batch size, ``value.shape == key.shape``; unequal
    head counts only with ``enable_gqa`` and ``Hq % Hkv == 0``; bool or float masks, not together with
    ``is_causal``; head dim 32/64/96/128/192/256 (unmasked; causal only with equal lengths) or
    16/32/64/128/256 (masked, or causal with unequal lengths); scale not 0.
    gems also: no mask (see ROUTE_MASKS_TO_GEMS), device, fp16/bf16, one dtype for q, k, v, no autograd,
    no empty tensors.
    """
    if provider == "gems":
        reason = gems.tensor_reason(query) or gems.tensor_reason(key)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if dropout_p:
        return "dropout"
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return "not 4-d"
    q_shape, k_shape = query.shape, key.shape
    if value.shape != k_shape:
        return "value shape"
    if k_shape[0] != q_shape[0]:
        return "batch mismatch"
    if k_shape[3] != q_shape[3]:
        return "head dim mismatch"
    if k_shape[1] != q_shape[1] and (not enable_gqa or q_shape[1] % k_shape[1]):
        return "head count mismatch"
    if attn_mask is not None:
        if is_causal:
            return "causal with mask"
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            return "mask dtype"
    head_dim = q_shape[3]
    if not _takes_flash(attn_mask, is_causal, q_shape[2], k_shape[2], head_dim) and head_dim not in SDPA_HEAD_DIMS:
        return f"head dim {head_dim}"
    if scale is not None and not scale:
        return "zero scale"
    if provider == "gems":
        if attn_mask is not None and not ROUTE_MASKS_TO_GEMS:
            return "attn mask"
        if key.dtype != query.dtype or value.dtype != query.dtype:
            return "mixed dtypes"
        if torch.is_grad_enabled() and (
            query.requires_grad
            or key.requires_grad
            or value.requires_grad
            or (attn_mask is not None and attn_mask.requires_grad)
        ):
            return "requires grad"
    return None


def reference_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_kv: int,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """flash-attn's ``flash_attn_varlen_func`` semantics by explicit math in fp32 (reads the cumulative
    lengths on the host; ``max_seqlen_*`` are not needed).

    q ``(Tq, Hq, D)``, k/v ``(Tkv, Hkv, D)`` with ``Hq % Hkv == 0`` (query head h uses kv head
    ``h // (Hq // Hkv)``); sequence i is rows ``cu[i]:cu[i+1]``. ``causal`` is bottom-right aligned
    (query i of a sequence sees keys j <= i + Lkv - Lq); a query that sees no key gives zeros.
    Returns ``(Tq, Hq, D)`` in q's dtype.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    groups = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    bounds_q, bounds_kv = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    for i in range(len(bounds_q) - 1):
        q_start, q_end, kv_start, kv_end = bounds_q[i], bounds_q[i + 1], bounds_kv[i], bounds_kv[i + 1]
        q_seq = q[q_start:q_end].transpose(0, 1).float()
        k_seq = k[kv_start:kv_end].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        v_seq = v[kv_start:kv_end].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        scores = torch.matmul(q_seq, k_seq.transpose(-2, -1)) * scale
        if causal:
            q_len, kv_len = q_end - q_start, kv_end - kv_start
            keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
            scores = scores.masked_fill(~keep, float("-inf"))
        out[q_start:q_end] = _safe_softmax_times(scores, v_seq).transpose(0, 1).to(q.dtype)
    return out


def gems_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_kv: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_kv: int,
    causal: bool = False,
    softmax_scale: float | None = None,
) -> torch.Tensor:
    """``reference_varlen`` on FlagGems' ``flash_attn_varlen_func`` (cumulative lengths as int32)."""
    return gems.ops().flash_attn_varlen_func(
        q, k, v, max_seqlen_q, cu_seqlens_q.to(torch.int32), max_seqlen_kv,
        cu_seqlens_k=cu_seqlens_kv.to(torch.int32), softmax_scale=softmax_scale, causal=causal,
    )


def unsupported_varlen(
    provider: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, softmax_scale: float | None
) -> str | None:
    """None when `provider` can take this varlen call, else a short reason.

    Both providers: 3-D q, k, v with ``v.shape == k.shape``, ``Hq % Hkv == 0``, one head dim, a multiple
    of 32 up to 256. gems also: device, fp16/bf16, one dtype, no autograd, no empty tensors.
    """
    if provider == "gems":
        reason = gems.tensor_reason(q) or gems.tensor_reason(k)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if q.dim() != 3 or k.dim() != 3 or v.shape != k.shape:
        return "shape"
    q_shape, k_shape = q.shape, k.shape
    if k_shape[2] != q_shape[2]:
        return "head dim mismatch"
    if k_shape[1] == 0 or q_shape[1] % k_shape[1]:
        return "head count mismatch"
    head_dim = q_shape[2]
    if head_dim % 32 or head_dim > MAX_VARLEN_HEAD_DIM:
        return f"head dim {head_dim}"
    if provider == "gems":
        if k.dtype != q.dtype or v.dtype != q.dtype:
            return "mixed dtypes"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return "requires grad"
    return None
