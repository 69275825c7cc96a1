"""The training loss: transformers' causal-LM cross-entropy on the provider's kernel (default row), and the opt-in
fused linear + cross-entropy, against the unpatched model: loss and every parameter's gradient, ignored labels,
never the whole logits, exact revert, fallbacks counted.

CPU tensors stand in for device tensors (``gems.device_reason`` accepts them) where the gems provider is tested,
on the fake FlagGems (tests/fake_flag_gems)."""

import inspect

import pytest
import torch
from test_routing import cache, profile_data, stand_in_device, write  # noqa: F401  (stand_in_device: a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

import fl_patch
from fl_patch.integrations.transformers_loss import FUSED_ROW, deferred_logits_reason
from fl_patch.kernels import fused_linear_cross_entropy as fused
from fl_patch.kernels import gems

VOCAB, HIDDEN, BATCH, SEQ = 300, 64, 2, 16


@pytest.fixture
def device_path(monkeypatch):
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)


def tiny(name: str, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

    config_class = {"llama": LlamaConfig, "qwen3": Qwen3Config}[name]
    config = config_class(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def batch(ignore_first: int = 5):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=generator)
    labels = ids.clone()
    labels[0, :ignore_first] = -100  # row 0 of the flattened targets is ignored: the case FlagGems reads before
    labels[1, -3:] = -100
    return ids, labels


def step(model, ids, labels=None, **kwargs):
    """(output, loss, {parameter name: grad}) of one forward + backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, out.loss.detach(), grads


def assert_close_grads(grads, expected, rtol):
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        scale = expected[name].abs().max().item()
        err = (grad.float() - expected[name].float()).abs().max().item()
        assert err <= rtol * scale + 1e-7, f"{name}: max err {err:.3g} vs max |grad| {scale:.3g}"


def record(target, where_suffix=""):
    [rec] = [r for r in fl_patch.report() if r["target"] == target and r["where"].endswith(where_suffix)]
    return rec


# ---------------------------------------------------------------------------------------------------------
# transformers.cross_entropy (default)

@pytest.mark.parametrize("provider", ["reference", "gems"])
def test_causal_lm_loss_on_the_kernel_equals_the_original(provider, request):
    if provider == "gems":
        request.getfixturevalue("fake_gems")
        request.getfixturevalue("device_path")
    model = tiny("llama")
    ids, labels = batch()
    _, loss, grads = step(model, ids, labels)
    fl_patch.apply(kernels=provider, include=["transformers.cross_entropy"])
    _, patched_loss, patched_grads = step(model, ids, labels)
    assert torch.allclose(patched_loss, loss, rtol=1e-6, atol=0)
    assert_close_grads(patched_grads, grads, rtol=1e-5)
    rec = record("transformers.cross_entropy")
    assert rec["state"] == "patched" and rec["fallbacks"] == {}
    if provider == "gems":
        from flag_gems import calls

        assert ("cross_entropy_loss", "none") in calls


def test_cross_entropy_mean_sum_and_ignore_index_match_torch(fake_gems, device_path):
    from transformers.loss import loss_utils

    original = loss_utils.fixed_cross_entropy
    fl_patch.apply(kernels="gems", include=["transformers.cross_entropy"])
    logits = torch.randn(12, 40)
    target = torch.randint(0, 40, (12,))
    target[[0, 5, 11]] = -100
    for items in (None, 7, torch.tensor(9)):
        expected = original(logits, target, items)
        assert torch.allclose(loss_utils.fixed_cross_entropy(logits, target, items), expected, rtol=1e-6)
    target[target == -100] = 3  # another ignore_index, inside the class range
    assert torch.allclose(loss_utils.fixed_cross_entropy(logits, target, ignore_index=3),
                          original(logits, target, ignore_index=3), rtol=1e-6)
    assert record("transformers.cross_entropy")["fallbacks"] == {}


def test_cross_entropy_calls_the_kernel_cant_take_run_the_original(fake_gems, device_path):
    from transformers.loss import loss_utils

    fl_patch.apply(kernels="gems", include=["transformers.cross_entropy"])
    half = torch.randn(4, 10).to(torch.bfloat16)
    target = torch.randint(0, 10, (4,))
    assert torch.equal(loss_utils.fixed_cross_entropy(half, target), torch.nn.functional.cross_entropy(half, target))
    image = torch.randn(2, 10, 3, 3)
    loss_utils.fixed_cross_entropy(image, torch.randint(0, 10, (2, 3, 3)))
    assert record("transformers.cross_entropy")["fallbacks"] == {"dtype bfloat16": 1, "shape": 1}
    assert fake_gems.calls == []


def test_a_target_out_of_range_raises_instead_of_reading_out_of_bounds(fake_gems, device_path):
    from transformers.loss import loss_utils

    fl_patch.apply(kernels="gems", include=["transformers.cross_entropy"])
    with pytest.raises(IndexError, match="out of bounds"):  # the check fails, then the original raises its own
        loss_utils.fixed_cross_entropy(torch.randn(3, 5), torch.tensor([0, 7, 1]))
    assert fake_gems.calls == []


def test_a_cross_entropy_kernel_that_raises_falls_back_counted(fake_gems, device_path, monkeypatch):
    def exploding(*args, **kwargs):
        raise RuntimeError("triton compilation failed")

    monkeypatch.setattr(fake_gems, "cross_entropy_loss", exploding)
    model = tiny("llama")
    ids, labels = batch()
    _, loss, grads = step(model, ids, labels)
    fl_patch.apply(kernels="gems", include=["transformers.cross_entropy"])
    _, patched_loss, patched_grads = step(model, ids, labels)
    _, again, _ = step(model, ids, labels)
    assert torch.allclose(patched_loss, loss, rtol=1e-6) and torch.allclose(again, loss, rtol=1e-6)
    assert_close_grads(patched_grads, grads, rtol=1e-5)
    assert record("transformers.cross_entropy")["fallbacks"] == {"kernel error: RuntimeError": 2}


# ---------------------------------------------------------------------------------------------------------
# transformers.fused_linear_cross_entropy (opt-in)

@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fused_loss_and_gradients_equal_the_original_in_fp32(name):
    model = tiny(name)
    ids, labels = batch()
    out, loss, grads = step(model, ids, labels)
    assert out.logits is not None
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    patched, patched_loss, patched_grads = step(model, ids, labels)
    assert patched.logits is None
    assert torch.allclose(patched_loss, loss, rtol=1e-6, atol=0)
    assert_close_grads(patched_grads, grads, rtol=1e-5)
    assert record(FUSED_ROW, f"{type(model).__name__}.forward")["fallbacks"] == {}


def test_the_fused_path_needs_no_kernel_provider():
    """Its chunks run torch's cross-entropy: with the gems provider and no FlagGems installed it still applies."""
    from fl_patch.kernels import gems as loader

    assert loader.installed() is not None  # no flag_gems on this path
    model = tiny("llama")
    ids, labels = batch()
    _, loss, _ = step(model, ids, labels)
    fl_patch.apply(kernels="gems", include=[FUSED_ROW])
    assert record(FUSED_ROW, "LlamaForCausalLM.forward")["state"] == "patched"
    assert record("transformers.cross_entropy")["state"] == "skipped"
    out, patched_loss, _ = step(model, ids, labels)
    assert out.logits is None and torch.allclose(patched_loss, loss, rtol=1e-6)


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_fused_loss_and_gradients_in_bf16_within_bf16_tolerance(name):
    """bf16, judged as fl-patch check judges kernels: against the exact result (the same weights in fp32), the
    fused path's error within max(0.016 x the largest magnitude, 2 x HF bf16's own error). The loss within 2 bf16
    ulps (2**-7 relative) of HF's. The chunks' GEMMs block differently from one GEMM over every token, and
    lm_head's gradient is the sum of one rounded GEMM per chunk."""
    model = tiny(name, torch.bfloat16)
    ids, labels = batch()
    _, loss, grads = step(model, ids, labels)
    _, _, exact = step(tiny(name, torch.bfloat16).float(), ids, labels)
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    _, patched_loss, patched_grads = step(model, ids, labels)
    assert abs(patched_loss.item() - loss.item()) <= 2**-7 * abs(loss.item())
    assert patched_grads.keys() == exact.keys()
    for key, grad in patched_grads.items():
        own = (grads[key].float() - exact[key]).abs().max().item()
        err = (grad.float() - exact[key]).abs().max().item()
        assert err <= max(0.016 * exact[key].abs().max().item(), 2 * own), f"{key}: {err:.3g} (HF's own {own:.3g})"


def test_fused_loss_under_autocast_computes_as_lm_head_would():
    """fp32 weights under bf16 autocast (what mixed-precision training runs): lm_head's GEMM in bf16, the
    gradients back in fp32; the same bounds as bf16."""
    model = tiny("llama")
    ids, labels = batch()
    _, exact_loss, exact = step(model, ids, labels)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss, grads = step(model, ids, labels)
        fl_patch.apply(kernels="reference", include=[FUSED_ROW])
        out, patched_loss, patched_grads = step(model, ids, labels)
    assert out.logits is None and record(FUSED_ROW, "LlamaForCausalLM.forward")["fallbacks"] == {}
    assert abs(patched_loss.item() - loss.item()) <= 2**-7 * abs(loss.item())
    for key, grad in patched_grads.items():
        assert grad.dtype == torch.float32
        own = (grads[key] - exact[key]).abs().max().item()
        err = (grad - exact[key]).abs().max().item()
        assert err <= max(0.016 * exact[key].abs().max().item(), 2 * own), f"{key}: {err:.3g} (HF's own {own:.3g})"


class LogitsRows(TorchDispatchMode):
    """The row count of every matmul output whose last dimension is the vocabulary."""

    def __init__(self):
        super().__init__()
        self.rows = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        matmul = func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm)
        if matmul and out.shape[-1] == VOCAB:
            self.rows.append(out.numel() // VOCAB)
        return out


def test_the_fused_path_never_materialises_the_whole_logits():
    model = tiny("llama")
    ids, labels = batch()
    with LogitsRows() as unpatched:
        step(model, ids, labels)
    assert max(unpatched.rows) == BATCH * SEQ  # the probe sees HF's [tokens, vocab] logits
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    with LogitsRows() as patched:
        step(model, ids, labels)
    chunk = fused.chunk_rows(BATCH * SEQ, HIDDEN, VOCAB)
    assert chunk < BATCH * SEQ and patched.rows and max(patched.rows) <= chunk


def test_calls_the_fused_path_does_not_take_keep_the_logits_and_are_counted():
    model = tiny("llama")
    ids, labels = batch()
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    assert model(input_ids=ids).logits.shape == (BATCH, SEQ, VOCAB)  # no labels: not a fallback
    model.eval()
    eval_out = model(input_ids=ids, labels=labels)
    model.train()
    as_tuple = model(input_ids=ids, labels=labels, return_dict=False)
    assert eval_out.logits.shape == (BATCH, SEQ, VOCAB) and as_tuple[1].shape == (BATCH, SEQ, VOCAB)
    model.loss_function = lambda logits, labels, vocab_size, **kwargs: logits.float().mean()
    assert model(input_ids=ids, labels=labels).logits.shape == (BATCH, SEQ, VOCAB)
    del model._loss_function
    assert record(FUSED_ROW, "LlamaForCausalLM.forward")["fallbacks"] == {
        "eval mode (logits kept)": 1, "return_dict=False": 1, "custom loss_function": 1}


def test_num_items_in_batch_and_shift_labels_as_transformers_does():
    model = tiny("qwen3")
    ids, labels = batch()
    shift = labels.roll(-1, dims=1)  # shifted labels given as such, the last column not ignored
    kinds = ({"labels": labels, "num_items_in_batch": torch.tensor(40)}, {"labels": labels, "num_items_in_batch": 40},
             {"labels": labels, "shift_labels": shift})
    expected = [step(model, ids, **kwargs)[1:] for kwargs in kinds]
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    for kwargs, (loss, grads) in zip(kinds, expected, strict=True):
        out, patched_loss, patched_grads = step(model, ids, **kwargs)
        assert out.logits is None and torch.allclose(patched_loss, loss, rtol=1e-6)
        assert_close_grads(patched_grads, grads, rtol=1e-5)


def test_the_fused_row_is_opt_in_and_adds_to_the_defaults():
    from transformers.models.llama import modeling_llama

    original = modeling_llama.LlamaForCausalLM.forward
    fl_patch.apply(kernels="reference")
    assert modeling_llama.LlamaForCausalLM.forward is original
    fl_patch.apply(kernels="reference", include=["cross_entropy"])  # the family: the default row only
    assert modeling_llama.LlamaForCausalLM.forward is original
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])  # everything else stays as by default
    assert modeling_llama.LlamaForCausalLM.forward is not original
    states = {r["target"]: r["state"] for r in fl_patch.report()}
    assert states["transformers.rms_norm"] == "patched" and states["transformers.cross_entropy"] == "patched"
    fl_patch.apply(kernels="reference", include=["rms_norm", FUSED_ROW])
    states = {r["target"]: r["state"] for r in fl_patch.report()}
    assert states[FUSED_ROW] == "patched" and states["transformers.rms_norm"] == "patched"
    assert states["transformers.cross_entropy"] == "excluded"


