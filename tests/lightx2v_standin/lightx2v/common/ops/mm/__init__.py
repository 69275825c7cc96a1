"""Framework linear ops. Importing registers them into ``MM_WEIGHT_REGISTER``."""

from .mm_weight import *  # noqa: F403
