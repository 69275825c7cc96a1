"""Demo: a tiny transformers model built from a config (no download), run unpatched and patched.

Prints the report (what fl_patch swapped, where, and with which provider) and how far the patched
logits are from the unpatched ones. On a machine with FlagGems and a GPU the patched run uses FlagGems
kernels (bf16); elsewhere it uses fl_patch's torch reference kernels (fp32 on CPU), which run the same
patched code paths.

    python examples/demo.py [--model llama|qwen3] [--kernels gems|reference] [--quick]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("FL_PATCH_AUTO", "0")  # this script applies explicitly, to show both runs

import fl_patch  # noqa: E402  (before torch on purpose: nothing heavy is imported here)


def tiny_config(model: str):
    from transformers import LlamaConfig, Qwen3Config

    shape = dict(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if model == "qwen3":
        return Qwen3Config(head_dim=32, **shape)
    return LlamaConfig(**shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("llama", "qwen3"), default="llama")
    parser.add_argument("--kernels", choices=("gems", "reference"), default=None,
                        help="default: gems when a GPU and FlagGems are present, else reference")
    parser.add_argument("--quick", action="store_true", help="shorter input")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    from fl_patch.kernels import gems

    missing = "no CUDA GPU here" if not torch.cuda.is_available() else gems.installed()
    if args.kernels == "gems" and missing:
        parser.error(f"--kernels gems runs FlagGems' kernels, which need a GPU and FlagGems ({missing}); "
                     "--kernels reference runs fl_patch's torch kernels on the same patched paths, on the CPU")
    kernels = args.kernels or ("reference" if missing else "gems")
    device, dtype = ("cuda", torch.bfloat16) if kernels == "gems" else ("cpu", torch.float32)

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config(args.model)).to(device, dtype).eval()
    seq = 16 if args.quick else 64
    input_ids = torch.randint(0, 1000, (2, seq), device=device)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, : seq // 4] = 0  # a left-padded row, so masking is exercised

    with torch.no_grad():
        native = model(input_ids=input_ids, attention_mask=attention_mask).logits
        fl_patch.apply(kernels=kernels)  # the model already exists: class-level patches still reach it
        patched = model(input_ids=input_ids, attention_mask=attention_mask).logits
    report = fl_patch.report()
    fl_patch.revert()

    from fl_patch.reporting import format_table

    shown = [r for r in report if r["state"] != "waiting"]
    print(format_table(shown))
    valid = attention_mask.bool()
    diff = (patched.float() - native.float())[valid].abs().max().item()
    count = sum(r["state"] == "patched" for r in report)
    print(f"\nmodel {args.model} ({device}, {dtype}), kernels={kernels}: {count} places patched; "
          f"max |patched - native| logit difference on real tokens: {diff:.3g}")


if __name__ == "__main__":
    main()
