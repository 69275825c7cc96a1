"""~1B Llama-style and Qwen3-style models (random init from config) in bf16 on CUDA, patched with FlagGems.

Sizes: 16 layers, hidden 2048, 16 heads / 8 KV heads (head dim 128), MLP 8192, vocab 32000.

Per model, two patch sets: the transformers rows alone (attention, RMSNorm, rope, SwiGLU) and everything
fl_patch applies by default (adds the torch-level rows, e.g. linear). Checks, each recorded:

- Logits on a batch of 2 x 512 tokens, row 0 left-padded by 64: no NaN/inf, and as close to the fp32 result
  (the same weights in fp32, unpatched) as native bf16 is. Tolerance: max |patched - fp32| <= 2 x max
  |native bf16 - fp32| + 0.01 x max |fp32 logit|, and top-1 agreement with fp32 at most 1 point below native
  bf16's. Padding positions are not compared: FlagGems gives a fully masked row an average where torch gives
  zeros (see fl_patch.kernels.attention), and those rows are discarded by every caller.
- Greedy generation of 32 tokens from a fixed 16-token prompt: the same tokens as unpatched bf16. A
  divergence is accepted only where the unpatched top-1 / top-2 logit margin at that step is below the
  patched-vs-native noise measured on the forward (max |patched - native|); it is recorded either way.

Results go to ``$FL_PATCH_GPU_RESULTS_DIR/transformers.json`` (default tests/gpu/results/), rewritten after
each test.
"""

import copy
import datetime
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

import fl_patch
from fl_patch.integrations import transformers as integration
from fl_patch.table import KERNEL_FAMILIES
from fl_patch.versions import installed_version

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA or importlib.util.find_spec("flag_gems") is None, reason="needs CUDA and flag_gems"
)

# Read at import: tests/conftest.py clears FL_PATCH_* variables around every test.
RESULTS_DIR = Path(os.environ.get("FL_PATCH_GPU_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
SIZES = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096,
             pad_token_id=0)
# include lists: this integration's rows; every kernel family (with no device profile, so that every FlagGems path
# is proven); and the defaults as users get them (this device's shipped profile: on the H200 attention and linear
# stay native, see fl_patch/profiles/).
PATCH_SETS = {
    "transformers rows": [target.name for target in integration.TARGETS],
    "every kernel family": list(KERNEL_FAMILIES),
    "defaults": None,
}
REQUIRED_FAMILIES = {"defaults": ("rms_norm", "rope", "swiglu")}
BATCH, SEQ, PAD = 2, 512, 64
PROMPT, NEW_TOKENS = 16, 32
ERROR_FACTOR, SCALE_SLACK, TOP1_SLACK = 2.0, 0.01, 0.01

_results: dict = {}


def _write_results() -> None:
    versions = {name: installed_version(name) for name in ("torch", "triton", "flag_gems", "transformers")}
    payload = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(0),
        "versions": versions,
        "sizes": SIZES,
        "dtype": "bfloat16",
        "models": _results,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "transformers.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")


