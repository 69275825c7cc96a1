"""``flash_attn2``, ``flash_attn3`` and ``flash_attn4`` (upstream ``lightx2v/common/ops/attn/flash_attn.py``).

``apply`` looks the kernels up as module globals at call time, as upstream, where they come from
``flash_attn`` (v2), ``flash_attn_interface`` (v3) and ``flash_attn.cute`` (v4); here they are the
torch versions in ``vendor_kernels``. Upstream's ``apply_with_lse`` (used by ring attention) and
the sparse ``spas_flash_attn4`` are not reproduced.
"""

from lightx2v.common.ops import vendor_kernels
from lightx2v.utils.registry_factory import ATTN_WEIGHT_REGISTER

from .template import AttnWeightTemplate

__all__ = ["FlashAttn2Weight", "FlashAttn3Weight", "FlashAttn4Weight"]

flash_attn_func_v2 = vendor_kernels.flash_attn_func
flash_attn_varlen_func_v2 = vendor_kernels.flash_attn_varlen_func
flash_attn_func_v3 = vendor_kernels.flash_attn_func
flash_attn_varlen_func_v3 = vendor_kernels.flash_attn_varlen_func
flash_attn_func_v4 = vendor_kernels.flash_attn_cute_func


def _dense_or_varlen(dense_fn, varlen_fn, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, kwargs):
    """Upstream's flash_attn2/3 dispatch; returns ``(B * max_seqlen_q, H * D)``.

    A 3-D ``(T, H, D)`` input, or a 4-D one with ``B == 1``, is ONE sequence: the dense kernel runs
    on all of it and ``cu_seqlens_*`` are ignored (``T`` must equal ``max_seqlen_q``). Only a 4-D
    input with ``B > 1`` is flattened and split by ``cu_seqlens_*`` (the varlen kernel). Reads
    ``causal`` and ``softmax_scale`` from ``kwargs``; other keywords are ignored.
    """
    causal = kwargs.get("causal", False)
    softmax_scale = kwargs.get("softmax_scale", None)
    bs = 1 if q.ndim == 3 else q.shape[0]
    total_seqlen = bs * max_seqlen_q
    if bs == 1:
        if q.ndim == 3:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        return dense_fn(q, k, v, softmax_scale=softmax_scale, causal=causal).reshape(total_seqlen, -1)
    q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    out = varlen_fn(
        q,
        k,
        v,
        cu_seqlens_q.to(q.device),
        cu_seqlens_kv.to(k.device),
        max_seqlen_q,
        max_seqlen_kv,
        softmax_scale=softmax_scale,
        causal=causal,
    )
    return out.reshape(total_seqlen, -1)


@ATTN_WEIGHT_REGISTER("flash_attn2")
class FlashAttn2Weight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        kernels = flash_attn_func_v2, flash_attn_varlen_func_v2
        return _dense_or_varlen(*kernels, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, kwargs)


@ATTN_WEIGHT_REGISTER("flash_attn3")
class FlashAttn3Weight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        kernels = flash_attn_func_v3, flash_attn_varlen_func_v3
        return _dense_or_varlen(*kernels, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, kwargs)


@ATTN_WEIGHT_REGISTER("flash_attn4")
class FlashAttn4Weight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        """One sequence only (asserts ``B == 1``); ignores ``cu_seqlens_*`` and every keyword."""
        if q.ndim == 3:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        bs = q.shape[0]
        assert bs == 1, (
            "flash_attn4 doesn't support flash_attn_varlen_func now. Just use it for batchsize = 1 for sure."
        )
        x, _ = flash_attn_func_v4(q, k, v)
        return x.reshape(bs * max_seqlen_q, -1)
