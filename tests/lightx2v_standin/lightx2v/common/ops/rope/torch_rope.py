"""``torch_complex_rope`` and ``torch_real_rope`` (upstream ``lightx2v/common/ops/rope/torch_rope.py``).

Both are plain torch upstream too. Neither overrides ``prepare_positions``, so the Wan model calls
``apply(q, k, freqs)`` without positions. ``torch_complex_rope`` keeps the complex ``[S, 1, D/2]``
cache as it is; ``torch_real_rope`` keeps whatever it is given (``prepare_freqs`` is the identity).
Only the first ``rotary_dim`` channels (default: all) rotate, in ``compute_dtype``; the result has
the input's dtype.
"""

from __future__ import annotations

import torch

from lightx2v.utils.registry_factory import ROPE_REGISTER

from .template import RopeTemplate, broadcast_freqs

__all__ = ["TorchComplexRope", "TorchRealRope"]


def _split_rotary(x, rotary_dim):
    if rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even, got {rotary_dim}.")
    return x[..., :rotary_dim], x[..., rotary_dim:]


def _join_rotary(rotated, passthrough):
    return torch.cat((rotated, passthrough), dim=-1) if passthrough.shape[-1] else rotated


def _pair_halves(x, layout):
    """The two members of each rotation pair, as two tensors of width ``D/2``."""
    if layout == "interleaved":
        return x[..., 0::2], x[..., 1::2]
    return x.chunk(2, dim=-1)


def _unpair_halves(first, second, layout):
    """Inverse of ``_pair_halves``."""
    if layout == "interleaved":
        return torch.stack((first, second), dim=-1).flatten(-2)
    return torch.cat((first, second), dim=-1)


@ROPE_REGISTER("torch_complex_rope")
class TorchComplexRope(RopeTemplate):
    def __init__(self, layout="interleaved", compute_dtype: torch.dtype = torch.float32):
        super().__init__(layout=layout, compute_dtype=compute_dtype)

    def prepare_freqs(self, freqs, rotary_dim: int | None = None):
        """Return a complex cache: a complex tensor unchanged, else ``cos + i*sin`` in ``compute_dtype``.

        Also accepts a real ``cat([cos, sin], -1)`` tensor of width ``rotary_dim`` or a
        ``(cos, sin)`` tuple of width ``rotary_dim / 2`` or ``rotary_dim`` (then one value per pair
        is kept, per ``layout``); both need ``rotary_dim``.
        """
        if torch.is_tensor(freqs) and torch.is_complex(freqs):
            return freqs
        if torch.is_tensor(freqs):
            if rotary_dim is None:
                raise ValueError("rotary_dim is required for real RoPE frequencies.")
            if freqs.shape[-1] != rotary_dim:
                raise ValueError(f"Concatenated cos-sin cache must have last dim {rotary_dim}, got {freqs.shape[-1]}.")
            cos, sin = freqs.chunk(2, dim=-1)
        elif isinstance(freqs, tuple):
            if len(freqs) != 2:
                raise ValueError(f"Expected a (cos, sin) tuple, got {len(freqs)} entries.")
            if rotary_dim is None:
                raise ValueError("rotary_dim is required for tuple RoPE frequencies.")
            cos, sin = freqs
            if cos.shape != sin.shape:
                raise ValueError(f"RoPE cos/sin shapes must match, got cos={cos.shape}, sin={sin.shape}.")
            if cos.shape[-1] == rotary_dim:
                cos, sin = _pair_halves(cos, self.layout)[0], _pair_halves(sin, self.layout)[0]
            elif cos.shape[-1] != rotary_dim // 2:
                raise ValueError(
                    f"RoPE frequency width must be {rotary_dim // 2} or {rotary_dim}, got {cos.shape[-1]}."
                )
        else:
            raise TypeError(f"Unsupported RoPE frequency type: {type(freqs)!r}")
        return torch.complex(cos.to(self.compute_dtype), sin.to(self.compute_dtype)).contiguous()

    def apply(self, q: torch.Tensor, k: torch.Tensor, freqs, **kwargs):
        """Rotate q and k; keywords (``rotary_dim``, ``unsqueeze_dim``) are passed to ``apply_single``."""
        freqs = self.prepare_freqs(freqs, rotary_dim=kwargs.get("rotary_dim", q.shape[-1]))
        return super().apply(q, k, freqs, **kwargs)

    def apply_single(self, x: torch.Tensor, freqs, rotary_dim: int | None = None, unsqueeze_dim: int = -2, **kwargs):
        """Multiply each channel pair, as a complex number, by the cache; extra keywords are ignored."""
        rotary_dim = x.shape[-1] if rotary_dim is None else rotary_dim
        rot, passthrough = _split_rotary(x, rotary_dim)
        freqs = self.prepare_freqs(freqs, rotary_dim=rotary_dim)
        if not torch.is_tensor(freqs) or not torch.is_complex(freqs):
            raise TypeError("TorchComplexRope expects a complex frequency tensor.")
        first, second = _pair_halves(rot.to(self.compute_dtype), self.layout)
        x_complex = torch.view_as_complex(torch.stack((first, second), dim=-1).contiguous())
        rotated = torch.view_as_real(x_complex * broadcast_freqs(freqs, x_complex, unsqueeze_dim))
        output = _unpair_halves(rotated[..., 0], rotated[..., 1], self.layout).to(x.dtype)
        return _join_rotary(output, passthrough)


