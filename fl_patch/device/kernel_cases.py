"""The kernel rows that ``fl-patch check`` and ``fl-patch tune`` run: one :class:`Form` per routing key.

A Form holds, for one key ``<family>.<form>`` of :data:`fl_patch.device.profiles.FAMILY_FORMS`, what both commands
need: its kernel module and function suffix (``gems<suffix>``, ``reference<suffix>``,
``unsupported<suffix>``, and ``native<suffix>`` where the form has one), its shape variants, the original it
replaces (what check compares with) and the native path fl_patch runs instead of FlagGems (what tune times).

Sizes are in the routing unit: the element count of the deciding tensor, the first tensor argument of
``unsupported<suffix>`` (x for norms and linear, q for rope, query for sdpa, q for varlen, gate for swiglu).
A variant builds inputs of about the asked number of elements with its inner dims fixed as in a model
(hidden 4096, head dim 128, 32 query / 8 key-value heads, ...; tiny sizes shrink the inner dims); what is
recorded is the actual count. ``max_elements`` caps a variant where larger inputs are not typical (a
decode batch) or too slow to time; ``tune=False`` marks variants only check runs (masked sdpa: fl_patch
routes masked calls to the original, and FlagGems retunes its masked kernel for every key length).

Also here: the device both commands run on (:func:`pick_device`). Both call the kernels directly, so the device
profile's routing (fl_patch.device.routing, which sits in front of the kernels in patched places) plays no part.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fl_patch.device import devices
from fl_patch.kernels import attention, cross_entropy, layer_norm, linear, rms_norm, rope, swiglu

EPS = 1e-6
LAYER_NORM_EPS = 1e-5
HIDDEN = 4096  # an LLM's hidden size
HEAD_DIM = 128
Q_HEADS, KV_HEADS = 32, 8  # GQA, as Llama 3 8B
DIT_HEADS = 12  # LightX2V's Wan 1.3B: 12 heads of 128
INTERMEDIATE = 8192  # the MLP's gate/up width
DECODE_CACHE = 1024  # cached keys of a decode step
VOCAB = 32000  # the causal-LM loss's classes (Llama 2's vocabulary)
IGNORED_EVERY = 7  # every 7th row's label is ignore_index (-100), as padding in a batch
CPU_HINT = "--quick (or, for check, --kernels reference) runs fl_patch's reference kernels on the CPU"


@dataclass
class Inputs:
    """One call's arguments. args: the kernel's (and the original's and native's) positional arguments.
    unsupported_args: what ``unsupported<suffix>(provider, *unsupported_args)`` takes. grads: positions in
    args of the tensors whose gradients check compares. shape: a label for people."""

    args: tuple
    unsupported_args: tuple
    shape: str
    grads: tuple[int, ...] = ()

    @property
    def deciding(self) -> torch.Tensor:
        """The tensor the routing decides by (its ``numel()``)."""
        return self.unsupported_args[0]

    def map(self, function: Callable[[torch.Tensor], torch.Tensor]) -> Inputs:
        """These inputs with `function` applied once to each tensor (shared by args and unsupported_args)."""
        done: dict[int, torch.Tensor] = {}

        def convert(value):
            if not isinstance(value, torch.Tensor):
                return value
            if id(value) not in done:
                done[id(value)] = function(value)
            return done[id(value)]

        return Inputs(tuple(convert(a) for a in self.args), tuple(convert(a) for a in self.unsupported_args),
                      self.shape, self.grads)

    def in_fp32(self) -> Inputs:
        """fp32 copies of the floating-point tensors (the "exact" run of the original)."""
        return self.map(lambda t: t.float() if t.is_floating_point() else t)

    def requiring_grad(self) -> Inputs:
        """Copies in which the tensors at `grads` are leaves that require grad (the others shared)."""
        wanted = {id(self.args[position]) for position in self.grads}
        return self.map(lambda t: t.detach().requires_grad_() if id(t) in wanted else t)

    def grad_tensors(self) -> list[torch.Tensor]:
        return [self.args[position] for position in self.grads]


@dataclass(frozen=True)
class Variant:
    """A family of shapes of one form: ``build(elements, dtype, device) -> Inputs``."""

    name: str
    build: Callable[[int, torch.dtype, torch.device], Inputs]
    max_elements: int | None = None
    tune: bool = True


@dataclass(frozen=True)
class Named:
    """A function with the kernel's signature, and the dotted name people know it by."""

    name: str
    function: Callable


