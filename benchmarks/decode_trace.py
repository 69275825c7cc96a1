"""Where a decode step's host time goes, in one process: the wall time of every decode step of HF and of
fl_patch from fl_patch's first step on (so that first-use verification and calibration show as they settle),
then a cProfile of steps of each: the functions fl_patch and FlagGems add to a step, µs and calls per step.

A decode step is launch-bound: its wall time is the host's time to launch its kernels, so the cProfile of the
host says where the difference to HF goes. Run it where a user starts: no profile anywhere (see
benchmarks/untuned_device.sh, step ``trace``), so the first steps take the prior and calibrate.

    python benchmarks/decode_trace.py --out DIR              # GPU: Llama ~1.1B, bf16, decode b1 over 2048 tokens
    python benchmarks/decode_trace.py --batch 16 --out DIR   # decode b16
    python benchmarks/decode_trace.py --quick --out DIR      # CPU, tiny model, reference kernels (harness check)

Writes <name>.json (every step's ms, the windows, the calibration state at checkpoints, the top functions) and
<name>.md (the windows table and the functions fl_patch adds) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import json
import pstats
import statistics
import threading
import time
from pathlib import Path

import torch

import fl_patch
from bench_e2e import decode_fn  # benchmarks/, on sys.path as the script's folder
from model_configs import model_config

CHECKPOINTS = (1, 2, 5, 10, 20, 50, 100, 200, 400, 800)
OURS = ("fl_patch", "flag_gems", "triton")  # path parts of the functions a patched step adds


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class GcWatch:
    """Seconds the garbage collector ran, and its collections per generation, while installed."""

    def __init__(self) -> None:
        self.seconds, self.collections, self._began = 0.0, [0, 0, 0], 0.0

    def __call__(self, phase, info) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.collections[info["generation"]] += 1


GC = GcWatch()
gc.callbacks.append(GC)
# per timed step: [wall ms, host ms until the step returned (before the drain), gc ms, full collections]
DETAIL: dict[str, list] = {}


def timed_steps(step, count: int, device: str, on_step=None, label: str = "") -> list[float]:
    """Wall ms of `count` steps, each from a drained device to a drained device (the detail of each appended to
    DETAIL[label])."""
    times = []
    detail = DETAIL.setdefault(label, [])
    for number in range(1, count + 1):
        synchronize(device)
        gc_before, full_before = GC.seconds, GC.collections[2]
        began = time.perf_counter()
        step()
        returned = time.perf_counter()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000)
        detail.append([round(times[-1], 3), round((returned - began) * 1000, 3),
                       round((GC.seconds - gc_before) * 1000, 3), GC.collections[2] - full_before])
        if on_step is not None:
            on_step(number)
    return times


def profiled(step, count: int, device: str) -> pstats.Stats:
    synchronize(device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(count):
        step()
    synchronize(device)
    profiler.disable()
    return pstats.Stats(profiler)


def per_step(stats: pstats.Stats, steps: int) -> dict[str, dict]:
    """function -> calls, own µs and cumulative µs per step, and whether fl_patch, FlagGems or Triton adds it."""
    out = {}
    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
        parts = Path(path).parts
        where = f"{'/'.join(parts[-3:])}:{line}({name})"
        out[where] = {"calls": calls / steps, "own_us": own * 1e6 / steps, "cum_us": cumulative * 1e6 / steps,
                      "ours": any(part in parts for part in OURS)}
    return out


def windows(detail: list[list], size: int = 10) -> list[tuple]:
    """Per `size` steps: (span, median wall ms, median host ms to return, gc ms in all, full collections)."""
    out = []
    for i in range(0, len(detail), size):
        rows = detail[i:i + size]
        out.append((f"{i + 1}-{i + len(rows)}", statistics.median(r[0] for r in rows),
                    statistics.median(r[1] for r in rows), sum(r[2] for r in rows), sum(r[3] for r in rows)))
    return out


def learning_state() -> dict:
    from fl_patch.device import routing

    return {"summary": routing.summary_line(), "learning": routing.learning_lines(),
            "threads": sorted(t.name for t in threading.enumerate()), "gc_counts": gc.get_count(),
            "gc_objects": len(gc.get_objects())}


def flag_gems_control(device: str) -> None:
    """What the first FlagGems call does to a process without fl_patch: import flag_gems and run one RMSNorm
    (its JIT compile included), as fl_patch's first-use verification does."""
    import flag_gems

    x = torch.randn(1, 2048, device=device, dtype=torch.bfloat16)
    flag_gems.rms_norm(x, [2048], torch.ones(2048, device=device, dtype=torch.bfloat16), 1e-6)
    synchronize(device)


