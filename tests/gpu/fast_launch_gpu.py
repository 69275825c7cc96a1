"""The fast launch path (fl_patch/kernels/fast_launch.py) on a GPU: every function it takes, in every form, dtype and
shape class fl_patch uses, gives outputs bitwise equal to FlagGems' own call, eagerly, on a side stream and inside
a CUDA graph.

    python tests/gpu/fast_launch_gpu.py tests/gpu/results/fast_launch.json             # GPU: cuda, flag_gems
    python tests/gpu/fast_launch_gpu.py --dry-run /tmp/fast_launch.json                # CPU check of this script

Not a pytest module. Two groups of cases:

- ``flag_gems``: ``FastOps(flag_gems).<fn>(*args)`` against ``flag_gems.<fn>(*args)`` (rms_norm, rms_norm_forward,
  silu_and_mul, apply_rotary_pos_emb, layer_norm) in bf16, fp16 and fp32, at decode (1 and 16 rows), prefill
  (4 x 2048 rows), odd sizes, an input 2 bytes off 16-byte alignment, and non-contiguous inputs (q, k as slices of a
  fused projection, gate and up as halves of one tensor, a transposed x);
- ``fl_patch``: fl_patch's kernel functions (``rms_norm.gems_hf`` / ``gems_gemma`` / ``gems_fp32`` / ``gems_torch``
  / ``gems_gated``, ``swiglu.gems``, ``rope.gems_hf`` with HF's transposed q and k (bound as one call with its
  views, op ``rope.gems_hf_full``; partial rotary through ``apply_rotary_pos_emb``), ``rope.gems_interleaved``,
  ``layer_norm.gems`` (bound with its ``[0]``, op ``layer_norm.gems_y``)) with the fast launch path against the same
  functions with FlagGems' module as ``ops()``.

Per case: CALLS calls with fresh inputs (the first ones record, the rest launch directly), each compared with
``torch.equal`` (and strides, dtype); once bound, one call on a side stream and one CUDA graph (captured with one
set of inputs, replayed after new values were copied into them) compared the same way. A case passes when every
comparison is equal and it bound as expected (``expect_bound``: None = either way, reported). Whatever stays on
FlagGems' own call is listed with the reason. Errors are recorded per case, never fatal; the JSON and a markdown
table (same name, ``.md``) are rewritten after every case; cases left when --budget seconds have passed are
recorded as skipped. ``--dry-run``: CPU, the stand-in launcher and FlagGems functions of tests/fake_launch.py, small
shapes, no stream or graph checks. Exit status 0 when every case that ran passed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
sys.path.insert(1, str(REPO / "tests"))
os.environ["FL_PATCH"] = "0"  # the kernel functions are called directly: importing fl_patch must not patch

CALLS = 5  # per case: recordings (autotuning settles within them), then direct launches


def say(message: str) -> None:
    print(f"[fast_launch_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


@dataclass
class Case:
    group: str  # "flag_gems" or "fl_patch"
    op: str  # the fast function whose counters the case reads
    form: str
    dtype: str
    shape: str
    make: Callable[[], tuple]  # fresh inputs
    fast: Callable  # the call on the fast launch path
    reference: Callable  # the same call through FlagGems' own function
    expect_bound: bool | None = True
    result: dict = field(default_factory=dict)


class Env:
    """What the cases run on: the device, the FlagGems module (or the stand-in), its FastOps, dtypes, sizes."""

    def __init__(self, dry_run: bool):
        import torch

        from fl_patch.kernels import fast_launch, gems

        self.torch, self.dry_run = torch, dry_run
        if dry_run:
            import fake_launch

            fast_launch.use_api(fake_launch.api())
            self.module, self.device = fake_launch.gems, "cpu"
            self.dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
            self.hidden, self.mlp, self.tokens, self.heads, self.head_dim = 64, 96, 12, (4, 2), 32
            self.odd = 50
        else:
            if not torch.cuda.is_available():
                raise RuntimeError("no CUDA device (use --dry-run on CPU)")
            import flag_gems

            self.module, self.device = flag_gems, "cuda"
            self.dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
            self.hidden, self.mlp, self.tokens, self.heads, self.head_dim = 2048, 8192, 2048, (16, 8), 128
            self.odd = 1000
        self.fast = fast_launch.FastOps(self.module)
        self.gems = gems
        gems.configure_fast_launch(True)

    def randn(self, *shape, dtype):
        return self.torch.randn(*shape, device=self.device).to(dtype)


# ----------------------------------------------------------------------------------------------------- cases

def flag_gems_cases(env: Env) -> list[Case]:
    torch, h, mlp, t = env.torch, env.hidden, env.mlp, env.tokens
    qh, kh = env.heads
    d = env.head_dim
    cases = []

    def add(op, form, dtype, shape, make, expect=True):
        cases.append(Case("flag_gems", op, form, dtype, shape, make, getattr(env.fast, op), getattr(env.module, op),
                          expect))

    table_rows = 4096
    for name, dt in env.dtypes.items():
        def r(*shape, dt=dt):
            return env.randn(*shape, dtype=dt)

        # RMSNorm: decode, prefill, an odd width, Gemma's fp32 weight, a misaligned x, a transposed x (copied)
        add("rms_norm", "hf", name, f"1x{h}", lambda r=r: (r(1, h), (h,), r(h), 1e-6))
        add("rms_norm", "hf", name, f"16x{h}", lambda r=r: (r(16, h), (h,), r(h), 1e-6))
        add("rms_norm", "hf", name, f"4x{t}x{h}", lambda r=r: (r(4, t, h), (h,), r(h), 1e-6))
        add("rms_norm", "hf", name, f"3x5x{env.odd}", lambda r=r: (r(3, 5, env.odd), (env.odd,), r(env.odd), 1e-5))
        add("rms_norm", "gemma fp32 weight", name, f"16x{h}",
            lambda r=r: (r(16, h), (h,), env.randn(h, dtype=torch.float32), 1e-6))
        add("rms_norm", "x one element off 16-byte alignment", name, f"1x{h}",
            lambda r=r: (r(1 + h)[1:].view(1, h), (h,), r(h), 1e-6))
        add("rms_norm", "transposed x (FlagGems copies it)", name, f"16x{h}",
            lambda r=r: (r(h, 16).t(), (h,), r(h), 1e-6), expect=False)
        add("rms_norm_forward", "custom op's forward", name, f"16x{h}", lambda r=r: (r(16, h), (h,), r(h), 1e-6))
        # SiLU-and-mul: decode, prefill, odd, gate and up as the halves of one tensor
        add("silu_and_mul", "", name, f"1x{mlp}", lambda r=r: (r(1, mlp), r(1, mlp)))
        add("silu_and_mul", "", name, f"16x{mlp}", lambda r=r: (r(16, mlp), r(16, mlp)))
        add("silu_and_mul", "", name, f"4x{t}x{mlp}", lambda r=r: (r(4, t, mlp), r(4, t, mlp)))
        add("silu_and_mul", "", name, f"3x{env.odd}", lambda r=r: (r(3, env.odd), r(3, env.odd)))

        def halves(r=r):
            both = r(16, 2 * mlp)
            return both[:, :mlp], both[:, mlp:]

        add("silu_and_mul", "halves of one tensor", name, f"16x{mlp}", halves)

        # rope: (B, S, H, D) with a half-width table of fl_patch's bucketed row count
        def rope_args(b, s, qheads=qh, kheads=kh, dim=d, r=r):
            return (r(b, s, qheads, dim), r(b, s, kheads, dim), r(table_rows, dim // 2), r(table_rows, dim // 2))

        add("apply_rotary_pos_emb", "neox", name, f"q 1x1x{qh}x{d}", lambda f=rope_args: f(1, 1))
        add("apply_rotary_pos_emb", "neox", name, f"q 16x1x{qh}x{d}", lambda f=rope_args: f(16, 1))
        add("apply_rotary_pos_emb", "neox", name, f"q 4x{t}x{qh}x{d}", lambda f=rope_args: f(4, t))
        odd_dim = 96 if not env.dry_run else 24
        add("apply_rotary_pos_emb", "neox, head dim padded", name, f"q 2x7x12x{odd_dim}",
            lambda f=rope_args, dim=odd_dim: f(2, 7, 12, 4, dim))

        def fused_qkv(b=16, s=1, r=r):
            qkv = r(b, s, (qh + 2 * kh) * d)
            q = qkv[..., : qh * d].view(b, s, qh, d)
            k = qkv[..., qh * d: (qh + kh) * d].view(b, s, kh, d)
            return q, k, r(table_rows, d // 2), r(table_rows, d // 2)

        add("apply_rotary_pos_emb", "q, k slices of a fused qkv", name, f"q 16x1x{qh}x{d}", fused_qkv)

        def interleaved(r=r):
            return (r(1, 64, qh, d), r(1, 64, qh, d), r(table_rows, d // 2), r(table_rows, d // 2), None, True)

        add("apply_rotary_pos_emb", "interleaved", name, f"q 1x64x{qh}x{d}", interleaved)
        # LayerNorm: with and without weight and bias, rows of up to 128, prefill
        add("layer_norm", "weight, bias", name, f"16x{h}", lambda r=r: (r(16, h), (h,), r(h), r(h), 1e-5))
        add("layer_norm", "no weight, no bias", name, f"16x{h}", lambda r=r: (r(16, h), (h,), None, None, 1e-5))
        add("layer_norm", "weight, bias", name, "3x100", lambda r=r: (r(3, 100), (100,), r(100), r(100), 1e-5))
        add("layer_norm", "weight, bias", name, f"4x{t}x{h}", lambda r=r: (r(4, t, h), (h,), r(h), r(h), 1e-5))
    return cases


def wide_cases(env: Env) -> list[Case]:
    """FlagGems' loop kernels above 4096 columns: autotuned over 12 configs (the first call compiles and times them
    all; run last, so a short budget spends itself on the cases above first)."""
    h, bf16 = 4 * env.hidden, env.dtypes["bf16"]
    return [
        Case("flag_gems", "rms_norm", "wide (loop kernel)", "bf16", f"16x{h}",
             lambda: (env.randn(16, h, dtype=bf16), (h,), env.randn(h, dtype=bf16), 1e-6),
             env.fast.rms_norm, env.module.rms_norm),
        Case("flag_gems", "layer_norm", "wide (loop kernel)", "bf16", f"2x{h}",
             lambda: (env.randn(2, h, dtype=bf16), (h,), env.randn(h, dtype=bf16), env.randn(h, dtype=bf16), 1e-5),
             env.fast.layer_norm, env.module.layer_norm),
    ]


def fl_patch_cases(env: Env) -> list[Case]:
    from fl_patch.kernels import layer_norm, rms_norm, rope, swiglu

    torch, h, mlp, d = env.torch, env.hidden, env.mlp, env.head_dim
    qh, kh = env.heads
    cases = []

    def add(op, form, dtype, shape, fn, make):
        cases.append(Case("fl_patch", op, form, dtype, shape, make, env.gems.calling_through(env.fast, fn),
                          env.gems.calling_through(env.module, fn), True))

    for name, dt in env.dtypes.items():
        if dt == torch.float32:
            continue  # fl_patch sends fp16 / bf16 to FlagGems only

        def r(*shape, dt=dt):
            return env.randn(*shape, dtype=dt)

        add("rms_norm", "rms_norm.gems_hf", name, f"16x{h}", rms_norm.gems_hf, lambda r=r: (r(16, 1, h), r(h), 1e-6))
        add("rms_norm", "rms_norm.gems_gemma", name, f"16x{h}", rms_norm.gems_gemma,
            lambda r=r: (r(16, 1, h), r(h), 1e-6))
        add("rms_norm", "rms_norm.gems_fp32 (no weight)", name, f"16x{h}", rms_norm.gems_fp32,
            lambda r=r: (r(16, h), None, 1e-6))
        add("rms_norm", "rms_norm.gems_torch", name, f"4x8x{h}", rms_norm.gems_torch,
            lambda r=r: (r(4, 8, h), (h,), r(h), None))
        add("silu_and_mul", "rms_norm.gems_gated", name, f"16x{h}", rms_norm.gems_gated,
            lambda r=r: (r(16, h), r(16, h), r(h), 1e-6))
        add("silu_and_mul", "swiglu.gems", name, f"16x1x{mlp}", swiglu.gems, lambda r=r: (r(16, 1, mlp), r(16, 1, mlp)))

        def hf_rope(b, s, per_row=False, rotary=d, r=r):
            """HF's q, k: (B, S, H, D) projections viewed as (B, H, S, D); cos, sin (1 or B, S, rotary) of equal
            halves."""
            q = r(b, s, qh, d).transpose(1, 2)
            k = r(b, s, kh, d).transpose(1, 2)
            freqs = torch.randn(b if per_row else 1, s, rotary // 2, device=env.device)
            emb = torch.cat((freqs, freqs), dim=-1)
            return q, k, emb.cos().to(q.dtype), emb.sin().to(q.dtype), 1

        full = "rope.gems_hf_full"  # rope.gems_hf with every channel rotated: bound as one call, views included
        add(full, "rope.gems_hf", name, f"q 16x{qh}x1x{d}", rope.gems_hf, lambda f=hf_rope: f(16, 1))
        add(full, "rope.gems_hf", name, f"q 1x{qh}x1x{d}", rope.gems_hf, lambda f=hf_rope: f(1, 1))
        add(full, "rope.gems_hf", name, f"q 2x{qh}x128x{d}", rope.gems_hf, lambda f=hf_rope: f(2, 128))
        add(full, "rope.gems_hf, cos per batch row", name, f"q 4x{qh}x1x{d}", rope.gems_hf,
            lambda f=hf_rope: f(4, 1, per_row=True))
        add(full, "rope.gems_hf, cos per batch row", name, f"q 16x{qh}x1x{d}", rope.gems_hf,
            lambda f=hf_rope: f(16, 1, per_row=True))
        add("apply_rotary_pos_emb", "rope.gems_hf, partial rotary (Phi-3)", name, f"q 16x{qh}x1x{d}, rotary {d // 2}",
            rope.gems_hf, lambda f=hf_rope: f(16, 1, per_row=True, rotary=d // 2))

        def lightx2v(r=r):
            s = 64
            freqs = torch.polar(torch.ones(s, 1, d // 2, device=env.device),
                                torch.randn(s, 1, d // 2, device=env.device))
            return r(s, qh, d), r(s, qh, d), freqs

        add("apply_rotary_pos_emb", "rope.gems_interleaved", name, f"q 64x{qh}x{d}", rope.gems_interleaved, lightx2v)
        add("layer_norm.gems_y", "layer_norm.gems", name, f"16x{h}", layer_norm.gems,
            lambda r=r: (r(16, h), (h,), r(h), r(h), 1e-5))
    return cases


# ----------------------------------------------------------------------------------------------- checking

def same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype and a.stride() == b.stride()
                and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def tensors_of(args) -> list:
    import torch

    return [a for a in args if isinstance(a, torch.Tensor)]


COMPOSITES = {"rope.gems_hf_full": "apply_rotary_pos_emb", "layer_norm.gems_y": "layer_norm"}  # site: FlagGems name


def site_of(env: Env, op: str):
    """The fast path's site a case's calls count on: a FlagGems function's, or one of fl_patch's composites."""
    if op in COMPOSITES:
        import importlib

        module, body = op.split(".")
        body = getattr(importlib.import_module(f"fl_patch.kernels.{module}"), body)
        return env.fast.composed(COMPOSITES[op], body).site
    return getattr(env.fast, op).site


def run_case(case: Case, env: Env) -> dict:
    torch = env.torch
    site = site_of(env, case.op)
    before = site.stats()
    equal_calls = []
    for _ in range(CALLS):
        args = case.make()
        equal_calls.append(same(case.fast(*args), case.reference(*args)))
    after = site.stats()
    fast_calls = after["fast_calls"] - before["fast_calls"]
    result = {"equal_calls": equal_calls, "fast_calls": fast_calls, "bound": fast_calls > 0}
    if not result["bound"]:
        new = {reason: n - before["public_calls"].get(reason, 0) for reason, n in after["public_calls"].items()
               if n != before["public_calls"].get(reason, 0)}
        result["public_calls"] = new
    checks = list(equal_calls)
    if env.device == "cuda" and result["bound"]:
        args = case.make()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            out = case.fast(*args)
        torch.cuda.current_stream().wait_stream(stream)
        result["side_stream_equal"] = same(out, case.reference(*args))
        checks.append(result["side_stream_equal"])
        result.update(graph_check(case, env))
        checks.append(result["graph_equal"])
    result["passed"] = all(checks) and (case.expect_bound is None or case.expect_bound == result["bound"])
    return result


def graph_check(case: Case, env: Env) -> dict:
    """Capture one fast call, copy new values into its inputs, replay: equal to FlagGems' call on those inputs."""
    torch = env.torch
    site = site_of(env, case.op)
    static = case.make()
    graph = torch.cuda.CUDAGraph()
    before = site.stats()["fast_calls"]
    with torch.cuda.graph(graph):
        out = case.fast(*static)
    captured = site.stats()["fast_calls"] - before
    fresh = case.make()
    for into, value in zip(tensors_of(static), tensors_of(fresh), strict=True):
        into.copy_(value)
    graph.replay()
    torch.cuda.synchronize()
    return {"graph_equal": same(out, case.reference(*static)), "graph_fast_calls": captured}


