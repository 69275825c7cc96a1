"""The FlagGems functions fl_patch's kernels call, as ``torch.library`` custom ops (namespace ``fl_patch``), so
that torch.compile traces each call as one opaque op, with no graph break.

Dynamo can't trace FlagGems' Triton launcher (Python autotuners, caches, ``libentry``). A custom op hides it:
dynamo and AOTAutograd see only the op and its fake (meta) function, which gives the exact shapes, dtypes and
strides the real function returns (read off the 5.0.2 source); the real function runs when the compiled graph
does. :func:`fl_patch.kernels.gems.ops` hands the kernel modules :data:`namespace` while dynamo traces, the
flag_gems module in eager (its hot functions on the fast launch path, :mod:`fl_patch.kernels.fast_launch`):
``namespace`` has the same attribute names and signatures (for the arguments fl_patch passes; others raise
``NotImplementedError``). The swap is dynamo's polyfill mechanism (``torch.compiler.substitute_in_graph``,
documented for C functions, used here on a Python one: checked on torch 2.13 by tests/test_custom_ops.py, on 2.11
by tests/gpu/compile_gpu.py on an H200), so eager calls pay nothing for it. Where it can't be registered, compiled
gems calls run the original (:func:`define` says why). The ops' real functions call FlagGems as eager calls do
(fast launch path included), when the compiled graph runs.

Backward, as FlagGems 5.0.2 has it:

- ``rms_norm`` (``RmsNorm`` autograd.Function, Triton backward kernels) and ``silu_and_mul`` (``SiluAndMul``, a
  Triton grad kernel): registered, through two more ops that call FlagGems' own backward kernels.
- ``layer_norm``, ``apply_rotary_pos_emb``, ``mm``, ``addmm``, ``flash_attention_forward``,
  ``flash_attn_varlen_func``, ``per_token_group_quant_fp8``, ``cutlass_scaled_mm``: FlagGems' direct calls have
  no autograd. ``scaled_dot_product_attention`` has one, but its backward ignores the mask. None is registered:
  fl_patch's ``unsupported_*`` checks send every call that needs gradients to the original before it gets here
  (in eager and under compile alike, so training under compile is right), and a call that reaches one of these
  ops with a tensor requiring grad fails at backward with torch's "autograd kernel not registered" error
  instead of giving a wrong gradient.

A FlagGems kernel raising at run time inside a compiled graph can't fall back to the original (the replacement's
``try`` ran at trace time); the op raises :class:`CompiledKernelError`, naming the op, the FlagGems error and
what to do. Nothing is counted from inside a compiled graph (see ``fl_patch.reporting.Record.fallback``).

The ops are defined on the first :func:`compile_reason` call (the first gems call that dynamo traces), not at
import; this module is imported only then.
"""

from __future__ import annotations

import functools
import importlib
import math
import threading
from types import SimpleNamespace

import torch
from torch import Tensor  # at module scope: the ops' annotations are read as strings (infer_schema)

from fl_patch.kernels import gems

NAMESPACE = "fl_patch"

_define_lock = threading.Lock()
namespace: SimpleNamespace | None = None  # the compiled stand-in for flag_gems, once defined
_define_error: str | None = None


class CompiledKernelError(RuntimeError):
    """A FlagGems kernel failed inside a compiled graph, where fl_patch can't hand the call to the original."""


@torch.compiler.assume_constant_result
def compile_reason() -> str | None:
    """None when gems calls can be traced as custom ops here, else why not (a gems call then runs the original).

    Called by :func:`fl_patch.kernels.gems.tensor_reason` while dynamo traces; dynamo runs it once per trace and
    keeps the result as a constant. Imports FlagGems (a failure is :data:`~fl_patch.kernels.gems.UNUSABLE`, as
    in eager) and defines the ops on the first call."""
    try:
        gems.load()
    except gems.GemsUnavailable:
        return gems.UNUSABLE
    return define()


