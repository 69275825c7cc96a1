"""Torch versions of the two Triton norm kernels the norm ops call (upstream ``triton_ops.py``).

Both compute in float32 and return the input's dtype, as the kernels do.
"""

import torch


def norm_infer(x, weight, bias, eps, is_rms_norm=False, out=None):
    """LayerNorm (or RMSNorm with ``is_rms_norm``) over the last dim of a 2-D ``(M, N)`` tensor.

    ``weight``/``bias`` may be None. Writes into ``out`` when given and returns it.
    """
    if x.ndim != 2:
        raise ValueError(f"norm_infer expects a 2-D (M, N) tensor, got shape {tuple(x.shape)}")
    xf = x.float()
    centred = xf if is_rms_norm else xf - xf.mean(dim=-1, keepdim=True)
    y = centred * torch.rsqrt(centred.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    if out is None:
        return y.to(x.dtype)
    return out.copy_(y)


def rms_norm_kernel(x, w, eps=1e-6):
    """RMSNorm over the last dim of ``x`` (any leading shape): ``x * rsqrt(mean(x^2) + eps) * w``."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * w.float()
    return y.to(x.dtype)
