"""Training as people run it, on the torch reference kernels (CPU, fp32): gradient checkpointing (transformers'
default, non-reentrant, reentrant) on models whose layer ends with a linear (Llama: down_proj) or with an RMSNorm
(Gemma2, OLMo2: post_feedforward_layernorm); ``transformers.Trainer`` with gradient checkpointing and gradient
accumulation; LoRA through peft. Each against the same run unpatched: loss and gradients (or the loss curve)
equal within fp32 tolerance, no call handed to the original for a kernel error, no attention call handed back.

Non-reentrant checkpointing stops its recomputation by raising from the saved-tensor hook of the layer's last op,
inside that op's replacement: the test that fl_patch lets torch's control flow through (fl_patch.failures)."""

import pytest
import torch

import fl_patch

pytest.importorskip("transformers")

# The names most training scripts use; transformers 5.25 deprecates them for activation_checkpointing_*, which run
# the same code.
pytestmark = pytest.mark.filterwarnings("ignore:.*gradient_checkpointing.* is deprecated:FutureWarning")

VOCAB, BATCH, SEQ = 300, 2, 16
LAYOUTS = ["llama", "gemma2", "olmo2"]  # the last op of a layer: linear, RMSNorm, RMSNorm
CHECKPOINTING = {"default": None, "non-reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


def tiny(name: str):
    """A 2-layer model of `name`'s layout in fp32, seeded, with its default attention (sdpa; Gemma2: eager, which
    fl_patch leaves alone, on transformers 5.25; sdpa with its softcap handed back on 5.17)."""
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Olmo2Config

    config_class = {"llama": LlamaConfig, "gemma2": Gemma2Config, "olmo2": Olmo2Config}[name]
    config = config_class(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
                          pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    return ids, labels


def step(model, ids, labels):
    """(loss, {parameter name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close_grads(grads, expected, rtol=1e-4):
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        err = (grad - expected[name]).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: max err {err:.3g} vs max |grad| {scale:.3g}"


def fallbacks() -> dict:
    """{place: {reason: count}} of every place that handed calls back."""
    return {r["where"]: r["fallbacks"] for r in fl_patch.report() if r["fallbacks"]}


def assert_no_kernel_error_and_no_attention_fallback():
    seen = fallbacks()
    assert not [(where, reason) for where, reasons in seen.items() for reason in reasons
                if reason.startswith("kernel error")], seen
    # "softcap": transformers 5.17 runs Gemma2 on sdpa, which fl_patch hands its softcap back to, as unpatched
    assert not [where for where, reasons in seen.items()
                if ("Attention" in where or "attention" in where) and set(reasons) - {"softcap"}], seen


@pytest.mark.parametrize("mode", list(CHECKPOINTING))
@pytest.mark.parametrize("layout", LAYOUTS)
def test_gradient_checkpointing_matches_unpatched(layout, mode):
    model = tiny(layout).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=CHECKPOINTING[mode])
    ids, labels = batch()
    loss, grads = step(model, ids, labels)
    fl_patch.apply(kernels="reference")
    patched_loss, patched_grads = step(model, ids, labels)
    torch.testing.assert_close(patched_loss, loss, rtol=1e-5, atol=0)
    assert_close_grads(patched_grads, grads)
    assert_no_kernel_error_and_no_attention_fallback()


# ---------------------------------------------------------------------------------------------------------
# transformers.Trainer


def trainer_losses(model, output_dir, steps=4) -> list[float]:
    """The loss curve of a few Trainer steps: gradient checkpointing (transformers' default kind), 2 micro-batches
    accumulated per step, on a fixed random dataset, CPU, nothing reported or saved."""
    from transformers import Trainer, TrainingArguments

    generator = torch.Generator().manual_seed(2)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, VOCAB, (4 * steps, SEQ), generator=generator)]
    args = TrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=steps, gradient_checkpointing=True, learning_rate=1e-3, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_trainer_with_checkpointing_and_accumulation_matches_unpatched(tmp_path):
    """Trainer passes num_items_in_batch to every training forward: it must not send attention back either."""
    pytest.importorskip("accelerate")
    expected = trainer_losses(tiny("llama"), tmp_path / "unpatched")
    fl_patch.apply(kernels="reference")
    losses = trainer_losses(tiny("llama"), tmp_path / "patched")
    assert len(losses) == 4
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_no_kernel_error_and_no_attention_fallback()


def test_lora_through_peft_with_checkpointing_matches_unpatched(tmp_path):
    pytest.importorskip("accelerate")
    peft = pytest.importorskip("peft")

    def lora_model():
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                 task_type="CAUSAL_LM")
        return peft.get_peft_model(tiny("llama"), config)

    expected = trainer_losses(lora_model(), tmp_path / "unpatched")
    fl_patch.apply(kernels="reference")
    losses = trainer_losses(lora_model(), tmp_path / "patched")
    assert losses == pytest.approx(expected, rel=1e-5)
    assert_no_kernel_error_and_no_attention_fallback()
