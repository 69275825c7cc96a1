"""What ``WanPreInfer.infer`` hands to the blocks (upstream ``wan/infer/module_io.py``)."""

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["GridOutput", "WanPreInferModuleOutput"]


@dataclass
class GridOutput:
    tensor: torch.Tensor
    tuple: tuple


@dataclass
class WanPreInferModuleOutput:
    embed: torch.Tensor
    grid_sizes: GridOutput
    x: torch.Tensor
    embed0: torch.Tensor
    context: torch.Tensor
    cos_sin: torch.Tensor | None = None
    rope_positions: torch.Tensor | None = None
    valid_token_len: int = 0
    valid_latent_num: int = 0
    adapter_args: dict[str, Any] = field(default_factory=dict)
    conditional_dict: dict[str, Any] = field(default_factory=dict)
