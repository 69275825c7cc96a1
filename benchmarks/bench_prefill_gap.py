"""Where prefill time goes between FlagGems, Liger, torch and inductor: one kernel at a time, Llama 4x2048 shapes.

Each case times one op on the shapes a ~1.1B Llama-style model (hidden 2048, 16 / 8 heads of 128, MLP 8192) gives
its kernels at prefill 4x2048 (8192 tokens), bf16, on every candidate that computes it: torch eager, inductor
(``torch.compile`` of the same code), FlagGems (as fl_patch calls it, and raw), FlagGems' fused alternatives
(``swiglu`` on one gate/up tensor, ``fused_add_rms_norm``, in-place rope) and Liger. Figures are
``triton.testing.do_bench`` medians in microseconds, with the bandwidth each reached (bytes the op must read and
write / time; the H200's HBM3e peak is 4.8 TB/s) and the time over the fastest candidate. Forward only, as in
prefill, and forward + backward where the candidate has a backward (training). Each candidate is checked against
torch eager (largest difference, bf16) before it is timed. ``host µs`` is the host time per call of 50 calls
enqueued back to back: where it is above ``µs`` the call is launch-bound at this shape, and do_bench's figure is
partly host time. One check is not a timing: FlagGems' in-place rope on equal inputs, three times (a race
between its reads and in-place writes shows as runs that differ).

    python benchmarks/bench_prefill_gap.py --out benchmarks/results       # GPU: needs flag_gems; liger optional

Writes prefill_gap.json and prefill_gap.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
from pathlib import Path

os.environ["FL_PATCH"] = "0"  # importing fl_patch must not patch the originals compared here
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKENS, HIDDEN, INTER, HEADS, KV_HEADS, HEAD_DIM, BATCH = 8192, 2048, 8192, 16, 8, 128, 4
PEAK_TBPS = 4.8  # H200 HBM3e, for the bandwidth column only


def bf16(*shape, grad=False):
    import torch

    return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, requires_grad=grad)


def hf_rms_norm(x, weight, eps=1e-6):
    import torch

    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def hf_rope(q, k, cos, sin):
    import torch

    def rotate_half(x):
        return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), dim=-1)

    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul(gate, up):
    import torch.nn.functional as F

    return F.silu(gate) * up


def add_rms_norm(x, residual, weight, eps=1e-6):
    h = x + residual
    return hf_rms_norm(h, weight, eps), h


def cases(liger):
    """{case: (bytes moved, {candidate: make() -> (fn, output of one call for the check)})}."""
    import torch

    import flag_gems
    from fl_patch.kernels import rope as rope_kernels

    compiled = {}

    def inductor(fn):  # compiled once: a torch.compile wrapper made per call costs ~1.5 ms of host time
        if fn not in compiled:
            compiled[fn] = torch.compile(fn, dynamic=False)
        return compiled[fn]

    e = 2  # bf16 bytes
    out = {}

    gate, up = bf16(TOKENS, INTER), bf16(TOKENS, INTER)
    gate_up = torch.cat((gate, up), dim=-1)
    silu_cands = {
        "torch eager": lambda: silu_mul(gate, up),
        "inductor": lambda: inductor(silu_mul)(gate, up),
        "FlagGems silu_and_mul": lambda: flag_gems.silu_and_mul(gate, up),
        "FlagGems swiglu (one gate|up tensor)": lambda: flag_gems.swiglu(gate_up),
    }
    if liger:
        from liger_kernel.ops.swiglu import LigerFusedGateUpSiLUMulFunction, LigerSiLUMulFunction

        silu_cands["Liger silu_mul"] = lambda: LigerSiLUMulFunction.apply(gate, up)
        silu_cands["Liger fused gate|up"] = lambda: LigerFusedGateUpSiLUMulFunction.apply(gate_up)
    out["silu(gate) * up, [8192, 8192] x2"] = (3 * TOKENS * INTER * e, silu_cands)

    x, weight = bf16(TOKENS, HIDDEN), torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    norm_cands = {
        "torch eager (HF form)": lambda: hf_rms_norm(x, weight),
        "torch F.rms_norm": lambda: torch.nn.functional.rms_norm(x, (HIDDEN,), weight, 1e-6),
        "inductor": lambda: inductor(hf_rms_norm)(x, weight),
        "FlagGems rms_norm": lambda: flag_gems.rms_norm(x, (HIDDEN,), weight, 1e-6),
    }
    if liger:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction

        norm_cands["Liger rms_norm"] = lambda: LigerRMSNormFunction.apply(x, weight, 1e-6, 0.0, "llama", False)
    out["RMSNorm, [8192, 2048]"] = (2 * TOKENS * HIDDEN * e, norm_cands)

    residual = bf16(TOKENS, HIDDEN)

    def gems_fused_add():  # in place: x <- norm(x + r), r <- x + r; on copies so the inputs stay
        a, b = x.clone(), residual.clone()
        return flag_gems.fused_add_rms_norm(a, b, (HIDDEN,), weight, 1e-6)

    add_cands = {
        "torch eager (add, HF form)": lambda: add_rms_norm(x, residual, weight),
        "inductor": lambda: inductor(add_rms_norm)(x, residual, weight),
        "FlagGems add + rms_norm": lambda: (flag_gems.rms_norm(h := flag_gems.add(x, residual), (HIDDEN,), weight,
                                                               1e-6), h),
        "FlagGems fused_add_rms_norm (+2 copies)": gems_fused_add,
    }
    if liger:
        from liger_kernel.ops.fused_add_rms_norm import LigerFusedAddRMSNormFunction

        add_cands["Liger fused_add_rms_norm"] = lambda: LigerFusedAddRMSNormFunction.apply(
            x, residual, weight, 1e-6, 0.0, "llama", False)
    out["residual add + RMSNorm, [8192, 2048]"] = (4 * TOKENS * HIDDEN * e, add_cands)

    # HF's layout: q, k are transposes of the (B, S, H, D) projections; cos, sin (1, S, D)
    q = bf16(BATCH, 2048, HEADS, HEAD_DIM).transpose(1, 2)
    k = bf16(BATCH, 2048, KV_HEADS, HEAD_DIM).transpose(1, 2)
    angles = torch.outer(torch.arange(2048, device="cuda").float(), torch.rand(HEAD_DIM // 2, device="cuda"))
    emb = torch.cat((angles, angles), dim=-1)[None]
    cos, sin = emb.cos().to(torch.bfloat16), emb.sin().to(torch.bfloat16)
    half_cos, half_sin = cos[0, :, : HEAD_DIM // 2].contiguous(), sin[0, :, : HEAD_DIM // 2].contiguous()
    q_tokens, k_tokens = q.transpose(1, 2), k.transpose(1, 2)  # (B, S, H, D), contiguous

    def gems_inplace():  # on copies: in place would change the inputs of the next call
        a, b = q_tokens.clone(), k_tokens.clone()
        flag_gems.apply_rotary_pos_emb(a, b, half_cos, half_sin, inplace=True)
        return a.transpose(1, 2), b.transpose(1, 2)

    rope_cands = {
        "torch eager (HF form)": lambda: hf_rope(q, k, cos, sin),
        "inductor": lambda: inductor(hf_rope)(q, k, cos, sin),
        "fl_patch gems_hf": lambda: rope_kernels.gems_hf(q, k, cos, sin),
        "FlagGems raw (tables ready)": lambda: tuple(t.transpose(1, 2) for t in flag_gems.apply_rotary_pos_emb(
            q_tokens, k_tokens, half_cos, half_sin)),
        "FlagGems in place (+2 copies)": gems_inplace,
    }
    if liger:
        from liger_kernel.ops.rope import LigerRopeFunction

        def liger_rope():  # in place on q, k's storage: on copies
            a, b = q_tokens.clone().transpose(1, 2), k_tokens.clone().transpose(1, 2)
            return LigerRopeFunction.apply(a, b, cos, sin)

        rope_cands["Liger rope (in place, +2 copies)"] = liger_rope
    CHECKS["FlagGems apply_rotary_pos_emb(inplace=True)"] = lambda: rope_inplace_check(
        lambda a, b: flag_gems.apply_rotary_pos_emb(a, b, half_cos, half_sin, inplace=True),
        q_tokens, k_tokens, hf_rope(q, k, cos, sin))
    rope_bytes = 2 * (q.numel() + k.numel()) * e
    out["rope, q [4, 16, 2048, 128], k [4, 8, 2048, 128]"] = (rope_bytes, rope_cands)

    # the copies some candidates need only to be re-runnable: timed alone, to subtract by eye
    out["copies: x and residual clone, [8192, 2048] x2"] = (
        4 * TOKENS * HIDDEN * e, {"torch clone x2": lambda: (x.clone(), residual.clone())})
    out["copies: q and k clone"] = (rope_bytes, {"torch clone x2": lambda: (q_tokens.clone(), k_tokens.clone())})

    xm = bf16(TOKENS, HIDDEN)
    w_gate, w_up, w_down = bf16(INTER, HIDDEN) * 0.02, bf16(INTER, HIDDEN) * 0.02, bf16(HIDDEN, INTER) * 0.02
    w_gate_up = torch.cat((w_gate, w_up))
    linear = torch.nn.functional.linear
    mlp_cands = {
        "HF: 3 GEMMs + torch silu*mul": lambda: linear(silu_mul(linear(xm, w_gate), linear(xm, w_up)), w_down),
        "fl_patch: 3 GEMMs + FlagGems silu_and_mul": lambda: linear(
            flag_gems.silu_and_mul(linear(xm, w_gate), linear(xm, w_up)), w_down),
        "fused gate|up GEMM + FlagGems swiglu": lambda: linear(flag_gems.swiglu(linear(xm, w_gate_up)), w_down),
        "fused gate|up GEMM + torch chunk silu*mul": lambda: linear(
            silu_mul(*linear(xm, w_gate_up).chunk(2, dim=-1)), w_down),
    }
    if liger:
        mlp_cands["Liger: 3 GEMMs + silu_mul"] = lambda: linear(
            LigerSiLUMulFunction.apply(linear(xm, w_gate), linear(xm, w_up)), w_down)
    out["MLP block, [8192, 2048] -> 8192 -> 2048"] = (None, mlp_cands)
    return out


CHECKS: dict = {}  # name -> check() -> dict, filled by cases(): correctness checks that are not timings


def rope_inplace_check(apply, q_tokens, k_tokens, want, runs: int = 3) -> dict:
    """An in-place rope `apply(q, k)` on fresh copies of the same (B, S, H, D) inputs, `runs` times: how far each
    half of the head dim lands from `want` (HF's out-of-place result, (B, H, S, D)) and how far the runs differ
    from each other. Runs that differ on equal inputs mean a race between reads and in-place writes."""
    outs = []
    for _ in range(runs):
        a, b = q_tokens.clone(), k_tokens.clone()
        apply(a, b)
        outs.append((a.transpose(1, 2).float(), b.transpose(1, 2).float()))
    half = q_tokens.shape[-1] // 2
    first = outs[0]
    return {
        "max_diff_first_half": max((got[..., :half] - ref.float()[..., :half]).abs().max().item()
                                   for got, ref in zip(first, want, strict=True)),
        "max_diff_second_half": max((got[..., half:] - ref.float()[..., half:]).abs().max().item()
                                    for got, ref in zip(first, want, strict=True)),
        "max_diff_between_runs": max((x - y).abs().max().item() for other in outs[1:]
                                     for x, y in zip(first, other, strict=True)),
        "runs": runs,
    }


def host_us(fn, calls: int = 50) -> float:
    """Host time per call: `calls` back-to-back calls enqueued without waiting (the device may lag behind)."""
    import time

    import torch

    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - started
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def training_cases(liger):
    """Forward + backward where a candidate has a backward: {case: {candidate: fn}}."""
    import torch

    import flag_gems

    gate, up = bf16(TOKENS, INTER, grad=True), bf16(TOKENS, INTER, grad=True)
    grad = bf16(TOKENS, INTER)
    x = bf16(TOKENS, HIDDEN, grad=True)
    weight = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    gx = bf16(TOKENS, HIDDEN)

    def step(fn, g, *inputs):
        def run():
            for t in inputs:
                t.grad = None
            fn().backward(g)
        return run

    out = {
        "silu(gate) * up fwd+bwd": {
            "torch eager": step(lambda: silu_mul(gate, up), grad, gate, up),
            "FlagGems silu_and_mul": step(lambda: flag_gems.silu_and_mul(gate, up), grad, gate, up),
        },
        "RMSNorm fwd+bwd": {
            "torch eager (HF form)": step(lambda: hf_rms_norm(x, weight), gx, x, weight),
            "torch F.rms_norm": step(lambda: torch.nn.functional.rms_norm(x, (HIDDEN,), weight, 1e-6), gx, x,
                                     weight),
            "FlagGems rms_norm": step(lambda: flag_gems.rms_norm(x, (HIDDEN,), weight, 1e-6), gx, x, weight),
        },
    }
    if liger:
        from liger_kernel.ops.rms_norm import LigerRMSNormFunction
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction

        out["silu(gate) * up fwd+bwd"]["Liger silu_mul"] = step(lambda: LigerSiLUMulFunction.apply(gate, up), grad,
                                                                 gate, up)
        out["RMSNorm fwd+bwd"]["Liger rms_norm"] = step(
            lambda: LigerRMSNormFunction.apply(x, weight, 1e-6, 0.0, "llama", False), gx, x, weight)
    return out


def largest_difference(got, want) -> float:
    import torch

    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(got, want, strict=False)
               if isinstance(a, torch.Tensor))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument("--name", default="prefill_gap")
    args = parser.parse_args()
    import torch
    import triton

    if not torch.cuda.is_available():
        print("bench_prefill_gap: needs a CUDA device and flag_gems", file=sys.stderr)
        return 2
    try:
        import liger_kernel  # noqa: F401
        liger = True
    except ImportError:
        liger = False
    import flag_gems

    from fl_patch.versions import installed_version

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.UTC).isoformat(),
              "versions": {"torch": torch.__version__, "triton": triton.__version__,
                           "flag_gems": getattr(flag_gems, "__version__", installed_version("flag_gems")),
                           "liger_kernel": installed_version("liger_kernel") if liger else None,
                           "python": platform.python_version()},
              "forward": {}, "train": {}}

    def save():
        (out_dir / f"{args.name}.json").write_text(json.dumps(result, indent=1))
        (out_dir / f"{args.name}.md").write_text(markdown(result))

    torch.manual_seed(0)
    for case, (moved, candidates) in cases(liger).items():
        rows = result["forward"].setdefault(case, {})
        reference = None
        for name, fn in candidates.items():
            try:
                got = fn()
                reference = got if reference is None else reference
                us = triton.testing.do_bench(fn, warmup=25, rep=200) * 1000
                rows[name] = {"us": round(us, 1), "host_us": round(host_us(fn), 1),
                              "max_diff": round(largest_difference(got, reference), 4)}
                if moved:
                    rows[name]["tb_per_s"] = round(moved / us / 1e6, 2)
            except Exception as exc:  # one candidate's failure must not lose the others
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{case:<52} {name:<44} {rows[name]}", flush=True)
            save()
    result["checks"] = {}
    for name, check in CHECKS.items():
        try:
            result["checks"][name] = {k: round(v, 4) for k, v in check().items()}
        except Exception as exc:
            result["checks"][name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
        print(f"check {name}: {result['checks'][name]}", flush=True)
        save()
    for case, candidates in training_cases(liger).items():
        rows = result["train"].setdefault(case, {})
        for name, fn in candidates.items():
            try:
                fn()
                rows[name] = {"us": round(triton.testing.do_bench(fn, warmup=25, rep=200) * 1000, 1),
                              "host_us": round(host_us(fn), 1)}
            except Exception as exc:
                rows[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            print(f"{case:<52} {name:<44} {rows[name]}", flush=True)
            save()
    save()
    return 0


def markdown(result) -> str:
    v = result["versions"]
    lines = [f"# Prefill gap, kernel by kernel: {result['device']}, {result['date'][:16]} UTC", "",
             f"torch {v['torch']}, triton {v['triton']}, flag_gems {v['flag_gems']}, liger_kernel {v['liger_kernel']};"
             " bf16, Llama 4x2048 shapes; `triton.testing.do_bench` medians. Bandwidth: bytes the op must move / "
             f"time (peak {PEAK_TBPS} TB/s). max diff: against the first candidate (torch eager).", ""]
    for part, title in (("forward", "Forward (prefill)"), ("train", "Forward + backward")):
        lines += [f"## {title}", "", "| case | candidate | µs | x fastest | TB/s | host µs | max diff |",
                  "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for case, rows in result[part].items():
            times = [r["us"] for r in rows.values() if "us" in r]
            best = min(times) if times else None
            for name, r in rows.items():
                if "us" not in r:
                    lines.append(f"| {case} | {name} | {r['error']} | | | | |")
                    continue
                lines.append(f"| {case} | {name} | {r['us']:.1f} | {r['us'] / best:.2f} | {r.get('tb_per_s', '')} | "
                             f"{r.get('host_us', '')} | {r.get('max_diff', '')} |")
        lines.append("")
        if part == "forward" and result.get("checks"):
            lines += ["## Checks", ""]
            lines += [f"- {name}: " + ", ".join(f"{k} {v}" for k, v in got.items())
                      for name, got in result["checks"].items()]
            lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
