"""LightX2V ops built from two configs, one with LightX2V's own keys and one with lightx2v-plugin-FL's
``flagos_*`` keys, run as one Wan-style attention block on the same input; then fl_patch's report.

    python examples/with_lightx2v/run_ops.py --quick                   # CPU: the test stand-in, torch reference kernels
    python examples/with_lightx2v/run_ops.py                           # GPU: the installed LightX2V, FlagGems kernels
    python examples/with_lightx2v/run_ops.py --lightx2v-src ~/LightX2V # GPU: a LightX2V checkout

Nothing in the configs or in the op code changes: ``fl_patch.apply()`` before LightX2V is imported is all
(``import fl_patch``, the sitecustomize bootstrap or ``PLATFORM=flagos`` do the same with no call at all).
"""

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("FL_PATCH_AUTO", "0")  # this script applies explicitly, with its --kernels

import fl_patch  # noqa: E402
from fl_patch.reporting import format_table  # noqa: E402

STANDIN = Path(__file__).resolve().parents[2] / "tests" / "lightx2v_standin"

# The keys a Wan config names. The first is what LightX2V configs say today; the second is what configs
# written for lightx2v-plugin-FL say.
UNCHANGED = {"self_attn_1_type": "flash_attn2", "rms_norm_type": "sgl-kernel", "layer_norm_type": "torch",
             "rope_type": "flashinfer_rope", "dit_quant_scheme": "Default"}
FLAGOS = {"self_attn_1_type": "flagos_flash_attn", "rms_norm_type": "flagos_rms_norm",
          "layer_norm_type": "flagos_layer_norm", "rope_type": "flagos_rope", "dit_quant_scheme": "flagos"}


def build_block(reg, config, weights, torch):
    """The ops of one self-attention block, built the way LightX2V's Wan model builds them."""
    def upstream_style(cls, *names):
        return cls(*names, False, False, False, None, lora_prefix="diffusion_model.blocks", lora_path="")

    def load(op, names):
        op.load({name: weights[name] for name in names if name is not None})
        op.to_cuda()
        return op

    ops = {"attn": reg.ATTN_WEIGHT_REGISTER[config["self_attn_1_type"]](),
           "norm1": reg.LN_WEIGHT_REGISTER[config["layer_norm_type"]](),
           "rope": reg.ROPE_REGISTER[config["rope_type"]](layout="interleaved", compute_dtype=torch.float32)}
    ops["norm1"].load({})
    for proj in ("q", "k", "v", "o"):
        names = (f"blocks.0.self_attn.{proj}.weight", f"blocks.0.self_attn.{proj}.bias")
        ops[proj] = load(upstream_style(reg.MM_WEIGHT_REGISTER[config["dit_quant_scheme"]], *names), names)
    for norm in ("norm_q", "norm_k"):
        name = f"blocks.0.self_attn.{norm}.weight"
        ops[norm] = load(upstream_style(reg.RMS_WEIGHT_REGISTER[config["rms_norm_type"]], name), [name])
    return ops


def run_block(ops, x, cache, heads):
    """LayerNorm, q/k/v projections, RMSNorm on q and k, rope, attention, output projection."""
    tokens, dim = x.shape
    h = ops["norm1"].apply(x)
    q = ops["norm_q"].apply(ops["q"].apply(h)).view(tokens, heads, dim // heads)
    k = ops["norm_k"].apply(ops["k"].apply(h)).view(tokens, heads, dim // heads)
    v = ops["v"].apply(h).view(tokens, heads, dim // heads)
    freqs = ops["rope"].prepare_freqs(cache, rotary_dim=dim // heads)
    positions = ops["rope"].prepare_positions(freqs)
    q, k = ops["rope"].apply(q, k, freqs, **({} if positions is None else {"positions": positions}))
    out = ops["attn"].apply(q=q, k=k, v=v, cu_seqlens_q=cu_seqlens(tokens), cu_seqlens_kv=cu_seqlens(tokens),
                            max_seqlen_q=tokens, max_seqlen_kv=tokens)
    return ops["o"].apply(out)


def cu_seqlens(tokens):
    import torch

    return torch.tensor([0, tokens], dtype=torch.int32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU, the test stand-in, torch reference kernels")
    parser.add_argument("--lightx2v-src", type=Path, help="a LightX2V checkout to import from")
    parser.add_argument("--kernels", choices=("gems", "reference"), help="default: gems (reference with --quick)")
    args = parser.parse_args()
    if args.quick:
        sys.path.insert(0, str(STANDIN))
        os.environ["PLATFORM"] = "cpu"
    if args.lightx2v_src:
        sys.path.insert(0, str(args.lightx2v_src.resolve()))
    fl_patch.apply(kernels=args.kernels or ("reference" if args.quick else "gems"))

    import torch

    from lightx2v.utils.registry_factory import ATTN_WEIGHT_REGISTER  # importing LightX2V patches it  # noqa: F401
    from lightx2v_platform.base.global_var import AI_DEVICE

    reg = sys.modules["lightx2v.utils.registry_factory"]
    tokens, dim, heads = (64, 256, 4) if args.quick else (4096, 1536, 12)
    torch.manual_seed(0)
    weights = {}
    for proj in ("q", "k", "v", "o"):
        weights[f"blocks.0.self_attn.{proj}.weight"] = (torch.randn(dim, dim) / dim**0.5).to(torch.bfloat16)
        weights[f"blocks.0.self_attn.{proj}.bias"] = torch.zeros(dim, dtype=torch.bfloat16)
    for norm in ("norm_q", "norm_k"):
        weights[f"blocks.0.self_attn.{norm}.weight"] = torch.ones(dim, dtype=torch.bfloat16)
    x = torch.randn(tokens, dim, device=AI_DEVICE).to(torch.bfloat16)
    head_dim = dim // heads
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, head_dim, 2, device=AI_DEVICE).float() / head_dim)
    angles = torch.outer(torch.arange(tokens, device=AI_DEVICE).float(), inv_freq)
    cache = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # Wan's complex [S, 1, D/2] cache

    with torch.no_grad():
        outputs = {}
        for label, config in (("LightX2V keys", UNCHANGED), ("flagos_* keys", FLAGOS)):
            outputs[label] = run_block(build_block(reg, config, weights, torch), x, cache, heads)
            print(f"{label:<14} {sorted(config.values())}: output {tuple(outputs[label].shape)} "
                  f"{outputs[label].dtype}")
    diff = (outputs["LightX2V keys"].float() - outputs["flagos_* keys"].float()).abs().max().item()
    print(f"max |difference| between the two configs: {diff:.3g}")
    print(format_table([r for r in fl_patch.report() if r["target"].startswith("lightx2v")]))


if __name__ == "__main__":
    main()
