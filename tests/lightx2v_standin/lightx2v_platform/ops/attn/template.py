"""Base class for chip attention ops (upstream ``lightx2v_platform/ops/attn/template.py``).

Concrete classes override ``__init__(self)`` without arguments and implement
``apply(q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs)``.
"""

# ruff: noqa: B027  (the non-abstract no-op hooks are deliberate, as upstream)

from abc import ABCMeta, abstractmethod


class AttnWeightTemplate(metaclass=ABCMeta):
    def __init__(self, weight_name):
        self.weight_name = weight_name
        self.config = {}

    def load(self, weight_dict):
        """Attention has no weights: a no-op."""

    @abstractmethod
    def apply(self, input_tensor):
        pass

    def set_config(self, config=None):
        if config is not None:
            self.config = config

    def to_cpu(self, non_blocking=False):
        pass

    def to_cuda(self, non_blocking=False):
        pass

    def state_dict(self, destination=None):
        return {} if destination is None else destination

    # "adapter_block_inde" is upstream's spelling in this template.
    def load_state_dict(self, destination, block_index, adapter_block_inde=None):
        return {}
