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
import cProfile
import json
import pstats
import statistics
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


def timed_steps(step, count: int, device: str, times: list | None = None, on_step=None) -> list[float]:
    """Wall ms of `count` steps, each from a drained device to a drained device, appended to `times`."""
    times = [] if times is None else times
    for number in range(1, count + 1):
        synchronize(device)
        began = time.perf_counter()
        step()
        synchronize(device)
        times.append((time.perf_counter() - began) * 1000)
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


def windows(times: list[float], size: int = 10) -> list[tuple[str, float]]:
    return [(f"{i + 1}-{min(i + size, len(times))}", statistics.median(times[i:i + size]))
            for i in range(0, len(times), size)]


def learning_state() -> dict:
    from fl_patch.device import routing

    return {"summary": routing.summary_line(), "learning": routing.learning_lines()}


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
    hf_before = timed_steps(step, 50, device)
    checkpoints = {}

    def snapshot(number: int) -> None:
        if number in CHECKPOINTS:
            checkpoints[number] = {"ms_so_far": statistics.median(fl_times[-min(10, len(fl_times)):])
                                   if fl_times else None, **learning_state()}
            print(f"  fl_patch step {number}: {len(checkpoints[number]['learning'])} learning lines", flush=True)

    fl_times: list[float] = []
    with fl_patch.patched(kernels=kernels):
        timed_steps(step, steps, device, times=fl_times, on_step=snapshot)
        fl_stats = profiled(step, profile_steps, device)
        reasons = routed_reasons()
        final_state = learning_state()
    hf_after = timed_steps(step, 50, device)
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
        "fl_patch_ms": fl_times, "windows": windows(fl_times), "checkpoints": checkpoints,
        "final": final_state, "routed_natively": reasons,
        "profile_steps": profile_steps,
        "step_total_us": {"fl_patch": fl_stats.total_tt * 1e6 / profile_steps,
                          "hf": hf_stats.total_tt * 1e6 / profile_steps},
        "added_functions": dict(top_added),
        "hf_top": dict(sorted(hf_functions.items(), key=lambda kv: -kv[1]["own_us"])[:25]),
        "fl_patch_top": dict(sorted(fl_functions.items(), key=lambda kv: -kv[1]["own_us"])[:25]),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# {args.model} decode b{args.batch} over {cached} tokens, {result['device']}, {result['date']}", "",
             f"HF median {hf_ms:.2f} ms a step (50 steps before fl_patch, 50 after)", "",
             "| fl_patch steps | median ms | x vs HF |", "| --- | --- | --- |"]
    lines += [f"| {span} | {ms:.2f} | {hf_ms / ms:.2f}x |" for span, ms in result["windows"]]
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
