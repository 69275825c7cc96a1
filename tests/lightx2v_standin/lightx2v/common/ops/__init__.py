"""Framework ops. Importing registers every op class into ``lightx2v.utils.registry_factory``.

Upstream also has ``embedding`` and ``moe`` here; the stand-in does not (and ``conv`` has Conv3d only).
"""

from .attn import *  # noqa: F403
from .conv import *  # noqa: F403
from .mm import *  # noqa: F403
from .norm import *  # noqa: F403
from .rope import *  # noqa: F403
from .tensor import *  # noqa: F403
