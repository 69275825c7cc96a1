"""Per-op benchmark of fl_patch's kernel layer.

For each op and shape (those of shared/notes/gpu-baseline.md) it times, in microseconds per call:

- native: the function fl_patch replaces (HF's module or function body, torch's builtin);
- fl_patch: what a patched call runs: a fixed-signature wrapper, like the integrations' replacements,
  that asks ``unsupported_*`` and calls the ``gems_*`` path (or the original when routed away);
- raw gems: the FlagGems call alone, its inputs prepared beforehand;

with the ratios native / fl_patch (speed-up) and fl_patch / raw (cost of the mapping). It also measures
the per-call Python overhead (patched minus raw, host time per call on tiny tensors, where launches
dominate), the cost of the check alone, and what a first call at a new length costs (compile/autotune).

GPU (default): needs CUDA and flag_gems; timings by ``triton.testing.do_bench`` (median).
``--quick``: CPU, the "reference" provider, small shapes, seconds; no raw gems column.
Writes ``bench_ops[_quick].json`` and ``.md`` to ``benchmarks/results/`` or ``--out``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["FL_PATCH"] = "0"  # compare against the originals: importing fl_patch must not patch them

from fl_patch.kernels import attention, gems, layer_norm, linear, rms_norm, rope, swiglu  # noqa: E402
from fl_patch.versions import installed_version  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass
class Case:
    op: str
    shape: str
    native: Callable[[], object]
    patched: Callable[[], object]
    raw: Callable[[], object] | None
    route: str | None = None


@dataclass
class OverheadCase:
    op: str
    native: Callable[[], object]
    raw: Callable[[], object] | None  # the FlagGems call alone (gems provider only)
    kernel: Callable[[], object]  # the provider's function, without check or wrapper
    patched: Callable[[], object]  # wrapper + check + kernel, as a patched call runs
    check: Callable[[], object]


# ------------------------------------------------------------------------------ patched-call wrappers
# Fixed-signature closures like fl_patch.integrations' replacements: check, then kernel or original.


def routed_rms_norm_hf(provider, original, kernel=None):
    """`kernel` (default: the provider's): ``rms_norm.native_hf`` times the route of a small call on NVIDIA."""
    kernel = kernel or getattr(rms_norm, f"{provider}_hf")

    def forward(x, weight, eps):
        if rms_norm.unsupported_hf(provider, x, weight) is not None:
            return original(x, weight, eps)
        return kernel(x, weight, eps)

    return forward


def routed_rope_hf(provider, original):
    kernel = getattr(rope, f"{provider}_hf")

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if rope.unsupported_hf(provider, q, k, cos, sin, unsqueeze_dim) is not None:
            return original(q, k, cos, sin, unsqueeze_dim)
        return kernel(q, k, cos, sin, unsqueeze_dim)

    return apply_rotary_pos_emb


def routed_rope_interleaved(provider, original):
    kernel = getattr(rope, f"{provider}_interleaved")

    def apply_rotary_emb(q, k, freqs_cis):
        if rope.unsupported_interleaved(provider, q, k, freqs_cis) is not None:
            return original(q, k, freqs_cis)
        return kernel(q, k, freqs_cis)

    return apply_rotary_emb


def routed_sdpa(provider, original):
    kernel = getattr(attention, f"{provider}_sdpa")

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        if attention.unsupported_sdpa(provider, query, key, value, attn_mask, dropout_p, is_causal, scale,
                                      enable_gqa) is not None:
            return original(query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa)
        return kernel(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    return scaled_dot_product_attention


def routed_varlen(provider, original):
    kernel = getattr(attention, f"{provider}_varlen")

    def varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=False, softmax_scale=None):
        if attention.unsupported_varlen(provider, q, k, v, causal, softmax_scale) is not None:
            return original(q, k, v, cu_q, cu_kv, max_q, max_kv, causal, softmax_scale)
        return kernel(q, k, v, cu_q, cu_kv, max_q, max_kv, causal, softmax_scale)

    return varlen


def routed_linear(provider, original):
    kernel = getattr(linear, provider)

    def linear_forward(x, weight, bias=None):
        if linear.unsupported(provider, x, weight, bias) is not None:
            return original(x, weight, bias)
        return kernel(x, weight, bias)

    return linear_forward


def routed_swiglu(provider, original):
    kernel = getattr(swiglu, provider)

    def silu_mul(gate, up):
        if swiglu.unsupported(provider, gate, up) is not None:
            return original(gate, up)
        return kernel(gate, up)

    return silu_mul


def routed_layer_norm(provider, original):
    kernel = getattr(layer_norm, provider)

    def layer_norm_forward(x, normalized_shape, weight=None, bias=None, eps=1e-5):
        if layer_norm.unsupported(provider, x, normalized_shape, weight, bias) is not None:
            return original(x, normalized_shape, weight, bias, eps)
        return kernel(x, normalized_shape, weight, bias, eps)

    return layer_norm_forward


# -------------------------------------------------------------------------------------------- originals


def hf_rms_norm_body(x, weight, eps):
    """LlamaRMSNorm.forward's body (what HF runs eagerly)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(input_dtype)


def hf_apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)


def silu_times(gate, up):
    return F.silu(gate) * up


def sdpa_varlen_single(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=False, softmax_scale=None):
    """What LightX2V's torch fallback does for one sequence: F.sdpa on the (1, H, S, D) view."""
    out = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)), is_causal=causal,
                                         scale=softmax_scale)
    return out[0].transpose(0, 1)


