"""End-to-end benchmark: HF transformers models from a config, native vs fl_patch vs peers, in one process.

For each model (Llama-style and Qwen3-style, 16 layers, hidden 2048, 16 heads / 8 KV heads, MLP 8192,
vocab 32000, bf16, random init) and each shape (prefill 4x2048 and 1x128; one decode step with 2048 cached
tokens at batch 1 and 16), it times these variants on the same model and inputs, and records the largest
logit difference from HF default:

    hf_sdpa (HF default), hf_eager, fl_patch (defaults: routed by this device's profile, the one
    ``fl-patch status`` names), fl_patch_hand (routed by the hand table that came before profiles,
    benchmarks/hand_table_profile.json), fl_patch_off (FL_PATCH_PROFILE=off: no routing, every call a kernel
    takes runs FlagGems), fl_patch_fast / fl_patch_off_fast / fl_patch_tuned_fast (the same with the fast launch
    path, docs/fast-launch.md, named: the default since 2026-12-07 18:30 UTC; before, the plain names ran without
    it), fl_patch_public / fl_patch_off_public / fl_patch_tuned_public (without it), fl_patch_all (every family on
    FlagGems), fl_patch_all-<family> (each family left out in turn), fl_patch+global (FlagGems aten override too),
    compile_hf, compile_fl_patch (torch.compile, default mode; fl_patch's FlagGems calls are custom ops there),
    compile_hf_cudagraphs, compile_fl_patch_cudagraphs
    (mode="reduce-overhead"), compile_fl_patch_no_packing (default mode plus the opt-in row
    transformers.attention.compiled_no_packing: prefill without a cache gets is_causal), liger (last: it can't revert)

Each compiled variant also records dynamo's graph breaks, graphs and frames compiled, the frames compiled while
being timed (recompiles: should be 0) and inductor's CUDA-graph skips, so a run shows whether decode fell back
to eager or re-compiled.

plus a training step (forward + backward + AdamW, 4x1024, labels = the inputs): time, peak memory and first-step loss
for hf_sdpa, fl_patch (defaults: the loss's cross-entropy on FlagGems), fl_patch_flce (plus the opt-in fused
linear + cross-entropy, ``include=["transformers.fused_linear_cross_entropy"]``), liger (rope, RMSNorm, SwiGLU, no
loss kernel) and liger_flce (those plus ``fused_linear_cross_entropy=True``, Liger's default and how its users run
it). ``--parts train --train-variants fl_patch_flce,liger_flce`` runs a subset (hf_sdpa always runs).
Ratios are speed-ups over hf_sdpa in the same run (>1 = faster).

    python benchmarks/bench_e2e.py --out benchmarks/results            # GPU, full
    python benchmarks/bench_e2e.py --quick                              # CPU, reference kernels, tiny model
    python benchmarks/bench_e2e.py --quick --parts prefill,compile --variants compile_fl_patch  # + compiled
    python benchmarks/bench_e2e.py --models llama --parts prefill,train # a subset
    python benchmarks/bench_e2e.py --parts prefill,decode --rounds 3    # launch-bound shapes: interleave rounds
    python benchmarks/bench_e2e.py --parts prefill,decode --rounds 10 --seconds 0.3 --variants fl_patch

With --rounds, each round times every shape with every variant back to back (``--interleave shape``), and "x vs
HF" is the median of the rounds' ratios: on the lent H100 a decode step's host time drifts by 40-80% for seconds at
a time (benchmarks/results/untuned-h100/decode_trace_*), so only pairs timed close together compare.

Writes <name>.json and <name>.md to --out; `--combine A.json B.json` merges runs of subsets and draws
e2e_<model>.png (needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

import fl_patch
from model_configs import model_config  # benchmarks/, on sys.path as the script's folder

FAMILIES = ("attention", "rms_norm", "rope", "linear", "swiglu")
PARTS = ("prefill", "decode", "compile", "train")
# fl_patch's hand-written routing table before device profiles, kept as a profile to compare with in the same run.
HAND_TABLE = Path(__file__).resolve().parent / "hand_table_profile.json"
# fl_patch variant -> the profile it routed by (fl_patch.device.routing.summary_line)
PROFILES_SEEN: dict[str, str] = {}
# fl_patch variant -> per routing key, calls calibration timed in this process and the decision it reached
CALIBRATION_SEEN: dict[str, dict] = {}
TUNED_PROFILE = ""  # --tuned-profile: a `fl-patch tune` profile, run as variant fl_patch_tuned beside fl_patch


class Timer:
    """Median wall time of a callable in ms (CUDA events on GPU), over at least `reps` calls and at least
    `min_seconds` of calls: launch-bound shapes (1x128, decode) vary by tens of percent between short runs."""

    def __init__(self, device: str, warmup: int, reps: int, min_seconds: float = 0.0):
        self.device, self.warmup, self.reps, self.min_seconds = device, warmup, reps, min_seconds

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        started = time.perf_counter()
        while len(times) < self.reps or time.perf_counter() - started < self.min_seconds:
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                fn()
                times.append((time.perf_counter() - begin) * 1000)
        return statistics.median(times)


def variants(kernels: str, quick: bool, model):
    """(name, context manager factory) in the order they run; compiled variants and liger come after."""

    def eager():
        @contextlib.contextmanager
        def use_eager():
            model.set_attn_implementation("eager")
            try:
                yield
            finally:
                model.set_attn_implementation("sdpa")
        return use_eager()

    everything = list(FAMILIES)
    rows = [("hf_sdpa", contextlib.nullcontext), ("hf_eager", eager),
            ("fl_patch", lambda: fl_patch.patched(kernels=kernels)),
            ("fl_patch_hand", lambda: fl_patch.patched(kernels=kernels, profile=str(HAND_TABLE))),
            ("fl_patch_off", lambda: fl_patch.patched(kernels=kernels, profile="off")),
            ("fl_patch_all", lambda: fl_patch.patched(kernels=kernels, include=everything))]
    if TUNED_PROFILE:
        rows.append(("fl_patch_tuned", lambda: fl_patch.patched(kernels=kernels, profile=TUNED_PROFILE)))
    # With and without FlagGems' hot functions launched directly (fl_patch.kernels.fast_launch), whatever the
    # default: off = every call a kernel takes runs FlagGems, so fl_patch_off_public against fl_patch_off_fast is
    # the host cost the fast path saves.
    for suffix, fast in (("fast", True), ("public", False)):
        rows += [(f"fl_patch_{suffix}", lambda fast=fast: fl_patch.patched(kernels=kernels, fast_launch=fast)),
                 (f"fl_patch_off_{suffix}",
                  lambda fast=fast: fl_patch.patched(kernels=kernels, profile="off", fast_launch=fast))]
        if TUNED_PROFILE:
            rows.append((f"fl_patch_tuned_{suffix}", lambda fast=fast: fl_patch.patched(
                kernels=kernels, profile=TUNED_PROFILE, fast_launch=fast)))
    rows += [(f"fl_patch_all-{family}",
              (lambda f=family: fl_patch.patched(kernels=kernels, include=[x for x in everything if x != f])))
             for family in FAMILIES]
    if not quick:
        rows.append(("fl_patch+global", lambda: fl_patch.patched(kernels=kernels, gems_global=True)))
    return rows


def inputs(shape: tuple[int, int], vocab: int, device: str):
    generator = torch.Generator(device="cpu").manual_seed(1234)
    return torch.randint(0, vocab, shape, generator=generator).to(device)


def prefill_fn(model, ids):
    def run():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    return run


def decode_fn(model, batch: int, cached: int, vocab: int, device: str):
    """One decode step over `cached` tokens of KV cache; the step is cropped off again after each call."""
    from transformers import DynamicCache

    ids = inputs((batch, cached), vocab, device)
    step_ids = inputs((batch, 1), vocab, device)
    cache = DynamicCache(config=model.config)
    # transformers 5.25 renamed the forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40)
    kv = {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, **kv)
    position = torch.full((batch, 1), cached, device=device)

    def run():
        with torch.no_grad():
            out = model(input_ids=step_ids, position_ids=position, use_cache=True, **kv).logits
        cache.crop(-1)  # drop the step just added: negative = tokens to remove, in every 5.x
        return out
    return run


def max_diff(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


COMPILED = {  # variant -> (context factory name, torch.compile mode)
    "compile_hf": ("hf", "default"),
    "compile_fl_patch": ("fl_patch", "default"),
    "compile_hf_cudagraphs": ("hf", "reduce-overhead"),
    "compile_fl_patch_cudagraphs": ("fl_patch", "reduce-overhead"),
    "compile_fl_patch_no_packing": ("fl_patch_no_packing", "default"),
}
NO_PACKING_ROW = "transformers.attention.compiled_no_packing"


def dynamo_counts() -> dict:
    """Dynamo's and inductor's counters so far: graph breaks, graphs, frames compiled, CUDA-graph skips."""
    from torch._dynamo.utils import counters

    return {"graph_breaks": sum(counters["graph_break"].values()), "graphs": counters["stats"]["unique_graphs"],
            "frames_compiled": counters["frames"]["ok"],
            "cudagraph_skips": counters["inductor"]["cudagraph_skips"]}


def compiled_regions(fn) -> dict:
    """One call of `fn` under the profiler (CPU events only): the compiled regions it entered (dynamo's
    ``Torch-Compiled Region: frame/compile`` names, so a call that runs another cache entry than the one compiled
    first shows) and how many aten ops it ran, in them or not. A compiled call that runs no region ran eager."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    names = [event.name for event in prof.events()]
    regions = sorted({name.split(": ", 1)[-1] for name in names if name.startswith("Torch-Compiled Region")})
    return {"regions": regions, "aten_ops": sum(name.startswith("aten::") for name in names)}


