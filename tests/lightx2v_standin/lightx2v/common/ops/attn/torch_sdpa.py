"""``torch_sdpa`` (upstream ``lightx2v/common/ops/attn/torch_sdpa.py``).

Note the signature: the fourth positional parameter is ``drop_rate``, not ``cu_seqlens_q``
(models pass everything after ``v`` by keyword). A 3-D input is one sequence; ``cu_seqlens_*``
and ``max_seqlen_*`` are ignored. Upstream's ``model_cls == "hunyuan3d"`` switch to the flash SDPA
backend (a CUDA backend choice, same math) is not reproduced.
"""

import torch
import torch.nn.functional as F

from lightx2v.utils.registry_factory import ATTN_WEIGHT_REGISTER

from .template import AttnWeightTemplate

__all__ = ["TorchSDPAWeight"]


@ATTN_WEIGHT_REGISTER("torch_sdpa")
class TorchSDPAWeight(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(
        self,
        q,
        k,
        v,
        drop_rate=0,
        attn_mask=None,
        causal=False,
        cu_seqlens_q=None,
        cu_seqlens_kv=None,
        max_seqlen_q=None,
        max_seqlen_kv=None,
        **kwargs,
    ):
        """Return ``(S, H * D)`` for a 3-D or ``B == 1`` input, else ``(B, S, H * D)``.

        A non-boolean ``attn_mask`` is cast to q's dtype and added to the scores.
        """
        if q.ndim == 3:
            q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        if attn_mask is not None and attn_mask.dtype != torch.bool:
            attn_mask = attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=attn_mask,
            dropout_p=drop_rate,
            is_causal=causal,
        )
        b, _, s, _ = x.shape
        return x.transpose(1, 2).reshape(b, s, -1).squeeze(0)
