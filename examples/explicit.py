"""fl_patch used explicitly in a script: apply with include/exclude, look at the report, revert, and
scope patches to a block with patched().

    python examples/explicit.py            # FlagGems kernels where available, else nothing is patched
    python examples/explicit.py --kernels reference
"""

import argparse
import os

os.environ.setdefault("FL_PATCH_AUTO", "0")  # this script decides when to apply

import fl_patch  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--kernels", choices=("gems", "reference"), default=None)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32)
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 1000, (1, 12))
    with torch.no_grad():
        native = model(ids).logits

        fl_patch.apply(kernels=args.kernels, exclude=["attention"])  # everything but attention
        patched = [r["where"] for r in fl_patch.report() if r["state"] == "patched"]
        print(f"apply(exclude=['attention']): {len(patched)} places patched, e.g. {patched[:3]}")
        print("max |diff|:", (model(ids).logits - native).abs().max().item())
        fl_patch.revert()

        with fl_patch.patched(kernels=args.kernels, include=["rms_norm"]):
            families = sorted({r["family"] for r in fl_patch.report() if r["state"] == "patched"})
            print("inside patched(include=['rms_norm']): families patched =", families)
            print("max |diff|:", (model(ids).logits - native).abs().max().item())
    print("after the block: active =", fl_patch.is_active())


if __name__ == "__main__":
    main()