@dataclass(frozen=True)
class Form:
    """One routing key. original / native: zero-argument callables giving a :class:`Named` (resolved late:
    they may import transformers). sizes: the element counts this form runs at in place of a command's grid,
    by grid name (``check`` and ``tune`` on a device, ``cpu`` for both on the CPU), where every new size is
    expensive (FlagGems' GEMM autotunes per token count: 2.6 s each on an H200; a CPU multiplies 4096-wide
    weights slowly). device_dtypes: the only dtypes check runs on a device, where each dtype costs a long
    first tuning (FlagGems' GEMM: 35 s per dtype on an H200, tests/gpu/results/kernels.json). dtypes: the only
    dtypes the form's path takes, in place of either command's own (check's, tune's bfloat16): the loss
    computes in fp32."""

    key: str
    module: object
    suffix: str
    variants: tuple[Variant, ...]
    original: Callable[[], Named]
    native: Callable[[], Named]
    sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    device_dtypes: tuple[torch.dtype, ...] | None = None
    dtypes: tuple[torch.dtype, ...] | None = None

    @property
    def family(self) -> str:
        return self.key.split(".", 1)[0]

    @property
    def form(self) -> str:
        return self.key.split(".", 1)[1]

    def kernel(self, provider: str) -> Named:
        """The provider's kernel (``gems<suffix>`` / ``reference<suffix>``) with its qualified name."""
        return self._named(provider + self.suffix)

    def native_kernel(self) -> Named | None:
        """fl_patch's own ``native<suffix>`` path of this form, where it has one."""
        return self._named("native" + self.suffix) if hasattr(self.module, "native" + self.suffix) else None

    def unsupported(self, provider: str, inputs: Inputs) -> str | None:
        """None when `provider` takes this call, else the reason (what the patched call would say)."""
        return getattr(self.module, "unsupported" + self.suffix)(provider, *inputs.unsupported_args)

    def _named(self, attribute: str) -> Named:
        return Named(f"{self.module.__name__}.{attribute}", getattr(self.module, attribute))


def _randn(shape, dtype, device, scale=1.0, offset=0.0) -> torch.Tensor:
    return (torch.randn(shape, device=device) * scale + offset).to(dtype)


def _split(elements: int, inner: int) -> tuple[int, int]:
    """(outer, inner) with about `elements` elements; inner shrinks to `elements` for tiny sizes."""
    inner = min(inner, elements)
    return max(1, round(elements / inner)), inner