def hf_cos_sin(batch, seq, head_dim, dtype, device):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim,
                         max_position_embeddings=max(seq, 2048))
    embedding = LlamaRotaryEmbedding(config).to(device)
    positions = torch.arange(seq, device=device)[None].expand(batch, seq)
    return embedding(torch.zeros(1, device=device, dtype=dtype), positions)


def lightx2v_freqs(seq, head_dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :].to(device)


# ------------------------------------------------------------------------------------------------ cases


def build_cases(provider: str, device: str, dtype: torch.dtype, quick: bool) -> list[Case]:
    """Cases at the baseline shapes (quick: scaled down); raw FlagGems calls only for the gems provider."""
    fg = gems.load() if provider == "gems" else None

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, device=device) * scale).to(dtype)

    cases = []

    norm = routed_rms_norm_hf(provider, hf_rms_norm_body)
    for rows, hidden in ([(256, 1024)] if quick else [(4096, 4096), (16384, 8192), (131072, 128)]):
        x, w = randn(rows, hidden, scale=3.0), randn(hidden) + 1
        raw = fg and (lambda x=x, w=w, n=hidden: fg.rms_norm(x, (n,), w, 1e-6))
        cases.append(Case("rms_norm (HF Llama)", f"{rows}x{hidden}", lambda x=x, w=w: hf_rms_norm_body(x, w, 1e-6),
                          lambda x=x, w=w: norm(x, w, 1e-6), raw, rms_norm.unsupported_hf(provider, x, w)))
        # torch's fused op, which small inputs run (fl_patch column) against FlagGems (raw column)
        cases.append(Case("rms_norm (HF Llama), torch fused", f"{rows}x{hidden}",
                          lambda x=x, w=w: hf_rms_norm_body(x, w, 1e-6),
                          lambda x=x, w=w: rms_norm.native_hf(x, w, 1e-6), raw))

    batch, q_heads, kv_heads, seq, head_dim = (1, 8, 2, 256, 64) if quick else (4, 32, 8, 2048, 128)
    shape = f"q,k [{batch},{q_heads}/{kv_heads},{seq},{head_dim}]"
    q = randn(batch, seq, q_heads, head_dim).transpose(1, 2)
    k = randn(batch, seq, kv_heads, head_dim).transpose(1, 2)
    v = randn(batch, seq, kv_heads, head_dim).transpose(1, 2)
    cos, sin = hf_cos_sin(1, seq, head_dim, dtype, device)
    rotary = routed_rope_hf(provider, hf_apply_rotary_pos_emb)
    raw = None
    if fg:
        q_t, k_t = q.transpose(1, 2), k.transpose(1, 2)
        cos_table, sin_table = rope._hf_table(cos, sin)
        raw = lambda: fg.apply_rotary_pos_emb(q_t, k_t, cos_table, sin_table)  # noqa: E731
    cases.append(Case("rope (HF apply_rotary_pos_emb)", shape, lambda: hf_apply_rotary_pos_emb(q, k, cos, sin),
                      lambda: rotary(q, k, cos, sin), raw, rope.unsupported_hf(provider, q, k, cos, sin, 1)))

    seq_x, heads_x = (512, 4) if quick else (32760, 12)
    qx, kx, freqs = randn(seq_x, heads_x, 128), randn(seq_x, heads_x, 128), lightx2v_freqs(seq_x, 128, device)
    rotary_pairs = routed_rope_interleaved(provider, rope.reference_interleaved)
    raw = None
    if fg:
        cos_table, sin_table = rope._interleaved_table(freqs)
        raw = lambda: fg.apply_rotary_pos_emb(  # noqa: E731
            qx[None], kx[None], cos_table, sin_table, rotary_interleaved=True)
    cases.append(Case("rope (LightX2V interleaved)", f"q,k [{seq_x},{heads_x},128]",
                      lambda: rope.reference_interleaved(qx, kx, freqs), lambda: rotary_pairs(qx, kx, freqs), raw,
                      rope.unsupported_interleaved(provider, qx, kx, freqs)))

    sdpa = routed_sdpa(provider, F.scaled_dot_product_attention)
    raw = None
    if fg:
        q_t, k_t, v_t = (t.transpose(1, 2) for t in (q, k, v))
        raw = lambda: fg.flash_attention_forward(q_t, k_t, v_t, None, None, seq, seq, 0.0, True, False)  # noqa: E731
    cases.append(Case("sdpa causal GQA (flash path)", shape.replace("q,k", "q,k,v"),
                      lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
                      lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True), raw,
                      attention.unsupported_sdpa(provider, q, k, v, None, 0.0, True, None, True)))

    keep = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    pads = torch.arange(batch, device=device) * (seq // 8)
    mask = (keep[None] & (torch.arange(seq, device=device)[None, :] >= pads[:, None])[:, None, :])[:, None]
    raw = None
    if fg:
        kernel_mask = attention._kernel_mask(mask, q, k)
        raw = lambda: fg.scaled_dot_product_attention(q, k, v, kernel_mask, 0.0, False, None, True)  # noqa: E731
    cases.append(Case("sdpa padded bool mask (sdpa kernel)", shape.replace("q,k", "q,k,v"),
                      lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True),
                      lambda: sdpa(q, k, v, attn_mask=mask, enable_gqa=True), raw,
                      attention.unsupported_sdpa(provider, q, k, v, mask, 0.0, False, None, True)))

    q1 = randn(batch, 1, q_heads, head_dim).transpose(1, 2)
    raw = None
    if fg:
        q1_t, k_t, v_t = q1.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        raw = lambda: fg.flash_attention_forward(q1_t, k_t, v_t, None, None, 1, seq, 0.0, False, False)  # noqa: E731
    cases.append(Case("sdpa decode GQA (flash path)", f"q [{batch},{q_heads},1,{head_dim}] kv {seq}",
                      lambda: F.scaled_dot_product_attention(q1, k, v, enable_gqa=True),
                      lambda: sdpa(q1, k, v, enable_gqa=True), raw,
                      attention.unsupported_sdpa(provider, q1, k, v, None, 0.0, False, None, True)))

    cu = torch.tensor([0, seq_x], dtype=torch.int32, device=device)
    vx = randn(seq_x, heads_x, 128)
    varlen = routed_varlen(provider, sdpa_varlen_single)
    raw = None
    if fg:
        raw = lambda: fg.flash_attn_varlen_func(qx, kx, vx, seq_x, cu, seq_x, cu_seqlens_k=cu)  # noqa: E731
    cases.append(Case("varlen attention (LightX2V)", f"1 x [{seq_x},{heads_x},128]",
                      lambda: sdpa_varlen_single(qx, kx, vx, cu, cu, seq_x, seq_x),
                      lambda: varlen(qx, kx, vx, cu, cu, seq_x, seq_x), raw,
                      attention.unsupported_varlen(provider, qx, kx, vx, False, None)))

    lin = routed_linear(provider, F.linear)
    for tokens, k_in, n_out in ([(256, 512, 1024)] if quick else [(8192, 4096, 4096), (8192, 4096, 14336)]):
        x, w = randn(tokens, k_in), randn(n_out, k_in, scale=k_in ** -0.5)
        raw = fg and (lambda x=x, w=w: fg.mm(x, w.t()))
        cases.append(Case("linear", f"{tokens}x{k_in} -> {n_out}", lambda x=x, w=w: F.linear(x, w),
                          lambda x=x, w=w: lin(x, w), raw, linear.unsupported(provider, x, w, None)))

    rows, inter = (256, 1024) if quick else (8192, 14336)
    gate, up = randn(rows, inter, scale=3.0), randn(rows, inter)
    silu = routed_swiglu(provider, silu_times)
    cases.append(Case("silu(gate) * up", f"{rows}x{inter}", lambda: silu_times(gate, up), lambda: silu(gate, up),
                      fg and (lambda: fg.silu_and_mul(gate, up)), swiglu.unsupported(provider, gate, up)))

    rows, hidden = (256, 1024) if quick else (4096, 4096)
    x, w, b = randn(rows, hidden, scale=3.0), randn(hidden), randn(hidden)
    ln = routed_layer_norm(provider, F.layer_norm)
    cases.append(Case("layer_norm", f"{rows}x{hidden}", lambda: F.layer_norm(x, (hidden,), w, b),
                      lambda: ln(x, (hidden,), w, b), fg and (lambda: fg.layer_norm(x, (hidden,), w, b, 1e-5)),
                      layer_norm.unsupported(provider, x, (hidden,), w, b)))
    return cases


