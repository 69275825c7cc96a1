"""Base classes for chip norm ops (upstream ``lightx2v_platform/ops/norm/norm_template.py``).

Simpler than ``lightx2v.common.ops.norm``: no LoRA/diff tensors, and CPU weights are always
copied into pinned memory (``pin_memory=True`` without a fallback, so on a machine without an
accelerator ``load`` raises, as upstream does). Holds its own ``GET_DTYPE``/``GET_SENSITIVE_DTYPE``
copies, as upstream.

``load(weight_dict)``: device tensors become ``self.weight``/``self.bias``; CPU tensors become
``self.pin_weight``/``self.pin_bias`` (``weight_dict[weight_name]`` is deleted) and reach
``self.weight``/``self.bias`` on ``to_cuda()``. Lazy loading and offload buffers are not reproduced.
"""

import os
from abc import ABCMeta, abstractmethod
from functools import lru_cache

import torch

from lightx2v_platform.base.global_var import AI_DEVICE

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


@lru_cache(maxsize=None)
def GET_SENSITIVE_DTYPE():
    """``$SENSITIVE_LAYER_DTYPE`` as a torch dtype, or ``GET_DTYPE()`` when unset/``None``."""
    name = os.getenv("SENSITIVE_LAYER_DTYPE", "None")
    return GET_DTYPE() if name == "None" else DTYPE_MAP[name]


def _pinned_copy(tensor):
    pinned = torch.empty(tensor.shape, pin_memory=True, dtype=tensor.dtype)
    return pinned.copy_(tensor)


def _refuse_file_loading():
    raise NotImplementedError("the stand-in does not reproduce lazy loading or offload buffers")


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
        lora_prefix="",
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

    def load(self, weight_dict):
        if self.create_cuda_buffer or self.create_cpu_buffer:
            _refuse_file_loading()
        if self.lazy_load:
            return
        weight = weight_dict[self.weight_name]
        if weight.device.type == "cpu":
            self.pin_weight = _pinned_copy(weight)
            del weight_dict[self.weight_name]
        else:
            self.weight = weight

    @abstractmethod
    def apply(self, input_tensor):
        pass

    def set_config(self, config=None):
        if config is not None:
            self.config = config

    def to_cuda(self, non_blocking=False):
        self.weight = self.pin_weight.to(AI_DEVICE, non_blocking=non_blocking)

    def to_cpu(self, non_blocking=False):
        if hasattr(self, "pin_weight"):
            self.weight = self.pin_weight.copy_(self.weight, non_blocking=non_blocking).cpu()
        else:
            self.weight = self.weight.to("cpu", non_blocking=non_blocking)


class LayerNormWeightTemplate(metaclass=ABCMeta):
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
    ):
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.eps = eps
        self.create_cuda_buffer = create_cuda_buffer
        self.create_cpu_buffer = create_cpu_buffer
        self.lazy_load = lazy_load
        self.lazy_load_file = lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()
        self.config = {}

    def load(self, weight_dict):
        if self.create_cuda_buffer or self.create_cpu_buffer:
            _refuse_file_loading()
        if self.lazy_load or self.weight_name is None:
            self.weight = None
            self.bias = None
            return
        weight = weight_dict[self.weight_name]
        bias = weight_dict.get(self.bias_name) if self.bias_name is not None else None
        if weight.device.type == "cpu":
            self.pin_weight = _pinned_copy(weight)
            self.pin_bias = None if bias is None else _pinned_copy(bias)
            self.bias = None
            del weight_dict[self.weight_name]
        else:
            self.weight = weight
            self.bias = bias

    @abstractmethod
    def apply(self, input_tensor):
        pass

    def set_config(self, config=None):
        if config is not None:
            self.config = config

    def to_cuda(self, non_blocking=False):
        pin_weight = getattr(self, "pin_weight", None)
        pin_bias = getattr(self, "pin_bias", None)
        self.weight = None if pin_weight is None else pin_weight.to(AI_DEVICE, non_blocking=non_blocking)
        self.bias = None if pin_bias is None else pin_bias.to(AI_DEVICE, non_blocking=non_blocking)

    def to_cpu(self, non_blocking=False):
        for name in ("weight", "bias"):
            tensor = getattr(self, name, None)
            pinned = getattr(self, f"pin_{name}", None)
            if tensor is None:
                setattr(self, name, None)
            elif pinned is not None:
                setattr(self, name, pinned.copy_(tensor, non_blocking=non_blocking).cpu())
            else:
                setattr(self, name, tensor.to("cpu", non_blocking=non_blocking))
