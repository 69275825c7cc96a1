"""SwiGLU's gate: ``silu(gate) * up`` on FlagGems' ``silu_and_mul`` (which has its own backward).

FlagGems computes ``silu`` in fp32 and multiplies before the one rounding to the output dtype; torch
rounds ``silu(gate)`` first, so results agree within bf16/fp16 tolerance, not bitwise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_patch.kernels import gems as _gems

FAMILY = "swiglu"  # routing keys of this module: "swiglu.<form>" (fl_patch.routing)


def reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up``."""
    return F.silu(gate) * up


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
