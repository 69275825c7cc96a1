"""Base class for chip rope ops (upstream ``lightx2v_platform/ops/rope/rope_template.py``).

Subclasses implement ``apply(xq, xk, cos_sin_cache)``. ``prepare_freqs`` is the identity and
``prepare_positions`` returns None, so with a subclass that keeps them the Wan model passes its
complex ``[S, 1, D/2]`` cache unchanged and no ``positions`` keyword.
"""

# ruff: noqa: B027  (the non-abstract no-op hooks are deliberate, as upstream)

import os
from abc import ABCMeta, abstractmethod
from functools import lru_cache

import torch

DTYPE_MAP = {
    "BF16": torch.bfloat16,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "torch.bfloat16": torch.bfloat16,
    "torch.float16": torch.float16,
    "torch.float32": torch.float32,
}


@lru_cache(maxsize=None)
def GET_DTYPE():
    """``$DTYPE`` (``BF16`` by default; only ``BF16``/``FP16`` are accepted) as a torch dtype."""
    name = os.getenv("DTYPE", "BF16")
    assert name in ["BF16", "FP16"]
    return DTYPE_MAP[name]


class RopeTemplate(metaclass=ABCMeta):
    def __init__(self, layout="interleaved", compute_dtype=torch.float32):
        if layout not in {"interleaved", "split_half"}:
            raise ValueError(f"Unsupported RoPE layout: {layout}")
        self.layout = layout
        self.compute_dtype = compute_dtype
        self.infer_dtype = GET_DTYPE()
        self.config = {}

    @abstractmethod
    def apply(self, xq: torch.Tensor, xk: torch.Tensor, cos_sin_cache: torch.Tensor):
        """Return ``(xq, xk)`` with the rotary embedding applied."""

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

    def prepare_freqs(self, freqs, rotary_dim=None):
        return freqs

    def prepare_positions(self, freqs):
        return None

    def apply_single(self, x: torch.Tensor, freqs, **kwargs):
        output, _ = self.apply(x, x.clone(), freqs, **kwargs)
        return output
