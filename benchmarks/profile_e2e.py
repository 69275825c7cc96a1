"""Where a forward's time goes: kernel time per category (matmul, attention, norm, rope, ...) for HF default,
fl_patch and Liger on the same model and inputs, from ``torch.profiler``.

bench_e2e says how fast each variant is; this says why: the device time of each variant's kernels, grouped by
what they compute, and the busiest kernels by name.

    python benchmarks/profile_e2e.py                                   # GPU: llama, 4x2048, hf_sdpa,fl_patch,liger
    python benchmarks/profile_e2e.py --models qwen3 --shapes 1x128 --variants hf_sdpa,fl_patch
    python benchmarks/profile_e2e.py --quick                           # CPU, reference kernels, tiny model
    python benchmarks/profile_e2e.py --shapes 4x2048,1x128 --variants compile_hf,compile_fl_patch

compile_hf / compile_fl_patch profile ``torch.compile(model, dynamic=True)`` (default mode) after its first
call at each shape, in the order given (the shapes compile in turn, as in bench_e2e). Each profile also counts
the kernels launched per forward: at launch-bound shapes the wall time follows the launches and the host time
of each, not the busy time. On CPU (--quick) it groups CPU operator self time instead of kernels. Writes
<name>.json and <name>.md to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

import fl_patch
from bench_e2e import apply_liger, inputs, prefill_fn  # benchmarks/, on sys.path as the script's folder
from model_configs import model_config

VARIANTS = ("hf_sdpa", "fl_patch", "compile_hf", "compile_fl_patch", "liger")
DEFAULT_VARIANTS = ("hf_sdpa", "fl_patch", "liger")  # the compiled ones take a minute a shape: by name only

# (category, substrings of a kernel or operator name, lower-cased); the first match wins.
CATEGORIES = (
    ("attention", ("flash", "fmha", "attention", "attn", "sdpa", "_efficient")),
    ("matmul", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "sm90", "sm100", "aten::mm", "aten::addmm",
                "aten::bmm", "aten::linear", "matmul")),
    ("rms_norm", ("rms",)),
    ("rope", ("rotary", "rope")),
    ("swiglu", ("silu", "swiglu", "swish")),
    ("embedding", ("embedding", "index_select", "indexselect")),
    ("copy / cast", ("copy", "cat", "contiguous", "to_copy", "clone")),
    ("reduction", ("reduce", "mean", "sum", "norm")),
    ("pointwise", ("elementwise", "vectorized", "pointwise", "mul", "add", "pow", "rsqrt", "neg", "fill")),
)


def category(name: str) -> str:
    lowered = name.lower()
    for label, needles in CATEGORIES:
        if any(needle in lowered for needle in needles):
            return label
    return "other"


def device_events(prof, on_gpu: bool):
    """(name, self µs total, calls) of each kernel (GPU) or CPU operator (CPU) the profile recorded."""
    rows = []
    for event in prof.key_averages():
        is_kernel = "CUDA" in str(getattr(event, "device_type", ""))
        if on_gpu != is_kernel:
            continue
        if on_gpu:
            total = getattr(event, "self_device_time_total", None)
            if total is None:
                total = event.self_cuda_time_total
        else:
            total = event.self_cpu_time_total
        if total > 0:
            rows.append((event.key, total, event.count))
    return rows


def wall_ms_per_call(run, on_gpu: bool, calls: int) -> float:
    """Milliseconds per call of `calls` back-to-back calls, up to the device finishing them."""
    started = time.perf_counter()
    for _ in range(calls):
        run()
    if on_gpu:
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / calls


def profile_variant(run, on_gpu: bool, iterations: int) -> dict:
    """Per-forward kernel (or CPU operator) time by category, the 12 busiest names, and the wall time."""
    wall_ms_per_call(run, on_gpu, 3)  # warm-up
    unprofiled_ms = wall_ms_per_call(run, on_gpu, iterations)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        wall_ms = wall_ms_per_call(run, on_gpu, iterations)
    events = device_events(prof, on_gpu)
    by_category: dict[str, float] = {}
    for name, total, _ in events:
        by_category[category(name)] = by_category.get(category(name), 0.0) + total / iterations / 1000
    busiest = sorted(events, key=lambda row: -row[1])[:12]
    return {
        "wall_ms": round(unprofiled_ms, 3),
        "wall_ms_profiled": round(wall_ms, 3),
        "launches": round(sum(count for _, _, count in events) / iterations, 1),
        "busy_ms": round(sum(by_category.values()), 3),
        "by_category_ms": {k: round(v, 3) for k, v in sorted(by_category.items(), key=lambda kv: -kv[1])},
        "busiest": [{"name": name[:120], "ms": round(total / iterations / 1000, 3),
                     "calls": round(count / iterations, 1), "category": category(name)}
                    for name, total, count in busiest],
        "calls_by_name": {name[:120]: round(count / iterations, 1) for name, _, count in events},
    }


def contexts(kernels: str, model_name: str, model):
    """(variant, context manager factory); liger patches for good, so it must come last."""

    @contextlib.contextmanager
    def liger():
        apply_liger(model_name, model)
        yield

    return {"hf_sdpa": contextlib.nullcontext, "fl_patch": lambda: fl_patch.patched(kernels=kernels),
            "compile_hf": contextlib.nullcontext, "compile_fl_patch": lambda: fl_patch.patched(kernels=kernels),
            "liger": liger}


def markdown(results: dict) -> str:
    lines = [f"# Profile of one forward, {results['device']}, {results['date']}", "",
             ", ".join(f"{k} {v}" for k, v in results["versions"].items()), ""]
    for key, variants in results["profiles"].items():
        names = list(variants)
        cats = []
        for name in names:
            for cat in variants[name].get("by_category_ms", {}):
                if cat not in cats:
                    cats.append(cat)
        unit = "kernel ms" if results["on_gpu"] else "CPU operator ms"
        lines += [f"## {key} ({unit} per forward)", "", "| category | " + " | ".join(names) + " |",
                  "| --- |" + " --- |" * len(names)]
        for cat in cats + ["busy (sum)", "wall", "wall, profiled", "kernels launched"]:
            cells = []
            for name in names:
                entry = variants[name]
                if "error" in entry:
                    cells.append("error")
                elif cat == "busy (sum)":
                    cells.append(f"{entry['busy_ms']:.3f}")
                elif cat == "wall":
                    cells.append(f"{entry.get('wall_ms', 0.0):.3f}")
                elif cat == "wall, profiled":
                    cells.append(f"{entry['wall_ms_profiled']:.3f}")
                elif cat == "kernels launched":
                    cells.append(f"{entry.get('launches', 0):g}")
                else:
                    cells.append(f"{entry['by_category_ms'].get(cat, 0.0):.3f}")
            lines.append(f"| {cat} | " + " | ".join(cells) + " |")
        for name in names:
            lines += ["", f"Busiest in {name}:", ""]
            for row in variants[name].get("busiest", []):
                lines.append(f"- {row['ms']:.3f} ms, {row['calls']:g} calls, {row['category']}: `{row['name']}`")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, reference kernels, tiny model, seconds")
    parser.add_argument("--models", default="llama")
    parser.add_argument("--shapes", default="4x2048", help="comma list of BATCHxSEQ prefill shapes")
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                        help=f"comma list of {', '.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)})")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="profile")
    args = parser.parse_args()
    fl_patch.revert()  # every variant starts native
    wanted = [v for v in args.variants.split(",") if v]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}; accepted: {', '.join(VARIANTS)}")
    try:
        shapes = [tuple(int(n) for n in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes {args.shapes!r}: expected BATCHxSEQ items such as 4x2048,1x128")
    on_gpu = torch.cuda.is_available() and not args.quick
    if not on_gpu and not args.quick:
        raise SystemExit("profile_e2e: no GPU here; use --quick for the CPU harness check")
    device, dtype, kernels = ("cuda", torch.bfloat16, "gems") if on_gpu else ("cpu", torch.float32, "reference")
    if args.quick:
        shapes = [(2, 32)]
        wanted = [v for v in wanted if v != "liger"]
    from fl_patch.environment import describe

    facts = describe()
    results = {"date": time.strftime("%Y-%m-%d"), "device": facts["device"] if on_gpu else "cpu", "on_gpu": on_gpu,
               "versions": {k: facts.get(k) for k in ("torch", "transformers", "flag_gems", "triton")},
               "profiles": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("_quick" if args.quick else "")
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        config = model_config(model_name, args.quick)
        model = __import__("transformers").AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
        available = contexts(kernels, model_name, model)
        ids = {f"{model_name} prefill {b}x{s}": inputs((b, s), config.vocab_size, device) for b, s in shapes}
        for variant in wanted:  # outer loop: liger can't be undone, so each variant runs every shape in turn
            compiled = variant.startswith("compile_")
            try:
                if compiled:
                    torch._dynamo.reset()
                with available[variant]():
                    target = torch.compile(model, dynamic=True) if compiled else model
                    for key, batch in ids.items():
                        run = prefill_fn(target, batch)
                        if compiled:
                            started = time.perf_counter()
                            run()
                            print(f"{key} {variant}: first call (compiling) {time.perf_counter() - started:.0f} s",
                                  flush=True)
                        entry = profile_variant(run, on_gpu, args.iterations)
                        results["profiles"].setdefault(key, {})[variant] = entry
                        print(f"{key} {variant}: busy {entry['busy_ms']:.2f} ms, wall {entry['wall_ms_profiled']:.2f} "
                              f"ms, {entry['launches']:g} launches, {entry['by_category_ms']}", flush=True)
                        (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
            except Exception as exc:  # one variant's failure must not lose the others' figures
                error = {"error": f"{type(exc).__name__}: {exc}"}
                for key in ids:
                    results["profiles"].setdefault(key, {}).setdefault(variant, error)
                print(f"{model_name} {variant}: {type(exc).__name__}: {exc}", flush=True)
        del model
    (out / f"{stem}.md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    main()