def test_revert_restores_every_original_object():
    from transformers.loss import loss_utils
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    originals = (loss_utils.fixed_cross_entropy, modeling_llama.LlamaForCausalLM.forward,
                 modeling_qwen3.Qwen3ForCausalLM.forward)
    model = tiny("llama")
    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    assert loss_utils.fixed_cross_entropy is not originals[0]
    assert modeling_llama.LlamaForCausalLM.forward is not originals[1]
    step(model, *batch())
    fl_patch.revert()
    assert (loss_utils.fixed_cross_entropy, modeling_llama.LlamaForCausalLM.forward,
            modeling_qwen3.Qwen3ForCausalLM.forward) == originals
    assert type(model.lm_head) is torch.nn.Linear and "_loss_function" not in vars(model)
    assert inspect.signature(originals[1]) == inspect.signature(modeling_llama.LlamaForCausalLM.forward)


def test_forwards_that_change_the_logits_stay_original_with_the_reason():
    from transformers.models.cohere import modeling_cohere
    from transformers.models.gemma2 import modeling_gemma2

    fl_patch.apply(kernels="reference", include=[FUSED_ROW])
    for cls in (modeling_gemma2.Gemma2ForCausalLM, modeling_cohere.CohereForCausalLM):
        rec = record(FUSED_ROW, f"{cls.__name__}.forward")
        assert rec["state"] == "skipped" and "logits assigned more than once" in rec["reason"]

    def upcasts(self, input_ids=None, labels=None, **kwargs):
        hidden_states = self.model(input_ids)
        logits = self.lm_head(hidden_states)
        loss = self.loss_function(logits=logits.float(), labels=labels, vocab_size=3)
        return dict(loss=loss, logits=logits)

    assert "logits read other than" in deferred_logits_reason(upcasts)


