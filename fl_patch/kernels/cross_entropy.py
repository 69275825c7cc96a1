"""Cross-entropy over class logits with integer targets, on FlagGems' ``cross_entropy_loss`` (which has its own
backward kernel), in two forms:

- ``loss``: ``F.cross_entropy(logits, target, ignore_index=..., reduction="mean" | "sum")`` on fp32 logits
  ``[N, C]``, what transformers' ``fixed_cross_entropy`` computes (its causal-LM loss upcasts the logits first);
- ``chunk``: one chunk of the fused linear + cross-entropy (:mod:`fl_patch.kernels.fused_linear_cross_entropy`):
  the per-row losses and, when asked, the gradient of ``sum(row_scale * row_loss)`` with respect to the logits.

FlagGems 5.0.2 reads the logit at the target index of *every* row, ignored ones included, with only the row
bound as mask: a target of -100 reads 100 elements before the row (before the tensor for row 0), any target out of
``[0, C)`` reads out of bounds, and what it read is multiplied by 0, which is NaN if the bytes were NaN or Inf.
So both forms hand it in-range targets only: ignored rows get class 0 and are masked out here (their loss and
gradient are zero, as in torch), and targets out of range raise a device-side assertion, as torch's own does.
Per-row losses are fp32 (the kernel's output dtype is its input's: the logits are fp32 here).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fl_patch.kernels import gems as _gems

FAMILY = "cross_entropy"  # routing keys of this module: "cross_entropy.<form>" (fl_patch.routing)
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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


def reference_chunk(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
                    need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp32 per-row losses of ``logits.float()``, the gradient of ``sum(row_scale * losses)`` in logits' dtype, or
    None without `need_grad`). `target` in range (ignored rows already class 0, with row_scale 0)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1)
    rows = lse - x.gather(1, target[:, None]).squeeze(1)
    if not need_grad:
        return rows, None
    grad = torch.softmax(x, dim=-1)
    grad.scatter_add_(1, target[:, None], torch.full_like(rows[:, None], -1.0))
    return rows, torch.mul(grad, row_scale[:, None], out=torch.empty_like(logits))  # one pass: scale, round


def gems_chunk(logits: torch.Tensor, target: torch.Tensor, row_scale: torch.Tensor,
               need_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``reference_chunk`` on FlagGems' ``cross_entropy_loss`` forward and backward kernels."""
    _check_range(target, logits.shape[1])
    x = logits.float().detach().requires_grad_(need_grad)
    with torch.enable_grad():
        rows = _gems.load().cross_entropy_loss(x, target, None, "none", -100, 0.0)
    if not need_grad:
        return rows.detach(), None
    (grad,) = torch.autograd.grad(rows, x, row_scale)
    return rows.detach(), grad.to(logits.dtype)


def unsupported_chunk(provider: str, logits: torch.Tensor, target: torch.Tensor) -> str | None:
    """None when `provider` can take the ``chunk`` form, else a short reason: logits ``[N, C]`` of a float dtype,
    int64 targets ``[N]``; gems also: device, no empty input."""
    reason = _tensor_reason(provider, logits)
    if reason is not None:
        return reason
    if logits.dtype not in _FLOAT_DTYPES:
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
