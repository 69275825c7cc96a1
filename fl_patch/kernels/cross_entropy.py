"""Cross-entropy over class logits with integer targets on FlagGems' ``cross_entropy_loss`` (which has its own
backward kernel): ``F.cross_entropy(logits, target, ignore_index=..., reduction="mean" | "sum")`` on fp32 logits
``[N, C]``, what transformers' ``fixed_cross_entropy`` computes (its causal-LM loss upcasts the logits first).

The fused linear + cross-entropy does not use this kernel for its chunks
(:mod:`fl_patch.kernels.fused_linear_cross_entropy` says why).

FlagGems 5.0.2 reads the logit at the target index of *every* row, ignored ones included, with only the row bound
as mask: a target of -100 reads 100 elements before the row (before the tensor for row 0), any target out of
``[0, C)`` reads out of bounds, and what it read is multiplied by 0, which is NaN if the bytes were NaN or Inf.
So it gets in-range targets only: ignored rows get class 0 and are masked out here (their loss and gradient are
zero, as in torch), and targets out of range raise a device-side assertion, as torch's own does.
Per-row losses are fp32 (the kernel's output dtype is its input's: the logits are fp32 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_patch.kernels import gems as _gems

FAMILY = "cross_entropy"  # routing keys of this module: "cross_entropy.<form>" (fl_patch.device.routing)


def _masked(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows that count, their targets with every ignored one replaced by class 0)."""
    valid = target != ignore_index
    return valid, torch.where(valid, target, 0)


def _reduce(rows: torch.Tensor, valid: torch.Tensor, num_items_in_batch) -> torch.Tensor:
    """transformers' reduction: mean over the rows that count, or their sum over `num_items_in_batch`."""
    total = torch.where(valid, rows, 0.0).sum()
    if num_items_in_batch is None:
        return total / valid.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def reference_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
                   num_items_in_batch=None) -> torch.Tensor:
    """``fixed_cross_entropy(logits, target, num_items_in_batch, ignore_index)`` as masked torch per-row losses."""
    valid, safe = _masked(logits, target, ignore_index)
    return _reduce(F.cross_entropy(logits, safe, reduction="none"), valid, num_items_in_batch)


def gems_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = -100,
              num_items_in_batch=None) -> torch.Tensor:
    """``reference_loss`` with the per-row losses (and their backward) on FlagGems' ``cross_entropy_loss``."""
    valid, safe = _masked(logits, target, ignore_index)
    _check_range(safe, logits.shape[1])
    rows = _gems.load().cross_entropy_loss(logits, safe, None, "none", ignore_index, 0.0)
    return _reduce(rows, valid, num_items_in_batch)


def unsupported_loss(provider: str, logits: torch.Tensor, target: torch.Tensor) -> str | None:
    """None when `provider` can take the ``loss`` form, else a short reason.

    Both providers: logits ``[N, C]`` of fp32 (the dtype transformers' loss computes in; another one would round
    differently), int64 targets ``[N]``. gems also: device, no empty input."""
    reason = _tensor_reason(provider, logits)
    if reason is not None:
        return reason
    if logits.dtype != torch.float32:
        return "dtype " + str(logits.dtype).removeprefix("torch.")
    return _shape_reason(logits, target)


def _check_range(target: torch.Tensor, classes: int) -> None:
    """Fail on a target outside ``[0, classes)`` as torch's cross_entropy does (a device-side assertion, no host
    sync), instead of letting FlagGems read out of bounds."""
    torch._assert_async(((target >= 0) & (target < classes)).all(), "cross_entropy: target out of bounds")


def _tensor_reason(provider: str, logits: torch.Tensor) -> str | None:
    """gems' per-call checks before the shape checks (see gems.tensor_reason), less the half-dtype one: the kernel
    computes in fp32 from any float input."""
    if provider != "gems":
        return None
    if torch.compiler.is_compiling():
        return "torch.compile"
    if _gems._load_error is not None:
        return _gems.UNUSABLE
    reason = _gems.device_reason(logits)
    if reason is None and logits.numel() == 0:
        return "empty tensor"
    return reason


def _shape_reason(logits: torch.Tensor, target: torch.Tensor) -> str | None:
    if logits.dim() != 2 or target.dim() != 1 or target.shape[0] != logits.shape[0]:
        return "shape"
    if target.dtype != torch.int64:
        return "target dtype " + str(target.dtype).removeprefix("torch.")
    return None