# ------------------------------------------------------------------------------------------------- output

def environment(env: Env) -> dict:
    from fl_patch.kernels import fast_launch
    from fl_patch.versions import installed_version

    torch = env.torch
    api, problem = fast_launch.launch_api()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__, "triton": installed_version("triton"),
            "flag_gems": installed_version("flag-gems") or getattr(env.module, "__version__", None),
            "device": torch.cuda.get_device_name(0) if env.device == "cuda" else "cpu (stand-in launcher)",
            "launch_api": api.name if api else problem, "dry_run": env.dry_run, "calls_per_case": CALLS}


def write(out: Path, info: dict, cases: list[Case]) -> None:
    rows = [{"group": c.group, "op": c.op, "form": c.form, "dtype": c.dtype, "shape": c.shape,
             "expect_bound": c.expect_bound, **c.result} for c in cases if c.result]
    ran = [row for row in rows if "passed" in row]
    summary = {"cases": len(rows), "ran": len(ran), "passed": sum(row["passed"] for row in ran),
               "errors": sum("error" in row for row in rows), "skipped": sum("skipped" in row for row in rows),
               "bound": sum(row.get("bound", False) for row in ran)}
    out.parent.mkdir(parents=True, exist_ok=True)
    from fl_patch.kernels import fast_launch

    out.write_text(json.dumps({"environment": info, "summary": summary, "cases": rows,
                               "stats": fast_launch.stats()}, indent=1, default=str))
    lines = [f"# Fast launch path: bitwise equality with FlagGems' own call ({info['device']})", "",
             ", ".join(f"{k} {v}" for k, v in info.items() if k != "device"), "",
             f"{summary['passed']} of {summary['ran']} cases passed, {summary['bound']} bound, "
             f"{summary['errors']} errors, {summary['skipped']} skipped", "",
             "| group | op | form | dtype | shape | bound | fast calls | eager equal | side stream | graph | passed |"
             " not bound because |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        if "error" in row or "skipped" in row:
            detail = row.get("error", row.get("skipped", ""))[-160:].replace("\n", " ").replace("|", "/")
            lines.append(f"| {row['group']} | {row['op']} | {row['form']} | {row['dtype']} | {row['shape']} | | | | | |"
                         f" {'error' if 'error' in row else 'skipped'} | {detail} |")
            continue
        why = ", ".join(f"{k} {v}" for k, v in (row.get("public_calls") or {}).items())
        lines.append(
            f"| {row['group']} | {row['op']} | {row['form']} | {row['dtype']} | {row['shape']} | {row['bound']} |"
            f" {row['fast_calls']} | {all(row['equal_calls'])} | {row.get('side_stream_equal', '-')} |"
            f" {row.get('graph_equal', '-')} | {row['passed']} | {why} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the JSON file to write (the markdown goes beside it, .md)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, the stand-in launcher of tests/fake_launch.py")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds of cases before the rest is skipped")
    parser.add_argument("--only", default="", help="comma list of ops to run (default: all)")
    args = parser.parse_args(argv)
    start = time.monotonic()
    try:
        env = Env(args.dry_run)
        info = environment(env)
    except Exception as exc:  # no CUDA, no FlagGems: say so in the JSON too
        say(f"can't start: {type(exc).__name__}: {exc}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}))
        return 2
    cases = flag_gems_cases(env) + fl_patch_cases(env) + wide_cases(env)
    if args.only:
        cases = [c for c in cases if c.op in args.only.split(",")]
    say(f"{len(cases)} cases on {info['device']} ({info['launch_api']})")
    for index, case in enumerate(cases):
        label = f"{case.group} {case.op} {case.form} {case.dtype} {case.shape}"
        if time.monotonic() - start > args.budget:
            case.result = {"skipped": f"time budget ({args.budget:.0f} s) spent"}
            continue
        began = time.monotonic()
        try:
            case.result = run_case(case, env)
        except Exception as exc:  # recorded, never fatal
            case.result = {"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}"}
        case.result["seconds"] = round(time.monotonic() - began, 3)
        outcome = "ERROR" if "error" in case.result else ("PASS" if case.result["passed"] else "FAIL")
        say(f"{index + 1}/{len(cases)} {outcome} {label} bound={case.result.get('bound')} "
            f"{case.result.get('public_calls') or ''}{case.result.get('error', '')[:200]}")
        write(args.out, info, cases)
    write(args.out, info, cases)
    ran = [c for c in cases if "passed" in c.result]
    passed = sum(c.result["passed"] for c in ran)
    errors = sum("error" in c.result for c in cases)
    say(f"done in {time.monotonic() - start:.0f} s: {passed} of {len(ran)} passed, {errors} errors; wrote {args.out}")
    return 0 if passed == len(ran) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