def measure_shapes(model, name, context, timer, shapes, vocab, device, reference, compile_mode=None, out=None,
                   saved=None):
    """Times every shape under `context`; returns {shape_key: {ms, max_diff}}. With `compile_mode` (a
    torch.compile mode) the model is compiled and each shape also gets compile_s (the first call's seconds,
    which include compiling that shape), the dynamo counts of that first call and ``recompiles``: frames compiled
    while timing (0 when the compiled graphs were reused); `out` gets ``"dynamo"``: the variant's totals. Fills
    `out` if given, calling `saved()` after each shape (compiling takes about a minute a shape: a run cut short
    keeps the shapes it finished)."""
    from torch._dynamo.utils import counters

    out = {} if out is None else out
    compiled = compile_mode is not None
    if compiled:
        torch._dynamo.reset()
        counters.clear()
    with context():
        target = torch.compile(model, dynamic=True, mode=compile_mode) if compiled else model
        for key, builder in shapes.items():
            try:
                fn = builder(target)
                before = dynamo_counts() if compiled else None
                started = time.perf_counter()
                fn()
                first_s = time.perf_counter() - started
                first = dynamo_counts() if compiled else None
                ms = timer(fn)
                logits = fn()
                entry = {"ms": ms, "finite": bool(torch.isfinite(logits).all())}
                if compiled:
                    after = dynamo_counts()
                    entry["compile_s"] = round(first_s, 1)
                    entry["first_call"] = {k: first[k] - before[k] for k in first}
                    entry["recompiles"] = after["frames_compiled"] - first["frames_compiled"]
                    entry["cudagraph_skips"] = after["cudagraph_skips"] - before["cudagraph_skips"]
                    entry["timed_call"] = compiled_regions(fn)
                    print(f"  {name:<22} {key}={ms:.2f}ms (first call {first_s:.0f} s, {entry['first_call']}, "
                          f"recompiles while timed {entry['recompiles']}, a timed call ran {entry['timed_call']})",
                          flush=True)
                if key in reference:
                    entry["max_diff"] = max_diff(logits, reference[key])
                else:
                    reference[key] = logits.detach().clone()
                    entry["max_diff"] = 0.0
                out[key] = entry
            except Exception as exc:  # one variant's failure must not lose the others' figures
                out[key] = {"error": f"{type(exc).__name__}: {exc}"}
                traceback.print_exc()
            if saved is not None:
                saved()
        if name.startswith("fl_patch") and fl_patch.is_active():
            from fl_patch.device import routing

            PROFILES_SEEN[name] = routing.summary_line()
            learned = routing.describe().get("calibration", {}).get("keys", {})
            if learned:
                CALIBRATION_SEEN[name] = {key: {"timed_calls": v["timed_calls"], "measuring": v["measuring"],
                                                "route": v.get("decision", {}).get("route"),
                                                "min_elements": v.get("decision", {}).get("min_elements")}
                                          for key, v in learned.items()}
        if compiled:
            out["dynamo"] = dynamo_counts()
            if saved is not None:
                saved()
            torch._dynamo.reset()
    print(f"  {name:<22} " + "  ".join(f"{k}={v.get('ms', float('nan')):.2f}ms" for k, v in out.items()
                                       if k != "dynamo"), flush=True)
    return out