@ROPE_REGISTER("torch_real_rope")
class TorchRealRope(RopeTemplate):
    def _cos_sin(self, freqs, rotary_dim: int):
        """``(cos, sin, pairwise)``: ``pairwise`` when cos/sin hold one value per pair (width ``rotary_dim / 2``)."""
        if torch.is_tensor(freqs) and torch.is_complex(freqs):
            return freqs.real, freqs.imag, True
        if isinstance(freqs, tuple):
            cos, sin = freqs
            return cos, sin, cos.shape[-1] == rotary_dim // 2
        if torch.is_tensor(freqs):
            if freqs.shape[-1] != rotary_dim:
                raise ValueError(f"Concatenated cos-sin cache must have last dim {rotary_dim}, got {freqs.shape[-1]}.")
            cos, sin = freqs.chunk(2, dim=-1)
            return cos, sin, True
        raise TypeError(f"Unsupported RoPE frequency type: {type(freqs)!r}")

    @staticmethod
    def _rotate_interleaved(x: torch.Tensor):
        first, second = x[..., 0::2], x[..., 1::2]
        return torch.stack((-second, first), dim=-1).flatten(-2)

    @staticmethod
    def _rotate_split_half(x: torch.Tensor):
        first, second = x.chunk(2, dim=-1)
        return torch.cat((-second, first), dim=-1)

    def apply_single(self, x: torch.Tensor, freqs, rotary_dim: int | None = None, unsqueeze_dim: int = -2, **kwargs):
        """Rotate with real cos/sin taken from a complex cache, a ``(cos, sin)`` tuple or a concatenated cache.

        Full-width (``rotary_dim``) cos/sin use ``x * cos + rotate(x) * sin``.
        """
        rotary_dim = rotary_dim or x.shape[-1]
        rot, passthrough = _split_rotary(x, rotary_dim)
        cos, sin, pairwise = self._cos_sin(freqs, rotary_dim)
        x_float = rot.to(self.compute_dtype)
        if pairwise:
            first, second = _pair_halves(x_float, self.layout)
            cos = broadcast_freqs(cos.to(self.compute_dtype), first, unsqueeze_dim)
            sin = broadcast_freqs(sin.to(self.compute_dtype), first, unsqueeze_dim)
            output = _unpair_halves(first * cos - second * sin, first * sin + second * cos, self.layout)
        else:
            cos = broadcast_freqs(cos.to(self.compute_dtype), x_float, unsqueeze_dim)
            sin = broadcast_freqs(sin.to(self.compute_dtype), x_float, unsqueeze_dim)
            rotate = self._rotate_interleaved if self.layout == "interleaved" else self._rotate_split_half
            output = x_float * cos + rotate(x_float) * sin
        return _join_rotary(output.to(x.dtype), passthrough)
