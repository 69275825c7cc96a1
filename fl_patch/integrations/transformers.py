"""transformers integration: attention through ``AttentionInterface``, and RMSNorm, rope and the SwiGLU MLP in
every ``transformers.models.*.modeling_*`` module, recognised by the shape of their code, not by model name.

Attention. The ``"flagos"`` row registers an attention function under that name (with the sdpa mask builder
in ``AttentionMaskInterface``, so padded batches get a mask) for ``attn_implementation="flagos"``; the
``"sdpa"`` row puts the same function under ``"sdpa"``, the default, so unchanged code runs on it. Either
way the original ``"sdpa"`` function takes the calls the kernel can't honour. Both write the class-level
``_global_mapping`` dicts that every interface instance reads (there is no unregister: revert restores them).
``"flagos"`` has sdpa's semantics: a model that doesn't support sdpa (``_supports_sdpa = False``, e.g. for
attention sinks) should not pick it, as transformers can't refuse the name for it the way it refuses sdpa.
After ``revert()`` the name is gone: a model set to ``"flagos"`` needs ``set_attn_implementation`` again.

RMSNorm, rope, MLP. Each modeling module's own classes and its ``apply_rotary_pos_emb`` are compared with the
known forms below, written as source text (data): the AST of a function, without decorators, annotations
and docstring, with its locals renamed in order and ``self.variance_epsilon`` / ``self.eps`` read as one
name, plus the same for every Python function it calls by global name or as ``self.<method>``
(``rotate_half``, ``_norm``). A class or function whose shape equals a known form is patched (a class at
class level, reaching existing instances; a function by rebinding the module global); any other is left
original and reported with the reason. A new model is covered when its code has a known form. Shapes are
cached per code object, so each function is parsed once per process.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import NamedTuple

from fl_patch.kernels.gems import NATIVE_ROUTES
from fl_patch.replacements import kernel_pair, like
from fl_patch.runtime import kernel_failed
from fl_patch.table import Target

MODELING = "transformers.models.*.modeling_*"
_HERE = "fl_patch.integrations.transformers"
_NEEDS = ("transformers>=5.0",)

TARGETS = [
    Target(
        name="transformers.attention",
        family="attention",
        module="transformers.modeling_utils",
        attribute="AttentionInterface['flagos'], AttentionMaskInterface['flagos']",
        factory=f"{_HERE}:patch_attention_name",
        variant="flagos",
        requires=_NEEDS,
        explicit_choice=True,
        description='attn_implementation="flagos" on the provider\'s sdpa kernel',
    ),
    Target(
        name="transformers.attention.sdpa",
        family="attention",
        module="transformers.modeling_utils",
        attribute="AttentionInterface['sdpa'] (the default implementation)",
        factory=f"{_HERE}:patch_attention_sdpa",
        variant="sdpa",
        requires=_NEEDS,
        description='the default attn_implementation="sdpa" on the provider\'s sdpa kernel',
    ),
    Target(
        name="transformers.attention.compiled_causal_skip",
        family="attention",
        module="transformers.masking_utils",
        attribute="masking_utils._ignore_causal_mask_sdpa",
        factory=f"{_HERE}:patch_compiled_causal_skip",
        requires=_NEEDS,
        kernel_free=True,
        description="under torch.compile, unpadded causal sdpa gets is_causal (flash) as in eager, not a mask",
    ),
    Target(
        name="transformers.attention.compiled_no_packing",
        family="attention",
        module="transformers.masking_utils",
        attribute="masking_utils.find_packed_sequence_indices",
        factory=f"{_HERE}:patch_compiled_no_packing",
        requires=_NEEDS,
        kernel_free=True,
        opt_in=True,
        description="opt-in: under torch.compile, position ids never hold packed sequences (prefill skips the mask)",
    ),
    Target(
        name="transformers.rms_norm",
        family="rms_norm",
        module=MODELING,
        attribute="*RMSNorm.forward of a known form, per modeling module",
        factory=f"{_HERE}:patch_rms_norm",
        requires=_NEEDS,
        description="RMSNorm classes in the Llama, Gemma (1 + w) or fp32-weight form",
    ),
    Target(
        name="transformers.rope",
        family="rope",
        module=MODELING,
        attribute="apply_rotary_pos_emb of a known form, per modeling module",
        factory=f"{_HERE}:patch_rope",
        requires=_NEEDS,
        description="apply_rotary_pos_emb in the Llama form (full or partial rotary)",
    ),
    Target(
        name="transformers.swiglu",
        family="swiglu",
        module=MODELING,
        attribute="MLP.forward of the form down_proj(act_fn(gate_proj(x)) * up_proj(x)), per modeling module",
        factory=f"{_HERE}:patch_swiglu",
        requires=_NEEDS,
        description="the gated MLP's silu(gate) * up on the provider's SwiGLU kernel",
    ),
]

# ---------------------------------------------------------------------------------------------------------
# Known forms. Each is source text copied from transformers; a form may have several writings. Only exact
# forms belong here: one that differs in what it computes (a weight that may be absent, a clamp, a scale)
# is another form, and stays original unless a kernel with its semantics is added here.

# RMSNorm: the class's forward and the methods it calls. variant -> writings.
RMS_NORM_FORMS = {
    # LlamaRMSNorm: normalise in fp32, cast to the input dtype, then weight * x (promoted dtype).
    "hf": (
        """
        class LlamaRMSNorm:
            def forward(self, hidden_states):
                input_dtype = hidden_states.dtype
                hidden_states = hidden_states.to(torch.float32)
                variance = hidden_states.pow(2).mean(-1, keepdim=True)
                hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
                return self.weight * hidden_states.to(input_dtype)
        """,
        """
        class Llama4TextRMSNorm:
            def _norm(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

            def forward(self, x):
                output = self._norm(x.float()).type_as(x)
                return output * self.weight
        """,
    ),
    # GemmaRMSNorm: all in fp32, norm(x) * (1 + weight), cast back.
    "gemma": (
        """
        class GemmaRMSNorm:
            def _norm(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

            def forward(self, x):
                output = self._norm(x.float())
                output = output * (1.0 + self.weight.float())
                return output.type_as(x)
        """,
    ),
    # The weight multiplied in fp32 before the cast back to the input dtype. Run on the hf kernel, then cast
    # back: exact in fp32 and on the gems provider (FlagGems' rms_norm multiplies in this order); in bf16/fp16
    # the reference provider rounds the normalised value once more (within one ulp), as gems does for "hf".
    "fp32_weight": (
        """
        class AfmoeRMSNorm:
            def forward(self, hidden_states):
                input_dtype = hidden_states.dtype
                hidden_states = hidden_states.to(torch.float32)
                variance = hidden_states.pow(2).mean(-1, keepdim=True)
                hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
                return (self.weight * hidden_states).to(input_dtype)
        """,
        """
        class HeliumRMSNorm:
            def forward(self, hidden_states):
                input_dtype = hidden_states.dtype
                hidden_states = hidden_states.to(torch.float32)
                variance = hidden_states.pow(2).mean(-1, keepdim=True)
                hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
                return (self.weight.to(torch.float32) * hidden_states).to(input_dtype)
        """,
        """
        class MoshiRMSNorm:
            def _norm(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

            def forward(self, x):
                output = self._norm(x.float())
                output = output * self.weight.float()
                return output.type_as(x)
        """,
    ),
    # No weight at all (NanoChat, HRM): normalise in fp32, cast back.
    "unweighted": (
        """
        class NanoChatRMSNorm:
            def _norm(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

            def forward(self, x):
                return self._norm(x.float()).type_as(x)
        """,
    ),
    # Gemma 3n / 4: the weight exists only when with_scale; pow(-0.5) where the others use rsqrt (one fp32 ulp).
    "with_scale": (
        """
        class Gemma4RMSNorm:
            def _norm(self, hidden_states):
                mean_squared = hidden_states.pow(2).mean(-1, keepdim=True) + self.eps
                return hidden_states * torch.pow(mean_squared, -0.5)

            def forward(self, hidden_states):
                normed_output = self._norm(hidden_states.float())
                if self.with_scale:
                    normed_output = normed_output * self.weight.float()
                return normed_output.type_as(hidden_states)
        """,
    ),
    # Qwen3-Next / 3.5, OLMo-Hybrid: Llama's norm, then times act(gate) in fp32; a call runs the kernel when
    # that instance's activation is "silu". forward takes (hidden_states, gate).
    "gated": (
        """
        class Qwen3NextRMSNormGated:
            def forward(self, hidden_states, gate):
                input_dtype = hidden_states.dtype
                hidden_states = hidden_states.to(torch.float32)
                variance = hidden_states.pow(2).mean(-1, keepdim=True)
                hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
                hidden_states = self.weight * hidden_states.to(input_dtype)
                hidden_states = hidden_states * ACT2FN[self.activation](gate.to(torch.float32))
                return hidden_states.to(input_dtype)
        """,
    ),
}


def _weight(module):
    return module.weight


def _no_weight(module):
    return None


def _weight_if_with_scale(module):
    return module.weight if module.with_scale else None


# variant -> (kernel form in fl_patch.kernels.rms_norm, cast the result back to the input dtype, the weight of a
# module instance: what the kernel gets as its weight argument). Plain functions: dynamo traces them inline.
RMS_NORM_KERNELS = {
    "hf": ("hf", False, _weight),
    "gemma": ("gemma", False, _weight),
    "fp32_weight": ("hf", True, _weight),
    "unweighted": ("fp32", False, _no_weight),
    "with_scale": ("fp32", False, _weight_if_with_scale),
    "gated": ("gated", False, _weight),  # its own forward: _gated_rms_norm_forward
}
# The fallback reason of a small call that ran the form's torch path (``native_<form>``) rather than the original.
# How a call routed to torch's fused rms_norm instead of the kernel is counted, per routing reason.
NATIVE_LABELS = {reason: f"{reason} (torch rms_norm)" for reason in NATIVE_ROUTES}

ROTATE_HALF = """
def rotate_half(x):
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)
"""

# apply_rotary_pos_emb, with the (q, k, cos, sin, unsqueeze_dim=1) signature; variant -> writings.
ROPE_FORMS = {
    # Llama's, and the partial-rotary writings (rotate the first cos.shape[-1] channels), which equal it when
    # cos covers the head dim; the kernel does both.
    "hf": (
        ROTATE_HALF + """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed, k_embed
""",
        ROTATE_HALF + """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = (q_rot * cos) + (rotate_half(q_rot) * sin)
    k_embed = (k_rot * cos) + (rotate_half(k_rot) * sin)
    q_embed = torch.cat([q_embed, q_pass], dim=-1)
    k_embed = torch.cat([k_embed, k_pass], dim=-1)
    return q_embed, k_embed
""",
        ROTATE_HALF + """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed
""",
        ROTATE_HALF + """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rot_dim = cos.shape[-1]
    q, q_pass = q[..., :rot_dim], q[..., rot_dim:]
    k, k_pass = k[..., :rot_dim], k[..., rot_dim:]
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return torch.cat((q_embed, q_pass), dim=-1), torch.cat((k_embed, k_pass), dim=-1)
""",
    ),
    # OLMo's: Llama's, then each result cast back to its input's dtype.
    "hf_cast": (
        ROTATE_HALF + """
def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    q_type, k_type = q.dtype, k.dtype
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    q_embed = (q * cos) + (rotate_half(q) * sin)
    k_embed = (k * cos) + (rotate_half(k) * sin)
    return q_embed.to(q_type), k_embed.to(k_type)
""",
    ),
}
ROPE_PARAMETERS = (("q", inspect.Parameter.empty), ("k", inspect.Parameter.empty), ("cos", inspect.Parameter.empty),
                   ("sin", inspect.Parameter.empty), ("unsqueeze_dim", 1))

SWIGLU_FORMS = {
    "swiglu": (
        """
        class LlamaMLP:
            def forward(self, x):
                down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
                return down_proj
        """,
        """
        class Idefics2MLP:
            def forward(self, x):
                return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
        """,
    ),
}
# A class is a SwiGLU candidate (and gets a report record) when its forward names all of these.
SWIGLU_NAMES = frozenset({"down_proj", "gate_proj", "up_proj"})

EPS_ATTRIBUTES = ("variance_epsilon", "eps")  # read as one name when comparing shapes

# ---------------------------------------------------------------------------------------------------------
# Shapes


class Form(NamedTuple):
    """What :func:`classify` found. variant None: no known form, see reason."""

    variant: str | None
    reason: str = ""
    eps: str = ""  # the eps attribute the code reads (RMSNorm)
    helpers: frozenset[str] = frozenset()  # methods of self the form calls


class _Normaliser(ast.NodeTransformer):
    """Rewrites one function in place: locals renamed in order of appearance, ``self.<eps>`` -> ``self.EPS``;
    collects the eps names seen and the calls to globals and to ``self`` methods."""

    def __init__(self, local_names: set[str]):
        self.local_names = local_names
        self.renamed: dict[str, str] = {}
        self.eps: set[str] = set()
        self.calls: set[tuple[str, str]] = set()

    def _rename(self, name: str) -> str:
        return self.renamed.setdefault(name, f"_{len(self.renamed)}") if name in self.local_names else name

    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.arg, node.annotation = self._rename(node.arg), None
        return node

    def visit_Name(self, node: ast.Name) -> ast.Name:
        node.id = self._rename(node.id)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.Attribute:
        if _is_self(node.value) and node.attr in EPS_ATTRIBUTES:
            self.eps.add(node.attr)
            node.attr = "EPS"
        self.generic_visit(node)
        return node

    def visit_Call(self, node: ast.Call) -> ast.Call:
        func = node.func
        if isinstance(func, ast.Name) and func.id not in self.local_names:
            self.calls.add(("global", func.id))
        elif isinstance(func, ast.Attribute) and _is_self(func.value):
            self.calls.add(("self", func.attr))
        self.generic_visit(node)
        return node


def _is_self(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id == "self"


@functools.lru_cache(maxsize=None)
def _normalised(text: str) -> tuple[str, frozenset[str], frozenset[tuple[str, str]]] | None:
    """(normalised AST dump, eps names, calls) of the function whose dedented source is `text`; None if
    `text` is not one function definition."""
    try:
        node = ast.parse(text).body[0]
    except (SyntaxError, IndexError):
        return None
    if not isinstance(node, ast.FunctionDef):
        return None
    node.decorator_list, node.returns, node.name = [], None, "_"
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        node.body = node.body[1:] or [ast.Pass()]  # the docstring
    arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
    local_names = {a.arg for a in arguments if a.arg != "self"}
    local_names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    normaliser = _Normaliser(local_names)
    normaliser.visit(node)
    return ast.dump(node), frozenset(normaliser.eps), frozenset(normaliser.calls)


def _shape(source: Callable[[str, str], str | None]) -> tuple[str, frozenset[str], frozenset[str]]:
    """(shape, eps names, self methods) of the function ``source("entry", "")`` and every Python function it
    calls, recursively (``source(kind, name)``: kind ``"self"`` or ``"global"``; None = not a Python function).
    Equal shapes mean equal code up to local names and the eps attribute's name."""
    parts, eps, helpers, seen, todo = [], set(), set(), set(), [("entry", "")]
    while todo:
        kind, name = todo.pop()
        text = None if (kind, name) in seen else source(kind, name)
        seen.add((kind, name))
        if text is None:
            continue
        if kind == "self":
            helpers.add(name)
        normalised = _normalised(text)
        if normalised is None:
            parts.append(f"{kind}.{name}: unreadable")
            continue
        dump, names, calls = normalised
        parts.append(f"{kind}.{name}: {dump}")
        eps |= names
        todo.extend(sorted(calls))
    return "\n".join(sorted(parts)), frozenset(eps), frozenset(helpers)


@functools.lru_cache(maxsize=None)
def _code_source(code: types.CodeType) -> str | None:
    """The dedented source of a code object's function, or None when it can't be read."""
    try:
        return textwrap.dedent(inspect.getsource(code))
    except (OSError, TypeError):
        return None


def _function_source(obj: object) -> str | None:
    """Source of a plain, undecorated Python function (a wrapper's source would not be what runs)."""
    if not isinstance(obj, types.FunctionType) or hasattr(obj, "__wrapped__"):
        return None
    return _code_source(obj.__code__)


def _live_source(entry: types.FunctionType, owner: type | None) -> Callable[[str, str], str | None]:
    """A `source` for :func:`_shape` over live objects: ``self`` methods looked up on `owner`, globals in the
    entry function's module."""

    def source(kind: str, name: str) -> str | None:
        if kind == "entry":
            return _function_source(entry)
        if kind == "self":
            return _function_source(inspect.getattr_static(owner, name, None)) if owner is not None else None
        return _function_source(entry.__globals__.get(name))

    return source


def _text_source(text: str, entry: str) -> Callable[[str, str], str | None]:
    """A `source` for :func:`_shape` over a form's text: a class (its methods are ``self``) or functions;
    `entry` names the function that runs."""
    tree = ast.parse(textwrap.dedent(text))
    functions, methods = {}, {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            methods.update({m.name: ast.unparse(m) for m in node.body if isinstance(m, ast.FunctionDef)})
        elif isinstance(node, ast.FunctionDef):
            functions[node.name] = ast.unparse(node)

    def source(kind: str, name: str) -> str | None:
        if kind == "entry":
            return methods.get(entry) or functions.get(entry)
        return (methods if kind == "self" else functions).get(name)

    return source


# form table name -> (the table, the name of the function that runs)
_FORM_TABLES = {
    "rms_norm": (RMS_NORM_FORMS, "forward"),
    "rope": (ROPE_FORMS, "apply_rotary_pos_emb"),
    "swiglu": (SWIGLU_FORMS, "forward"),
}


@functools.lru_cache(maxsize=None)
def _known_shapes(table: str) -> dict[str, str]:
    """shape -> variant for one form table (parsed once)."""
    forms, entry = _FORM_TABLES[table]
    return {_shape(_text_source(text, entry))[0]: variant for variant, writings in forms.items() for text in writings}


def classify(table: str, function: types.FunctionType, owner: type | None = None) -> Form:
    """Which known form of `table` (``"rms_norm"``, ``"rope"``, ``"swiglu"``) `function` has: a method of
    `owner`, or a module-level function (owner None)."""
    source = _live_source(function, owner)
    if source("entry", "") is None:
        return Form(None, "source unavailable, or wrapped by a decorator")
    shape, eps, helpers = _shape(source)
    variant = _known_shapes(table).get(shape)
    if variant is None:
        return Form(None, f"code matches no known {table} form")
    if len(eps) > 1:
        return Form(None, f"reads several eps attributes: {', '.join(sorted(eps))}")
    return Form(variant, eps=next(iter(eps), ""), helpers=helpers)


# ---------------------------------------------------------------------------------------------------------
# Attention

# Keyword arguments that may reach the attention function and leave sdpa_attention_forward's result unchanged
# (it ignores them); is_causal is read here as sdpa reads it. Audited on transformers 5.25: the keywords every
# modeling file passes to attention_interface, and those that reached it in a training forward (labels,
# output_hidden_states=True, num_items_in_batch, backward) and in generate() of every causal-LM type built tiny.
# - bookkeeping of the model's forward and outputs, which **kwargs carries down to attention: num_items_in_batch
#   (transformers.Trainer passes it to every training forward), output_hidden_states, output_router_logits,
#   labels (gemma4), use_cache, cache_position (earlier 5.x), logits_to_keep, position_ids (rope is applied
#   before attention);
# - already in the mask the sdpa mask builder made: sliding_window;
# - flash-attention only: cu_seq_lens_q/k, max_length_q/k, seq_idx (packed sequences: the sdpa mask carries the
#   packing, found from position_ids), deterministic (flash's backward).
# Any other keyword, when set (not None / False), sends the call to the original: it may change the result or
# ask for something the kernel does not give. In 5.25: softcap, s_aux and sinks (attention sinks),
# position_bias, indices and block_indices (sparse attention), cross_attention_mask and
# full_text_row_masked_out_mask, output_attentions=True (weights); and whatever a later release adds.
ATTENTION_NEUTRAL_KWARGS = frozenset({
    "is_causal",
    "num_items_in_batch", "output_hidden_states", "output_router_logits", "labels", "use_cache", "cache_position",
    "logits_to_keep", "position_ids",
    "sliding_window",
    "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx", "deterministic",
})


def _attention_refusal(dropout: float, kwargs: dict) -> str | None:
    """Why the kernel can't stand in for sdpa_attention_forward on this call (None: it can)."""
    if dropout:
        return "dropout"
    for name, value in kwargs.items():
        if name not in ATTENTION_NEUTRAL_KWARGS and value is not None and value is not False:
            return name
    return None


def _attention_function(ctx, rec, original: Callable) -> Callable:
    """An AttentionInterface function on the provider's sdpa kernel that decides causality exactly as
    transformers' ``sdpa_attention_forward`` does and hands every call it can't take to `original`."""
    from fl_patch.kernels import attention as kernels

    kernel, unsupported = kernel_pair(kernels, "sdpa", ctx.provider, rec)
    provider = ctx.provider

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        reason = _attention_refusal(dropout, kwargs)
        if reason is None:
            q_length = query.shape[2]
            is_causal = kwargs.get("is_causal")
            is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            is_causal = q_length > 1 and attention_mask is None and is_causal
            k, v = key, value
            if is_causal and k.shape[2] > q_length:  # prefill into an empty static cache, as sdpa does
                k, v = k[:, :, :q_length], v[:, :, :q_length]
            enable_gqa = query.shape[1] != k.shape[1]
            reason = unsupported(provider, query, k, v, attention_mask, dropout, is_causal, scaling, enable_gqa)
            if reason is None:
                try:
                    out = kernel(query, k, v, attn_mask=attention_mask, is_causal=is_causal, scale=scaling,
                                 enable_gqa=enable_gqa)
                    return out.transpose(1, 2).contiguous(), None
                except Exception as exc:
                    reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    return like(attention, original)


def patch_attention_name(modeling_utils, ctx) -> None:
    """Register ``"flagos"`` in AttentionInterface and, with the sdpa mask builder, in AttentionMaskInterface.

    Runs before the ``"sdpa"`` row (table order), so its fallback is the original sdpa function.
    """
    from transformers import masking_utils

    original = modeling_utils.ALL_ATTENTION_FUNCTIONS["sdpa"]
    rec = ctx.record("transformers.AttentionInterface['flagos']")
    ctx.setitem(rec, modeling_utils.AttentionInterface._global_mapping, "flagos",
                _attention_function(ctx, rec, original))
    mask_rec = ctx.record("transformers.masking_utils.AttentionMaskInterface['flagos']")
    ctx.setitem(mask_rec, masking_utils.AttentionMaskInterface._global_mapping, "flagos",
                masking_utils.ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def patch_attention_sdpa(modeling_utils, ctx) -> None:
    """Put the kernel under ``"sdpa"``, the default; the original sdpa function stays its fallback."""
    rec = ctx.record("transformers.AttentionInterface['sdpa']")
    local = modeling_utils.ALL_ATTENTION_FUNCTIONS._local_mapping.get("sdpa")
    if local is not None:
        ctx.skip(rec, f"ALL_ATTENTION_FUNCTIONS['sdpa'] is overridden by {getattr(local, '__qualname__', local)}")
        return
    mapping = modeling_utils.AttentionInterface._global_mapping
    ctx.setitem(rec, mapping, "sdpa", _attention_function(ctx, rec, mapping["sdpa"]))


# ---------------------------------------------------------------------------------------------------------
# The causal mask under torch.compile
#
# Eagerly, transformers' sdpa_mask builds no mask for an unpadded causal call (no attention_mask, and q_length
# 1 or equal to kv_length, or an empty cache): SDPA's is_causal flag then reaches the flash kernel. While
# dynamo traces it never skips, because the skip must not be baked into a torch.export graph and, before
# torch 2.14 (pytorch#176499), ``torch.compiler.is_exporting()`` is constant True inside dynamo; so a compiled
# model gets a materialised (B, 1, S, S) mask and a slower SDPA kernel. transformers skips under compile
# itself from torch 2.14 on (5.23's comment says so); this backports that case to older torch by reading the
# flag export sets. Calls with a padding mask (its values can't be read while tracing), a tensor q_offset,
# a sliding window that applies, or outside dynamo, all go to the original.

CAUSAL_SKIP_PARAMETERS = ("padding_mask", "q_length", "kv_length", "q_offset", "kv_offset", "local_attention_size")


def patch_compiled_causal_skip(masking_utils, ctx) -> None:
    """Wrap ``masking_utils._ignore_causal_mask_sdpa`` (called by ``sdpa_mask`` through the module global) so that
    under torch.compile, not export, an unpadded causal call skips the mask as it does eagerly."""
    rec = ctx.record("transformers.masking_utils._ignore_causal_mask_sdpa")
    original = getattr(masking_utils, "_ignore_causal_mask_sdpa", None)
    if original is None:
        ctx.skip(rec, "transformers.masking_utils has no _ignore_causal_mask_sdpa")
        return
    parameters = tuple(inspect.signature(original).parameters)
    if parameters != CAUSAL_SKIP_PARAMETERS:
        ctx.skip(rec, f"_ignore_causal_mask_sdpa{parameters} is not the known signature {CAUSAL_SKIP_PARAMETERS}")
        return
    rec.provider = "torch sdpa"
    ctx.setattr(rec, masking_utils, "_ignore_causal_mask_sdpa", _causal_skip_under_compile(original))


def _compiling_not_exporting() -> bool:
    import torch

    # torch.export sets _is_exporting_flag before dynamo traces; absent (unknown torch), assume export.
    return torch.compiler.is_dynamo_compiling() and not getattr(torch.compiler, "_is_exporting_flag", True)


def _causal_skip_under_compile(original):
    import torch

    def ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if (
            padding_mask is None
            and not isinstance(q_offset, torch.Tensor)
            and _compiling_not_exporting()
            and (local_attention_size is None or kv_length < local_attention_size)
            and (q_length == 1 or kv_length == q_length or q_offset == 0)
        ):
            return True
        return original(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    return like(ignore_causal_mask_sdpa, original)


# Without a cache and without an attention mask, transformers looks for packed sequences in the position ids
# (positions that restart inside a row, as DataCollatorWithFlattening writes them). Eagerly it reads their values
# and finds none; while tracing it can't, so ``find_packed_sequence_indices`` returns the traced tensor, and the
# compiled model builds a (B, 1, S, S) mask with a packed-sequence term and never skips it, even when the model
# made the positions itself (``arange``, packing impossible). That fact lives only in each model's forward
# (``if position_ids is None: ...``), after which the mask code sees a tensor like any other: no rule inside
# masking_utils can tell the two apart soundly. So this is an opt-in row: the user states that their position
# ids are never packed. Eager calls and torch.export keep the original's answer. Together with the row above
# (or torch >= 2.14) SDPA then gets ``is_causal``.


def patch_compiled_no_packing(masking_utils, ctx) -> None:
    """Wrap ``masking_utils.find_packed_sequence_indices`` (called by ``_preprocess_mask_arguments`` through the
    module global): under torch.compile, not export, it answers None (no packed sequences)."""
    rec = ctx.record("transformers.masking_utils.find_packed_sequence_indices")
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        ctx.skip(rec, "transformers.masking_utils has no find_packed_sequence_indices")
        return
    parameters = tuple(inspect.signature(original).parameters)
    if parameters != ("position_ids",):
        ctx.skip(rec, f"find_packed_sequence_indices{parameters} is not the known signature ('position_ids',)")
        return
    rec.provider = "torch sdpa"
    ctx.setattr(rec, masking_utils, "find_packed_sequence_indices", _no_packing_under_compile(original))


def _no_packing_under_compile(original):
    def find_packed_sequence_indices(position_ids):
        if _compiling_not_exporting():
            return None
        return original(position_ids)

    return like(find_packed_sequence_indices, original)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm, rope, SwiGLU


def _rms_norm_forward(kernel, unsupported, native, provider: str, original, rec, eps_name: str, cast_back: bool,
                     weight_of: Callable):
    """`native` (or None): the form's torch path for calls routed away from the kernel for speed
    (``gems.NATIVE_ROUTES``); `weight_of(module)`: the weight the kernel gets (None for unweighted forms)."""
    def forward(self, hidden_states):
        weight = weight_of(self)
        reason = unsupported(provider, hidden_states, weight)
        if reason is None:
            try:
                out = kernel(hidden_states, weight, getattr(self, eps_name))
                return out.to(hidden_states.dtype) if cast_back else out
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        elif native is not None and reason in NATIVE_ROUTES:
            rec.fallback(NATIVE_LABELS[reason])
            out = native(hidden_states, weight, getattr(self, eps_name))
            return out.to(hidden_states.dtype) if cast_back else out
        rec.fallback(reason)
        return original(self, hidden_states)

    return like(forward, original)


def _gated_rms_norm_forward(kernel, unsupported, native, provider: str, original, rec, eps_name: str):
    """The "gated" form's forward(hidden_states, gate); a call whose instance's activation isn't silu keeps the
    original."""
    def forward(self, hidden_states, gate):
        if self.activation != "silu":
            rec.fallback("activation is not silu")
            return original(self, hidden_states, gate)
        weight = self.weight
        reason = unsupported(provider, hidden_states, gate, weight)
        if reason is None:
            try:
                return kernel(hidden_states, gate, weight, getattr(self, eps_name))
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        elif reason in NATIVE_ROUTES:
            rec.fallback(NATIVE_LABELS[reason])
            return native(hidden_states, gate, weight, getattr(self, eps_name))
        rec.fallback(reason)
        return original(self, hidden_states, gate)

    return like(forward, original)


def patch_rms_norm(module, ctx) -> None:
    """Patch ``forward`` of every ``*RMSNorm`` class defined in `module` that has a known form (replacements
    take the input positionally, as every transformers caller passes it). Calls too small for FlagGems run
    torch's fused ``rms_norm`` where the form has one (``native_<form>``), else the original."""
    from fl_patch.kernels import rms_norm as kernels

    def make_forward(original, rec, form: Form) -> Callable:
        kernel_form, cast_back, weight_of = RMS_NORM_KERNELS[form.variant]
        kernel, unsupported = kernel_pair(kernels, kernel_form, ctx.provider, rec)
        native = getattr(kernels, f"native_{kernel_form}", None)
        if form.variant == "gated":
            return _gated_rms_norm_forward(kernel, unsupported, native, ctx.provider, original, rec, form.eps)
        return _rms_norm_forward(kernel, unsupported, native, ctx.provider, original, rec, form.eps, cast_back,
                                 weight_of)

    _patch_forwards(module, ctx, "rms_norm", lambda cls, forward: "RMSNorm" in cls.__name__, make_forward)


def _rope_function(kernel, unsupported, provider: str, original, rec, cast_back: bool):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        reason = unsupported(provider, q, k, cos, sin, unsqueeze_dim)
        if reason is None:
            try:
                q_embed, k_embed = kernel(q, k, cos, sin, unsqueeze_dim)
                return (q_embed.to(q.dtype), k_embed.to(k.dtype)) if cast_back else (q_embed, k_embed)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(q, k, cos, sin, unsqueeze_dim)

    return like(apply_rotary_pos_emb, original)


def patch_rope(module, ctx) -> None:
    """Rebind `module`'s ``apply_rotary_pos_emb`` global when it has a known form and Llama's signature."""
    from fl_patch.kernels import rope as kernels

    original = vars(module).get("apply_rotary_pos_emb")
    if original is None:
        return
    function = original if isinstance(original, types.FunctionType) else _function_inside(original,
                                                                                         "apply_rotary_pos_emb")
    form = classify("rope", function) if function is not None else Form(None, "not a function")
    if form.variant is not None and _parameters(function) != ROPE_PARAMETERS:
        form = Form(None, f"signature {inspect.signature(function)} is not (q, k, cos, sin, unsqueeze_dim=1)")
    rec = ctx.record(f"{module.__name__}.apply_rotary_pos_emb", variant=form.variant)
    if form.variant is None:
        ctx.skip(rec, form.reason)
        return
    kernel, unsupported = kernel_pair(kernels, "hf", ctx.provider, rec)
    replacement = _rope_function(kernel, unsupported, ctx.provider, original, rec, form.variant == "hf_cast")
    ctx.setattr(rec, module, "apply_rotary_pos_emb", replacement)


def _function_inside(layer: object, name: str) -> types.FunctionType | None:
    """The plain function `name` that a callable layer object runs, or None.

    transformers >= 5.25 decorates ``apply_rotary_pos_emb`` with the ``kernels`` package's
    ``use_kernel_forward_from_hub``, which turns the function into an ``nn.Module`` instance whose class's
    ``forward`` calls it (a closure over the function; it runs a Hub kernel instead only after ``kernelize``). The
    module global fl_patch rebinds is then that instance: its code is the closed-over function's, and the
    instance stays the original that fallbacks call and revert restores."""
    forward = getattr(type(layer), "forward", None)
    for cell in getattr(forward, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if isinstance(value, types.FunctionType) and value.__name__ == name:
            return value
    return None


def _parameters(function: Callable) -> tuple:
    return tuple((p.name, p.default) for p in inspect.signature(function).parameters.values())


def _swiglu_forward(kernel, unsupported, native, provider: str, original, rec, silu_types: tuple[type, ...]):
    """`native`: the torch path of calls routed away from the kernel for speed (``gems.NATIVE_ROUTES``)."""
    def forward(self, x):
        act_fn = self.act_fn
        if type(act_fn) not in silu_types:
            rec.fallback("act_fn is not SiLU")
            return original(self, x)
        gate, up = self.gate_proj(x), self.up_proj(x)
        reason = unsupported(provider, gate, up)
        if reason is None:
            try:
                hidden = kernel(gate, up)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
            else:  # down_proj is the model's module (hooks, a patched F.linear): not part of the kernel call
                return self.down_proj(hidden)
        elif reason in NATIVE_ROUTES and gate.shape == up.shape:
            rec.fallback(reason)
            return self.down_proj(native(gate, up))
        rec.fallback(reason)
        return self.down_proj(act_fn(gate) * up)

    return like(forward, original)


def patch_swiglu(module, ctx) -> None:
    """Patch ``forward`` of every class in `module` whose forward is ``down_proj(act_fn(gate_proj(x)) *
    up_proj(x))``; a call runs on the kernel when that instance's ``act_fn`` is SiLU."""
    from torch import nn
    from transformers import activations

    from fl_patch.kernels import swiglu as kernels

    silu_types = (activations.SiLUActivation, nn.SiLU)

    def make_forward(original, rec, form: Form) -> Callable:
        kernel, unsupported = kernel_pair(kernels, "", ctx.provider, rec)
        return _swiglu_forward(kernel, unsupported, kernels.native, ctx.provider, original, rec, silu_types)

    def is_candidate(cls: type, forward: types.FunctionType) -> bool:
        return SWIGLU_NAMES <= set(forward.__code__.co_names)

    _patch_forwards(module, ctx, "swiglu", is_candidate, make_forward)


# A patched forward carries (row name, methods of self its form calls): a subclass that inherits it but
# overrides one of those methods must not run the kernel, which would skip the override.
_HELPERS = "_fl_patch_helpers"


def _patch_forwards(module, ctx, table: str, is_candidate: Callable, make_forward: Callable) -> None:
    """The class-level rows' loop over the classes defined in `module`: each candidate (``is_candidate(cls,
    forward)``) with its own forward is classified against `table` and patched with ``make_forward(original,
    rec, form)`` or skipped; each that inherits a forward this row patched gets the original back if it
    overrides a method that forward's form calls."""
    for cls in _own_classes(module):
        original = _own_forward(cls)
        if original is None:
            _restore_if_helpers_overridden(cls, ctx)
            continue
        if not is_candidate(cls, original):
            continue
        form = classify(table, original, cls)
        rec = ctx.record(f"{module.__name__}.{cls.__qualname__}.forward", variant=form.variant)
        if form.variant is None:
            ctx.skip(rec, form.reason)
            continue
        forward = make_forward(original, rec, form)
        setattr(forward, _HELPERS, (ctx.target.name, form.helpers))
        ctx.setattr(rec, cls, "forward", forward)


def _own_classes(module: types.ModuleType) -> list[type]:
    """Classes defined in `module` (not imported into it), in definition order."""
    return [c for c in vars(module).values() if isinstance(c, type) and c.__module__ == module.__name__]


def _own_forward(cls: type) -> types.FunctionType | None:
    forward = vars(cls).get("forward")
    return forward if isinstance(forward, types.FunctionType) else None


def _restore_if_helpers_overridden(cls: type, ctx) -> None:
    """Give `cls` the original forward back when it inherits one this row patched and overrides a method
    that forward's form calls."""
    inherited = inspect.getattr_static(cls, "forward", None)
    row, helpers = getattr(inherited, _HELPERS, ("", ()))
    overridden = sorted(name for name in helpers if name in vars(cls))
    if row == ctx.target.name and overridden:
        rec = ctx.record(f"{cls.__module__}.{cls.__qualname__}.forward")
        ctx.setattr(rec, cls, "forward", inherited.__wrapped__)
        ctx.skip(rec, f"overrides {', '.join(overridden)}, which the inherited patched forward would skip")
