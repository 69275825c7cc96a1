"""Framework convolution ops. Importing registers them into ``CONV3D_WEIGHT_REGISTER`` (no 2-D ones here)."""

from .conv3d import *  # noqa: F403
