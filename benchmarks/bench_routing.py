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
    python benchmarks/bench_routing.py --places              # also each patched place alone, µs a call

``--places`` times each place a decode step passes through on its own (one layer's modules, decode shapes, the
same simulated routing), unpatched and patched, and prints the difference a call: where the step's overhead goes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time
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
    parser.add_argument("--places", action="store_true", help="also time each patched place alone (µs a call)")
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
    if args.places:
        print_places(model, rounds=3 if args.quick else 7, calls=200 if args.quick else 2000)


def places(model) -> dict:
    """One call of each place a Llama decode step passes through, at decode shapes (batch 1, one token), on the
    first layer's own modules: name -> a function of no arguments."""
    from torch.nn import functional
    from transformers.models.llama import modeling_llama

    layer, config = model.model.layers[0], model.config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    hidden = torch.randn(1, 1, config.hidden_size, dtype=torch.bfloat16)
    q = torch.randn(1, heads, 1, head_dim, dtype=torch.bfloat16)
    k = torch.randn(1, kv_heads, 1, head_dim, dtype=torch.bfloat16)
    cached = torch.randn(1, heads, 65, head_dim, dtype=torch.bfloat16)
    cos, sin = torch.randn(1, 1, head_dim, dtype=torch.bfloat16), torch.randn(1, 1, head_dim, dtype=torch.bfloat16)
    return {  # looked up at call time: the patched attributes when patched
        "F.linear (q_proj)": lambda: functional.linear(hidden, layer.self_attn.q_proj.weight),
        "F.scaled_dot_product_attention": lambda: functional.scaled_dot_product_attention(q, cached, cached),
        "LlamaRMSNorm": lambda: layer.input_layernorm(hidden),
        "apply_rotary_pos_emb": lambda: modeling_llama.apply_rotary_pos_emb(q, k, cos, sin),
        "LlamaMLP (3 F.linear inside)": lambda: layer.mlp(hidden),
        "LlamaAttention (no cache, 4 F.linear inside)":
            lambda: layer.self_attn(hidden, position_embeddings=(cos, sin), attention_mask=None),
        "LlamaDecoderLayer (no cache)":
            lambda: layer(hidden, position_embeddings=(cos, sin), attention_mask=None),
    }


def _per_call_us(fn, calls: int) -> float:
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - began) / calls * 1e6


def print_places(model, rounds: int, calls: int) -> None:
    """Each place alone, unpatched and patched in interleaved rounds (the host's speed drifts): the best loop of
    `calls` calls per side, µs a call."""
    timed = places(model)  # the same calls both ways: each looks the patched place up when called
    figures = {name: ([], []) for name in timed}
    with torch.no_grad():
        for _ in range(rounds):
            for patched in (False, True):
                with fl_patch.patched(kernels="gems") if patched else contextlib.nullcontext():
                    for name, fn in timed.items():
                        _per_call_us(fn, max(1, calls // 10))  # warm
                        figures[name][patched].append(_per_call_us(fn, calls))
    print(f"  each place alone, µs a call (best of {rounds} interleaved loops of {calls}):")
    print(f"    {'place':<44} {'unpatched':>9} {'fl_patch':>9} {'difference':>10}")
    for name in timed:
        plain, patched = min(figures[name][False]), min(figures[name][True])
        print(f"    {name:<44} {plain:>9.2f} {patched:>9.2f} {patched - plain:>+10.2f}")


if __name__ == "__main__":
    main()
