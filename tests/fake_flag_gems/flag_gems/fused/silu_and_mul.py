"""CPU stand-in for ``flag_gems.fused.silu_and_mul``'s grad kernel (fl_patch's compiled backward calls it)."""

import torch

import flag_gems


def silu_and_mul_grad_kernel(x, y, dgrad):
    """``(dx, dy)`` of ``silu(x) * y`` in fp32, each like x in the promoted dtype of the three inputs."""
    flag_gems.calls.append(("silu_and_mul_grad_kernel",))
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), dgrad.dtype)
    h, g = x.float(), dgrad.float()
    sig = torch.sigmoid(h)
    dx = sig * (1 + h * (1 - sig)) * g * y.float()
    dy = g * h * sig
    return dx.to(dtype), dy.to(dtype)