def _heads(elements: int, heads: int) -> tuple[int, int]:
    """(tokens, heads) of head dim 128 with about `elements` query elements; fewer heads for tiny sizes."""
    heads = max(1, min(heads, elements // HEAD_DIM))
    return max(1, round(elements / (heads * HEAD_DIM))), heads


def _dims(*sizes) -> str:
    return "x".join(str(s) for s in sizes)


# ---------------------------------------------------------------------------------------------- RMSNorm


def _rms_rows(width: int, weight_offset: float = 1.0, weighted: bool = True):
    def build(elements, dtype, device):
        rows, hidden = _split(elements, width)
        x = _randn((rows, hidden), dtype, device, 3.0)
        weight = _randn((hidden,), dtype, device, 0.5, weight_offset) if weighted else None
        label = f"x {_dims(rows, hidden)}" + ("" if weighted else ", no weight")
        return Inputs((x, weight, EPS), (x, weight), label, (0, 1) if weighted else (0,))

    return build


def _rms_gated(width: int):
    def build(elements, dtype, device):
        rows, hidden = _split(elements, width)
        x, gate = _randn((rows, hidden), dtype, device, 3.0), _randn((rows, hidden), dtype, device, 2.0)
        weight = _randn((hidden,), dtype, device, 0.5, 1.0)
        return Inputs((x, gate, weight, EPS), (x, gate, weight), f"x, gate {_dims(rows, hidden)}", (0, 1, 2))

    return build


def _rms_torch(width: int):
    def build(elements, dtype, device):
        rows, hidden = _split(elements, width)
        x, weight = _randn((rows, hidden), dtype, device, 3.0), _randn((hidden,), dtype, device, 0.5, 1.0)
        return Inputs((x, (hidden,), weight, EPS), (x, (hidden,), weight), f"x {_dims(rows, hidden)}", (0, 2))

    return build


def _hf_module(module: str, class_name: str, fallback: Callable, call: Callable) -> Callable[[], Named]:
    """The original of an HF norm class: `call(cls, *kernel_args)` builds the module around the given weight
    and runs it; fl_patch's copy of its body (`fallback`) where transformers can't be imported."""

    def resolve() -> Named:
        try:
            cls = getattr(importlib.import_module(module), class_name)
        except (ImportError, AttributeError):
            return Named(f"{fallback.__module__}.{fallback.__name__} (transformers' {class_name} not importable: "
                         "fl_patch's copy of its body)", fallback)
        return Named(f"{module}.{class_name}.forward", lambda *args: call(cls, *args))

    return resolve


def _holding(module: torch.nn.Module, weight: torch.Tensor | None) -> torch.nn.Module:
    """`module` with `weight` (a plain tensor, so gradients reach the caller's) in place of its parameter."""
    if weight is not None:
        del module.weight
        module.weight = weight
    return module


def _llama_norm(cls, x, weight, eps):
    return _holding(cls(x.shape[-1], eps=eps), weight)(x)


def _gemma4_norm(cls, x, weight, eps):
    return _holding(cls(x.shape[-1], eps=eps, with_scale=weight is not None), weight)(x)


def _gated_norm(cls, x, gate, weight, eps):
    return _holding(cls(x.shape[-1], eps=eps), weight)(x, gate)


# ------------------------------------------------------------------------------------------------- rope


def _hf_cos_sin(positions: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin ``(rows, S, 128)`` as HF's default rotary embedding builds them: ``cat(freqs, freqs)``."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, device=positions.device).float() / HEAD_DIM))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rope_hf(decode: bool):
    """Prefill: one sequence of S tokens, shared positions. Decode: B rows of one token at other positions."""

    def build(elements, dtype, device):
        tokens, heads = _heads(elements, Q_HEADS)
        kv_heads = max(1, heads // (Q_HEADS // KV_HEADS))
        batch, seq = (tokens, 1) if decode else (1, tokens)
        q = _randn((batch, seq, heads, HEAD_DIM), dtype, device).transpose(1, 2)
        k = _randn((batch, seq, kv_heads, HEAD_DIM), dtype, device).transpose(1, 2)
        if decode:
            positions = (torch.arange(batch, device=device) * 37 + 5)[:, None]
        else:
            positions = torch.arange(seq, device=device)[None]
        cos, sin = _hf_cos_sin(positions, dtype)
        label = f"q {_dims(batch, heads, seq, HEAD_DIM)}, k {kv_heads} heads" + (", own positions" if decode else "")
        return Inputs((q, k, cos, sin, 1), (q, k, cos, sin, 1), label, (0, 1))

    return build


def _rope_interleaved(elements, dtype, device):
    tokens, heads = _heads(elements, DIT_HEADS)
    q, k = _randn((tokens, heads, HEAD_DIM), dtype, device), _randn((tokens, heads, HEAD_DIM), dtype, device)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM))
    angles = torch.outer(torch.arange(tokens, dtype=torch.float64), inv_freq)
    freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :].to(device)
    return Inputs((q, k, freqs), (q, k, freqs), f"q, k {_dims(tokens, heads, HEAD_DIM)}", (0, 1))


def _hf_rope() -> Named:
    try:
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    except ImportError:
        return Named("fl_patch.kernels.rope.reference_hf (transformers not importable: fl_patch's copy of HF's "
                     "apply_rotary_pos_emb)", rope.reference_hf)
    return Named("transformers.models.llama.modeling_llama.apply_rotary_pos_emb",
                 lambda q, k, cos, sin, dim: apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=dim))


