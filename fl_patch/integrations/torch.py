"""torch-level targets: functions of ``torch.nn.functional`` that modules look up at call time.

``nn.RMSNorm``, ``nn.LayerNorm`` and ``nn.Linear`` call ``F.rms_norm`` / ``F.layer_norm`` / ``F.linear``
through the module attribute at every call (as do ``F.multi_head_attention_forward`` and transformers' sdpa
path with ``F.scaled_dot_product_attention``), so rebinding the attribute reaches them and every other
caller that did not bind the function early: ``from torch.nn.functional import linear`` run before
activation keeps the original (``fl-patch status`` lists such references).

``F.linear`` and ``F.scaled_dot_product_attention`` are C builtins with no Python signature; the
replacements take the same arguments (sdpa's ``scale`` and ``enable_gqa`` keyword-only, as in the
builtin). Tensor subclasses (DTensor, quantized weights, ...) go to the original, which dispatches them
through ``__torch_function__``.

torch.compile: dynamo lists ``torch.nn.functional.layer_norm`` *by name* as an in-graph function, and
resolves the name when ``torch._dynamo`` is imported, that is after the patch: it would put the replacement
in the graph as an opaque node and run it on fake tensors (where it falls back to the original). The
``torch.layer_norm.dynamo`` row sets that entry of dynamo's rule map to "trace it" instead, as for every
other replacement.
"""

from __future__ import annotations

from fl_patch.replacements import kernel_pair, like
from fl_patch.runtime import Skip, kernel_failed
from fl_patch.table import Target

SUBCLASS = "tensor subclass"

def _row(name: str, family: str, module: str, attribute: str, factory: str, description: str) -> Target:
    return Target(name=name, family=family, module=module, attribute=attribute,
                  factory=f"fl_patch.integrations.torch:{factory}", variant="torch", requires=("torch>=2.4",),
                  description=description)


TARGETS = [
    _row("torch.rms_norm", "rms_norm", "torch", "torch.nn.functional.rms_norm (reaches nn.RMSNorm.forward)",
         "patch_rms_norm", "F.rms_norm and nn.RMSNorm on the provider's RMSNorm kernel"),
    _row("torch.layer_norm", "layer_norm", "torch",
         "torch.nn.functional.layer_norm (reaches nn.LayerNorm.forward)", "patch_layer_norm",
         "F.layer_norm and nn.LayerNorm on the provider's LayerNorm kernel"),
    _row("torch.layer_norm.dynamo", "layer_norm", "torch._dynamo",
         "torch._dynamo's rule for F.layer_norm (trace the replacement, not an opaque graph node)",
         "patch_layer_norm_dynamo_rule",
         "torch.compile traces the F.layer_norm replacement instead of running it as a graph node"),
    _row("torch.linear", "linear", "torch", "torch.nn.functional.linear (reaches nn.Linear.forward)",
         "patch_linear", "F.linear and nn.Linear on the provider's GEMM"),
    _row("torch.scaled_dot_product_attention", "attention", "torch",
         "torch.nn.functional.scaled_dot_product_attention", "patch_sdpa",
         "F.scaled_dot_product_attention on the provider's attention kernel"),
]


def patch_rms_norm(torch_module, ctx) -> None:
    """Rebind ``torch.nn.functional.rms_norm`` to a replacement with the same signature."""
    from torch.nn import functional

    from fl_patch.kernels import rms_norm as kernels

    original = functional.rms_norm
    rec = ctx.record("torch.nn.functional.rms_norm")
    kernel, unsupported = kernel_pair(kernels, "torch", ctx.provider, rec)
    provider = ctx.provider

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        reason = unsupported(provider, input, normalized_shape, weight)
        if reason is None:
            try:
                return kernel(input, normalized_shape, weight, eps)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(input, normalized_shape, weight, eps)

    ctx.setattr(rec, functional, "rms_norm", like(rms_norm, original))