def tiny_cases(provider: str, device: str, dtype: torch.dtype) -> list[OverheadCase]:
    """Launch-bound calls on tiny tensors (HF layouts): host time per call is Python plus launches."""
    fg = gems.load() if provider == "gems" else None

    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    x, w, x3 = randn(4, 64), randn(64), randn(1, 4, 64)
    q, k, v = (randn(2, 4, heads, 64).transpose(1, 2) for heads in (8, 2, 2))
    q_t, k_t, v_t = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = hf_cos_sin(1, 4, 64, dtype, device)
    lin_w = randn(64, 64)
    if fg:
        cos_table, sin_table = rope._hf_table(cos, sin)
    kernel = {name: getattr(module, f"{provider}{form}") for name, module, form in (
        ("rms_norm", rms_norm, "_hf"), ("rope", rope, "_hf"), ("sdpa", attention, "_sdpa"),
        ("linear", linear, ""), ("swiglu", swiglu, ""), ("layer_norm", layer_norm, ""))}
    norm = routed_rms_norm_hf(provider, hf_rms_norm_body)
    native_norm = routed_rms_norm_hf(provider, hf_rms_norm_body, rms_norm.native_hf)
    rotary = routed_rope_hf(provider, hf_apply_rotary_pos_emb)
    sdpa = routed_sdpa(provider, F.scaled_dot_product_attention)
    lin = routed_linear(provider, F.linear)
    silu = routed_swiglu(provider, silu_times)
    ln = routed_layer_norm(provider, F.layer_norm)
    return [
        OverheadCase(
            "rms_norm", lambda: hf_rms_norm_body(x, w, 1e-6), fg and (lambda: fg.rms_norm(x, (64,), w, 1e-6)),
            lambda: kernel["rms_norm"](x, w, 1e-6), lambda: norm(x, w, 1e-6),
            lambda: rms_norm.unsupported_hf(provider, x, w)),
        OverheadCase(  # what a small HF RMSNorm call runs on NVIDIA: the check, then torch's fused op
            "rms_norm, torch fused", lambda: hf_rms_norm_body(x, w, 1e-6), None,
            lambda: rms_norm.native_hf(x, w, 1e-6), lambda: native_norm(x, w, 1e-6),
            lambda: rms_norm.unsupported_hf(provider, x, w)),
        OverheadCase(
            "rope", lambda: hf_apply_rotary_pos_emb(q, k, cos, sin),
            fg and (lambda: fg.apply_rotary_pos_emb(q_t, k_t, cos_table, sin_table)),
            lambda: kernel["rope"](q, k, cos, sin), lambda: rotary(q, k, cos, sin),
            lambda: rope.unsupported_hf(provider, q, k, cos, sin, 1)),
        OverheadCase(
            "sdpa", lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True),
            fg and (lambda: fg.flash_attention_forward(q_t, k_t, v_t, None, None, 4, 4, 0.0, True, False,
                                                       disable_splitkv=True)),
            lambda: kernel["sdpa"](q, k, v, None, 0.0, True, None, True),
            lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True),
            lambda: attention.unsupported_sdpa(provider, q, k, v, None, 0.0, True, None, True)),
        OverheadCase(
            "linear (3-d input)", lambda: F.linear(x3, lin_w), fg and (lambda: fg.mm(x3[0], lin_w.t())),
            lambda: kernel["linear"](x3, lin_w), lambda: lin(x3, lin_w),
            lambda: linear.unsupported(provider, x3, lin_w, None)),
        OverheadCase(
            "swiglu", lambda: silu_times(x, x), fg and (lambda: fg.silu_and_mul(x, x)),
            lambda: kernel["swiglu"](x, x), lambda: silu(x, x), lambda: swiglu.unsupported(provider, x, x)),
        OverheadCase(
            "layer_norm", lambda: F.layer_norm(x, (64,), w, w), fg and (lambda: fg.layer_norm(x, (64,), w, w, 1e-5)),
            lambda: kernel["layer_norm"](x, (64,), w, w), lambda: ln(x, (64,), w, w),
            lambda: layer_norm.unsupported(provider, x, (64,), w, w)),
    ]


