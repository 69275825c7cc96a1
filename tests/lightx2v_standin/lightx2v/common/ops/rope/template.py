"""Base class of the framework rope ops (upstream ``lightx2v/common/ops/rope/template.py``).

Constructor: ``ROPE_REGISTER[key](layout="interleaved", compute_dtype=torch.float32)`` (the Wan
model's call). ``layout`` is ``"interleaved"`` (channel pairs ``(2j, 2j + 1)``) or ``"split_half"``
(pairs ``(j, j + D/2)``).

How a model drives an op: once per shape it calls ``prepare_freqs(cache, rotary_dim=head_dim)`` on
its complex ``[S, 1, D/2]`` cache (``cos + i*sin``) and ``prepare_positions(prepared)``; then per
layer ``apply(q, k, prepared)`` when the positions are None, else
``apply(q, k, prepared, positions=positions)``; q/k are ``[S, H, D]``.
"""

from __future__ import annotations

from typing import Literal

import torch

RopeLayout = Literal["interleaved", "split_half"]


class RopeTemplate:
    def __init__(self, layout: RopeLayout = "interleaved", compute_dtype: torch.dtype = torch.float32):
        if layout not in {"interleaved", "split_half"}:
            raise ValueError(f"Unsupported RoPE layout: {layout}")
        self.layout = layout
        self.compute_dtype = compute_dtype
        self.config = {}

    def set_config(self, config=None):
        if config is not None:
            self.config = config

    def load(self, weight_dict):
        """Rope has no weights: a no-op."""

    def to_cpu(self, non_blocking=False):
        pass

    def to_cuda(self, non_blocking=False):
        pass

    def state_dict(self, destination=None):
        return {} if destination is None else destination

    def load_state_dict(self, destination, block_index, adapter_block_index=None):
        return {} if destination is None else destination

    def load_state_dict_from_disk(self, block_index, adapter_block_index=None):
        pass

    def named_parameters(self, prefix=""):
        return iter(())

    def prepare_freqs(self, freqs, rotary_dim: int | None = None):
        """Convert the model's cache to this op's format; the identity here."""
        return freqs

    def prepare_positions(self, freqs):
        """Positions for ``apply(..., positions=...)``; None here (the model then passes none)."""
        return None

    def apply_single(self, x: torch.Tensor, freqs, **kwargs) -> torch.Tensor:
        raise NotImplementedError

    def apply(self, q: torch.Tensor, k: torch.Tensor, freqs, **kwargs):
        """``(apply_single(q), apply_single(k))`` with the same arguments."""
        return self.apply_single(q, freqs, **kwargs), self.apply_single(k, freqs, **kwargs)


def broadcast_freqs(freqs: torch.Tensor, target: torch.Tensor, unsqueeze_dim: int = -2):
    """Unsqueeze ``freqs`` at ``unsqueeze_dim`` until it has ``target``'s number of dims."""
    while freqs.ndim < target.ndim:
        freqs = freqs.unsqueeze(unsqueeze_dim)
    return freqs
