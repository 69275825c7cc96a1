"""Linear ops (upstream ``lightx2v/common/ops/mm/mm_weight.py``), key = ``dit_quant_scheme``.

Constructor, as models call it::

    MM_WEIGHT_REGISTER[key](weight_name, bias_name, create_cuda_buffer, create_cpu_buffer,
                            lazy_load, lazy_load_file, lora_prefix=..., lora_path=...)

``load(weight_dict)`` stores the checkpoint's ``[out, in]`` weight TRANSPOSED, as a ``.t()`` view
of shape ``[in, out]``, and the bias as is: on a non-CPU device directly in ``self.weight`` /
``self.bias``; from CPU tensors in ``self.pin_weight`` / ``self.pin_bias`` (the entries are deleted
from ``weight_dict``; ``self.weight``/``self.bias`` stay None until ``to_cuda()``).
``apply(input_tensor)`` takes a 2-D ``[tokens, in]`` input and returns
``input @ weight (+ bias) (+ LoRA branch)`` in the input's dtype.

The quantised schemes (``fp8-*``, ``int8-*``, ``mxfp*``, ``nvfp4``, ``gguf-*``, ``Calib*``, ...),
``TensorParallel``, lazy loading, offload buffers and the state-dict methods are not reproduced.
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
from lightx2v.utils.registry_factory import MM_WEIGHT_REGISTER
from lightx2v_platform.base.global_var import AI_DEVICE

__all__ = ["MMWeightTemplate", "MMWeight", "MMWeightForceFp32"]


class MMWeightTemplate(metaclass=ABCMeta):
    def __init__(
        self,
        weight_name,
        bias_name,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.create_cuda_buffer = create_cuda_buffer
        self.create_cpu_buffer = create_cpu_buffer
        self.lazy_load = lazy_load
        self.lazy_load_file = lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.config = {}
        self.lora_prefix = lora_prefix
        self.lora_path = lora_path
        self.has_lora_branch = False
        self.has_diff = False
        self.base_attrs = [(weight_name, "weight", True)]
        if bias_name is not None:
            self.base_attrs.append((bias_name, "bias", False))
        (
            self.lora_down_name,
            self.lora_up_name,
            self.lora_alpha_name,
            self.weight_diff_name,
            self.bias_diff_name,
        ) = build_lora_and_diff_names(weight_name, lora_prefix)
        self.lora_attrs = {
            "lora_alpha": "lora_alpha_name",
            "lora_down": "lora_down_name",
            "lora_up": "lora_up_name",
            "weight_diff": "weight_diff_name",
            "bias_diff": "bias_diff_name",
        }

    def _get_actual_weight(self):
        return self.weight + self.weight_diff if hasattr(self, "weight_diff") else self.weight

    def _get_actual_bias(self, bias=None):
        if bias is None:
            bias = getattr(self, "bias", None)
            if bias is None:
                return None
        return bias + self.bias_diff if hasattr(self, "bias_diff") else bias

    def apply_lora(self, input_tensor):
        """``strength * scale * (x @ lora_down.T @ lora_up.T)``."""
        hidden = torch.mm(input_tensor, self.lora_down.t())
        return self.lora_strength * self.lora_scale * torch.mm(hidden, self.lora_up.t())

    def set_config(self, config={}):  # noqa: B006  (upstream signature)
        self.config = config

    def register_diff(self, weight_dict):
        """Take this layer's ``.diff`` (transposed, like the weight) and ``.diff_b`` tensors when present."""
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.weight_diff_name in weight_dict:
            self.has_diff = True
            self.weight_diff = weight_dict[self.weight_diff_name].t()
        if self.bias_diff_name in weight_dict:
            self.has_diff = True
            self.bias_diff = weight_dict[self.bias_diff_name]

    def register_lora(self, weight_dict, lora_strength=1):
        """Take this layer's ``lora_down``/``lora_up`` (and ``alpha``) tensors and turn the LoRA branch on.

        ``lora_scale`` is ``alpha / rank`` when ``alpha`` is present, else 1.
        """
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.lora_down_name not in weight_dict:
            return
        self.has_lora_branch = True
        device = self.weight.device if getattr(self, "weight", None) is not None else AI_DEVICE
        self.lora_down = weight_dict[self.lora_down_name].to(device)
        self.lora_up = weight_dict[self.lora_up_name].to(device)
        self.lora_strength = lora_strength
        if self.lora_alpha_name in weight_dict:
            self.lora_alpha = weight_dict[self.lora_alpha_name].to(device)
            self.lora_scale = self.lora_alpha / self.lora_down.shape[0]
        else:
            self.lora_scale = torch.tensor(1.0, device=device)

    def to_cuda(self, non_blocking=False):
        move_attr_to_cuda(self, self.base_attrs, self.lora_attrs, non_blocking)

    def to_cpu(self, non_blocking=False):
        move_attr_to_cpu(self, self.base_attrs, self.lora_attrs, non_blocking)

    @abstractmethod
    def load(self, weight_dict):
        pass

    @abstractmethod
    def apply(self):
        pass


@MM_WEIGHT_REGISTER("Default")
class MMWeight(MMWeightTemplate):
    def __init__(
        self,
        weight_name,
        bias_name=None,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
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
            lora_prefix,
            lora_path,
        )

    def load(self, weight_dict):
        """Place weight (transposed) and bias; see the module docstring."""
        if self.create_cuda_buffer or self.create_cpu_buffer:
            refuse_file_loading()
        if self.lazy_load:
            return
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        self.weight = device_tensors.get("weight")
        self.bias = device_tensors.get("bias")
        self.pin_weight = pin_tensors.get("weight")
        self.pin_bias = pin_tensors.get("bias")

    def apply(self, input_tensor):
        """``addmm(bias, x, weight)`` (``mm`` without bias) into a fresh tensor of x's dtype, plus the LoRA branch.

        The weight must share x's dtype (no cast happens).
        """
        output = torch.empty(
            (input_tensor.shape[0], self.weight.shape[1]), dtype=input_tensor.dtype, device=input_tensor.device
        )
        if getattr(self, "bias", None) is not None:
            output = torch.addmm(self._get_actual_bias(), input_tensor, self._get_actual_weight(), out=output)
        else:
            output = torch.mm(input_tensor, self._get_actual_weight(), out=output)
        return output + self.apply_lora(input_tensor) if self.has_lora_branch else output


@MM_WEIGHT_REGISTER("Default-ForceFp32")
class MMWeightForceFp32(MMWeight):
    """``Default`` with weight and bias kept in float32; ``apply`` is inherited, so x must be float32 too."""

    def load(self, weight_dict):
        super().load(weight_dict)
        for name in ("weight", "bias", "pin_weight", "pin_bias"):
            tensor = getattr(self, name, None)
            if tensor is not None:
                setattr(self, name, tensor.to(torch.float32))
