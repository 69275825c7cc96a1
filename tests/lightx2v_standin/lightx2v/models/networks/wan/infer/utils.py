"""Helpers of the Wan infer classes (upstream ``wan/infer/utils.py``, the timestep embedding only)."""

import torch

from lightx2v.utils.envs import GET_SENSITIVE_DTYPE

__all__ = ["sinusoidal_embedding_1d"]


def sinusoidal_embedding_1d(dim, position):
    """``[cos(p * f), sin(p * f)]`` with ``f = 10000 ** (-i / (dim / 2))``, in float32 then the sensitive dtype."""
    assert dim % 2 == 0
    half = dim // 2
    position = position.type(torch.float32)
    angles = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1).to(GET_SENSITIVE_DTYPE())