# ---------------------------------------------------------------------------------------------------------
# The SwiGLU MLP routed native in training: silu(gate) recomputed in the backward, not kept


class SavedBytes:
    """Bytes autograd keeps for the backward while active."""

    def __init__(self):
        self.total = 0

    def __enter__(self):
        def pack(tensor):
            self.total += tensor.numel() * tensor.element_size()
            return tensor

        self.hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self.hooks.__exit__(*exc)


@pytest.mark.usefixtures("stand_in_device")
def test_native_swiglu_in_training_keeps_two_tensors_with_autograds_gradients(tmp_path):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    write(cache(tmp_path) / "a.json", profile_data(families={"swiglu": {"route": "native", "why": "slower"}}))
    torch.manual_seed(0)
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128)).to(torch.bfloat16)
    x = torch.randn(2, 8, 64).to(torch.bfloat16).requires_grad_()
    grad_out = torch.randn(2, 8, 64).to(torch.bfloat16)

    def run():
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        with SavedBytes() as saved:
            out = mlp(x)
        out.backward(grad_out)
        return out, x.grad.clone(), [p.grad.clone() for p in mlp.parameters()], saved.total

    out, grad_x, grads, saved = run()
    fl_patch.apply(kernels="gems")  # nothing included: the profile routes (an included family is lifted over it)
    patched, patched_x, patched_grads, patched_saved = run()
    assert record("transformers.swiglu", "LlamaMLP.forward")["fallbacks"] == {"native by profile": 1}
    assert torch.equal(patched, out) and torch.equal(patched_x, grad_x)
    assert all(torch.equal(a, b) for a, b in zip(patched_grads, grads, strict=True))
    assert saved - patched_saved == 2 * 8 * 128 * 2  # silu(gate), [2, 8, 128] bf16, is no longer kept
