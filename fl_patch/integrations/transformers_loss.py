"""transformers' training loss: the causal-LM cross-entropy on FlagGems, and (opt-in) the fused linear +
cross-entropy that never materialises the ``[tokens, vocab]`` logits.

``transformers.cross_entropy`` rebinds ``transformers.loss.loss_utils.fixed_cross_entropy``, which every loss of
that module looks up at call time (``ForCausalLMLoss``, the masked-LM, token- and sequence-classification ones):
calls with fp32 ``[N, C]`` logits and int64 targets (what ``ForCausalLMLoss`` passes, having upcast the logits)
run FlagGems' ``cross_entropy_loss``; any other call, and any call the kernel raises on, runs the original.

``transformers.fused_linear_cross_entropy`` (opt-in: ``FL_PATCH_INCLUDE=transformers.fused_linear_cross_entropy``)
replaces ``forward`` of every class, in every modeling module, whose forward has the standard causal-LM data flow,
checked on its code (the AST, no model names): ``logits`` is assigned once, from ``self.lm_head(...)``, and read
only as the ``logits`` argument of ``self.loss_function(...)`` and of the returned output. A forward that
changes the logits in between (Gemma 2's softcapping, Cohere's ``logit_scale``, a ``.float()``) is left original
and reported with the reason. The replacement runs that same original forward (so every version's arguments and
decorators still apply), with the instance's ``lm_head`` swapped for one that hands its input through and its
``loss_function`` for the fused one, for the duration of the call; the output has ``logits=None``, as Liger-Kernel
returns. It takes only training calls with labels (``model.train()``), a plain bias-free ``nn.Linear`` head
without hooks, the standard ``ForCausalLMLoss`` and ``return_dict`` on; any other call runs the original, counted.
Its chunks' cross-entropy is torch's (:mod:`fl_patch.kernels.fused_linear_cross_entropy` gives the H200
measurements), so it needs no kernel provider.

Why opt-in: the output of a training step with labels no longer holds the logits, which code that reads them
(accuracy metrics, distillation, logging) would find as None. fl_patch's default rows never change what the
user's code gets back; this one does, so the user names it. The swap mutates the model instance during its
forward: another thread running the same instance at the same time would see it.
"""

from __future__ import annotations

import ast
import functools
import inspect
import types

from fl_patch.integrations.transformers import MODELING, _code_source, _own_classes, _own_forward
from fl_patch.replacements import kernel_pair, like
from fl_patch.runtime import kernel_failed
from fl_patch.table import Target

_HERE = "fl_patch.integrations.transformers_loss"
_NEEDS = ("transformers>=5.0",)
FUSED_ROW = "transformers.fused_linear_cross_entropy"

TARGETS = [
    Target(
        name="transformers.cross_entropy",
        family="cross_entropy",
        module="transformers.loss.loss_utils",
        attribute="loss_utils.fixed_cross_entropy (ForCausalLMLoss and the other losses of loss_utils)",
        factory=f"{_HERE}:patch_cross_entropy",
        variant="loss",
        requires=_NEEDS,
        description="the causal-LM loss's cross-entropy on the provider's cross-entropy kernel",
    ),
    Target(
        name=FUSED_ROW,
        family="cross_entropy",
        module=MODELING,
        attribute="*ForCausalLM.forward of the standard data flow, per modeling module",
        factory=f"{_HERE}:patch_fused_linear_cross_entropy",
        variant="fused_linear",
        requires=_NEEDS,
        kernel_free=True,
        opt_in=True,
        description="opt-in: training with labels computes lm_head + loss in chunks, without logits (None)",
    ),
]