def train_step(model, ids, optimizer):
    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        return loss.detach()
    return run


def measure_train(model, context, timer, ids, device, initial):
    """Time and peak memory of a training step; every variant starts from the same `initial` weights, and
    `loss` is the first step's (the same math on the same weights, so comparable across variants)."""
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with context():
        fn = train_step(model, ids, optimizer)
        loss = fn().item()
        ms = timer(fn)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    optimizer.zero_grad(set_to_none=True)
    del optimizer
    model.load_state_dict(initial)
    model.eval()
    return {"ms": ms, "peak_gib": peak, "loss": loss}


FUSED_LOSS_ROW = "transformers.fused_linear_cross_entropy"
TRAIN_VARIANTS = ("hf_sdpa", "fl_patch", "fl_patch_flce", "liger", "liger_flce")


def train_variant(result, variant, model, context, timer, ids, device, initial, save) -> None:
    """Measure one training variant into result["train"], print it and save; an error is recorded, not raised."""
    try:
        train = measure_train(model, context, timer, ids, device, initial)
        print(f"  train {variant:<16} {train['ms']:.1f} ms, peak {train['peak_gib']:.2f} GiB, loss {train['loss']:.4f}",
              flush=True)
    except Exception as exc:
        train = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc()
    result["train"][variant] = train
    save(result)


