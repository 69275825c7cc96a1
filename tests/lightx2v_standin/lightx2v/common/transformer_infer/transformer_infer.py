"""Base of the transformer infer classes (upstream ``lightx2v/common/transformer_infer/transformer_infer.py``).

``run_block(index, block, *args)`` calls ``infer_block(block, *args)`` (compiled per block with
``use_compile``, as upstream); ``set_scheduler`` also points the scheduler back at this infer. The Taylor
caching base is not reproduced.
"""

from abc import ABC, abstractmethod

import torch

__all__ = ["BaseTransformerInfer"]


class BaseTransformerInfer(ABC):
    def init_compile(self, config):
        self.use_compile = config.get("use_compile", False)
        self.compiled_blocks = {}

    def run_block(self, block_idx, block, *args):
        if not self.use_compile:
            return self.infer_block(block, *args)
        cached = self.compiled_blocks.get(block_idx)
        if cached is None or cached[0] is not block:
            cached = (block, torch.compile(lambda *inputs: self.infer_block(block, *inputs), dynamic=None))
            self.compiled_blocks[block_idx] = cached
        return cached[1](*args)

    @abstractmethod
    def infer(self):
        pass

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler
        self.scheduler.transformer_infer = self
