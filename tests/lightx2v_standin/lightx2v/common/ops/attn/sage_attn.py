"""``sage_attn2`` and ``sage_attn3`` (upstream ``lightx2v/common/ops/attn/sage_attn.py``).

Upstream's SageAttention kernels quantise q/k (int8) and v; the stand-in's ``sageattn`` and
``sageattn3_blackwell`` compute exact attention. Both ops treat a 3-D input as one sequence and
ignore ``cu_seqlens_*`` and all keywords (no ``causal``/``softmax_scale``). The sparse and
fp8-KV variants (``spas_sage_attn2``, ``spas_sage_attn3``, ``sage_attn2_k_int8_v_fp8``) and
``apply_with_lse`` are not reproduced.
"""

from lightx2v.common.ops import vendor_kernels
from lightx2v.utils.registry_factory import ATTN_WEIGHT_REGISTER

from .template import AttnWeightTemplate

__all__ = ["SageAttn2Weight", "SageAttn3Weight"]

sageattn = vendor_kernels.sageattn
sageattn3_blackwell = vendor_kernels.sageattn3_blackwell


def _batched(q, k, v, max_seqlen_q):
    """Contiguous ``(B, S, H, D)`` q/k/v, ``B`` and ``max_seqlen_q`` (default ``S``)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if q.ndim == 3:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    if max_seqlen_q is None:
        max_seqlen_q = q.shape[-3]
    return q, k, v, q.shape[0], max_seqlen_q


@ATTN_WEIGHT_REGISTER("sage_attn2")
class SageAttn2Weight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        q, k, v, bs, max_seqlen_q = _batched(q, k, v, max_seqlen_q)
        return sageattn(q, k, v, tensor_layout="NHD").view(bs * max_seqlen_q, -1)


@ATTN_WEIGHT_REGISTER("sage_attn3")
class SageAttn3Weight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        q, k, v, bs, max_seqlen_q = _batched(q, k, v, max_seqlen_q)
        out = sageattn3_blackwell(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).reshape(bs * max_seqlen_q, -1)
