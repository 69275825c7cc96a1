"""Device classes and the device-selection functions; importing registers the devices."""

from lightx2v_platform.base.base import check_ai_device, init_ai_device
from lightx2v_platform.base.cpu import CpuDevice
from lightx2v_platform.base.nvidia import CudaDevice

__all__ = ["init_ai_device", "check_ai_device", "CudaDevice", "CpuDevice"]