def patch_cross_entropy(loss_utils, ctx) -> None:
    """Rebind ``loss_utils.fixed_cross_entropy`` (same signature; extra keyword arguments ignored, as there)."""
    from fl_patch.kernels import cross_entropy as kernels

    original = loss_utils.fixed_cross_entropy
    rec = ctx.record("transformers.loss.loss_utils.fixed_cross_entropy")
    kernel, unsupported = kernel_pair(kernels, "loss", ctx.provider, rec)
    provider = ctx.provider

    def fixed_cross_entropy(source, target, num_items_in_batch=None, ignore_index=-100, **kwargs):
        reason = unsupported(provider, source, target)
        if reason is None:
            try:
                return kernel(source, target, ignore_index, num_items_in_batch)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(source, target, num_items_in_batch, ignore_index, **kwargs)

    ctx.setattr(rec, loss_utils, "fixed_cross_entropy", like(fixed_cross_entropy, original))


# ---------------------------------------------------------------------------------------------------------
# Which forwards have the standard data flow


def deferred_logits_reason(forward: types.FunctionType) -> str | None:
    """None when `forward` (decorators unwrapped) computes ``logits = self.lm_head(x)`` once and reads ``logits``
    only as the ``logits`` argument of ``self.loss_function(...)`` and of the output it returns; else why not."""
    inner = inspect.unwrap(forward)
    text = _code_source(inner.__code__) if isinstance(inner, types.FunctionType) else None
    if text is None:
        return "source not readable"
    try:
        node = ast.parse(text).body[0]
    except (SyntaxError, IndexError):
        return "source not readable"
    heads = [n for n in ast.walk(node) if _is_self_attr(n, "lm_head")]
    stores = _logits_names(node, ast.Store)
    assigns = [n for n in ast.walk(node) if isinstance(n, ast.Assign) and any(t in stores for t in n.targets)]
    if len(stores) != 1 or len(assigns) != 1 or len(assigns[0].targets) != 1:
        return "logits assigned more than once (changed after lm_head)" if len(stores) > 1 else "no logits = ..."
    value = assigns[0].value
    if not (isinstance(value, ast.Call) and _is_self_attr(value.func, "lm_head") and len(value.args) == 1
            and not value.keywords):
        return "logits is not self.lm_head(hidden_states)"
    if len(heads) != 1:
        return "self.lm_head used elsewhere"
    allowed = set()
    for call in ast.walk(node):
        if not isinstance(call, ast.Call):
            continue
        if _is_self_attr(call.func, "loss_function"):
            allowed |= {id(k.value) for k in call.keywords if k.arg == "logits"}
            allowed |= {id(call.args[0])} if call.args else set()
    for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return)):
        if isinstance(ret.value, ast.Call):
            allowed |= {id(k.value) for k in ret.value.keywords if k.arg == "logits"}
    loads = _logits_names(node, ast.Load)
    if not loads or any(id(n) not in allowed for n in loads):
        return "logits read other than by self.loss_function(logits=...) and the returned output"
    return None


def _logits_names(node: ast.AST, context: type) -> list[ast.Name]:
    return [n for n in ast.walk(node) if isinstance(n, ast.Name) and n.id == "logits" and isinstance(n.ctx, context)]


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == "self")


# ---------------------------------------------------------------------------------------------------------
# The fused forward


def patch_fused_linear_cross_entropy(module, ctx) -> None:
    """Patch ``forward`` of every class defined in `module` whose forward calls ``self.lm_head`` and
    ``self.loss_function`` and has the standard data flow (:func:`deferred_logits_reason`)."""
    for cls in _own_classes(module):
        original = _own_forward(cls)
        if original is None:
            continue
        names = set(inspect.unwrap(original).__code__.co_names)
        if not {"lm_head", "loss_function"} <= names:
            continue
        rec = ctx.record(f"{module.__name__}.{cls.__qualname__}.forward")
        reason = deferred_logits_reason(original)
        if reason is None:
            reason = _labels_position(original)[1]
        if reason is not None:
            ctx.skip(rec, reason)
            continue
        ctx.setattr(rec, cls, "forward", _fused_forward(ctx, rec, original))


def _labels_position(forward) -> tuple[int, str | None]:
    """(index of ``labels`` among the positional arguments after self, None) or (-1, why not)."""
    parameters = list(inspect.signature(inspect.unwrap(forward)).parameters.values())
    names = [p.name for p in parameters[1:]]
    if "labels" not in names:
        return -1, "forward takes no labels"
    return names.index("labels"), None


