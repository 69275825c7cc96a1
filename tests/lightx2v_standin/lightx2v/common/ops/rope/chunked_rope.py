"""``chunked_rope`` (upstream ``lightx2v/common/ops/rope/chunked_rope.py``): another rope op, in chunks.

Built as ``ROPE_REGISTER["chunked_rope"](inner=rope, chunk_size=n)`` around the op of
``rope_type``; ``prepare_freqs``/``prepare_positions`` are the inner op's. Tokens past the cache
(or positions) length are returned unrotated.
"""

from __future__ import annotations

import torch

from lightx2v.utils.registry_factory import ROPE_REGISTER

from .template import RopeTemplate

__all__ = ["ChunkedRope"]


def _freq_len(freqs):
    return freqs[0].shape[0] if isinstance(freqs, tuple) else freqs.shape[0]


def _slice_freqs(freqs, start: int, end: int):
    if isinstance(freqs, tuple):
        return tuple(item[start:end] for item in freqs)
    return freqs[start:end]


@ROPE_REGISTER("chunked_rope")
class ChunkedRope(RopeTemplate):
    def __init__(self, inner: RopeTemplate, chunk_size: int):
        super().__init__(
            layout=getattr(inner, "layout", "interleaved"), compute_dtype=getattr(inner, "compute_dtype", torch.float32)
        )
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}.")
        self.inner = inner
        self.chunk_size = chunk_size

    def set_config(self, config=None):
        super().set_config(config)
        if hasattr(self.inner, "set_config"):
            self.inner.set_config(config)

    def prepare_freqs(self, freqs, rotary_dim: int | None = None):
        return self.inner.prepare_freqs(freqs, rotary_dim=rotary_dim)

    def prepare_positions(self, freqs):
        return self.inner.prepare_positions(freqs)

    def _chunks(self, seq_len, freqs, positions):
        """``(start, end, chunk_freqs, extra_kwargs)``: with positions, the whole cache plus a positions slice."""
        for start in range(0, seq_len, self.chunk_size):
            end = min(start + self.chunk_size, seq_len)
            if positions is None:
                yield start, end, _slice_freqs(freqs, start, end), {}
            else:
                yield start, end, freqs, {"positions": positions[start:end]}

    def _seq_len(self, lengths, freqs, positions):
        seq_len = min(*lengths, _freq_len(freqs))
        return seq_len if positions is None else min(seq_len, positions.shape[0])

    def apply_single(self, x: torch.Tensor, freqs, positions: torch.Tensor | None = None, **kwargs):
        seq_len = self._seq_len([x.shape[0]], freqs, positions)
        output = torch.empty_like(x)
        for start, end, chunk_freqs, extra in self._chunks(seq_len, freqs, positions):
            output[start:end] = self.inner.apply_single(x[start:end], chunk_freqs, **extra, **kwargs)
        output[seq_len:] = x[seq_len:]
        return output

    def apply(self, q: torch.Tensor, k: torch.Tensor, freqs, positions: torch.Tensor | None = None, **kwargs):
        seq_len = self._seq_len([q.shape[0], k.shape[0]], freqs, positions)
        q_out, k_out = torch.empty_like(q), torch.empty_like(k)
        for start, end, chunk_freqs, extra in self._chunks(seq_len, freqs, positions):
            q_chunk, k_chunk = self.inner.apply(q[start:end], k[start:end], chunk_freqs, **extra, **kwargs)
            q_out[start:end], k_out[start:end] = q_chunk, k_chunk
        q_out[seq_len:], k_out[seq_len:] = q[seq_len:], k[seq_len:]
        return q_out, k_out
