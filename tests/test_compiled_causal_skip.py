"""Under torch.compile (not export, not eager), an unpadded causal call skips the materialised sdpa mask."""

import inspect

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from fl_patch.integrations import transformers as integration

pytest.importorskip("transformers")
import transformers.masking_utils as masking_utils  # noqa: E402
import transformers_coverage as coverage  # noqa: E402  (needs transformers)

ROW = "transformers.attention.compiled_causal_skip"


@pytest.fixture
def real():
    """transformers' own function, read once the autouse fixture has reverted what ``import fl_patch`` applied."""
    return masking_utils._ignore_causal_mask_sdpa


@pytest.fixture
def never_skips_while_tracing(real):
    """As transformers < 5.23, or 5.23 on torch < 2.14: no skip while dynamo traces, the eager rule otherwise."""
    def _ignore_causal_mask_sdpa(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size=None):
        if torch.compiler.is_compiling():
            return False
        return real(padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size)

    return _ignore_causal_mask_sdpa


def wrapped():
    consulted = []

    def original(*args):
        consulted.append(args)
        return False

    return integration._causal_skip_under_compile(original), consulted


def compiled(fn):
    return torch.compile(fn, backend="eager", fullgraph=True)


# (padding_mask, q_length, kv_length, q_offset, kv_offset, local_attention_size) -> skipped under compile
CALLS = [
    ((None, 1, 2049, 2048, 0, None), True),  # decode step
    ((None, 128, 128, 0, 0, None), True),  # prefill, no cache
    ((None, 16, 64, 0, 0, None), True),  # empty static cache: upper-left is_causal is right
    ((None, 16, 80, 64, 0, None), False),  # chunk after a cache: needs the offset mask
    ((None, 128, 128, 0, 0, 64), False),  # a sliding window that applies
    ((None, 32, 32, 0, 0, 64), True),  # a window longer than the keys
    ((torch.ones(2, 8, dtype=torch.bool), 8, 8, 0, 0, None), False),  # a padding mask: values unreadable
    ((None, 8, 8, torch.tensor(0), 0, None), False),  # a tensor q_offset (static caches)
]


@pytest.mark.parametrize("call, skipped", CALLS)
def test_skips_under_compile_only_where_eager_transformers_would(call, skipped):
    replacement, consulted = wrapped()

    def probe(x):
        return x + 1 if replacement(*call) else x - 1

    assert compiled(probe)(torch.zeros(1)).item() == (1 if skipped else -1)
    assert bool(consulted) is not skipped
    consulted.clear()
    assert probe(torch.zeros(1)).item() == -1  # eager: always the original's answer
    assert len(consulted) == 1
    torch._dynamo.reset()


@pytest.mark.parametrize("strict", [True, False])
def test_export_gets_the_originals_answer(strict):
    replacement, _ = wrapped()  # strict export doesn't replay the list's append: only the answer tells

    class Probe(torch.nn.Module):
        def forward(self, x):
            return x + 1 if replacement(None, 8, 8, 0, 0, None) else x - 1

    program = torch.export.export(Probe(), (torch.zeros(1),), strict=strict)
    assert program.module()(torch.zeros(1)).item() == -1
    torch._dynamo.reset()


def sdpa_masks_traced(monkeypatch, model, input_ids):
    """Compile `model` (eager backend) on `input_ids` with a KV cache and no attention mask; return the logits
    and, per traced SDPA call, whether it had no mask and its is_causal. (Without a cache, transformers keeps
    the mask while compiling for another reason: position ids might hold packed sequences.)"""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        seen.append((kwargs.get("attn_mask") is None, kwargs.get("is_causal")))
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    torch._dynamo.reset()
    with torch.no_grad():
        logits = torch.compile(model, backend="eager", dynamic=True)(input_ids=input_ids, use_cache=True).logits
    torch._dynamo.reset()
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    return logits, seen


def test_compiled_llama_gets_is_causal_instead_of_a_mask_and_the_same_logits(monkeypatch, never_skips_while_tracing):
    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", never_skips_while_tracing)
    model, input_ids = coverage.build("llama"), torch.randint(0, coverage.VOCAB, (2, 24))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        eager = model(input_ids=input_ids, use_cache=True).logits

    masked, seen = sdpa_masks_traced(monkeypatch, model, input_ids)
    assert seen == [(False, False)] * layers  # the traced graph builds and passes a (B, 1, S, S) mask

    fl_patch.apply(kernels="reference", include=[ROW])
    [record] = [r for r in fl_patch.report() if r["target"] == ROW]
    assert (record["state"], record["provider"]) == ("patched", "torch sdpa")
    skipped, seen = sdpa_masks_traced(monkeypatch, model, input_ids)
    assert seen == [(True, True)] * layers
    # fp32: the masked and the is_causal SDPA sum in other orders
    torch.testing.assert_close(skipped, eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(masked, eager, rtol=1e-5, atol=1e-5)

    fl_patch.revert()
    assert masking_utils._ignore_causal_mask_sdpa is never_skips_while_tracing


def test_excluded_with_the_attention_family_and_patched_without_flag_gems(real):
    fl_patch.apply(kernels="gems")  # FlagGems is not installed here: the kernel rows are skipped, this one isn't
    states = {r["target"]: (r["state"], r["reason"]) for r in fl_patch.report()}
    assert states[ROW] == ("patched", "")
    assert states["transformers.attention.sdpa"] == ("skipped", "FlagGems unavailable: flag_gems not installed")
    fl_patch.revert()
    fl_patch.apply(kernels="reference", exclude=["attention"])
    assert {r["state"] for r in fl_patch.report() if r["target"] == ROW} == {"excluded"}
    assert masking_utils._ignore_causal_mask_sdpa is real


def test_an_unknown_signature_is_left_alone_and_reported(monkeypatch):
    def other(padding_mask, query_length, kv_length, kv_offset, local_attention_size=None):
        return False

    monkeypatch.setattr(masking_utils, "_ignore_causal_mask_sdpa", other)
    fl_patch.apply(kernels="reference", include=[ROW])
    [record] = [r for r in fl_patch.report() if r["target"] == ROW]
    assert record["state"] == "skipped"
    assert "query_length" in record["reason"] and "q_length" in record["reason"]
    assert masking_utils._ignore_causal_mask_sdpa is other


def test_the_installed_transformers_has_the_known_signature(real):
    assert tuple(inspect.signature(real).parameters) == integration.CAUSAL_SKIP_PARAMETERS