def define() -> str | None:
    """Define the ops once (thread-safe) and set :data:`namespace`; None on success, else why they can't be."""
    global namespace, _define_error
    with _define_lock:
        if namespace is None and _define_error is None:
            missing = [name for name, owner in (("torch.library.custom_op", torch.library),
                                                 ("torch.compiler.substitute_in_graph", torch.compiler))
                       if not hasattr(owner, name.rsplit(".", 1)[1])]
            if missing:
                _define_error = f"torch.compile (torch {torch.__version__} has no {', '.join(missing)})"
            else:
                try:
                    ops = _define_ops()
                    # dynamo traces _traced_ops wherever the kernels call gems.ops(); eager runs gems.ops itself
                    torch.compiler.substitute_in_graph(gems.ops)(_traced_ops)
                except Exception as exc:  # a torch whose custom ops or polyfills differ from what this expects
                    _define_error = (f"torch.compile (fl_patch's custom ops can't be set up: {type(exc).__name__}: "
                                     f"{gems.first_line(exc)})")
                else:
                    namespace = ops
        return _define_error


def _traced_ops() -> SimpleNamespace:
    """What ``gems.ops()`` gives inside a graph being traced: the custom ops."""
    return namespace


def _gems_call(name: str, *args, **kwargs):
    """``flag_gems.<name>(*args, **kwargs)``, a failure raised as CompiledKernelError."""
    try:
        return _resolve(name)(*args, **kwargs)
    except Exception as exc:
        raise CompiledKernelError(
            f"fl_patch::{name.rsplit('.', 1)[-1]}: the FlagGems kernel raised {type(exc).__name__}: "
            f"{gems.first_line(exc)}. Under torch.compile a kernel failure can't fall back to the original: "
            "run this model eagerly, or exclude the family (FL_PATCH_EXCLUDE)") from exc


def _resolve(name: str):
    """``flag_gems.<name>`` as eager calls get it (:func:`fl_patch.kernels.gems.ops`: the fast launch path where it
    takes the function); a dotted name is an attribute of a flag_gems submodule (``fused.silu_and_mul.x``)."""
    module, _, attribute = name.rpartition(".")
    owner = gems.ops() if not module else importlib.import_module(f"{gems.MODULE_NAME}.{module}")
    return getattr(owner, attribute)


