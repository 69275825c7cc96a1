"""Stand-in for the ``lightx2v`` package root, without the models, runners and pipeline.

As upstream, importing any part of ``lightx2v`` first runs ``lightx2v_platform.set_ai_device``
(plugins, then ``$PLATFORM``), then imports the op modules, whose decorators fill the tables of
``lightx2v.utils.registry_factory`` (the first of them to import it takes the ``PLATFORM_*`` copy).
Upstream reaches the op modules and the models through ``lightx2v.pipeline``; the stand-in imports the op
modules and its one model (Wan, with ``base_model``) directly.
"""

import lightx2v_platform.set_ai_device  # noqa: F401  (device first, as upstream)
from lightx2v import common, models, utils
from lightx2v.common import ops
from lightx2v.models.networks.wan import model as wan_model

__version__ = "0.1.0"

__all__ = ["__version__", "common", "models", "ops", "utils", "wan_model"]
