"""``flashinfer_rope``, the Wan default (upstream ``lightx2v/common/ops/rope/flashinfer_rope.py``).

``prepare_freqs`` turns the complex ``[S, 1, D/2]`` cache into flashinfer's real ``[S, D]``
cos/sin cache (``cat([cos, sin], -1)``, float32) and ``prepare_positions`` gives ``arange(S)``, so
the Wan model calls ``apply(q, k, cos_sin_cache, positions=positions)`` with the prepared cache.
The kernel rotates in place: when q/k are contiguous, ``apply`` overwrites them and returns views
of them. The stand-in kernel is ``vendor_kernels.apply_rope_with_cos_sin_cache_inplace``, looked
up as a module global at call time as upstream's flashinfer import is.
"""

from __future__ import annotations

import torch

from lightx2v.common.ops import vendor_kernels
from lightx2v.utils.registry_factory import ROPE_REGISTER

from .template import RopeTemplate

__all__ = ["FlashInferRope"]

apply_rope_with_cos_sin_cache_inplace = vendor_kernels.apply_rope_with_cos_sin_cache_inplace


@ROPE_REGISTER("flashinfer_rope")
class FlashInferRope(RopeTemplate):
    @staticmethod
    def is_available():
        return apply_rope_with_cos_sin_cache_inplace is not None

    def prepare_freqs(self, freqs, rotary_dim: int | None = None):
        """Return a float32 ``[S, rotary_dim]`` cache: cos in the first half of a row, sin in the second.

        Accepts the complex cache (size-1 dims before the last are squeezed), a ``(cos, sin)`` tuple
        of width ``rotary_dim / 2`` or ``rotary_dim`` (then the pair's first element is kept, per
        ``layout``; needs ``rotary_dim``), or an already prepared real tensor (returned as float32).
        """
        if torch.is_tensor(freqs) and torch.is_complex(freqs):
            while freqs.ndim > 2 and freqs.shape[-2] == 1:
                freqs = freqs.squeeze(-2)
            return torch.cat([freqs.real, freqs.imag], dim=-1).float().contiguous()
        if isinstance(freqs, tuple):
            cos, sin = freqs[:2]
            if rotary_dim is None:
                raise ValueError("rotary_dim is required for tuple RoPE frequencies.")
            if cos.shape[-1] == rotary_dim:
                keep = slice(None, None, 2) if self.layout == "interleaved" else slice(None, rotary_dim // 2)
                cos, sin = cos[..., keep], sin[..., keep]
            elif cos.shape[-1] != rotary_dim // 2:
                raise ValueError(
                    f"RoPE frequency width must be {rotary_dim // 2} or {rotary_dim}, got {cos.shape[-1]}."
                )
            while cos.ndim > 2 and cos.shape[0] == 1:
                cos, sin = cos.squeeze(0), sin.squeeze(0)
            return torch.cat([cos, sin], dim=-1).float().contiguous()
        if torch.is_tensor(freqs):
            return freqs.float().contiguous()
        raise TypeError(f"Unsupported RoPE frequency type: {type(freqs)!r}")

    def prepare_positions(self, freqs):
        return torch.arange(freqs.shape[0], device=freqs.device, dtype=torch.long)

    def _apply_eager(self, q, k, freqs, positions=None):
        if q.ndim != 3 or k.ndim != 3:
            raise ValueError(f"FlashInferRope expects [L, H, D] tensors, got q={q.shape}, k={k.shape}.")
        length, q_heads, head_dim = q.shape
        if positions is None:
            positions = torch.arange(length, device=q.device, dtype=torch.long)
        query = q.reshape(length, q_heads * head_dim).contiguous()
        key = k.reshape(length, k.shape[1] * head_dim).contiguous()
        apply_rope_with_cos_sin_cache_inplace(
            positions=positions,
            query=query,
            key=key,
            head_size=head_dim,
            cos_sin_cache=freqs,
            is_neox=self.layout == "split_half",
        )
        return query.view_as(q), key.view_as(k)

    def apply(self, q: torch.Tensor, k: torch.Tensor, freqs, positions: torch.Tensor | None = None, **kwargs):
        """Rotate ``[L, H, D]`` (or ``[1, L, H, D]``) q/k; ``positions[i]`` picks token i's cache row.

        ``freqs`` may be the raw complex cache or the prepared one (``prepare_freqs`` runs again).
        Other keywords are ignored.
        """
        squeeze_batch = q.ndim == 4 and q.shape[0] == 1 and k.ndim == 4 and k.shape[0] == 1
        if squeeze_batch:
            q, k = q[0], k[0]
        freqs = self.prepare_freqs(freqs, rotary_dim=q.shape[-1])
        q_out, k_out = self._apply_eager(q, k, freqs, positions=positions)
        if squeeze_batch:
            return q_out.unsqueeze(0), k_out.unsqueeze(0)
        return q_out, k_out

    def apply_single(self, x: torch.Tensor, freqs, **kwargs):
        output, _ = self.apply(x, x.clone(), freqs, **kwargs)
        return output
