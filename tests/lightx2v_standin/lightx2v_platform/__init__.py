"""Stand-in for LightX2V's ``lightx2v_platform`` package.

Importing it registers the device classes (``lightx2v_platform.base``) and nothing else; the
device is chosen when ``lightx2v_platform.set_ai_device`` is first imported.
"""

from .base import *  # noqa: F403
