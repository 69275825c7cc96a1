"""An ordinary transformers script with no fl_patch in it: builds a tiny model from a config and generates.

Run it unchanged on fl_patch, with the report printed at exit:

    FL_PATCH_REPORT=1 PYTHONPATH=sitecustomize python examples/generate.py
    FL_PATCH_REPORT=1 fl-patch run -- python examples/generate.py
    FL_PATCH_REPORT=1 FL_PATCH_EXCLUDE=attention fl-patch run -- python examples/generate.py   # exclude a family

Without a GPU add FL_PATCH_KERNELS=reference (fl_patch's torch kernels) to see the patched paths run on CPU.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=344, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = AutoModelForCausalLM.from_config(config).to(device, dtype).eval()
    prompt = torch.tensor([[1, 17, 42, 7, 99, 3]], device=device)
    output = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
    print("generated:", output[0, prompt.shape[1]:].tolist())


if __name__ == "__main__":
    main()