def build(style: str):
    """The bf16 model on CUDA (seeded random init) and an fp32 copy of the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        style]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = model_class(config_class(**SIZES)).to(torch.bfloat16).eval()
    exact = copy.deepcopy(model).float()
    return model, exact


def batch():
    generator = torch.Generator(device="cuda").manual_seed(1)
    input_ids = torch.randint(3, SIZES["vocab_size"], (BATCH, SEQ), device="cuda", generator=generator)
    attention_mask = torch.ones(BATCH, SEQ, dtype=torch.long, device="cuda")
    attention_mask[0, :PAD] = 0
    input_ids[0, :PAD] = SIZES["pad_token_id"]
    return input_ids, attention_mask


@torch.no_grad()
def logits(model, input_ids, attention_mask):
    return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()


@torch.no_grad()
def generate(model, prompt):
    out = model.generate(prompt, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    return out.sequences[0, prompt.shape[1]:].tolist(), [step[0].float() for step in out.logits]


def forward_figures(patched, native, exact, keep):
    """Errors against fp32 over the kept (non-padding) positions."""
    patched, native, exact = patched[keep], native[keep], exact[keep]
    top1 = exact.argmax(-1)
    return {
        "finite": bool(torch.isfinite(patched).all()),
        "logit_scale": exact.abs().max().item(),
        "max_error_patched": (patched - exact).abs().max().item(),
        "max_error_native": (native - exact).abs().max().item(),
        "mean_error_patched": (patched - exact).abs().mean().item(),
        "mean_error_native": (native - exact).abs().mean().item(),
        "max_diff_patched_vs_native": (patched - native).abs().max().item(),
        "top1_agreement_patched": (patched.argmax(-1) == top1).float().mean().item(),
        "top1_agreement_native": (native.argmax(-1) == top1).float().mean().item(),
        "top1_agreement_patched_vs_native": (patched.argmax(-1) == native.argmax(-1)).float().mean().item(),
    }


def generation_figures(patched_tokens, native_tokens, native_logits, noise):
    """Where the token streams first differ, and the unpatched margin there."""
    step = next((i for i, (a, b) in enumerate(zip(patched_tokens, native_tokens, strict=True)) if a != b), None)
    figures = {"tokens_patched": patched_tokens, "tokens_native": native_tokens, "first_divergence": step}
    if step is not None:
        top2 = native_logits[step].topk(2).values
        figures["margin_at_divergence"] = (top2[0] - top2[1]).item()
        figures["noise"] = noise
        figures["divergence_explained"] = figures["margin_at_divergence"] <= noise
    return figures


def fl_patch_summary():
    """Patched places per family and every fallback, from fl_patch's report."""
    patched, fallbacks = {}, {}
    for record in fl_patch.report():
        if record["state"] == "patched":
            patched[record["family"]] = patched.get(record["family"], 0) + 1
        for reason, count in record["fallbacks"].items():
            fallbacks[f"{record['where']}: {reason}"] = count
    return {"patched": patched, "fallbacks": fallbacks}


@pytest.mark.parametrize("style", ["llama", "qwen3"])
def test_bf16_model_patched_with_flag_gems(style, monkeypatch):
    model, exact_model = build(style)
    input_ids, attention_mask = batch()
    keep = attention_mask.bool()
    prompt = input_ids[1:, :PROMPT]
    exact = logits(exact_model, input_ids, attention_mask)
    del exact_model
    native = logits(model, input_ids, attention_mask)
    native_tokens, native_step_logits = generate(model, prompt)

    results = _results[style] = {}
    failures = []
    for name, rows in PATCH_SETS.items():
        if name == "defaults":
            monkeypatch.delenv("FL_PATCH_PROFILE")  # tests/gpu/conftest.py turns profiles off for the others
        fl_patch.apply(kernels="gems", include=rows)
        try:
            patched = logits(model, input_ids, attention_mask)
            patched_tokens, _ = generate(model, prompt)
            summary = fl_patch_summary()
        finally:
            fl_patch.revert()
        figures = forward_figures(patched, native, exact, keep)
        figures["generation"] = generation_figures(patched_tokens, native_tokens, native_step_logits,
                                                   figures["max_diff_patched_vs_native"])
        figures["fl_patch"] = summary
        results[name] = figures
        _write_results()

        bound = ERROR_FACTOR * figures["max_error_native"] + SCALE_SLACK * figures["logit_scale"]
        if not figures["finite"]:
            failures.append(f"{name}: NaN/inf logits")
        if figures["max_error_patched"] > bound:
            failures.append(f"{name}: max error {figures['max_error_patched']:.4g} > {bound:.4g}")
        if figures["top1_agreement_patched"] < figures["top1_agreement_native"] - TOP1_SLACK:
            failures.append(f"{name}: top-1 agreement {figures['top1_agreement_patched']:.4f} vs native "
                            f"{figures['top1_agreement_native']:.4f}")
        generation = figures["generation"]
        if generation["first_divergence"] is not None and not generation["divergence_explained"]:
            failures.append(f"{name}: tokens diverge at step {generation['first_divergence']} with margin "
                            f"{generation['margin_at_divergence']:.4g} > noise {generation['noise']:.4g}")
        for family in REQUIRED_FAMILIES.get(name, ("attention", "rms_norm", "rope", "swiglu")):
            if not summary["patched"].get(family):
                failures.append(f"{name}: nothing patched for {family}")
    assert failures == []