def routed_reasons() -> dict:
    return {r["where"]: r["fallbacks"] for r in fl_patch.report() if r["state"] == "patched" and r["fallbacks"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="llama")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--cached", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=300, help="fl_patch steps traced from its first (default 300)")
    parser.add_argument("--profile-steps", type=int, default=30)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="decode_trace")
    parser.add_argument("--early-profile", action="store_true",
                        help="profile the 20 fl_patch steps after its first instead of steps after the trace")
    parser.add_argument("--gc-freeze", action="store_true", help="gc.freeze() after fl_patch's first step")
    parser.add_argument("--control", action="store_true",
                        help="no fl_patch: HF steps traced after importing flag_gems and one FlagGems RMSNorm")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    kernels = "reference" if args.quick else "gems"
    steps, profile_steps = (20, 5) if args.quick else (args.steps, args.profile_steps)
    cached = 32 if args.quick else args.cached
    fl_patch.revert()  # `import fl_patch` may have activated from the environment: HF runs native
    torch.manual_seed(0)
    config = model_config(args.model, args.quick)
    model = __import__("transformers").AutoModelForCausalLM.from_config(config).to(device, torch.bfloat16).eval()
    step = decode_fn(model, batch=args.batch, cached=cached, vocab=config.vocab_size, device=device)
    print(f"{args.model} decode b{args.batch} over {cached} cached tokens, {device}; HF warm-up", flush=True)
    timed_steps(step, 20, device)
    hf_before = timed_steps(step, 50, device, label="hf_before")
    checkpoints = {}

    def snapshot(number: int) -> None:
        if number == 1 and args.gc_freeze:
            gc.freeze()
        if number in CHECKPOINTS:
            so_far = DETAIL["fl_patch"][-10:]
            checkpoints[number] = {"ms_so_far": statistics.median(row[0] for row in so_far), **learning_state()}
            print(f"  fl_patch step {number}: {len(checkpoints[number]['learning'])} learning lines", flush=True)

    if args.control:  # the "fl_patch" steps are HF's, after FlagGems' first call
        flag_gems_control(device)
        context = contextlib.nullcontext
    else:
        context = lambda: fl_patch.patched(kernels=kernels)  # noqa: E731
    with context():
        if args.early_profile:
            timed_steps(step, 1, device, on_step=snapshot, label="fl_patch")
            fl_stats = profiled(step, profile_steps, device)
            timed_steps(step, steps, device, on_step=snapshot, label="fl_patch")
        else:
            timed_steps(step, steps, device, on_step=snapshot, label="fl_patch")
            fl_stats = profiled(step, profile_steps, device)
        reasons = routed_reasons()
        final_state = learning_state()
    hf_after = timed_steps(step, 50, device, label="hf_after")
    hf_stats = profiled(step, profile_steps, device)
    hf_ms = statistics.median(hf_before + hf_after)
    fl_functions, hf_functions = per_step(fl_stats, profile_steps), per_step(hf_stats, profile_steps)
    added = {name: row for name, row in fl_functions.items() if row["ours"]}
    top_added = sorted(added.items(), key=lambda kv: -kv[1]["own_us"])[:40]
    result = {
        "model": args.model, "batch": args.batch, "cached": cached, "device": torch.cuda.get_device_name()
        if device == "cuda" else "cpu", "versions": {"torch": torch.__version__},
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "hf_ms": {"median": hf_ms, "before": hf_before, "after": hf_after},
        "fl_patch_ms": [row[0] for row in DETAIL["fl_patch"]], "windows": windows(DETAIL["fl_patch"]),
        "checkpoints": checkpoints,
        "final": final_state, "routed_natively": reasons,
        "profile_steps": profile_steps, "options": {"early_profile": args.early_profile,
                                                    "gc_freeze": args.gc_freeze, "control": args.control},
        "detail": {"columns": ["wall ms", "host ms to return", "gc ms", "full collections"], **DETAIL},
        "step_total_us": {"fl_patch": fl_stats.total_tt * 1e6 / profile_steps,
                          "hf": hf_stats.total_tt * 1e6 / profile_steps},
        "added_functions": dict(top_added),
        "hf_top": dict(sorted(hf_functions.items(), key=lambda kv: -kv[1]["own_us"])[:25]),
        "fl_patch_top": dict(sorted(fl_functions.items(), key=lambda kv: -kv[1]["own_us"])[:25]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    traced = "HF after FlagGems' first call (--control)" if args.control else "fl_patch"
    options = ", ".join(k for k, v in result["options"].items() if v) or "defaults"
    lines = [f"# {args.model} decode b{args.batch} over {cached} tokens, {result['device']}, {result['date']}", "",
             f"HF median {hf_ms:.2f} ms a step (50 steps before, 50 after); traced: {traced}; options: {options}",
             "", f"| {traced} steps | median ms | x vs HF | host ms to return | gc ms | full gc |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {span} | {ms:.2f} | {hf_ms / ms:.2f}x | {host:.2f} | {gc_ms:.1f} | {full} |"
              for span, ms, host, gc_ms, full in result["windows"]]
    lines += ["", f"cProfile, {profile_steps} steps: fl_patch {result['step_total_us']['fl_patch']:.0f} µs a step "
              f"of profiled host time, HF {result['step_total_us']['hf']:.0f}", "",
              "| function (fl_patch, flag_gems, triton) | calls a step | own µs a step | cumulative µs a step |",
              "| --- | --- | --- | --- |"]
    lines += [f"| {name} | {row['calls']:.0f} | {row['own_us']:.0f} | {row['cum_us']:.0f} |" for name, row in top_added]
    lines += ["", "Routed natively (per place, per reason, whole run):", ""]
    lines += [f"- {where}: {why}" for where, why in sorted(reasons.items())]
    lines += ["", "Learned by the end:", ""] + [f"- {line}" for line in final_state["learning"]]
    (out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[:len(result["windows"]) + 6]), flush=True)
    print(f"wrote {out / args.name}.json and .md")


if __name__ == "__main__":
    main()
