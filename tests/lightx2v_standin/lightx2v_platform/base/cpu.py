"""The ``cpu`` platform device. Stand-in only: upstream has no CPU platform.

Upstream op constructors place tensors on ``AI_DEVICE`` (e.g. the RMSNorm ``weight_diff``), which
fails on a CPU-only torch when ``AI_DEVICE == "cuda"``. ``PLATFORM=cpu`` lets tests build and run
the ops on CPU.
"""

import torch.distributed as dist

from lightx2v_platform.registry_factory import PLATFORM_DEVICE_REGISTER


@PLATFORM_DEVICE_REGISTER("cpu")
class CpuDevice:
    name = "cpu"

    @staticmethod
    def init_device_env():
        pass

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def get_device() -> str:
        return "cpu"

    @staticmethod
    def init_parallel_env():
        dist.init_process_group(backend="gloo")