def apply_liger(name, model, fused_loss: bool = False):
    """Liger's patches for `model` (it can't revert: the liger variants run last). `fused_loss`: also its fused
    linear + cross-entropy, which replaces the causal-LM class's forward."""
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen3

    patch = {"llama": apply_liger_kernel_to_llama, "qwen3": apply_liger_kernel_to_qwen3}[name]
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=fused_loss,
          model=model)


def train_wanted(args, variant: str) -> bool:
    """Whether --train-variants (empty: all) asks for this training variant; hf_sdpa always runs."""
    return not args.train_variants or variant == "hf_sdpa" or variant in args.train_variants


def wanted(args, variant: str) -> bool:
    """Whether --variants (empty: all) asks for this forward variant; hf_sdpa always runs (the baseline)."""
    return not args.variants or variant == "hf_sdpa" or variant in args.variants


def merge_rounds(measured: list[dict]) -> dict:
    """One variant's shapes over rounds: ms is the median of the rounds' medians, rounds_ms lists them."""
    merged = {}
    for key, entry in measured[-1].items():
        times = [m[key]["ms"] for m in measured if "ms" in m.get(key, {})]
        merged[key] = dict(entry)
        if len(measured) > 1 and times:
            merged[key]["ms"] = statistics.median(times)
            merged[key]["rounds_ms"] = [round(t, 3) for t in times]
    return merged


