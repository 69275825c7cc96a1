"""Explore launch shapes of FlagGems' rope and silu_and_mul at the e2e shapes (GPU only; exploratory: neither
variant was adopted, see benchmarks/results/explore_launch.md).

    python tests/gpu/explore_launch.py OUT.json      # SKIP_ROPE=1: the rope rows at 4x2048 only

rope: FlagGems runs one program per token that loops over every q then k head. Splitting each token's heads
into `g` groups (g = gcd(q heads, k heads)) gives g programs per token with a position-id tensor.
silu_and_mul: FlagGems' pointwise launcher on NVIDIA uses 512-element tiles; try larger tiles via a
PointwiseDynamicFunction with another CodeGenConfig (same scalar function).
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
os.environ["FL_PATCH"] = "0"

import triton  # noqa: E402

from fl_patch.kernels import rope, swiglu  # noqa: E402


def bench(fn):
    return triton.testing.do_bench(fn, warmup=50, rep=300) * 1000.0  # µs


def rope_split(flag_gems, q, k, cos, sin, ids):
    """FlagGems rope with each token's heads split into g groups; q, k (B, H, S, D) transposed views, cos
    (1, S, D), `ids` the (B * S * g,) position of each group."""
    qt, kt = q.transpose(1, 2), k.transpose(1, 2)
    b, s, hq, d = qt.shape
    hk = kt.shape[2]
    g = math.gcd(hq, hk)
    cos_t, sin_t = rope._hf_table(cos, sin)
    qo, ko = flag_gems.apply_rotary_pos_emb(
        qt.reshape(b * s * g, hq // g, d), kt.reshape(b * s * g, hk // g, d), cos_t, sin_t, position_ids=ids
    )
    return qo.view(b, s, hq, d).transpose(1, 2), ko.view(b, s, hk, d).transpose(1, 2)


def rope_row(flag_gems, b, s, dt):
    q = torch.randn(b, s, 16, 128, device="cuda", dtype=dt).transpose(1, 2)
    k = torch.randn(b, s, 8, 128, device="cuda", dtype=dt).transpose(1, 2)
    freqs = torch.randn(1, s, 64, device="cuda")
    emb = torch.cat((freqs, freqs), -1)
    cos, sin = emb.cos().to(dt), emb.sin().to(dt)
    ids = (torch.arange(b * s * 8, device="cuda") // 8) % s
    same = all(torch.equal(a, c) for a, c in zip(rope.gems_hf(q, k, cos, sin),
                                                 rope_split(flag_gems, q, k, cos, sin, ids), strict=True))
    return {"shape": f"{b}x{s}", "current_us": bench(lambda: rope.gems_hf(q, k, cos, sin)),
            "split_us": bench(lambda: rope_split(flag_gems, q, k, cos, sin, ids)),
            "hf_us": bench(lambda: rope.reference_hf(q, k, cos, sin)), "bitwise_equal": same}


def silu_and_mul_row(flag_gems, variants, shape, dt):
    gate = torch.randn(shape, device="cuda", dtype=dt)
    up = torch.randn(shape, device="cuda", dtype=dt)
    ref = flag_gems.silu_and_mul(gate, up)
    row = {"shape": "x".join(map(str, shape)), "default_us": bench(lambda: flag_gems.silu_and_mul(gate, up)),
           "torch_us": bench(lambda: swiglu.reference(gate, up))}
    for name, fn in variants.items():
        row[f"{name}_equal"] = torch.equal(fn(gate, up), ref)
        row[f"{name}_us"] = bench(lambda fn=fn: fn(gate, up))
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
        row["liger_us"] = bench(lambda: LigerSiLUMulFunction.apply(gate, up))
    except Exception as exc:  # liger is optional
        row["liger_error"] = str(exc)[:100]
    return row


def main(out):
    import importlib

    import flag_gems
    from flag_gems.utils.codegen_config_utils import CodeGenConfig
    from flag_gems.utils.pointwise_dynamic import PointwiseDynamicFunction

    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
               "flag_gems": getattr(flag_gems, "__version__", "?"), "rope": [], "silu_and_mul": []}
    dt = torch.bfloat16
    rope_shapes = [(4, 2048)] if os.environ.get("SKIP_ROPE") else [(4, 2048), (1, 128), (1, 1), (16, 1)]
    for b, s in rope_shapes:
        results["rope"].append(rope_row(flag_gems, b, s, dt))
        print("rope", results["rope"][-1], flush=True)

    kernel = importlib.import_module("flag_gems.fused.silu_and_mul").silu_and_mul_kernel
    variants = {}
    for tile in (1024, 2048, 4096, 8192):
        for one_d in (True, False):
            config = CodeGenConfig(tile, (65536, 65536, 65536), 32, True, prefer_1d_tile=one_d)
            name = f"tile{tile}{'_1d' if one_d else ''}"
            variants[name] = PointwiseDynamicFunction(kernel.fx, kernel._scalar_fn, config)
    for shape in [(4, 2048, 8192), (1, 128, 8192), (16, 1, 8192), (4, 1024, 8192)]:
        results["silu_and_mul"].append(silu_and_mul_row(flag_gems, variants, shape, dt))
        print("silu_and_mul", results["silu_and_mul"][-1], flush=True)
    Path(out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "explore_launch.json")
