"""Base class of the framework attention ops (upstream ``lightx2v/common/ops/attn/template.py``).

Registered subclasses override ``__init__(self)`` with no arguments (models build them as
``ATTN_WEIGHT_REGISTER[key]()``) and implement ``apply`` on ``(T, H, D)`` or ``(B, S, H, D)``
tensors, returning ``(B * S, H * D)``.
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

    def load_state_dict(self, destination, block_index, adapter_block_index=None):
        return {}

    def load_state_dict_from_disk(self, block_index, adapter_block_index=None):
        pass