def patch_layer_norm(torch_module, ctx) -> None:
    """Rebind ``torch.nn.functional.layer_norm`` to a replacement with the same signature."""
    from torch.nn import functional

    from fl_patch.kernels import layer_norm as kernels

    original = functional.layer_norm
    rec = ctx.record("torch.nn.functional.layer_norm")
    kernel, unsupported = kernel_pair(kernels, "", ctx.provider, rec)
    provider = ctx.provider
    plain, optional = _tensor_types(torch_module)

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        if type(input) not in plain or type(weight) not in optional or type(bias) not in optional:
            reason = SUBCLASS
        else:
            reason = unsupported(provider, input, normalized_shape, weight, bias)
        if reason is None:
            try:
                return kernel(input, normalized_shape, weight, bias, eps)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(input, normalized_shape, weight, bias, eps)

    ctx.setattr(rec, functional, "layer_norm", like(layer_norm, original))


def patch_linear(torch_module, ctx) -> None:
    """Rebind ``torch.nn.functional.linear`` (a builtin: ``linear(input, weight, bias=None)``)."""
    from torch.nn import functional

    from fl_patch.kernels import linear as kernels

    original = functional.linear
    rec = ctx.record("torch.nn.functional.linear")
    kernel, unsupported = kernel_pair(kernels, "", ctx.provider, rec)
    provider = ctx.provider
    plain, optional = _tensor_types(torch_module)

    def linear(input, weight, bias=None):
        if type(input) not in plain or type(weight) not in plain or type(bias) not in optional:
            reason = SUBCLASS
        else:
            reason = unsupported(provider, input, weight, bias)
        if reason is None:
            try:
                return kernel(input, weight, bias)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(input, weight, bias)

    ctx.setattr(rec, functional, "linear", like(linear, original))


def patch_sdpa(torch_module, ctx) -> None:
    """Rebind ``torch.nn.functional.scaled_dot_product_attention`` (a builtin whose ``scale`` and
    ``enable_gqa`` are keyword-only)."""
    from torch.nn import functional

    from fl_patch.kernels import attention as kernels

    original = functional.scaled_dot_product_attention
    rec = ctx.record("torch.nn.functional.scaled_dot_product_attention")
    kernel, unsupported = kernel_pair(kernels, "sdpa", ctx.provider, rec)
    provider = ctx.provider
    plain, optional = _tensor_types(torch_module)

    def scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, *, scale=None, enable_gqa=False
    ):
        if (type(query) not in plain or type(key) not in plain or type(value) not in plain
                or type(attn_mask) not in optional):
            reason = SUBCLASS
        else:
            reason = unsupported(provider, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
        if reason is None:
            try:
                return kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)

    ctx.setattr(rec, functional, "scaled_dot_product_attention", like(scaled_dot_product_attention, original))


def _tensor_types(torch_module) -> tuple[frozenset, frozenset]:
    """(types the kernels take as tensors, the same or None): Tensor and Parameter. Any other type (DTensor,
    a quantized weight, ...) is a subclass that goes to the original, reason SUBCLASS."""
    plain = frozenset((torch_module.Tensor, torch_module.nn.Parameter))
    return plain, plain | {type(None)}


def patch_layer_norm_dynamo_rule(dynamo_module, ctx) -> None:
    """Make dynamo trace the ``F.layer_norm`` replacement (see the module docstring)."""
    import importlib

    from torch.nn import functional

    replacement = functional.layer_norm
    if getattr(getattr(replacement, "__code__", None), "co_filename", None) != __file__:
        raise Skip("torch.nn.functional.layer_norm is not fl_patch's replacement")
    trace_rules = importlib.import_module("torch._dynamo.trace_rules")
    from torch._dynamo.variables import UserFunctionVariable

    rule_map = trace_rules.get_torch_obj_rule_map()  # built (and cached) when torch._dynamo is imported
    rec = ctx.record("torch._dynamo.trace_rules.get_torch_obj_rule_map()[torch.nn.functional.layer_norm]")
    if replacement in rule_map:
        ctx.setitem(rec, rule_map, replacement, UserFunctionVariable)
    else:
        ctx.skip(rec, "dynamo does not treat the replacement as an in-graph function")
