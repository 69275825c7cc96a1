"""Framework rope ops. Importing registers them into ``ROPE_REGISTER``."""

from .chunked_rope import ChunkedRope
from .flashinfer_rope import FlashInferRope
from .template import RopeLayout, RopeTemplate
from .torch_rope import TorchComplexRope, TorchRealRope

__all__ = ["ChunkedRope", "FlashInferRope", "RopeLayout", "RopeTemplate", "TorchComplexRope", "TorchRealRope"]