def _fused_forward(ctx, rec, original):
    labels_at, _ = _labels_position(original)

    def forward(self, *args, **kwargs):
        labels = kwargs.get("labels", args[labels_at] if len(args) > labels_at else None)
        if labels is None:
            return original(self, *args, **kwargs)
        reason = _refusal(self, kwargs)
        if reason is not None:
            rec.fallback(reason)
            return original(self, *args, **kwargs)
        head = self.lm_head
        call = _Call(head, rec)
        self._modules["lm_head"] = _hand_through()()
        self.loss_function = call.loss
        try:
            output = original(self, *args, **kwargs)
        finally:
            self._modules["lm_head"] = head
            del self._loss_function
        if call.logits is None and not call.fused:  # the forward did not call the loss: logits as it would have
            call.logits = head(output["logits"])
        if call.logits is not None:
            output["logits"] = call.logits
            return output
        return type(output)(**{k: v for k, v in output.items() if k != "logits"})

    return like(forward, original)


def _refusal(model, kwargs) -> str | None:
    """Why a training call with labels can't take the fused path (None: it can)."""
    import torch
    from torch import nn
    from transformers.loss import loss_utils

    if not model.training:
        return "eval mode (logits kept)"
    if torch.compiler.is_compiling():
        return "torch.compile"
    head = model.lm_head
    if type(head) is not nn.Linear:
        return f"lm_head is {type(head).__name__}, not nn.Linear"
    if head.bias is not None:
        return "lm_head has a bias"
    if head._forward_hooks or head._forward_pre_hooks or head._backward_hooks:
        return "lm_head has hooks"
    if type(head.weight) not in (torch.Tensor, nn.Parameter):
        return "tensor subclass"
    if "_loss_function" in vars(model):
        return "custom loss_function"
    if model.loss_function is not loss_utils.ForCausalLMLoss:
        return "loss is not ForCausalLMLoss"
    return_dict = kwargs.get("return_dict")
    if return_dict is False or (return_dict is None and getattr(model.config, "return_dict", True) is False):
        return "return_dict=False"
    return None


@functools.cache
def _hand_through():
    """A module class that stands in for ``lm_head`` during a fused call: it returns its input, the hidden
    states the loss then gets as its ``logits``."""
    from torch import nn

    class HandThrough(nn.Module):
        def forward(self, hidden_states):
            return hidden_states

    return HandThrough


class _Call:
    """One fused call: the loss function the forward calls (with the hidden states as its ``logits``), and what
    became of the logits: None when fused, the real ones when the loss had to compute them."""

    def __init__(self, head, rec):
        self.head, self.rec = head, rec
        self.logits = None
        self.fused = False

    def loss(self, logits, labels, vocab_size, num_items_in_batch=None, ignore_index=-100, shift_labels=None,
             **kwargs):
        """``ForCausalLMLoss(lm_head(hidden), ...)``, fused when it can be; `logits` holds the hidden states."""
        import torch
        import torch.nn.functional as F
        from transformers.loss import loss_utils

        from fl_patch.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy

        hidden, weight = logits, self.head.weight
        target = shift_labels
        if target is None:
            target = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
        rows = hidden.reshape(-1, hidden.shape[-1])
        target = target.reshape(-1).to(hidden.device)
        reason = None
        if vocab_size != weight.shape[0]:
            reason = "vocab_size is not lm_head's"
        elif hidden.dtype != weight.dtype:
            reason = "mixed dtypes"
        elif target.shape[0] != rows.shape[0] or target.dtype != torch.int64:
            reason = "labels shape or dtype"
        if reason is not None:
            self.rec.fallback(reason)
            self.logits = self.head(hidden)
            return loss_utils.ForCausalLMLoss(self.logits, labels, vocab_size, num_items_in_batch, ignore_index,
                                              shift_labels, **kwargs)
        self.fused = True
        return fused_linear_cross_entropy(rows, weight, target, ignore_index, num_items_in_batch)
