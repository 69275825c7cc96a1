"""3-D convolution op (upstream ``lightx2v/common/ops/conv/conv3d.py``): Wan's patch embedding.

``CONV3D_WEIGHT_REGISTER["Default"](weight_name, bias_name, stride=1, padding=0, dilation=1, groups=1,
lora_prefix=...)``; ``load`` places weight and bias as the other ops do (CPU tensors pinned until
``to_cuda``); ``apply(x)`` is ``F.conv3d`` with the diff tensors added when registered.
"""

import torch

from lightx2v.common.ops.utils import (
    build_lora_and_diff_names,
    create_default_tensors,
    move_attr_to_cpu,
    move_attr_to_cuda,
)
from lightx2v.utils.registry_factory import CONV3D_WEIGHT_REGISTER

__all__ = ["Conv3dWeight"]


@CONV3D_WEIGHT_REGISTER("Default")
class Conv3dWeight:
    def __init__(self, weight_name, bias_name, stride=1, padding=0, dilation=1, groups=1,
                 lora_prefix="diffusion_model.blocks"):
        self.weight_name, self.bias_name = weight_name, bias_name
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.config = {}
        self.lora_prefix = lora_prefix
        self.has_lora_branch = False
        self.has_diff = False
        self.base_attrs = [(weight_name, "weight", False), (bias_name, "bias", False)]
        *_, self.weight_diff_name, self.bias_diff_name = build_lora_and_diff_names(weight_name, lora_prefix)
        self.lora_attrs = {"weight_diff": "weight_diff_name", "bias_diff": "bias_diff_name"}

    def _get_actual_weight(self):
        return self.weight + self.weight_diff if hasattr(self, "weight_diff") else self.weight

    def _get_actual_bias(self):
        if getattr(self, "bias", None) is None:
            return None
        return self.bias + self.bias_diff if hasattr(self, "bias_diff") else self.bias

    def register_diff(self, weight_dict):
        if self.weight_diff_name in weight_dict:
            self.weight_diff = weight_dict[self.weight_diff_name]
        if self.bias_diff_name in weight_dict:
            self.bias_diff = weight_dict[self.bias_diff_name]

    def load(self, weight_dict):
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        self.weight, self.bias = device_tensors.get("weight"), device_tensors.get("bias")
        self.pin_weight, self.pin_bias = pin_tensors.get("weight"), pin_tensors.get("bias")

    def apply(self, input_tensor):
        return torch.nn.functional.conv3d(input_tensor, weight=self._get_actual_weight(), bias=self._get_actual_bias(),
                                          stride=self.stride, padding=self.padding, dilation=self.dilation,
                                          groups=self.groups)

    def to_cuda(self, non_blocking=False):
        move_attr_to_cuda(self, self.base_attrs, self.lora_attrs, non_blocking)

    def to_cpu(self, non_blocking=False):
        move_attr_to_cpu(self, self.base_attrs, self.lora_attrs, non_blocking)
