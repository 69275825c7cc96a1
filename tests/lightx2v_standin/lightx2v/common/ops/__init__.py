"""Framework ops. Importing registers every op class into ``lightx2v.utils.registry_factory``.

Upstream also has ``conv``, ``embedding``, ``moe`` and ``tensor`` here; the stand-in does not.
"""

from .attn import *  # noqa: F403
from .mm import *  # noqa: F403
from .norm import *  # noqa: F403
from .rope import *  # noqa: F403
