"""Framework tensor ops. Importing registers them into ``TENSOR_REGISTER``."""

from .tensor import DefaultTensor  # noqa: F401