# -------------------------------------------------------------------------------------------- attention


def _sdpa(kind: str):
    """causal: LLM prefill (GQA). decode: one query per row against a cache (GQA). dit: a DiT block's
    full attention (12 heads). masked: key padding as a bool mask (two rows, the second padded)."""

    def build(elements, dtype, device):
        heads_wanted = DIT_HEADS if kind == "dit" else 8 if kind == "masked" else Q_HEADS
        tokens, heads = _heads(elements, heads_wanted)
        kv_heads = max(1, heads // (Q_HEADS // KV_HEADS)) if kind in ("causal", "decode") else heads
        if kind == "decode":
            batch, q_len, kv_len = tokens, 1, DECODE_CACHE
        elif kind == "masked":
            batch, q_len = 2, max(1, tokens // 2)
            kv_len = q_len
        else:
            batch, q_len, kv_len = 1, tokens, tokens
        q = _randn((batch, q_len, heads, HEAD_DIM), dtype, device).transpose(1, 2)
        k = _randn((batch, kv_len, kv_heads, HEAD_DIM), dtype, device).transpose(1, 2)
        v = _randn((batch, kv_len, kv_heads, HEAD_DIM), dtype, device).transpose(1, 2)
        mask = None
        if kind == "masked":  # row 1 has its first third of keys padded; every query keeps some key
            keep = torch.ones(batch, 1, 1, kv_len, dtype=torch.bool, device=device)
            keep[1, ..., : kv_len // 3] = False
            mask = keep
        causal, gqa = kind == "causal", heads != kv_heads
        args = (q, k, v, mask, 0.0, causal, None, gqa)
        label = (f"q {_dims(batch, heads, q_len, HEAD_DIM)}, kv {_dims(kv_heads, kv_len)}"
                 + (", causal" if causal else "") + (", key padding mask" if mask is not None else ""))
        return Inputs(args, args, label, (0, 1, 2))

    return build


def sdpa_call(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """``F.scaled_dot_product_attention`` with the kernel's positional signature."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                                          is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


def _varlen(sequences: int):
    """LightX2V's DiT attention on ``(T, 12, 128)`` tokens: one sequence, or two of unequal lengths."""

    def build(elements, dtype, device):
        tokens, heads = _heads(elements, DIT_HEADS)
        tokens = max(tokens, sequences)
        bounds = [0, tokens] if sequences == 1 else [0, tokens // 3 or 1, tokens]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        longest = max(b - a for a, b in zip(bounds, bounds[1:], strict=False))
        q, k, v = (_randn((tokens, heads, HEAD_DIM), dtype, device) for _ in range(3))
        args = (q, k, v, cu, cu, longest, longest, False, None)
        lengths = ", ".join(str(b - a) for a, b in zip(bounds, bounds[1:], strict=False))
        return Inputs(args, (q, k, v, False, None), f"q, k, v {_dims(tokens, heads, HEAD_DIM)}, sequences {lengths}",
                      (0, 1, 2))

    return build


def sdpa_per_sequence(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, causal=False,
                      softmax_scale=None):
    """What LightX2V runs without flash-attn: ``F.scaled_dot_product_attention`` per sequence on ``(1, H, S,
    D)`` views (bottom-right causal as flash-attn; one sequence needs no copy of the lengths to the host)."""
    if cu_seqlens_q.numel() == 2:
        bounds_q, bounds_kv = [0, q.shape[0]], [0, k.shape[0]]
    else:
        bounds_q, bounds_kv = cu_seqlens_q.tolist(), cu_seqlens_kv.tolist()
    outputs = []
    for i in range(len(bounds_q) - 1):
        query = q[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)[None]
        key, value = (t[bounds_kv[i]:bounds_kv[i + 1]].transpose(0, 1)[None] for t in (k, v))
        mask = None
        if causal:
            q_len, kv_len = query.shape[2], key.shape[2]
            mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=softmax_scale,
                                             enable_gqa=key.shape[1] != query.shape[1])
        outputs.append(out[0].transpose(0, 1))
    return torch.cat(outputs)


# ------------------------------------------------------------------------------- linear, swiglu, layer norm


def _linear(in_out: bool):
    """linear: HF's 3-d ``(1, M, 4096)`` input, weight ``[4096, 4096]``, no bias. in_out: LightX2V's 2-d
    ``(M, 4096)`` input, weight stored ``[in, out]``, with a bias."""

    def build(elements, dtype, device):
        rows, width = _split(elements, HIDDEN)
        scale = width ** -0.5
        if in_out:
            x, weight = _randn((rows, width), dtype, device), _randn((width, HIDDEN), dtype, device, scale)
            bias = _randn((HIDDEN,), dtype, device)
            return Inputs((x, weight, bias), (x, weight, bias), f"x {_dims(rows, width)}, weight [in, out] "
                          f"{_dims(width, HIDDEN)}, bias", (0, 1, 2))
        x, weight = _randn((1, rows, width), dtype, device), _randn((HIDDEN, width), dtype, device, scale)
        return Inputs((x, weight, None), (x, weight, None), f"x {_dims(1, rows, width)}, weight {_dims(HIDDEN, width)}",
                      (0, 1))

    return build


def addmm_in_out(x, weight_t, bias=None):
    """LightX2V's mm: ``torch.addmm(bias, x, weight_t)`` (``torch.mm`` without a bias) on a 2-d x."""
    return torch.mm(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)


def _swiglu(elements, dtype, device):
    rows, width = _split(elements, INTERMEDIATE)
    gate, up = _randn((rows, width), dtype, device, 3.0), _randn((rows, width), dtype, device)
    return Inputs((gate, up), (gate, up), f"gate, up {_dims(rows, width)}", (0, 1))


def _layer_norm(width: int, affine: bool):
    def build(elements, dtype, device):
        rows, hidden = _split(elements, width)
        x = _randn((rows, hidden), dtype, device, 3.0, 1.0)
        weight = _randn((hidden,), dtype, device) if affine else None
        bias = _randn((hidden,), dtype, device) if affine else None
        args = (x, (hidden,), weight, bias, LAYER_NORM_EPS)
        label = f"x {_dims(rows, hidden)}" + ("" if affine else ", no affine")
        return Inputs(args, (x, (hidden,), weight, bias), label, (0, 2, 3) if affine else (0,))

    return build


def _cross_entropy(elements, dtype, device):
    """transformers' causal-LM loss input: fp32 logits ``[tokens, 32000]`` (fewer classes at tiny sizes), int64
    labels with every 7th row ignored (-100)."""
    rows, classes = _split(elements, VOCAB)
    logits = _randn((rows, classes), dtype, device, 3.0)
    target = torch.randint(0, classes, (rows,), device=device)
    target[::IGNORED_EVERY] = -100
    return Inputs((logits, target, -100, None), (logits, target), f"logits {_dims(rows, classes)}", (0,))


def mean_cross_entropy(logits, target, ignore_index=-100, num_items_in_batch=None):
    """What transformers' ``fixed_cross_entropy`` computes without ``num_items_in_batch``: the mean over the
    counted rows."""
    return F.cross_entropy(logits, target, ignore_index=ignore_index)


def _named(name: str, function: Callable) -> Callable[[], Named]:
    return lambda: Named(name, function)


def _torch_function(name: str) -> Callable[[], Named]:
    """``torch.nn.functional.<name>`` looked up when needed (after fl_patch has reverted its own)."""
    return lambda: Named(f"torch.nn.functional.{name}", getattr(F, name))


# Token counts 1, 16, 256, 4096 at width 4096; check's are a subset, so that tune after check on one machine
# finds FlagGems' autotuning results cached on disk.
# FORMS' order is the order check and tune run in: the cheap forms first, then those whose first calls tune
# longest, GEMM (45 s on a fresh H200) before attention (25 s), so that the form running when tune's --budget-s
# ends is a shorter one.
LINEAR_SIZES = {"tune": (1 << 12, 1 << 16, 1 << 20, 1 << 24), "check": (1 << 12, 1 << 20), "cpu": (1 << 8, 1 << 10)}

FORMS = (
    Form("rms_norm.hf", rms_norm, "_hf",
         (Variant("rows x 4096", _rms_rows(HIDDEN)), Variant("per-head rows x 128", _rms_rows(HEAD_DIM))),
         _hf_module("transformers.models.llama.modeling_llama", "LlamaRMSNorm", rms_norm.reference_hf, _llama_norm),
         _named("fl_patch.kernels.rms_norm.native_hf", rms_norm.native_hf)),
    Form("rms_norm.gemma", rms_norm, "_gemma", (Variant("rows x 4096", _rms_rows(HIDDEN, weight_offset=0.0)),),
         _hf_module("transformers.models.gemma.modeling_gemma", "GemmaRMSNorm", rms_norm.reference_gemma,
                    _llama_norm),
         _named("fl_patch.kernels.rms_norm.reference_gemma (HF's GemmaRMSNorm body)", rms_norm.reference_gemma)),
    Form("rms_norm.fp32", rms_norm, "_fp32",
         (Variant("rows x 4096", _rms_rows(HIDDEN)), Variant("unweighted rows x 256", _rms_rows(256, weighted=False))),
         _hf_module("transformers.models.gemma4.modeling_gemma4", "Gemma4RMSNorm", rms_norm.reference_fp32,
                    _gemma4_norm),
         _named("fl_patch.kernels.rms_norm.native_fp32", rms_norm.native_fp32)),
    Form("rms_norm.gated", rms_norm, "_gated", (Variant("rows x 128", _rms_gated(HEAD_DIM)),),
         _hf_module("transformers.models.qwen3_next.modeling_qwen3_next", "Qwen3NextRMSNormGated",
                    rms_norm.reference_gated, _gated_norm),
         _named("fl_patch.kernels.rms_norm.native_gated", rms_norm.native_gated)),
    Form("rms_norm.torch", rms_norm, "_torch", (Variant("rows x 4096", _rms_torch(HIDDEN)),),
         _torch_function("rms_norm"), _named("torch.rms_norm", torch.rms_norm)),
    Form("rope.hf", rope, "_hf",
         (Variant("prefill", _rope_hf(decode=False)), Variant("decode", _rope_hf(decode=True), 1 << 18)),
         _hf_rope, _named("fl_patch.kernels.rope.reference_hf (HF's apply_rotary_pos_emb)", rope.reference_hf)),
    Form("rope.interleaved", rope, "_interleaved", (Variant("DiT tokens", _rope_interleaved),),
         _named("fl_patch.kernels.rope.reference_interleaved (LightX2V's torch rope)", rope.reference_interleaved),
         _named("fl_patch.kernels.rope.reference_interleaved (LightX2V's torch rope)", rope.reference_interleaved)),
    Form("swiglu.swiglu", swiglu, "", (Variant("rows x 8192", _swiglu),),
         _named("F.silu(gate) * up", swiglu.reference), _named("F.silu(gate) * up", swiglu.reference)),
    Form("layer_norm.layer_norm", layer_norm, "",
         (Variant("affine rows x 4096", _layer_norm(HIDDEN, True)),
          Variant("DiT rows x 1536, no affine", _layer_norm(DIT_HEADS * HEAD_DIM, False))),
         _torch_function("layer_norm"), _torch_function("layer_norm")),
    Form("cross_entropy.loss", cross_entropy, "_loss", (Variant("tokens x 32000, every 7th ignored", _cross_entropy),),
         _named("F.cross_entropy (transformers' fixed_cross_entropy)", mean_cross_entropy),
         _named("F.cross_entropy (transformers' fixed_cross_entropy)", mean_cross_entropy),
         dtypes=(torch.float32,)),
    Form("linear.linear", linear, "", (Variant("3-d x, no bias", _linear(in_out=False)),),
         _torch_function("linear"), _torch_function("linear"), LINEAR_SIZES, (torch.bfloat16,)),
    Form("linear.in_out", linear, "_in_out", (Variant("2-d x, bias", _linear(in_out=True)),),
         _named("torch.addmm(bias, x, weight_t) (LightX2V's mm)", addmm_in_out),
         _named("torch.addmm(bias, x, weight_t) (LightX2V's mm)", addmm_in_out), LINEAR_SIZES, (torch.bfloat16,)),
    Form("attention.sdpa", attention, "_sdpa",
         (Variant("causal GQA", _sdpa("causal")), Variant("decode GQA", _sdpa("decode"), 1 << 18),
          Variant("DiT", _sdpa("dit"), 1 << 24), Variant("masked", _sdpa("masked"), 1 << 22, tune=False)),
         _named("torch.nn.functional.scaled_dot_product_attention", sdpa_call),
         _named("torch.nn.functional.scaled_dot_product_attention", sdpa_call)),
    Form("attention.varlen", attention, "_varlen",
         (Variant("one sequence", _varlen(1), 1 << 24), Variant("two sequences", _varlen(2), 1 << 22, tune=False)),
         _named("F.scaled_dot_product_attention per sequence (LightX2V without flash-attn)", sdpa_per_sequence),
         _named("F.scaled_dot_product_attention per sequence (LightX2V without flash-attn)", sdpa_per_sequence)),
)
BY_KEY = {form.key: form for form in FORMS}


def select(names: str | None) -> list[Form]:
    """The forms named by a comma list of families (``rms_norm``) and keys (``rms_norm.hf``); None or "" = all.
    Raises ValueError naming the unknown name and what is accepted."""
    if not names:
        return list(FORMS)
    wanted = [name.strip() for name in names.split(",") if name.strip()]
    families = {form.family for form in FORMS}
    for name in wanted:
        if name not in families and name not in BY_KEY:
            raise ValueError(f"unknown family or form {name!r}; accepted: {', '.join(sorted(families))} "
                             f"or a key such as {', '.join(BY_KEY)}")
    return [form for form in FORMS if form.family in wanted or form.key in wanted]


def grid(variant: Variant, sizes: tuple[int, ...]) -> list[int]:
    """The element counts `variant` runs at: `sizes` capped at its maximum (the maximum itself standing for
    the sizes above it)."""
    if variant.max_elements is None:
        return list(sizes)
    capped = [size for size in sizes if size <= variant.max_elements]
    if len(capped) < len(sizes):
        capped.append(variant.max_elements)
    return sorted(set(capped))


# ------------------------------------------------------------------------------------------------ device


def pick_device(name: str | None, cpu_allowed: bool) -> torch.device:
    """The device to run on: `name` if given (``cuda:1``), else the first accelerator torch reports available
    among the device types of :data:`fl_patch.device.devices.VENDORS` (their installed torch extension imported
    first: ``torch_npu`` adds ``torch.npu``), else the CPU where `cpu_allowed`. Raises ValueError saying what
    was looked for, or that the CPU can't run the FlagGems kernels, otherwise."""
    if name:
        try:
            device = torch.device(name)
        except RuntimeError as exc:
            raise ValueError(f"--device {name!r} is not a torch device ({exc})") from None
        if device.type == "cpu" and not cpu_allowed:
            raise ValueError(f"--device {name}: FlagGems' kernels need an accelerator. " + CPU_HINT)
        return device
    from fl_patch import environment

    device = environment.first_device()
    if device is not None:
        return device
    if cpu_allowed:
        return torch.device("cpu")
    kinds = ", ".join(dict.fromkeys(vendor.device_type for vendor in devices.VENDORS))
    raise ValueError(f"no accelerator found (looked for {kinds}); FlagGems' kernels need one. " + CPU_HINT)


@contextlib.contextmanager
def cpu_threads(device: torch.device):
    """On the CPU, one torch thread inside the block: the cases are small, and threads only contend (a loaded
    2-core host ran ``check --quick`` in 18 s with two, 6 s with one)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def size_label(elements: int) -> str:
    """``2**20`` for a power of two, else the count."""
    exponent = math.log2(elements) if elements > 0 else 0
    return f"2**{int(exponent)}" if exponent.is_integer() else str(elements)
