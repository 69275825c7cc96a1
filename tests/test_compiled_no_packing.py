"""The opt-in row: under torch.compile (not export, not eager), position ids are taken to hold no packed sequences,
so a causal prefill without a cache or an attention mask skips the materialised mask."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from fl_patch.errors import SettingsError
from fl_patch.integrations import transformers as integration

pytest.importorskip("transformers")
import transformers.masking_utils as masking_utils  # noqa: E402
import transformers_coverage as coverage  # noqa: E402  (needs transformers)

ROW = "transformers.attention.compiled_no_packing"
SKIP_ROW = "transformers.attention.compiled_causal_skip"
PACKED = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])  # three sequences in one row
UNPACKED = torch.arange(8)[None]


@pytest.fixture
def real():
    return masking_utils.find_packed_sequence_indices


@pytest.fixture
def never_skips_while_tracing():
    """transformers' _ignore_causal_mask_sdpa on torch < 2.14: no skip while dynamo traces."""
    real = masking_utils._ignore_causal_mask_sdpa

    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if torch.compiler.is_compiling():
            return False
        return real(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    return _ignore_causal_mask_sdpa


def test_eager_calls_keep_the_originals_answer(real):
    replacement = integration._no_packing_under_compile(real)
    assert replacement(UNPACKED) is None
    assert torch.equal(replacement(PACKED), real(PACKED))
    assert replacement(PACKED)[0, -1].item() == 2


def test_under_compile_it_answers_no_packing(real):
    replacement = integration._no_packing_under_compile(real)

    def probe(position_ids):
        found = replacement(position_ids)
        return position_ids * 0 if found is None else found

    assert compiled_probe(probe, PACKED).abs().sum().item() == 0
    original_probe = torch.compile(lambda p: real(p), backend="eager", fullgraph=True)  # noqa: PLW0108
    assert torch.equal(original_probe(PACKED), real(PACKED))  # the original keeps the traced answer
    torch._dynamo.reset()


def compiled_probe(fn, x):
    torch._dynamo.reset()
    return torch.compile(fn, backend="eager", fullgraph=True)(x)


@pytest.mark.parametrize("strict", [True, False])
def test_export_gets_the_originals_answer(real, strict):
    replacement = integration._no_packing_under_compile(real)

    class Probe(torch.nn.Module):
        def forward(self, position_ids):
            found = replacement(position_ids)
            return position_ids * 0 if found is None else found

    program = torch.export.export(Probe(), (PACKED,), strict=strict)
    assert torch.equal(program.module()(PACKED), real(PACKED))
    torch._dynamo.reset()


def sdpa_calls_traced(monkeypatch, model, **inputs):
    """Compile `model` (eager backend) without a cache; return the logits and, per traced SDPA call, whether it had
    no mask and its is_causal."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend="eager")(use_cache=False, **inputs).logits
    torch._dynamo.reset()
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return logits, seen


def test_compiled_prefill_gets_is_causal_only_with_the_opt_in(monkeypatch, never_skips_while_tracing, real):
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", never_skips_while_tracing)
    model, input_ids = coverage.build("llama"), torch.randint(0, coverage.VOCAB, (2, 24))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        eager = model(input_ids=input_ids, use_cache=False).logits

    fl_patch.apply(kernels="reference", include=[SKIP_ROW])  # the default skip alone: prefill keeps its mask
    _, seen = sdpa_calls_traced(monkeypatch, model, input_ids=input_ids)
    assert seen == [(False, False)] * layers
    fl_patch.revert()

    fl_patch.apply(kernels="reference", include=[SKIP_ROW, ROW])
    states = {r["target"]: (r["state"], r["provider"]) for r in fl_patch.report()}
    assert states[ROW] == ("patched", "torch sdpa")
    skipped, seen = sdpa_calls_traced(monkeypatch, model, input_ids=input_ids)
    assert seen == [(True, True)] * layers
    torch.testing.assert_close(skipped, eager, rtol=1e-5, atol=1e-5)  # fp32

    fl_patch.revert()
    assert masking_utils.find_packed_sequence_indices is real


def test_what_the_opt_in_assumes_packed_positions_differ(monkeypatch, never_skips_while_tracing):
    """Why it is opt-in: compiled with packed position ids, the row gives plain causal attention across the packed
    sequences, where eager transformers keeps them apart."""
    model, input_ids = coverage.build("llama"), torch.randint(0, coverage.VOCAB, (1, 8))
    with torch.no_grad():
        eager = model(input_ids=input_ids, position_ids=PACKED, use_cache=False).logits
    fl_patch.apply(kernels="reference", include=[ROW])
    skipped, _ = sdpa_calls_traced(monkeypatch, model, input_ids=input_ids, position_ids=PACKED)
    fl_patch.revert()
    assert not torch.allclose(skipped[0, 3:], eager[0, 3:], atol=1e-3)  # the later sequences see the first
    torch.testing.assert_close(skipped[0, :3], eager[0, :3], rtol=1e-5, atol=1e-5)


def test_selected_only_by_its_own_name(real):
    fl_patch.apply(kernels="reference")
    assert {r["state"] for r in fl_patch.report() if r["target"] == ROW} == {"excluded"}
    fl_patch.revert()
    fl_patch.apply(kernels="reference", include=["attention"])
    assert {r["state"] for r in fl_patch.report() if r["target"] == ROW} == {"excluded"}
    fl_patch.revert()
    fl_patch.apply(kernels="reference", include=[ROW])  # adds it to every other row
    states = {r["target"]: r["state"] for r in fl_patch.report()}
    assert states[ROW] == states[SKIP_ROW] == "patched"
    fl_patch.revert()
    with pytest.raises(SettingsError, match="both included"):
        fl_patch.apply(kernels="reference", include=[ROW], exclude=["attention"])
    assert masking_utils.find_packed_sequence_indices is real


def test_an_unknown_signature_is_left_alone_and_reported(monkeypatch):
    def other(position_ids, batch_size):
        return None

    monkeypatch.setattr(masking_utils, "find_packed_sequence_indices", other)
    fl_patch.apply(kernels="reference", include=[ROW])
    [record] = [r for r in fl_patch.report() if r["target"] == ROW]
    assert record["state"] == "skipped" and "batch_size" in record["reason"]
    assert masking_utils.find_packed_sequence_indices is other


def test_the_installed_transformers_has_the_known_signature(real):
    assert tuple(inspect.signature(real).parameters) == ("position_ids",)
