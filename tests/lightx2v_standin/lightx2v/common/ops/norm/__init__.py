"""Framework norm ops. Importing registers them into ``RMS_WEIGHT_REGISTER`` and ``LN_WEIGHT_REGISTER``."""

from .layer_norm_weight import *  # noqa: F403
from .rms_norm_weight import *  # noqa: F403
