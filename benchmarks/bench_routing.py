"""What fl_patch costs on the launch-bound path: a decode step on CPU, a device profile's routing simulated.

On a GPU the launch-bound shapes (1x128, a decode step) run every fl_patch replacement's routing and then a native
path: the original for rope, the MLP, attention and linear, torch's fused ``rms_norm`` for HF's RMSNorm. Those GPU
figures move by up to 2x between runs (benchmarks/results/e2e_rounds.md), far more than the checks cost, so that
cost is measured here instead: a 16-layer bf16 Llama-style model on CPU, with fl_patch's device check told the
tensors are on the profile's device, so every call takes the route it takes there. HF default and fl_patch are
timed in interleaved rounds on the same model and KV cache. What the fused RMSNorm saves on a GPU (one launch
instead of seven) is not shown here: CPU ops launch in a few µs; benchmarks/results/bench_ops.md and e2e_*.md have
the GPU figures.

    python benchmarks/bench_routing.py                       # ~1 minute, the shipped H200 profile
    python benchmarks/bench_routing.py --profile PATH        # another profile
    python benchmarks/bench_routing.py --quick               # seconds (CI checks the harness)
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

import fl_patch
from bench_e2e import Timer, decode_fn  # benchmarks/, on sys.path as the script's folder
from fl_patch.device import devices, profiles
from fl_patch.kernels import gems
from model_configs import model_config


def build_model(layers: int):
    from transformers import AutoModelForCausalLM

    config = model_config("llama", quick=True)
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval().to(torch.bfloat16)


# Without a shipped H200 profile: the hand table that came before profiles, kept as one.
HAND_TABLE = Path(__file__).resolve().parent / "hand_table_profile.json"


def shipped_h200_profile() -> Path | None:
    found = sorted(profiles.SHIPPED_DIR.glob("nvidia-nvidia-h200-*.json"))
    return found[-1] if found else None


def simulate_routing(profile_path: str | None) -> Path:
    """Make fl_patch route CPU bf16 tensors as tensors of the profile's device (this process only); returns the
    profile used.

    FlagGems is reported installed so that its rows patch; no call may reach it (every one of a decode step is
    under the profile's sizes or in a native family), and ``gems.load`` raises if one does."""
    profile_path = profile_path or shipped_h200_profile() or HAND_TABLE
    profile = profiles.read(profile_path, "bench_routing")
    device = devices.DeviceInfo(profile.device.get("vendor"), "cuda", profile.device["name"])
    gems.installed = lambda: None
    gems.load = _no_kernel_call
    gems.device_reason = lambda tensor: None
    devices.identify = lambda torch_device: device
    os.environ["FL_PATCH_PROFILE"] = str(profile_path)
    return Path(profile_path)


def _no_kernel_call():
    raise SystemExit("bench_routing: a call reached a FlagGems kernel; the simulation is wrong")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds (default 15)")
    parser.add_argument("--profile", help="the device profile whose routing to simulate (default: the shipped H200)")
    args = parser.parse_args()
    layers, reps, rounds = (2, 20, 2) if args.quick else (16, 100, max(1, args.rounds))
    torch.set_num_threads(1)
    fl_patch.revert()  # `import fl_patch` may have activated from the environment
    used = simulate_routing(args.profile)
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
    print(f"decode step, {layers} layers, bf16, CPU, routing of {used.name} simulated; medians of {rounds} rounds")
    for name, label in (("hf", "HF default"), ("fl_patch", "fl_patch")):
        print(f"  {label + ':':<11} {statistics.median(figures[name]):.3f} ms  "
              f"(rounds {', '.join(f'{x:.3f}' for x in figures[name])})")
    print(f"  fl_patch / HF: {patched / hf:.3f}  ({(patched - hf) * 1000 / max(1, layers):+.1f} µs per layer)")
    print("  calls routed natively in the last round, per reason:")
    for where, reasons in sorted(routed.items()):
        print(f"    {where}: {reasons}")


if __name__ == "__main__":
    main()
