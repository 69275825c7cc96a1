"""Plain tensor op (upstream ``lightx2v/common/ops/tensor/tensor.py``): Wan's modulation tables.

``TENSOR_REGISTER["Default"](tensor_name, create_cuda_buffer=False, create_cpu_buffer=False, lazy_load=False,
lazy_load_file=None, is_post_adapter=False)``; after ``load`` and ``to_cuda`` the tensor is ``.tensor``
(a CPU one is pinned, leaves ``weight_dict``, and moves at ``to_cuda``). Buffers and lazy loading are not
reproduced.
"""

from lightx2v.common.ops.utils import create_pin_tensor, refuse_file_loading
from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE
from lightx2v.utils.registry_factory import TENSOR_REGISTER
from lightx2v_platform.base.global_var import AI_DEVICE

__all__ = ["DefaultTensor"]


@TENSOR_REGISTER("Default")
class DefaultTensor:
    def __init__(self, tensor_name, create_cuda_buffer=False, create_cpu_buffer=False, lazy_load=False,
                 lazy_load_file=None, is_post_adapter=False):
        self.tensor_name = tensor_name
        self.create_cuda_buffer, self.create_cpu_buffer = create_cuda_buffer, create_cpu_buffer
        self.lazy_load, self.lazy_load_file = lazy_load, lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()

    def load(self, weight_dict):
        if self.create_cuda_buffer or self.create_cpu_buffer or self.lazy_load:
            refuse_file_loading()
        tensor = weight_dict[self.tensor_name]
        if tensor.device.type == "cpu":
            self.pin_tensor = create_pin_tensor(weight_dict.pop(self.tensor_name))
        else:
            self.tensor = tensor

    def to_cuda(self, non_blocking=False):
        source = self.pin_tensor if hasattr(self, "pin_tensor") else self.tensor
        self.tensor = source.to(AI_DEVICE, non_blocking=non_blocking)

    def to_cpu(self, non_blocking=False):
        self.tensor = self.tensor.to("cpu", non_blocking=non_blocking)
