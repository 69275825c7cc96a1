"""What fl_patch costs on the launch-bound path: a decode step on CPU, NVIDIA routing simulated.

On an NVIDIA GPU the launch-bound shapes (1x128, a decode step) run every fl_patch replacement's checks and then
a native path: the original for rope and the MLP, torch's fused ``rms_norm`` for HF's RMSNorm (attention and
linear stay unpatched; the other calls are under 2**22 elements). Those GPU figures move by up to 2x between runs
(benchmarks/results/e2e_rounds.md), far more than the checks cost, so that cost is measured here instead: a
16-layer bf16 Llama-style model on CPU, with fl_patch's device check told the tensors are on a GPU and its vendor
told "nvidia", so every call takes the same route as on the GPU. HF default and fl_patch are timed in interleaved
rounds on the same model and KV cache. What the fused RMSNorm saves on a GPU (one launch instead of seven) is not
shown here: CPU ops launch in a few µs; benchmarks/results/bench_ops.md and e2e_*.md have the GPU figures.

    python benchmarks/bench_routing.py            # ~1 minute
    python benchmarks/bench_routing.py --quick    # seconds (CI checks the harness)
"""

from __future__ import annotations

import argparse
import statistics

import torch

import fl_patch
from bench_e2e import Timer, decode_fn  # benchmarks/, on sys.path as the script's folder
from fl_patch import performance
from fl_patch.kernels import gems
from model_configs import model_config


def build_model(layers: int):
    from transformers import AutoModelForCausalLM

    config = model_config("llama", quick=True)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)


def simulate_nvidia_routing() -> None:
    """Make fl_patch route CPU bf16 tensors as it routes CUDA ones on an NVIDIA build (this process only).

    FlagGems is reported installed so that its rows patch; no call reaches it (every one is under the size limit
    or in a family left native), and ``gems.load`` raises if one does."""
    gems.installed = lambda: None
    gems.load = _no_kernel_call
    gems.device_reason = lambda tensor: None
    gems.small_input_elements = lambda: performance.SMALL_INPUT_ELEMENTS["nvidia"]
    performance.vendor = lambda: "nvidia"


def _no_kernel_call():
    raise SystemExit("bench_routing: a call reached a FlagGems kernel; the simulation is wrong")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    args = parser.parse_args()
    layers, reps, rounds = (2, 20, 2) if args.quick else (16, 100, max(1, args.rounds))
    torch.set_num_threads(1)
    fl_patch.revert()  # `import fl_patch` may have activated from the environment
    simulate_nvidia_routing()
    model = build_model(layers)
    step = decode_fn(model, batch=1, cached=64, vocab=model.config.vocab_size, device="cpu")
    timer = Timer("cpu", warmup=max(3, reps // 10), reps=reps)
    figures = {"hf": [], "fl_patch": []}
    for _ in range(rounds):
        figures["hf"].append(timer(step))
        with fl_patch.patched(kernels="gems"):
            figures["fl_patch"].append(timer(step))
            routed = {r["where"]: r["fallbacks"] for r in fl_patch.report()
                      if r["state"] == "patched" and r["fallbacks"]}
    hf, patched = statistics.median(figures["hf"]), statistics.median(figures["fl_patch"])
    print(f"decode step, {layers} layers, bf16, CPU, NVIDIA routing simulated; medians of {rounds} rounds")
    for name, label in (("hf", "HF default"), ("fl_patch", "fl_patch")):
        print(f"  {label + ':':<11} {statistics.median(figures[name]):.3f} ms  "
              f"(rounds {', '.join(f'{x:.3f}' for x in figures[name])})")
    print(f"  fl_patch / HF: {patched / hf:.3f}  ({(patched - hf) * 1000 / max(1, layers):+.1f} µs per layer)")
    print("  calls routed natively in the last round, per reason:")
    for where, reasons in sorted(routed.items()):
        print(f"    {where}: {reasons}")


if __name__ == "__main__":
    main()
