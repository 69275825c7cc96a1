"""LayerNorm ops (upstream ``lightx2v/common/ops/norm/layer_norm_weight.py``).

Constructor, as models call it: ``LN_WEIGHT_REGISTER[key]()`` (no affine parameters) or
``LN_WEIGHT_REGISTER[key](weight_name, bias_name, create_cuda_buffer, create_cpu_buffer, lazy_load,
lazy_load_file, lora_prefix=..., lora_path=...)``. ``load(weight_dict)`` places ``self.weight`` and
``self.bias`` as the RMSNorm ops do (CPU tensors go to ``pin_weight``/``pin_bias`` until
``to_cuda()``). ``apply(input_tensor)`` normalises over the last dim.

Both registered classes are named ``LNWeight``, as upstream: the module attribute ``LNWeight`` is
the ``"Triton"`` one; the ``"torch"`` class is reachable only through ``LN_WEIGHT_REGISTER``.
Lazy loading, offload buffers and the state-dict methods are not reproduced.
"""

from abc import ABCMeta, abstractmethod

import torch

from lightx2v.common.ops.utils import (
    build_lora_and_diff_names,
    create_default_tensors,
    move_attr_to_cpu,
    move_attr_to_cuda,
    refuse_file_loading,
)
from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE
from lightx2v.utils.registry_factory import LN_WEIGHT_REGISTER

from .triton_ops import norm_infer

__all__ = ["LNWeightTemplate", "LNWeight"]


class LNWeightTemplate(metaclass=ABCMeta):
    def __init__(
        self,
        weight_name=None,
        bias_name=None,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        eps=1e-6,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.eps = eps
        self.create_cuda_buffer = create_cuda_buffer
        self.create_cpu_buffer = create_cpu_buffer
        self.lazy_load = lazy_load
        self.lazy_load_file = lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.config = {}
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()
        self.lora_prefix = lora_prefix
        self.lora_path = lora_path
        self.has_lora_branch = False
        self.has_diff = False
        self.base_attrs = []
        if weight_name is None:
            self.weight = None
        else:
            self.base_attrs.append((weight_name, "weight", False))
        if bias_name is None:
            self.bias = None
        else:
            self.base_attrs.append((bias_name, "bias", False))
        if weight_name is None:
            self.weight_diff_name = self.bias_diff_name = None
            self.lora_attrs = {}
        else:
            *_, self.weight_diff_name, self.bias_diff_name = build_lora_and_diff_names(weight_name, lora_prefix)
            self.lora_attrs = {"weight_diff": "weight_diff_name", "bias_diff": "bias_diff_name"}

    def _get_actual_weight(self):
        if self.weight is None:
            return None
        return self.weight + self.weight_diff if hasattr(self, "weight_diff") else self.weight

    def _get_actual_bias(self):
        if self.bias is None:
            return None
        return self.bias + self.bias_diff if hasattr(self, "bias_diff") else self.bias

    def load(self, weight_dict):
        """Place weight and bias; see the module docstring. Offload buffers raise NotImplementedError."""
        if self.create_cuda_buffer or self.create_cpu_buffer:
            refuse_file_loading()
        if self.lazy_load:
            return
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        self.weight = device_tensors.get("weight")
        self.bias = device_tensors.get("bias")
        self.pin_weight = pin_tensors.get("weight")
        self.pin_bias = pin_tensors.get("bias")

    def register_diff(self, weight_dict):
        """Take ``weight_dict``'s ``.diff``/``.diff_b`` tensors for this norm as ``weight_diff``/``bias_diff``."""
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.weight_diff_name is not None and self.weight_diff_name in weight_dict:
            self.weight_diff = weight_dict[self.weight_diff_name]
            self.has_diff = True
        if self.bias_diff_name is not None and self.bias_diff_name in weight_dict:
            self.bias_diff = weight_dict[self.bias_diff_name]
            self.has_diff = True

    def set_config(self, config=None):
        if config is not None:
            self.config = config

    def to_cuda(self, non_blocking=False):
        move_attr_to_cuda(self, self.base_attrs, self.lora_attrs, non_blocking)

    def to_cpu(self, non_blocking=False):
        move_attr_to_cpu(self, self.base_attrs, self.lora_attrs, non_blocking)

    @abstractmethod
    def apply(self, input_tensor):
        pass


@LN_WEIGHT_REGISTER("torch")
class LNWeight(LNWeightTemplate):
    def __init__(
        self,
        weight_name=None,
        bias_name=None,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        eps=1e-6,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            eps,
            lora_prefix,
            lora_path,
        )

    def apply(self, input_tensor):
        """``F.layer_norm`` in the input's dtype; in float32 then ``infer_dtype`` under a sensitive dtype."""
        x = input_tensor.float() if self.sensitive_layer_dtype != self.infer_dtype else input_tensor
        output = torch.nn.functional.layer_norm(
            x, (input_tensor.shape[-1],), self._get_actual_weight(), self._get_actual_bias(), self.eps
        )
        return output.to(self.infer_dtype) if self.sensitive_layer_dtype != self.infer_dtype else output


@LN_WEIGHT_REGISTER("Triton")
class LNWeight(LNWeightTemplate):  # noqa: F811  (upstream reuses the name; this one wins the module attribute)
    def __init__(
        self,
        weight_name=None,
        bias_name=None,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        eps=1e-6,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            eps,
            lora_prefix,
            lora_path,
        )

    def apply(self, input_tensor):
        """The Triton kernel: float32 math, input dtype out; 2-D ``(M, N)`` input only."""
        return norm_infer(input_tensor, self._get_actual_weight(), self._get_actual_bias(), self.eps)
