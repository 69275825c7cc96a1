"""Stand-in for ``lightx2v/utils/registry_factory.py``: the tables models build their ops from.

At its first import this module copies the ``PLATFORM_*`` tables of
``lightx2v_platform.registry_factory`` into the matching tables below (``Register.merge``: a copy
taken once, not a view). A class registered into a ``PLATFORM_*`` table after that is never seen
here; register into these tables directly instead. Upstream defines an identical ``Register``
class in each module; the stand-in shares one.
"""

from lightx2v_platform.registry_factory import (
    PLATFORM_ATTN_WEIGHT_REGISTER,
    PLATFORM_FUSED_MOE_REGISTER,
    PLATFORM_LAYERNORM_WEIGHT_REGISTER,
    PLATFORM_MM_WEIGHT_REGISTER,
    PLATFORM_RMS_WEIGHT_REGISTER,
    PLATFORM_ROPE_REGISTER,
    Register,
)

__all__ = [
    "Register",
    "MM_WEIGHT_REGISTER",
    "ATTN_WEIGHT_REGISTER",
    "RMS_WEIGHT_REGISTER",
    "LN_WEIGHT_REGISTER",
    "CONV3D_WEIGHT_REGISTER",
    "CONV2D_WEIGHT_REGISTER",
    "TENSOR_REGISTER",
    "CONVERT_WEIGHT_REGISTER",
    "EMBEDDING_WEIGHT_REGISTER",
    "RUNNER_REGISTER",
    "ROPE_REGISTER",
    "FUSED_MOE_REGISTER",
    "SPARSE_MASK_GENERATOR_REGISTER",
    "SPARSE_OPERATOR_REGISTER",
]

MM_WEIGHT_REGISTER = Register()
ATTN_WEIGHT_REGISTER = Register()
RMS_WEIGHT_REGISTER = Register()
LN_WEIGHT_REGISTER = Register()
CONV3D_WEIGHT_REGISTER = Register()
CONV2D_WEIGHT_REGISTER = Register()
TENSOR_REGISTER = Register()
CONVERT_WEIGHT_REGISTER = Register()
EMBEDDING_WEIGHT_REGISTER = Register()
RUNNER_REGISTER = Register()
ROPE_REGISTER = Register()
FUSED_MOE_REGISTER = Register()
SPARSE_MASK_GENERATOR_REGISTER = Register()
SPARSE_OPERATOR_REGISTER = Register()

ATTN_WEIGHT_REGISTER.merge(PLATFORM_ATTN_WEIGHT_REGISTER)
MM_WEIGHT_REGISTER.merge(PLATFORM_MM_WEIGHT_REGISTER)
RMS_WEIGHT_REGISTER.merge(PLATFORM_RMS_WEIGHT_REGISTER)
LN_WEIGHT_REGISTER.merge(PLATFORM_LAYERNORM_WEIGHT_REGISTER)
ROPE_REGISTER.merge(PLATFORM_ROPE_REGISTER)
FUSED_MOE_REGISTER.merge(PLATFORM_FUSED_MOE_REGISTER)
