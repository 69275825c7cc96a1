"""Torch versions of the CUDA-only kernels that upstream ops call. Stand-in only.

Upstream imports these from ``flash_attn`` / ``flash_attn_interface`` / ``flash_attn.cute``,
``sageattention`` / ``sageattn3``, ``sgl_kernel`` and ``flashinfer``. Each function here takes the
arguments upstream passes and returns the layout the library returns, computed exactly (no
quantisation, unlike SageAttention). Tensor layouts: ``B`` batch, ``S`` sequence, ``T`` packed
tokens, ``H`` heads, ``D`` head dim.
"""

from itertools import pairwise

import torch
import torch.nn.functional as F


def _attention(q, k, v, softmax_scale=None, causal=False):
    """``(B, Sq, H, D)`` attention over ``(B, Sk, Hk, D)`` keys/values; ``Hk`` may divide ``H`` (GQA).

    ``causal`` aligns the mask to the bottom-right corner, as flash-attn does when ``Sq != Sk``.
    The result is contiguous, as the kernels' outputs are (upstream calls ``.view`` on them).
    """
    mask = None
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2),
        k.transpose(1, 2),
        v.transpose(1, 2),
        attn_mask=mask,
        scale=softmax_scale,
        enable_gqa=True,
    )
    return out.transpose(1, 2).contiguous()


def flash_attn_func(q, k, v, softmax_scale=None, causal=False):
    """``flash_attn.flash_attn_func`` / ``flash_attn_interface.flash_attn_func``: ``(B, S, H, D)`` in and out."""
    return _attention(q, k, v, softmax_scale, causal)


def flash_attn_varlen_func(
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None, causal=False
):
    """``flash_attn_varlen_func``: packed ``(T, H, D)`` in and out, one attention per sequence.

    Sequence ``i`` is ``q[cu_seqlens_q[i]:cu_seqlens_q[i + 1]]`` against the matching ``k``/``v``
    slice of ``cu_seqlens_k``. ``max_seqlen_*`` are accepted and unused, as in the kernel's math.
    """
    sequences = zip(pairwise(cu_seqlens_q.tolist()), pairwise(cu_seqlens_k.tolist()), strict=True)
    outputs = [
        flash_attn_func(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], softmax_scale, causal)[0]
        for (q0, q1), (k0, k1) in sequences
    ]
    return torch.cat(outputs, dim=0)


def flash_attn_cute_func(q, k, v):
    """``flash_attn.cute.flash_attn_func``: ``(out, lse)`` on ``(B, S, H, D)``; the stand-in's lse is None."""
    return _attention(q, k, v), None


def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None):
    """``sageattention.sageattn``: ``NHD`` is ``(B, S, H, D)``, ``HND`` is ``(B, H, S, D)``; same layout out."""
    if tensor_layout == "HND":
        out = _attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), sm_scale, is_causal)
        return out.transpose(1, 2).contiguous()
    return _attention(q, k, v, sm_scale, is_causal)


def sageattn3_blackwell(q, k, v):
    """``sageattn3.sageattn3_blackwell``: ``(B, H, S, D)`` in and out."""
    return sageattn(q, k, v, tensor_layout="HND")


def sgl_kernel_rmsnorm(input, weight, eps, enable_pdl=False):
    """``sgl_kernel.rmsnorm`` on ``(N, D)``: float32 math, weight applied in float32, input's dtype out."""
    x = input.float()
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * weight.float()).to(input.dtype)


def apply_rope_with_cos_sin_cache_inplace(positions, query, key, head_size, cos_sin_cache, is_neox=True):
    """``flashinfer.rope.apply_rope_with_cos_sin_cache_inplace``: rotate ``query``/``key`` in place.

    ``query`` is ``(L, Hq * head_size)``, ``key`` ``(L, Hk * head_size)``. ``cos_sin_cache`` is
    ``(max_position, rotary_dim)``: cos in the first half of a row, sin in the second; token ``i``
    uses row ``positions[i]``. The first ``rotary_dim`` channels of each head rotate: in pairs
    ``(2j, 2j + 1)`` (GPT-J, interleaved) unless ``is_neox``, then ``(j, j + rotary_dim / 2)``.
    """
    rotary_dim = cos_sin_cache.shape[-1]
    cos, sin = cos_sin_cache[positions].float().unsqueeze(1).chunk(2, dim=-1)
    for packed in (query, key):
        heads = packed.view(packed.shape[0], -1, head_size)
        rot = heads[..., :rotary_dim].float()
        first, second = rot.chunk(2, dim=-1) if is_neox else (rot[..., 0::2], rot[..., 1::2])
        new_first = first * cos - second * sin
        new_second = second * cos + first * sin
        if is_neox:
            rotated = torch.cat((new_first, new_second), dim=-1)
        else:
            rotated = torch.stack((new_first, new_second), dim=-1).flatten(-2)
        heads[..., :rotary_dim] = rotated.to(packed.dtype)