# --------------------------------------------------------------------------------------------- timing


def device_time_us(fn, quick: bool) -> float:
    """Median time per call in microseconds: do_bench on GPU, a host timer on CPU."""
    if quick:
        fn()
        samples = []
        for _ in range(5):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
        return statistics.median(samples) * 1e6
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def host_time_us(fn, synchronize, calls=2000, repeats=7) -> float:
    """Host time per call: the best of `repeats` loops of `calls` calls, synchronised at loop ends (the
    minimum is the least disturbed by other work on the host)."""
    for _ in range(50):
        fn()
    synchronize()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        synchronize()
        samples.append((time.perf_counter() - start) / calls)
    return min(samples) * 1e6


def first_call_ms(synchronize, fn, *args, **kwargs) -> float:
    synchronize()
    start = time.perf_counter()
    fn(*args, **kwargs)
    synchronize()
    return (time.perf_counter() - start) * 1e3


def first_calls(device, dtype, synchronize) -> dict:
    """Cost of the first call at a length never seen before, after the op is warm at other lengths."""
    def randn(*shape):
        return torch.randn(*shape, device=device).to(dtype)

    results = {}
    for seq in (1000, 1234):  # 1000: warm-up at one length; 1234: the measured new length
        q, k = randn(2, seq, 32, 128).transpose(1, 2), randn(2, seq, 8, 128).transpose(1, 2)
        cos, sin = hf_cos_sin(1, seq, 128, dtype, device)
        results["rope gems_hf, new sequence length"] = first_call_ms(synchronize, rope.gems_hf, q, k, cos, sin)
    for kv_len in (700, 777):
        q, k, v = (randn(2, kv_len, h, 128).transpose(1, 2) for h in (32, 8, 8))
        results["sdpa flash path, new length"] = first_call_ms(
            synchronize, attention.gems_sdpa, q, k, v, is_causal=True, enable_gqa=True)
        mask = torch.ones(kv_len, kv_len, dtype=torch.bool, device=device).tril()
        results["sdpa masked (sdpa kernel), new key length"] = first_call_ms(
            synchronize, attention.gems_sdpa, q, k, v, attn_mask=mask, enable_gqa=True)
    for tokens in (3000, 3333):
        x, w = randn(tokens, 4096), randn(4096, 4096)
        results["linear (mm), new token count"] = first_call_ms(synchronize, linear.gems, x, w)
    return {name: round(ms, 2) for name, ms in results.items()}