def run_model(name, args, device, dtype, kernels, save):
    torch.manual_seed(0)
    config = model_config(name, args.quick)
    model = __import__("transformers").AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    vocab = config.vocab_size
    timer = Timer(device, warmup=1 if args.quick else 3, reps=2 if args.quick else 10,
                  min_seconds=0.0 if args.quick else args.seconds)
    prefill_shapes = [(2, 32), (1, 8)] if args.quick else [(4, 2048), (1, 128)]
    decode_shapes = [(1, 32), (2, 32)] if args.quick else [(1, 2048), (16, 2048)]
    shapes = {}
    if "prefill" in args.parts:
        for b, s in prefill_shapes:
            shapes[f"prefill_{b}x{s}"] = functools.partial(prefill_fn, ids=inputs((b, s), vocab, device))
    if "decode" in args.parts:
        for b, c in decode_shapes:
            shapes[f"decode_b{b}_c{c}"] = functools.partial(decode_fn, batch=b, cached=c, vocab=vocab, device=device)
    result = {"forward": {}, "train": {}}
    save(result)
    reference = {}
    print(f"{name}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params, {device}, {dtype}", flush=True)
    eager = [(variant, context) for variant, context in variants(kernels, args.quick, model) if wanted(args, variant)]
    rounds = {variant: [] for variant, _ in eager}
    for number in range(args.rounds):  # interleaved: drift in clocks or host load hits every variant alike
        if args.rounds > 1:
            print(f"  round {number + 1}/{args.rounds}", flush=True)
        if args.interleave == "variant":  # each variant times every shape in turn
            for variant, context in eager:
                rounds[variant].append(measure_shapes(model, variant, context, timer, shapes, vocab, device,
                                                      reference))
                result["forward"][variant] = merge_rounds(rounds[variant])
                save(result)
            continue
        this_round = {variant: {} for variant, _ in eager}  # each shape timed by every variant in turn
        for key, builder in shapes.items():
            for variant, context in eager:
                this_round[variant].update(measure_shapes(model, variant, context, timer, {key: builder}, vocab,
                                                          device, reference))
        for variant, _ in eager:
            rounds[variant].append(this_round[variant])
            result["forward"][variant] = merge_rounds(rounds[variant])
        save(result)
    if "compile" in args.parts:  # with --quick only the compiled variants --variants names (minutes on CPU)
        contexts = {"hf": contextlib.nullcontext, "fl_patch": lambda: fl_patch.patched(kernels=kernels),
                    "fl_patch_no_packing": lambda: fl_patch.patched(kernels=kernels, include=[NO_PACKING_ROW])}
        for variant, (context, mode) in COMPILED.items():
            if wanted(args, variant) and (not args.quick or variant in args.variants):
                measure_shapes(model, variant, contexts[context], timer, shapes, vocab, device, reference,
                               compile_mode=mode, out=result["forward"].setdefault(variant, {}),
                               saved=lambda: save(result))
    initial = {k: v.detach().clone() for k, v in model.state_dict().items()} if "train" in args.parts else None
    ids = inputs((2, 64) if args.quick else (4, 1024), vocab, device)
    if "train" in args.parts:
        fused_loss = [FUSED_LOSS_ROW]
        for variant, context in (("hf_sdpa", contextlib.nullcontext),
                                 ("fl_patch", lambda: fl_patch.patched(kernels=kernels)),
                                 ("fl_patch_flce", lambda: fl_patch.patched(kernels=kernels, include=fused_loss))):
            if train_wanted(args, variant):
                train_variant(result, variant, model, context, timer, ids, device, initial, save)
    if not args.quick and not args.no_liger:
        try:
            if wanted(args, "liger") or train_wanted(args, "liger"):
                apply_liger(name, model)
            if wanted(args, "liger"):
                result["forward"]["liger"] = measure_shapes(model, "liger", contextlib.nullcontext, timer, shapes,
                                                            vocab, device, reference)
                save(result)
            if "train" in args.parts and train_wanted(args, "liger"):
                train_variant(result, "liger", model, contextlib.nullcontext, timer, ids, device, initial, save)
            if "train" in args.parts and train_wanted(args, "liger_flce"):
                apply_liger(name, model, fused_loss=True)
                train_variant(result, "liger_flce", model, contextlib.nullcontext, timer, ids, device, initial, save)
        except Exception as exc:  # liger absent or broken: say so in each liger entry asked for
            error = {"error": f"{type(exc).__name__}: {exc}"}
            if wanted(args, "liger"):
                result["forward"].setdefault("liger", error)
            for variant in ("liger", "liger_flce"):
                if "train" in args.parts and train_wanted(args, variant):
                    result["train"].setdefault(variant, error)
            save(result)
            traceback.print_exc()
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def speedup(base: dict, entry: dict) -> float:
    """hf_sdpa's time over `entry`'s: the median of the rounds' ratios where both were timed in the same rounds
    (each round's pair close in time: a host whose speed drifts for seconds moves both alike), else the ratio of
    the medians."""
    base_rounds, rounds = base.get("rounds_ms", []), entry.get("rounds_ms", [])
    if rounds and len(base_rounds) == len(rounds):
        return statistics.median(b / r for b, r in zip(base_rounds, rounds, strict=True))
    return base.get("ms", float("nan")) / entry["ms"]


