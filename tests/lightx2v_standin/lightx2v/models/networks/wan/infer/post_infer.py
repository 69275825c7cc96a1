"""Wan's output step (upstream ``wan/infer/post_infer.py``): tokens back to a ``[C, F, H, W]`` latent."""

import math

import torch

__all__ = ["WanPostInfer"]


class WanPostInfer:
    def __init__(self, config):
        self.out_dim = config["out_dim"]
        self.patch_size = (1, 2, 2)
        self.clean_cuda_cache = config.get("clean_cuda_cache", False)

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler

    @torch.no_grad()
    def infer(self, x, pre_infer_out):
        """A one-element list holding the float32 latent."""
        return [u.float() for u in self.unpatchify(x, pre_infer_out.grid_sizes.tuple)]

    def unpatchify(self, x, grid_sizes):
        c = self.out_dim
        x = x[: math.prod(grid_sizes)].view(*grid_sizes, *self.patch_size, c)
        x = torch.einsum("fhwpqrc->cfphqwr", x)
        return [x.reshape(c, *[i * j for i, j in zip(grid_sizes, self.patch_size, strict=True)])]
