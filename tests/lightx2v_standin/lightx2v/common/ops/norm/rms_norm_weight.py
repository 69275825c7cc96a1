"""RMSNorm ops (upstream ``lightx2v/common/ops/norm/rms_norm_weight.py``).

Constructor, as models call it::

    RMS_WEIGHT_REGISTER[key](weight_name, create_cuda_buffer, create_cpu_buffer, lazy_load,
                             lazy_load_file, lora_prefix=..., lora_path=...)

(full signature below; ``weight_name=None`` means no affine weight). ``load(weight_dict)`` takes
``weight_dict[weight_name]``: a non-CPU tensor becomes ``self.weight``; a CPU tensor is copied to
``self.pin_weight``, deleted from ``weight_dict`` and reaches ``self.weight`` on ``to_cuda()``.
``apply(input_tensor)`` normalises over the last dim with ``self._get_actual_weight()``, which is
``self.weight + self.weight_diff`` (``weight_diff`` starts as a 0-d zero on ``AI_DEVICE``).

``self.infer_dtype``/``self.sensitive_layer_dtype`` come from ``$DTYPE``/``$SENSITIVE_LAYER_DTYPE``
and choose between float32 and input-dtype math, as upstream. The tensor-parallel keys
(``TensorParallel``, ``TensorParallelFP32``), the fused QK/3D-rope helpers, lazy loading, offload
buffers and the state-dict methods are not reproduced.
"""

from abc import ABCMeta, abstractmethod

import torch

from lightx2v.common.ops.norm.triton_ops import rms_norm_kernel
from lightx2v.common.ops.utils import (
    build_lora_and_diff_names,
    create_default_tensors,
    move_attr_to_cpu,
    move_attr_to_cuda,
    refuse_file_loading,
)
from lightx2v.common.ops.vendor_kernels import sgl_kernel_rmsnorm
from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE
from lightx2v.utils.registry_factory import RMS_WEIGHT_REGISTER
from lightx2v_platform.base.global_var import AI_DEVICE

__all__ = [
    "RMSWeightTemplate",
    "RMSWeight",
    "RMSWeightNative",
    "RMSWeightSgl",
    "RMSWeightFP32",
    "RMSWeightFP32Qwen",
    "RMSWeightSF",
    "RMSWeightOnePass",
]


def _rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


