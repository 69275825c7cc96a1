"""Environment-driven dtypes (upstream ``lightx2v/utils/envs.py``, the parts the ops use).

Both functions are cached for the life of the module, as upstream: changing ``$DTYPE`` after the
first call has no effect until the module is re-imported.
"""

import os
from functools import lru_cache

import torch

DTYPE_MAP = {
    "BF16": torch.bfloat16,
    "FP16": torch.float16,
    "FP32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "torch.bfloat16": torch.bfloat16,
    "torch.float16": torch.float16,
    "torch.float32": torch.float32,
}


@lru_cache(maxsize=None)
def GET_DTYPE():
    """``$DTYPE`` (``BF16`` by default; only ``BF16``/``FP16`` are accepted) as a torch dtype."""
    name = os.getenv("DTYPE", "BF16")
    assert name in ["BF16", "FP16"]
    return DTYPE_MAP[name]


@lru_cache(maxsize=None)
def GET_SENSITIVE_DTYPE():
    """``$SENSITIVE_LAYER_DTYPE`` as a torch dtype, or ``GET_DTYPE()`` when unset/``None``."""
    name = os.getenv("SENSITIVE_LAYER_DTYPE", "None")
    return GET_DTYPE() if name == "None" else DTYPE_MAP[name]