def _define_ops() -> SimpleNamespace:
    lib = NAMESPACE
    # FlagGems' wrappers depend on their inputs' strides (views, "last dim contiguous", row- and column-major
    # asserts): inductor is told to pass every input exactly as eager would (the default of recent torch anyway)
    exact = getattr(torch.Tag, "needs_exact_strides", None)
    op = functools.partial(torch.library.custom_op, tags=(exact,) if exact is not None else ())

    # ------------------------------------------------------------------------------------------------- rms_norm
    @op(f"{lib}::rms_norm_forward", mutates_args=())
    def rms_norm_forward(x: Tensor, normalized_shape: list[int], weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
        return _gems_call("rms_norm_forward", x, tuple(normalized_shape), weight, eps)

    @rms_norm_forward.register_fake
    def _(x, normalized_shape, weight, eps):
        rows = x.numel() // math.prod(normalized_shape)  # y = empty_like(x.contiguous()); inv_rms fp32 per row
        return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows,), dtype=torch.float32)

    @op(f"{lib}::rms_norm_backward", mutates_args=())
    def rms_norm_backward(dy: Tensor, x: Tensor, inv_rms: Tensor, normalized_shape: list[int], weight: Tensor,
                          eps: float) -> tuple[Tensor, Tensor]:
        return _gems_call("rms_norm_backward", dy, x, inv_rms, tuple(normalized_shape), weight, eps)

    @rms_norm_backward.register_fake
    def _(dy, x, inv_rms, normalized_shape, weight, eps):  # dx = empty_like(x.contiguous()); dw (N,) in x's dtype
        dw = x.new_empty((math.prod(normalized_shape),))
        return torch.empty_like(x, memory_format=torch.contiguous_format), dw

    def rms_norm_setup(ctx, inputs, output):
        x, normalized_shape, weight, eps = inputs
        ctx.save_for_backward(x, output[1], weight)
        ctx.normalized_shape, ctx.eps = normalized_shape, eps
        ctx.mark_non_differentiable(output[1])

    def rms_norm_grad(ctx, dy, _inv_rms_grad):
        x, inv_rms, weight = ctx.saved_tensors
        dx, dw = torch.ops.fl_patch.rms_norm_backward(dy, x, inv_rms, ctx.normalized_shape, weight, ctx.eps)
        return dx, None, dw.view(weight.shape).to(weight.dtype), None

    rms_norm_forward.register_autograd(rms_norm_grad, setup_context=rms_norm_setup)

    def rms_norm(x, normalized_shape, weight, eps=1e-5):
        return torch.ops.fl_patch.rms_norm_forward(x, list(normalized_shape), weight, float(eps))[0]

    # --------------------------------------------------------------------------------------------- silu_and_mul
    @op(f"{lib}::silu_and_mul", mutates_args=())
    def silu_and_mul_op(A: Tensor, B: Tensor) -> Tensor:
        return _gems_call("silu_and_mul", A, B)

    @silu_and_mul_op.register_fake
    def _(A, B):  # pointwise_dynamic: empty_like(A) in the promoted dtype (A and B of one shape here)
        return torch.empty_like(A, dtype=torch.promote_types(A.dtype, B.dtype))

    @op(f"{lib}::silu_and_mul_backward", mutates_args=())
    def silu_and_mul_backward(A: Tensor, B: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        return _gems_call("fused.silu_and_mul.silu_and_mul_grad_kernel", A, B, grad)

    @silu_and_mul_backward.register_fake
    def _(A, B, grad):
        dtype = torch.promote_types(torch.promote_types(A.dtype, B.dtype), grad.dtype)
        return torch.empty_like(A, dtype=dtype), torch.empty_like(A, dtype=dtype)

    def silu_and_mul_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def silu_and_mul_grad(ctx, grad):
        A, B = ctx.saved_tensors
        grad_a, grad_b = torch.ops.fl_patch.silu_and_mul_backward(A, B, grad)
        return grad_a.to(A.dtype), grad_b.to(B.dtype)

    silu_and_mul_op.register_autograd(silu_and_mul_grad, setup_context=silu_and_mul_setup)

    def silu_and_mul(A, B):
        return torch.ops.fl_patch.silu_and_mul(A, B)

    # ----------------------------------------------------------------------------------------------- layer_norm
    @op(f"{lib}::layer_norm", mutates_args=())
    def layer_norm_op(x: Tensor, normalized_shape: list[int], weight: Tensor | None, bias: Tensor | None,
                      eps: float) -> tuple[Tensor, Tensor, Tensor]:
        return _gems_call("layer_norm", x, tuple(normalized_shape), weight, bias, eps)

    @layer_norm_op.register_fake
    def _(x, normalized_shape, weight, bias, eps):  # y = empty_like(x.contiguous()); mean, rstd (M,) in x's dtype
        rows = x.numel() // math.prod(normalized_shape)
        return (torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty((rows,)),
                x.new_empty((rows,)))

    def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
        return torch.ops.fl_patch.layer_norm(input, list(normalized_shape), weight, bias, float(eps))

    # ------------------------------------------------------------------------------------- apply_rotary_pos_emb
    @op(f"{lib}::apply_rotary_pos_emb", mutates_args=())
    def rope_op(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                rotary_interleaved: bool) -> tuple[Tensor, Tensor]:
        return _gems_call("apply_rotary_pos_emb", q, k, cos, sin, position_ids, rotary_interleaved)

    @rope_op.register_fake
    def _(q, k, cos, sin, position_ids, rotary_interleaved):  # empty_like of the (tokens, heads, dim) views
        q_tokens = q.view(-1, q.shape[-2], q.shape[-1])
        k_tokens = k.view(-1, k.shape[-2], k.shape[-1])
        return torch.empty_like(q_tokens).view(q.shape), torch.empty_like(k_tokens).view(k.shape)

    def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, rotary_interleaved=False, inplace=False):
        if inplace:
            raise NotImplementedError("fl_patch::apply_rotary_pos_emb: inplace=True is not an op")
        return torch.ops.fl_patch.apply_rotary_pos_emb(q, k, cos, sin, position_ids, rotary_interleaved)

    # ---------------------------------------------------------------------------------------------- attention
    @op(f"{lib}::scaled_dot_product_attention", mutates_args=())
    def sdpa_op(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None, dropout_p: float,
                is_causal: bool, scale: float | None, enable_gqa: bool) -> Tensor:
        return _gems_call("scaled_dot_product_attention", query, key, value, attn_mask, dropout_p, is_causal,
                          scale, enable_gqa)

    @sdpa_op.register_fake
    def _(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        return torch.empty_like(query, dtype=value.dtype)

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        return torch.ops.fl_patch.scaled_dot_product_attention(
            query, key, value, attn_mask, float(dropout_p), is_causal, scale, enable_gqa)

    @op(f"{lib}::flash_attention_forward", mutates_args=())
    def flash_op(query: Tensor, key: Tensor, value: Tensor, max_q: int, max_k: int, is_causal: bool,
                 scale: float | None, disable_splitkv: bool) -> Tensor:
        return _gems_call("flash_attention_forward", query, key, value, None, None, max_q, max_k, 0.0, is_causal,
                          False, scale=scale, disable_splitkv=disable_splitkv)[0]

    @flash_op.register_fake
    def _(query, key, value, max_q, max_k, is_causal, scale, disable_splitkv):
        return torch.empty_like(query)  # out = empty_like(query) (last dim already contiguous)

    def flash_attention_forward(query, key, value, cumulative_sequence_length_q, cumulative_sequence_length_k,
                                max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale=None,
                                disable_splitkv=False, **others):
        """``out`` as the real one's first result; lse, philox seed/offset and p are None (fl_patch reads out)."""
        used = [name for name, value in others.items() if value is not None and value != 0.0]
        if cumulative_sequence_length_q is not None or cumulative_sequence_length_k is not None or dropout_p \
                or return_debug_mask or used:
            raise NotImplementedError("fl_patch::flash_attention_forward takes no cumulative lengths, dropout, "
                                      f"debug mask, {', '.join(used) or 'softcap, windows, seqused_k, alibi'}")
        out = torch.ops.fl_patch.flash_attention_forward(query, key, value, max_q, max_k, is_causal, scale,
                                                         disable_splitkv)
        return out, None, None, None, None

    @op(f"{lib}::flash_attn_varlen_func", mutates_args=())
    def varlen_op(q: Tensor, k: Tensor, v: Tensor, max_seqlen_q: int, cu_seqlens_q: Tensor, max_seqlen_k: int,
                  cu_seqlens_k: Tensor, softmax_scale: float | None, causal: bool) -> Tensor:
        return _gems_call("flash_attn_varlen_func", q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k,
                          cu_seqlens_k=cu_seqlens_k, softmax_scale=softmax_scale, causal=causal)

    @varlen_op.register_fake
    def _(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k, softmax_scale, causal):
        return torch.empty_like(q)

    def flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, cu_seqlens_k=None,
                               softmax_scale=None, causal=False):
        if cu_seqlens_k is None:
            raise NotImplementedError("fl_patch::flash_attn_varlen_func needs cu_seqlens_k")
        return torch.ops.fl_patch.flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k,
                                                         cu_seqlens_k, softmax_scale, causal)

    # ----------------------------------------------------------------------------------------------- matmuls
    @op(f"{lib}::mm", mutates_args=())
    def mm_op(a: Tensor, b: Tensor) -> Tensor:
        return _gems_call("mm", a, b)

    @mm_op.register_fake
    def _(a, b):  # c = empty((M, N)) in the higher dtype
        return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.promote_types(a.dtype, b.dtype))

    @op(f"{lib}::addmm", mutates_args=())
    def addmm_op(bias: Tensor, mat1: Tensor, mat2: Tensor, beta: float, alpha: float) -> Tensor:
        return _gems_call("addmm", bias, mat1, mat2, beta=beta, alpha=alpha)

    @addmm_op.register_fake
    def _(bias, mat1, mat2, beta, alpha):  # out = empty((M, N)) in mat1's dtype
        return mat1.new_empty((mat1.shape[0], mat2.shape[1]))

    def mm(a, b):
        return torch.ops.fl_patch.mm(a, b)

    def addmm(bias, mat1, mat2, *, beta=1, alpha=1):
        return torch.ops.fl_patch.addmm(bias, mat1, mat2, float(beta), float(alpha))

    # ------------------------------------------------------------------------------------------ quantised linear
    @op(f"{lib}::per_token_group_quant_fp8", mutates_args=())
    def quant_op(x: Tensor, group_size: int, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        return _gems_call("per_token_group_quant_fp8", x, group_size, eps=eps, dtype=dtype)

    @quant_op.register_fake
    def _(x, group_size, eps, dtype):  # x_q = empty_like(x, dtype); x_s row-major (..., groups) fp32
        return (torch.empty_like(x, dtype=dtype),
                x.new_empty(x.shape[:-1] + (x.shape[-1] // group_size,), dtype=torch.float32))

    def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False,
                                  scale_ue8m0=False):
        if dtype is None or column_major_scales or scale_ue8m0:
            raise NotImplementedError("fl_patch::per_token_group_quant_fp8: an explicit dtype, row-major fp32 scales")
        return torch.ops.fl_patch.per_token_group_quant_fp8(x, group_size, float(eps), dtype)

    @op(f"{lib}::cutlass_scaled_mm", mutates_args=("c",))
    def scaled_mm_op(c: Tensor, a: Tensor, b: Tensor, a_scale: Tensor, b_scale: Tensor,
                     bias: Tensor | None) -> None:
        _gems_call("cutlass_scaled_mm", c, a, b, a_scale, b_scale, bias)

    @scaled_mm_op.register_fake
    def _(c, a, b, a_scale, b_scale, bias):
        return None

    def cutlass_scaled_mm(c, a, b, a_scale, b_scale, bias=None):
        torch.ops.fl_patch.cutlass_scaled_mm(c, a, b, a_scale, b_scale, bias)
        return c

    return SimpleNamespace(
        rms_norm=rms_norm, silu_and_mul=silu_and_mul, layer_norm=layer_norm,
        apply_rotary_pos_emb=apply_rotary_pos_emb, scaled_dot_product_attention=scaled_dot_product_attention,
        flash_attention_forward=flash_attention_forward, flash_attn_varlen_func=flash_attn_varlen_func,
        mm=mm, addmm=addmm, per_token_group_quant_fp8=per_token_group_quant_fp8,
        cutlass_scaled_mm=cutlass_scaled_mm,
    )


OPS = ("rms_norm_forward", "rms_norm_backward", "silu_and_mul", "silu_and_mul_backward", "layer_norm",
       "apply_rotary_pos_emb", "scaled_dot_product_attention", "flash_attention_forward", "flash_attn_varlen_func",
       "mm", "addmm", "per_token_group_quant_fp8", "cutlass_scaled_mm")  # the ops, as torch.ops.fl_patch.<name>
WITH_BACKWARD = ("rms_norm_forward", "silu_and_mul")  # the ops with a registered autograd formula
