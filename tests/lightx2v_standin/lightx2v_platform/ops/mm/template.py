"""Base class for chip linear ops (upstream ``lightx2v_platform/ops/mm/template.py``).

Subclasses implement ``load(weight_dict)`` and ``apply(input_tensor)``. Unlike
``lightx2v.common.ops.mm.MMWeightTemplate`` this base does not transpose anything and has no
LoRA/diff handling. Upstream's ``MMWeightQuantTemplate`` (same module) is not reproduced.
"""

from abc import ABCMeta, abstractmethod

from lightx2v_platform.base.global_var import AI_DEVICE


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
        lora_prefix="",
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

    @abstractmethod
    def load(self, weight_dict):
        pass

    @abstractmethod
    def apply(self):
        pass

    def set_config(self, config={}):  # noqa: B006  (upstream signature)
        self.config = config

    def to_cuda(self, non_blocking=False):
        self.weight = self.pin_weight.to(AI_DEVICE, non_blocking=non_blocking)
        if getattr(self, "pin_bias", None) is not None:
            self.bias = self.pin_bias.to(AI_DEVICE, non_blocking=non_blocking)

    def to_cpu(self, non_blocking=False):
        if hasattr(self, "pin_weight"):
            self.weight = self.pin_weight.copy_(self.weight, non_blocking=non_blocking).cpu()
            if self.bias is not None:
                self.bias = self.pin_bias.copy_(self.bias, non_blocking=non_blocking).cpu()
        else:
            self.weight = self.weight.to("cpu", non_blocking=non_blocking)
            if getattr(self, "bias", None) is not None:
                self.bias = self.bias.to("cpu", non_blocking=non_blocking)
