"""Stand-in for ``lightx2v_platform/set_ai_device.py``: picks the device once, at first import.

Order, as upstream: load ``lightx2v.platform_plugins`` entry points, then ``init_ai_device`` and
``check_ai_device`` for ``$PLATFORM`` (default ``cuda``), then import ``lightx2v_platform.ops``
(upstream's chip ops register into the ``PLATFORM_*`` tables there). ``import lightx2v`` imports
this module first, so all of it runs before ``lightx2v.utils.registry_factory`` copies the
``PLATFORM_*`` tables -- unless a plugin imports that module itself.
"""

import logging
import os
from importlib.metadata import entry_points

from lightx2v_platform import check_ai_device, init_ai_device

logger = logging.getLogger(__name__)

PLUGIN_GROUP = "lightx2v.platform_plugins"


def _load_platform_plugins():
    """Call each ``lightx2v.platform_plugins`` entry point (a zero-argument callable).

    A plugin that fails to load or raises is logged and skipped.
    """
    for ep in entry_points(group=PLUGIN_GROUP):
        try:
            ep.load()()
            logger.info("Loaded LightX2V platform plugin: %s", ep.name)
        except Exception as e:
            logger.warning("Failed to load platform plugin '%s': %s", ep.name, e)


def set_ai_device():
    """Load plugins, then select and check the device named by ``$PLATFORM`` (default ``cuda``)."""
    platform = os.getenv("PLATFORM", "cuda")
    _load_platform_plugins()
    init_ai_device(platform)
    check_ai_device(platform)


set_ai_device()

from lightx2v_platform.ops import *  # noqa: E402, F403