def markdown(results: dict) -> str:
    """One table per model: ms per shape, ratio to hf_sdpa (:func:`speedup`), max logit diff."""
    lines = []
    for name, result in results["models"].items():
        forward = result["forward"]
        keys = list(next(iter(forward.values())).keys()) if forward else []
        lines.append(f"\n### {name}\n")
        if keys:  # no forward shapes with --parts train
            lines.append("| variant | " + " | ".join(f"{k} ms (x vs HF, max diff)" for k in keys) + " |")
            lines.append("| --- |" + " --- |" * len(keys))
        base = forward.get("hf_sdpa", {})
        for variant, shapes in forward.items() if keys else ():
            cells = []
            for key in keys:
                entry = shapes.get(key, {}) if isinstance(shapes, dict) else {}
                if "ms" not in entry:
                    cells.append(entry.get("error", shapes.get("error", "-"))[:60] if isinstance(entry, dict) else "-")
                    continue
                ratio = speedup(base.get(key, {}), entry)
                nan = "" if entry.get("finite", True) else ", **NaN**"
                cells.append(f"{entry['ms']:.2f} ({ratio:.2f}x, {entry.get('max_diff', 0):.3g}{nan})")
            lines.append(f"| {variant} | " + " | ".join(cells) + " |")
        for variant, shapes in forward.items():
            if isinstance(shapes, dict) and "dynamo" in shapes:
                counts = shapes["dynamo"]
                recompiles = ", ".join(f"{k} {v['recompiles']}" for k, v in shapes.items() if "recompiles" in v)
                ran = "; ".join(f"{k} {', '.join(v['timed_call']['regions']) or 'none (eager)'}"
                                for k, v in shapes.items() if "timed_call" in v)
                lines.append(f"\n{variant}: {counts['graph_breaks']} graph breaks, {counts['graphs']} graphs, "
                             f"{counts['cudagraph_skips']} CUDA-graph skips; recompiles while timed: {recompiles}"
                             + (f"; compiled regions a timed call ran: {ran}" if ran else ""))
        if result["train"]:
            lines.append("\n| training step 4x1024 | ms | x vs HF | peak GiB | loss |\n| --- | --- | --- | --- | --- |")
            base_ms = result["train"].get("hf_sdpa", {}).get("ms", float("nan"))
            for variant, train in result["train"].items():
                if "ms" not in train:
                    lines.append(f"| {variant} | {train.get('error', '-')[:60]} | | | |")
                    continue
                lines.append(f"| {variant} | {train['ms']:.1f} | {base_ms / train['ms']:.2f}x | "
                             f"{train['peak_gib']:.2f} | {train['loss']:.4f} |")
    return "\n".join(lines)


