"""Device selection: ``init_ai_device`` and ``check_ai_device``, as upstream."""

import logging
import os

from lightx2v_platform.base import global_var
from lightx2v_platform.registry_factory import PLATFORM_DEVICE_REGISTER

logger = logging.getLogger(__name__)


def _device_class(platform):
    device = PLATFORM_DEVICE_REGISTER.get(platform, None)
    if device is None:
        available_platforms = list(PLATFORM_DEVICE_REGISTER.keys())
        raise RuntimeError(f"Unsupported PLATFORM: {platform}. Available PLATFORM: {available_platforms}")
    return device


def init_ai_device(platform="cuda"):
    """Set ``global_var.PLATFORM``/``AI_DEVICE`` from the registered device class and return AI_DEVICE.

    Raises ``RuntimeError`` naming the registered platforms when ``platform`` is unknown.
    """
    device = _device_class(platform)
    global_var.PLATFORM = platform
    global_var.AI_DEVICE = device.get_device()
    device.init_device_env()
    logger.info("Initialized AI_DEVICE: %s", global_var.AI_DEVICE)
    return global_var.AI_DEVICE


def check_ai_device(platform="cuda"):
    """Return True when the platform's device is available.

    When it is not, raise ``RuntimeError`` unless ``SKIP_PLATFORM_CHECK`` is ``1`` or ``True``, in
    which case log a warning and return True.
    """
    device = _device_class(platform)
    if device.is_available():
        logger.info("AI device for platform '%s' is available.", platform)
        return True
    error_msg = f"AI device for platform '{platform}' is not available. Please check your runtime environment."
    if os.getenv("SKIP_PLATFORM_CHECK", "False") in ["1", "True"]:
        logger.warning(error_msg)
        return True
    raise RuntimeError(error_msg)