class RMSWeightTemplate(metaclass=ABCMeta):
    def __init__(
        self,
        weight_name,
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
        self.eps = eps
        self.create_cuda_buffer = create_cuda_buffer
        self.create_cpu_buffer = create_cpu_buffer
        self.lazy_load = lazy_load
        self.lazy_load_file = lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()
        self.config = {}
        self.lora_prefix = lora_prefix
        self.lora_path = lora_path
        self.has_lora_branch = False
        self.has_diff = False
        if weight_name is None:
            self.base_attrs = []
            self.weight = None
            self.weight_diff_name = None
            self.lora_attrs = {}
        else:
            self.base_attrs = [(weight_name, "weight", False)]
            self.weight_diff_name = build_lora_and_diff_names(weight_name, lora_prefix)[3]
            self.lora_attrs = {"weight_diff": "weight_diff_name"}
            self.weight_diff = torch.tensor(0.0, dtype=GET_DTYPE(), device=AI_DEVICE)

    def _get_actual_weight(self):
        """``self.weight + self.weight_diff`` (the diff moved to the weight's device/dtype), or None."""
        if self.weight is None:
            return None
        if not hasattr(self, "weight_diff"):
            return self.weight
        if self.weight_diff.device != self.weight.device or self.weight_diff.dtype != self.weight.dtype:
            self.weight_diff = self.weight_diff.to(device=self.weight.device, dtype=self.weight.dtype)
        return self.weight + self.weight_diff

    def register_diff(self, weight_dict):
        """Take ``weight_dict[self.weight_diff_name]`` as ``self.weight_diff`` when present."""
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.weight_diff_name is not None and self.weight_diff_name in weight_dict:
            self.weight_diff = weight_dict[self.weight_diff_name]

    def load(self, weight_dict):
        """Place the weight; see the module docstring. Offload buffers raise NotImplementedError."""
        if self.create_cuda_buffer or self.create_cpu_buffer:
            refuse_file_loading()
        if self.lazy_load:
            return
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        self.weight = device_tensors.get("weight")
        self.pin_weight = pin_tensors.get("weight")

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


@RMS_WEIGHT_REGISTER("torch")
class RMSWeight(RMSWeightTemplate):
    def __init__(
        self,
        weight_name,
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
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            eps,
            lora_prefix,
            lora_path,
        )

    def _norm(self, x):
        return _rms(x, self.eps)

    def apply(self, input_tensor):
        """Normalise in float32 (in the input's dtype when a sensitive-layer dtype is set), cast back, times weight."""
        if self.sensitive_layer_dtype != self.infer_dtype:
            output = self._norm(input_tensor).type_as(input_tensor)
        else:
            output = self._norm(input_tensor.float()).type_as(input_tensor)
        weight = self._get_actual_weight()
        return output if weight is None else output * weight


@RMS_WEIGHT_REGISTER("torch_native")
class RMSWeightNative(RMSWeight):
    def apply(self, input_tensor):
        """``torch.nn.functional.rms_norm`` over the last dim."""
        return torch.nn.functional.rms_norm(
            input_tensor, (input_tensor.shape[-1],), weight=self._get_actual_weight(), eps=self.eps
        )


@RMS_WEIGHT_REGISTER("sgl-kernel")
class RMSWeightSgl(RMSWeight):
    def __init__(
        self,
        weight_name,
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
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            eps,
            lora_prefix,
            lora_path,
        )
        self.enable_pdl = False

    def apply(self, input_tensor):
        """The fused kernel (float32 math, input dtype out) when there is a weight and no sensitive dtype.

        Otherwise upstream's fallback: input-dtype math (float32 variance under a sensitive dtype),
        times weight, cast to ``infer_dtype``.
        """
        weight = self._get_actual_weight()
        if weight is not None and self.sensitive_layer_dtype == self.infer_dtype:
            x = input_tensor.contiguous()
            output = sgl_kernel_rmsnorm(x.view(-1, x.shape[-1]), weight, self.eps, enable_pdl=self.enable_pdl)
            return output.view(x.shape)
        if self.sensitive_layer_dtype != self.infer_dtype:
            variance = input_tensor.float().pow(2).mean(-1, keepdim=True)
            output = input_tensor * torch.rsqrt(variance + self.eps).to(self.infer_dtype)
        else:
            output = _rms(input_tensor, self.eps)
        return output if weight is None else (output * weight).to(self.infer_dtype)


@RMS_WEIGHT_REGISTER("fp32_variance")
class RMSWeightFP32(RMSWeight):
    def apply(self, input_tensor):
        """Float32 variance; a half-precision weight casts the result to its dtype first; input dtype out."""
        input_dtype = input_tensor.dtype
        variance = input_tensor.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = input_tensor * torch.rsqrt(variance + self.eps)
        weight = self._get_actual_weight()
        if weight is not None:
            if weight.dtype in [torch.float16, torch.bfloat16]:
                hidden_states = hidden_states.to(weight.dtype)
            hidden_states = hidden_states * weight
        return hidden_states.to(input_dtype)


@RMS_WEIGHT_REGISTER("fp32_variance_qwen")
class RMSWeightFP32Qwen(RMSWeight):
    def apply(self, hidden_states):
        """Float32 normalisation cast to the input dtype, then times ``self.weight`` (no diff applied)."""
        output = _rms(hidden_states.to(torch.float32), self.eps).to(hidden_states.dtype)
        return output if self.weight is None else self.weight * output


@RMS_WEIGHT_REGISTER("self_forcing")
class RMSWeightSF(RMSWeight):
    def apply(self, x):
        """Float32 normalisation cast to the input dtype, times weight, whatever the sensitive dtype."""
        output = self._norm(x.float()).type_as(x)
        weight = self._get_actual_weight()
        return output if weight is None else output * weight


@RMS_WEIGHT_REGISTER("one-pass")
class RMSWeightOnePass(RMSWeight):
    def apply(self, input_tensor):
        """The one-pass Triton kernel (float32 math, input dtype out); ``F.rms_norm`` without a weight."""
        weight = self._get_actual_weight()
        if weight is None:
            return torch.nn.functional.rms_norm(input_tensor, (input_tensor.shape[-1],), eps=self.eps)
        return rms_norm_kernel(input_tensor, weight, self.eps)