def plot(results: dict, out: Path) -> list[str]:
    """A bar chart per model of speed-up over hf_sdpa per variant and shape (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for name, result in results["models"].items():
        forward = {v: s for v, s in result["forward"].items() if isinstance(s, dict) and "error" not in s}
        keys = list(forward.get("hf_sdpa", {}).keys())
        fig, ax = plt.subplots(figsize=(12, 5))
        width = 0.8 / max(1, len(forward))
        for i, (variant, shapes) in enumerate(forward.items()):
            ratios = [forward["hf_sdpa"][k]["ms"] / shapes[k]["ms"] if "ms" in shapes.get(k, {}) else 0 for k in keys]
            ax.bar([j + i * width for j in range(len(keys))], ratios, width, label=variant)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(keys))], keys)
        ax.set_ylabel("speed-up over HF default (sdpa)")
        ax.set_title(f"{name}: forward, {results['device']}")
        ax.legend(fontsize=7, ncol=3)
        path = out / f"e2e_{name}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(str(path))
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU, reference kernels, tiny model, seconds")
    parser.add_argument("--models", default="llama,qwen3")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {', '.join(PARTS)}")
    parser.add_argument("--no-liger", action="store_true")
    parser.add_argument("--variants", default="", help="comma list of forward variants to run (default: all)")
    parser.add_argument("--train-variants", default="",
                        help=f"comma list of training variants to run (default: all of {', '.join(TRAIN_VARIANTS)})")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the eager variants this many times, interleaved; report the median round")
    parser.add_argument("--interleave", choices=("shape", "variant"), default="shape",
                        help="shape (default): each shape is timed by every variant in turn, so a pair is "
                             "seconds apart at most; variant: each variant times every shape in turn")
    parser.add_argument("--seconds", type=float, default=1.0,
                        help="time each shape for at least this long per round (default 1.0); many short rounds "
                             "pair the variants more tightly on a host whose speed drifts")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--name", default="e2e", help="file name stem of the outputs (default e2e)")
    parser.add_argument("--combine", nargs="+", metavar="JSON",
                        help="no run: merge these result files into <out>/<name>.json/.md and draw the charts")
    parser.add_argument("--tuned-profile", default="", metavar="JSON",
                        help="also run variant fl_patch_tuned, routed by this `fl-patch tune` profile")
    args = parser.parse_args()
    global TUNED_PROFILE
    TUNED_PROFILE = args.tuned_profile
    if args.combine:
        combine(args.combine, Path(args.out), args.name)
        return
    fl_patch.revert()  # `import fl_patch` may have activated from the environment: every variant starts native
    args.parts = set(args.parts.split(","))
    args.variants = {v for v in args.variants.split(",") if v}
    args.train_variants = {v for v in args.train_variants.split(",") if v}
    if args.train_variants - set(TRAIN_VARIANTS):
        parser.error(f"unknown training variant(s) {sorted(args.train_variants - set(TRAIN_VARIANTS))}; accepted: "
                     f"{', '.join(TRAIN_VARIANTS)}")
    unknown = args.parts - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {sorted(unknown)}; accepted: {', '.join(PARTS)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be 1 or more, got {args.rounds}")
    use_gpu = torch.cuda.is_available() and not args.quick
    device, dtype, kernels = ("cuda", torch.bfloat16, "gems") if use_gpu else ("cpu", torch.float32, "reference")
    if not use_gpu and not args.quick:
        sys.exit("bench_e2e: no GPU here; use --quick for the CPU harness check")
    import transformers

    from fl_patch.environment import describe

    results = {"date": time.strftime("%Y-%m-%d"), "device": describe()["device"] if use_gpu else "cpu",
               "versions": {k: v for k, v in describe().items() if k in ("torch", "transformers", "flag_gems",
                                                                         "triton", "python")},
               "transformers": transformers.__version__, "kernels": kernels, "quick": args.quick, "models": {}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = args.name + ("_quick" if args.quick else "")
    for name in args.models.split(","):
        def save(result, name=name):  # after each variant: a run cut short keeps what it measured
            results["models"][name] = result
            results["profiles"] = PROFILES_SEEN
            results["calibration"] = CALIBRATION_SEEN
            (out / f"{stem}.json").write_text(json.dumps(results, indent=2))

        run_model(name, args, device, dtype, kernels, save)
    table = markdown(results)
    (out / f"{stem}.md").write_text(f"# End-to-end, {results['device']}, {results['date']}\n{table}\n")
    print(table)


def combine(paths: list[str], out: Path, name: str) -> None:
    """Merge runs made with --models/--parts subsets (later files add models or variants) and chart them."""
    merged: dict = {}
    for path in paths:
        results = json.loads(Path(path).read_text())
        models = merged.setdefault("models", {})
        merged.update({k: v for k, v in results.items() if k != "models"})
        for model, result in results["models"].items():
            target = models.setdefault(model, {"forward": {}, "train": {}})
            for part in ("forward", "train"):
                for variant, shapes in result[part].items():
                    if part == "forward" and isinstance(shapes, dict) and variant in target[part]:
                        target[part][variant].update(shapes)
                    else:
                        target[part][variant] = shapes
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(merged, indent=2))
    table = markdown(merged)
    (out / f"{name}.md").write_text(f"# End-to-end, {merged['device']}, {merged['date']}\n{table}\n")
    print(table)
    for path in plot(merged, out):
        print("chart:", path)


if __name__ == "__main__":
    main()
