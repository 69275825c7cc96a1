"""Framework attention ops. Importing registers them into ``ATTN_WEIGHT_REGISTER``.

Upstream registers many more keys here (sparse, ring, ulysses, radial, ...); see the README.
"""

from .flash_attn import FlashAttn2Weight, FlashAttn3Weight, FlashAttn4Weight
from .sage_attn import SageAttn2Weight, SageAttn3Weight
from .torch_sdpa import TorchSDPAWeight

__all__ = [
    "FlashAttn2Weight",
    "FlashAttn3Weight",
    "FlashAttn4Weight",
    "SageAttn2Weight",
    "SageAttn3Weight",
    "TorchSDPAWeight",
]