# -------------------------------------------------------------------------------------------- reports


def environment(device: str) -> dict:
    versions = {name: installed_version(name) for name in ("torch", "triton", "flag_gems", "transformers")}
    name = torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or platform.machine()
    return {"device": name, "versions": versions, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def ratio(a, b):
    return round(a / b, 2) if a and b else None


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [f"# bench_ops ({report['mode']}, provider {report['provider']}, {report['dtype']})", "",
             f"{env['device']}; " + ", ".join(f"{k} {v}" for k, v in env["versions"].items()) + f"; {env['date']}",
             "", "| op | shape | native µs | fl_patch µs | raw gems µs | native / fl_patch | fl_patch / raw | routed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["ops"]:
        lines.append(f"| {row['op']} | {row['shape']} | {row['native_us']} | {row['fl_patch_us']} | "
                     f"{row['raw_us'] if row['raw_us'] is not None else '-'} | {row['speedup']} | "
                     f"{row['fl_patch_over_raw'] if row['fl_patch_over_raw'] is not None else '-'} | "
                     f"{row['routed'] or '-'} |")
    gems_mode = report["provider"] == "gems"
    lines += ["", "Host time per call on tiny tensors (launch-bound), µs. kernel: the provider's function alone; "
              "patched: wrapper + check + kernel; overhead: patched minus " + ("the raw FlagGems call" if gems_mode
                                                                                else "the kernel"), "",
              "| op | native | raw gems | kernel | patched | mapping | check + wrapper | overhead | check alone |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in report["overhead"]:
        lines.append(f"| {row['op']} | {row['native_us']} | {row.get('raw_us', '-')} | {row['kernel_us']} | "
                     f"{row['patched_us']} | {row['mapping_us']} | {row['check_and_wrapper_us']} | "
                     f"{row['overhead_us']} | {row['check_us']} |")
    if report.get("first_call_ms"):
        lines += ["", "First call at a new length, ms (the op already warm at another length)", ""]
        lines += [f"- {name}: {ms}" for name, ms in report["first_call_ms"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, reference provider, small shapes")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for the JSON and Markdown")
    parser.add_argument("--skip-first-calls", action="store_true", help="skip the new-length measurements")
    args = parser.parse_args(argv)

    quick = args.quick
    device = "cpu" if quick else "cuda"
    provider = "reference" if quick else "gems"
    dtype = torch.float32 if quick else torch.bfloat16
    if not quick and not torch.cuda.is_available():
        parser.error("no CUDA device: use --quick")
    # This measures the FlagGems paths at every size: its wrappers call unsupported_* directly, without the device
    # profile's routing (the "torch fused" rows time the path HF RMSNorm's routed-away calls take instead).
    synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.manual_seed(0)

    report = {"mode": "quick" if quick else "gpu", "provider": provider, "dtype": str(dtype).removeprefix("torch."),
              "environment": environment(device), "ops": [], "overhead": []}
    with torch.no_grad():
        for case in build_cases(provider, device, dtype, quick):
            native = device_time_us(case.native, quick)
            patched = device_time_us(case.patched, quick)
            raw = device_time_us(case.raw, quick) if case.raw else None
            report["ops"].append({
                "op": case.op, "shape": case.shape, "native_us": round(native, 1), "fl_patch_us": round(patched, 1),
                "raw_us": None if raw is None else round(raw, 1), "speedup": ratio(native, patched),
                "fl_patch_over_raw": ratio(patched, raw), "routed": case.route,
            })
            print(report["ops"][-1], flush=True)
        calls = 200 if quick else 2000
        for case in tiny_cases(provider, device, dtype):
            times = {name: host_time_us(fn, synchronize, calls)
                     for name, fn in (("native", case.native), ("raw", case.raw), ("kernel", case.kernel),
                                      ("patched", case.patched)) if fn is not None}
            times["check"] = host_time_us(case.check, lambda: None, calls * 5)
            base = times.get("raw", times["kernel"])
            report["overhead"].append({
                "op": case.op, **{f"{name}_us": round(t, 2) for name, t in times.items()},
                "mapping_us": round(times["kernel"] - base, 2),
                "check_and_wrapper_us": round(times["patched"] - times["kernel"], 2),
                "overhead_us": round(times["patched"] - base, 2),
            })
            print(report["overhead"][-1], flush=True)
        if not quick and not args.skip_first_calls:
            report["first_call_ms"] = first_calls(device, dtype, synchronize)
            print(report["first_call_ms"], flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench_ops_quick" if quick else "bench_ops"
    (args.out / f"{stem}.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
