"""SwiGLU's gate: ``silu(gate) * up`` on FlagGems' ``silu_and_mul`` (which has its own backward).

FlagGems computes ``silu`` in fp32 and multiplies before the one rounding to the output dtype; torch
rounds ``silu(gate)`` first, so results agree within bf16/fp16 tolerance, not bitwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_patch.kernels import gems as _gems

FAMILY = "swiglu"  # routing keys of this module: "swiglu.<form>" (fl_patch.device.routing)


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``."""
    return F.silu(gate) * up


def native(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``reference`` for calls routed away from FlagGems (``gems.NATIVE_ROUTES``): torch's own ops, so the same
    numbers, but in training ``silu(gate)`` is recomputed in the backward instead of kept for it (as FlagGems' and
    Liger's kernels do): one activation of the MLP's width less per layer, gradients bitwise those of autograd."""
    if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
        return _SiluMulRecomputed.apply(gate, up)
    return F.silu(gate) * up


class _SiluMulRecomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        gate, up = ctx.saved_tensors
        # what autograd runs for F.silu(gate) * up (mul's backward, then silu's), with silu(gate) computed again
        grad_up = grad * F.silu(gate) if ctx.needs_input_grad[1] else None
        grad_gate = torch.ops.aten.silu_backward(grad * up, gate) if ctx.needs_input_grad[0] else None
        return grad_gate, grad_up


def gems(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``reference`` on ``flag_gems.silu_and_mul(gate, up)``."""
    return _gems.ops().silu_and_mul(gate, up)


def unsupported(provider: str, gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """None when `provider` can take ``silu(gate) * up``, else a short reason.

    Both providers: gate and up of one shape (no broadcasting). gems also: device, fp16/bf16, one dtype.
    """
    if provider == "gems":
        reason = _gems.tensor_reason(gate)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
        if up.dtype != gate.dtype:
            return "mixed dtypes"
    if gate.shape != up.shape:
        return "shape mismatch"
    return None
