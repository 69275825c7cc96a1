"""The transformers integration on CPU, through the torch reference kernels (``kernels="reference"``), so the
patched path really runs: every causal-LM type, exact revert, attention implementation choices, the shape
classifier, torch.compile, and the zero-code bootstrap."""

import importlib
import json
import sys
import textwrap
import time

import pytest
import torch

import fl_patch
from fl_patch import runtime, settings
from fl_patch.integrations import transformers as integration
from fl_patch.table import Target

pytest.importorskip("transformers")

import transformers_coverage as coverage  # noqa: E402  (needs transformers)
from conftest import run_python  # noqa: E402

# fp32: patched and unpatched logits agree to this, relative to the logits' scale (max |logit|, at least 1).
TOLERANCE = 1e-4
COVERAGE_TARGET = 0.9


def relative_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(1, max |expected|), over positions where neither is NaN; inf if the NaN
    positions differ."""
    if not torch.equal(actual.isnan(), expected.isnan()):
        return float("inf")
    finite = ~expected.isnan()
    scale = max(1.0, expected[finite].abs().max().item())
    return (actual[finite] - expected[finite]).abs().max().item() / scale


def test_every_causal_lm_type_matches_unpatched_and_most_are_covered(monkeypatch, capsys):
    """Build every causal-LM type tiny, run a left-padded batch unpatched, patch, run it again."""
    started = time.perf_counter()
    input_ids, attention_mask = coverage.padded_batch()
    built, skipped = {}, {}
    for model_type in coverage.causal_lm_types():
        try:
            built[model_type] = coverage.build_and_run(model_type, input_ids, attention_mask)
        except coverage.NotTiny as why:
            skipped[model_type] = str(why)
    calls = coverage.spy_on_kernels(monkeypatch)
    # this integration's rows only (torch-level rows would also count kernel calls); the models above already
    # exist: class-level patches reach them
    fl_patch.apply(kernels="reference", include=[target.name for target in integration.TARGETS])
    rows = {}
    for model_type, (model, expected) in built.items():
        calls.update(dict.fromkeys(calls, 0))
        before = coverage.fallback_counts()
        diff = relative_diff(coverage.logits(model, input_ids, attention_mask), expected)
        fallbacks = {k: n - before.get(k, 0) for k, n in coverage.fallback_counts().items() if n != before.get(k, 0)}
        used, patched = coverage.rms_norm_classes(model)
        reached = calls["attention"] > 0 or any("AttentionInterface['sdpa']" in k for k in fallbacks)
        rows[model_type] = dict(diff=diff, calls=dict(calls), norms=used, patched_norms=patched,
                                attention_reached=reached, fallbacks=fallbacks)
    elapsed = time.perf_counter() - started

    with_norm = [t for t, r in rows.items() if r["norms"]]
    norm_ran = [t for t in with_norm if rows[t]["calls"]["rms_norm"]]
    norm_all = [t for t in with_norm if rows[t]["norms"] == rows[t]["patched_norms"]]
    reached = [t for t, r in rows.items() if r["attention_reached"]]
    attention_ran = [t for t in reached if rows[t]["calls"]["attention"]]
    both = [t for t in with_norm if t in reached]
    both_ran = [t for t in both if t in norm_ran and t in attention_ran]
    ran = {family: [t for t, r in rows.items() if r["calls"][family]] for family in ("rope", "swiglu")}
    lines = [
        f"transformers coverage: {len(rows)} of {len(rows) + len(skipped)} causal-LM types built tiny "
        f"({elapsed:.0f}s); all within {TOLERANCE:g} of unpatched on a left-padded batch",
        f"  RMSNorm kernel ran: {len(norm_ran)}/{len(with_norm)} types that use an *RMSNorm class "
        f"(every *RMSNorm class patched in {len(norm_all)})",
        f"  attention kernel ran: {len(attention_ran)}/{len(reached)} types whose attention goes through "
        f"AttentionInterface['sdpa'] ({len(rows) - len(reached)} others: eager-only or not on the interface)",
        f"  both: {len(both_ran)}/{len(both)}; rope kernel ran: {len(ran['rope'])}/{len(rows)}; "
        f"SwiGLU kernel ran: {len(ran['swiglu'])}/{len(rows)}",
        "  RMSNorm not patched: " + "; ".join(
            f"{t} ({', '.join(sorted(rows[t]['norms'] - rows[t]['patched_norms']))})"
            for t in with_norm if t not in norm_all),
        "  attention fallbacks: " + "; ".join(
            f"{t} ({', '.join(sorted({k.split(': ', 1)[1] for k in rows[t]['fallbacks'] if 'Attention' in k}))})"
            for t in reached if t not in attention_ran),
        "  skipped: " + "; ".join(f"{t} ({why})" for t, why in skipped.items()),
    ]
    with capsys.disabled():
        print("\n" + "\n".join(lines))

    assert {t: r["diff"] for t, r in rows.items() if not r["diff"] <= TOLERANCE} == {}
    assert len(norm_ran) >= COVERAGE_TARGET * len(with_norm)
    assert len(attention_ran) >= COVERAGE_TARGET * len(reached)
    assert len(both_ran) >= COVERAGE_TARGET * len(both)


def interface_mappings():
    """The mappings the attention rows write (class-level) or must leave alone (the shared instance's)."""
    from transformers import masking_utils, modeling_utils

    return {
        "AttentionInterface": modeling_utils.AttentionInterface._global_mapping,
        "ALL_ATTENTION_FUNCTIONS": modeling_utils.ALL_ATTENTION_FUNCTIONS._local_mapping,
        "AttentionMaskInterface": masking_utils.AttentionMaskInterface._global_mapping,
        "ALL_MASK_ATTENTION_FUNCTIONS": masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._local_mapping,
    }


def snapshot():
    """Every module global and class attribute of the imported modeling modules, and the interface
    mappings: (place, name) -> the object."""
    seen = {}
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and ".modeling_" in name and module is not None:
            seen.update({(name, key): value for key, value in vars(module).items()})
            for cls in integration._own_classes(module):
                seen.update({(cls, key): value for key, value in vars(cls).items()})
    for label, mapping in interface_mappings().items():
        seen.update({(label, key): value for key, value in mapping.items()})
    return seen


def assert_same_objects(before, after):
    assert after.keys() == before.keys()
    assert [place for place, value in before.items() if after[place] is not value] == []


def test_models_built_before_apply_are_patched_and_revert_restores_every_original(monkeypatch):
    input_ids, attention_mask = coverage.padded_batch()
    models = {t: coverage.build(t) for t in ("llama", "qwen3", "gemma", "olmo2", "phi3")}
    expected = {t: coverage.logits(m, input_ids, attention_mask) for t, m in models.items()}
    before = snapshot()
    calls = coverage.spy_on_kernels(monkeypatch)

    fl_patch.apply(kernels="reference")
    for model_type, model in models.items():
        calls.update(dict.fromkeys(calls, 0))
        assert relative_diff(coverage.logits(model, input_ids, attention_mask), expected[model_type]) <= TOLERANCE
        assert calls["rms_norm"] and calls["rope"] and calls["attention"], (model_type, calls)
    changed = snapshot()
    assert any(changed[place] is not value for place, value in before.items())
    assert ("AttentionInterface", "flagos") in changed

    fl_patch.revert()
    assert_same_objects(before, snapshot())
    for model_type, model in models.items():
        assert torch.equal(coverage.logits(model, input_ids, attention_mask), expected[model_type])


def test_report_names_each_place_with_its_form_or_reason():
    for name in ("llama", "gemma3n", "deepseek_v4", "cohere"):
        importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    fl_patch.apply(kernels="reference")
    by_where = {r["where"]: r for r in fl_patch.report()}
    llama = "transformers.models.llama.modeling_llama"
    assert by_where[f"{llama}.LlamaRMSNorm.forward"]["variant"] == "hf"
    assert by_where[f"{llama}.LlamaMLP.forward"]["variant"] == "swiglu"
    assert by_where[f"{llama}.apply_rotary_pos_emb"]["state"] == "patched"
    gemma3n = by_where["transformers.models.gemma3n.modeling_gemma3n.Gemma3nRMSNorm.forward"]
    assert (gemma3n["state"], gemma3n["variant"]) == ("patched", "with_scale")
    # DeepSeek-V4's unweighted norm rounds the scale to x's dtype before multiplying: another form
    deepseek = by_where["transformers.models.deepseek_v4.modeling_deepseek_v4.DeepseekV4UnweightedRMSNorm.forward"]
    assert (deepseek["state"], deepseek["reason"]) == ("skipped", "code matches no known rms_norm form")
    # Cohere's rotate_half is interleaved: same apply_rotary_pos_emb body, different helper
    cohere = by_where["transformers.models.cohere.modeling_cohere.apply_rotary_pos_emb"]
    assert cohere["state"] == "skipped"
    for where in ("transformers.AttentionInterface['flagos']", "transformers.AttentionInterface['sdpa']",
                  "transformers.masking_utils.AttentionMaskInterface['flagos']"):
        assert by_where[where]["state"] == "patched"


@pytest.mark.parametrize("rows, sdpa_on_kernel", [(None, True), (["transformers.attention"], False)])
def test_attn_implementation_flagos_sdpa_and_eager(monkeypatch, rows, sdpa_on_kernel):
    """"flagos" runs on the kernel; "sdpa" does unless its row is left out; "eager" never does."""
    from transformers import AutoModelForCausalLM

    input_ids, attention_mask = coverage.padded_batch()

    def llama(implementation):
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(coverage.tiny_config("llama"),
                                                attn_implementation=implementation).eval()

    # unpatched; "flagos" is to match sdpa (eager differs from sdpa on padding rows, which are discarded)
    expected = {name: coverage.logits(llama(name), input_ids, attention_mask) for name in ("sdpa", "eager")}
    expected["flagos"] = expected["sdpa"]
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference", include=rows)

    def attention_calls(model):
        calls["attention"] = 0
        logits = coverage.logits(model, input_ids, attention_mask)
        assert relative_diff(logits, expected[model.config._attn_implementation]) <= TOLERANCE
        return calls["attention"]

    flagos = llama("flagos")
    assert flagos.config._attn_implementation == "flagos"
    assert attention_calls(flagos) > 0
    assert (attention_calls(llama("sdpa")) > 0) is sdpa_on_kernel
    assert attention_calls(llama("eager")) == 0
    flagos.set_attn_implementation("eager")
    assert flagos.config._attn_implementation == "eager"
    assert attention_calls(flagos) == 0
    flagos.set_attn_implementation("flagos")
    assert attention_calls(flagos) > 0


def test_from_pretrained_with_each_attn_implementation(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    input_ids, attention_mask = coverage.padded_batch()
    saved = coverage.build("qwen3")
    saved.save_pretrained(tmp_path)
    expected = {name: coverage.logits(AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name),
                                      input_ids, attention_mask) for name in ("sdpa", "eager")}
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference")
    for name, on_kernel in ((None, True), ("flagos", True), ("sdpa", True), ("eager", False)):
        calls["attention"] = 0
        model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name)
        logits = coverage.logits(model, input_ids, attention_mask)
        assert relative_diff(logits, expected["eager" if name == "eager" else "sdpa"]) <= TOLERANCE
        assert (calls["attention"] > 0) is on_kernel, name


def test_flash_attention_2_behaves_as_without_fl_patch():
    from transformers import AutoModelForCausalLM

    def outcome():
        try:
            AutoModelForCausalLM.from_config(coverage.tiny_config("llama"), attn_implementation="flash_attention_2")
        except Exception as exc:
            return type(exc), str(exc)
        return None

    unpatched = outcome()
    fl_patch.apply(kernels="reference")
    assert outcome() == unpatched


def attention_layer():
    """A tiny Llama's first attention module (2 query heads, 1 key/value head, head dim 32) and inputs."""
    model = coverage.build("llama")
    module = model.model.layers[0].self_attn
    torch.manual_seed(2)
    query, key, value = torch.randn(2, 2, 5, 32), torch.randn(2, 1, 5, 32), torch.randn(2, 1, 5, 32)
    return module, query, key, value


CALLS = {
    # name: (query length, key length, mask, keyword arguments); None = no mask
    "causal prefill": (5, 5, None, {}),
    "decode": (1, 5, None, {}),
    "static cache prefill": (3, 5, None, {}),
    "padded": (5, 5, "padded", {}),
    "is_causal=False": (5, 5, None, {"is_causal": False}),
    "neutral kwargs": (5, 5, None, {"sliding_window": 3, "position_ids": torch.arange(5)[None], "use_cache": True}),
    "Trainer's kwargs": (5, 5, "padded", {"num_items_in_batch": torch.tensor(7), "output_hidden_states": True,
                                          "output_router_logits": False, "labels": torch.arange(5)[None]}),
    "flash's packing kwargs": (5, 5, None, {"cu_seq_lens_q": torch.tensor([0, 5], dtype=torch.int32),
                                             "cu_seq_lens_k": torch.tensor([0, 5], dtype=torch.int32),
                                             "max_length_q": 5, "max_length_k": 5, "deterministic": True}),
}
FALLBACKS = {
    # name: (keyword arguments, reason counted)
    "dropout": ({"dropout": 0.5}, "dropout"),
    "position_bias": ({"position_bias": torch.randn(1, 2, 5, 5)}, "position_bias"),
    "output_attentions": ({"output_attentions": True}, "output_attentions"),
    "s_aux": ({"s_aux": torch.zeros(2)}, "s_aux"),
    "indices": ({"indices": torch.zeros(2, 5, 2, dtype=torch.long)}, "indices"),
    "unknown": ({"mystery": 1}, "mystery"),
}


ATTENTION_ROWS = ["transformers.attention", "transformers.attention.sdpa"]  # not torch's F.sdpa row


def sdpa_record():
    return next(r for r in fl_patch.report() if r["where"] == "transformers.AttentionInterface['sdpa']")


@pytest.mark.parametrize("name", CALLS)
def test_attention_takes_calls_as_sdpa_would(monkeypatch, name):
    """Causality decided as sdpa_attention_forward decides it; the kernel's result matches the original's."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, query, key, value = attention_layer()
    q_length, kv_length, mask, kwargs = CALLS[name]
    query, key, value = query[:, :, -q_length:], key[:, :, :kv_length], value[:, :, :kv_length]
    if mask == "padded":
        mask = torch.ones(2, 1, q_length, kv_length, dtype=torch.bool).tril()
        mask[0, :, :, :2] = False
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference", include=ATTENTION_ROWS)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    out, weights = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, mask, scaling=0.2, **kwargs)
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=0.2, **kwargs)
    assert weights is None and out.shape == expected.shape
    assert relative_diff(out, expected) <= 1e-5
    assert calls["attention"] == 1 and sdpa_record()["fallbacks"] == {}


@pytest.mark.parametrize("name", FALLBACKS)
def test_attention_hands_what_the_kernel_cant_honour_to_sdpa(name):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module, query, key, value = attention_layer()
    kwargs, reason = FALLBACKS[name]
    fl_patch.apply(kernels="reference", include=ATTENTION_ROWS)
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    torch.manual_seed(3)
    out, _ = ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, scaling=0.2, **kwargs)
    torch.manual_seed(3)
    expected, _ = sdpa_attention_forward(module, query, key, value, None, scaling=0.2, **kwargs)
    assert torch.equal(out, expected)
    assert sdpa_record()["fallbacks"] == {reason: 1}


def test_a_training_forward_with_trainers_arguments_runs_the_attention_kernel(monkeypatch):
    """transformers.Trainer passes num_items_in_batch to every training forward; output_hidden_states is a common
    choice. Both reach the attention function through **kwargs and change nothing there."""
    model = coverage.build("llama").train()
    input_ids, attention_mask = coverage.padded_batch()
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    kwargs = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, output_hidden_states=True,
                  num_items_in_batch=torch.tensor(11))
    expected = model(**kwargs)
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference", include=ATTENTION_ROWS)
    out = model(**kwargs)
    assert calls["attention"] == model.config.num_hidden_layers and sdpa_record()["fallbacks"] == {}
    assert relative_diff(out.logits, expected.logits) <= 1e-5
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=0)
    for hidden, want in zip(out.hidden_states, expected.hidden_states, strict=True):
        assert relative_diff(hidden, want) <= 1e-5


def test_softcap_goes_to_sdpa_as_before():
    """transformers 5.25's sdpa refuses a softcap; 5.17's ignores it. Patched, the call gets the same answer."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module, query, key, value = attention_layer()

    def outcome():
        try:
            return ALL_ATTENTION_FUNCTIONS["sdpa"](module, query, key, value, None, softcap=30.0)[0]
        except ValueError as error:
            assert "softcap" in str(error)
            return str(error)

    expected = outcome()
    fl_patch.apply(kernels="reference", include=ATTENTION_ROWS)
    actual = outcome()
    if isinstance(expected, str):
        assert actual == expected
    else:
        assert torch.equal(actual, expected)
    assert sdpa_record()["fallbacks"] == {"softcap": 1}


def test_swiglu_runs_only_where_act_fn_is_silu(monkeypatch):
    input_ids, attention_mask = coverage.padded_batch()
    llama, gemma = coverage.build("llama"), coverage.build("gemma")  # silu / gelu_pytorch_tanh
    expected = [coverage.logits(m, input_ids, attention_mask) for m in (llama, gemma)]
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference", include=["swiglu"])
    assert relative_diff(coverage.logits(llama, input_ids, attention_mask), expected[0]) <= TOLERANCE
    assert calls["swiglu"] == 2
    assert torch.equal(coverage.logits(gemma, input_ids, attention_mask), expected[1])
    assert calls["swiglu"] == 2
    gemma_mlp = next(r for r in fl_patch.report() if r["where"].endswith("GemmaMLP.forward"))
    assert gemma_mlp["fallbacks"] == {"act_fn is not SiLU": 2}


def test_gated_rms_norm_runs_the_kernel_where_the_activation_is_silu(monkeypatch):
    """Qwen3-Next's gated norm, called as its layers call it (gate positional or by keyword)."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    torch.manual_seed(0)
    norm = Qwen3NextRMSNormGated(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x, gate = torch.randn(2, 7, 64) * 3, torch.randn(2, 7, 64)
    with torch.no_grad():
        expected = norm(x, gate)
        norm.activation = "gelu"
        expected_gelu = norm(x, gate)
        norm.activation = "silu"
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference", include=["transformers.rms_norm"])
    with torch.no_grad():
        assert torch.equal(norm(x, gate), expected)
        assert torch.equal(norm(x, gate=gate), expected)
        ran = calls["rms_norm"]
        assert ran > 0
        norm.activation = "gelu"
        assert torch.equal(norm(x, gate), expected_gelu)
    assert calls["rms_norm"] == ran
    record = next(r for r in fl_patch.report() if r["where"].endswith("Qwen3NextRMSNormGated.forward"))
    assert (record["variant"], record["fallbacks"]) == ("gated", {"activation is not silu": 1})


# A package of modeling modules written for these tests: each form written differently from transformers'
# (names, comments, docstring, annotations), near misses, and subclasses.
FAKE_MODELS = {
    "standard": '''
        import functools
        import torch
        from torch import nn


        class OwnRMSNorm(nn.Module):
            def __init__(self, size, eps=1e-6):
                super().__init__()
                self.weight = nn.Parameter(torch.rand(size))
                self.eps = eps

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                """Llama's form with other names."""
                dtype = x.dtype  # remember it
                x = x.to(torch.float32)
                var = x.pow(2).mean(-1, keepdim=True)
                x = x * torch.rsqrt(var + self.eps)
                return self.weight * x.to(dtype)


        class InheritingRMSNorm(OwnRMSNorm):
            pass


        class ScaledRMSNorm(OwnRMSNorm):
            def forward(self, x):
                dtype = x.dtype
                x = x.to(torch.float32)
                var = x.pow(2).mean(-1, keepdim=True)
                x = x * torch.rsqrt(var + self.eps)
                return 2 * self.weight * x.to(dtype)


        class OptionalScaleRMSNorm(OwnRMSNorm):
            def forward(self, x):
                dtype = x.dtype
                x = x.to(torch.float32)
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
                if self.weight is not None:
                    x = self.weight * x
                return x.to(dtype)


        def logged(function):
            @functools.wraps(function)
            def wrapper(*args):
                return function(*args)
            return wrapper


        class DecoratedRMSNorm(OwnRMSNorm):
            @logged
            def forward(self, x):
                dtype = x.dtype
                x = x.to(torch.float32)
                var = x.pow(2).mean(-1, keepdim=True)
                x = x * torch.rsqrt(var + self.eps)
                return self.weight * x.to(dtype)


        class CenteredRMSNorm(nn.Module):
            def __init__(self, size, eps=1e-6):
                super().__init__()
                self.weight = nn.Parameter(torch.rand(size))
                self.variance_epsilon = eps

            def _norm(self, x):
                return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

            def forward(self, x):
                output = self._norm(x.float())
                output = output * (1.0 + self.weight.float())
                return output.type_as(x)


        class OtherNormCenteredRMSNorm(CenteredRMSNorm):
            def _norm(self, x):
                return x / x.abs().amax(-1, keepdim=True)


        def rotate_half(x):
            x1 = x[..., : x.shape[-1] // 2]
            x2 = x[..., x.shape[-1] // 2 :]
            return torch.cat((-x2, x1), dim=-1)


        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_out = (q * cos) + (rotate_half(q) * sin)
            k_out = (k * cos) + (rotate_half(k) * sin)
            return q_out, k_out
    ''',
    "flipped": '''
        import torch


        def rotate_half(x):
            x1 = x[..., : x.shape[-1] // 2]
            x2 = x[..., x.shape[-1] // 2 :]
            return torch.cat((x2, -x1), dim=-1)


        def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_out = (q * cos) + (rotate_half(q) * sin)
            k_out = (k * cos) + (rotate_half(k) * sin)
            return q_out, k_out
    ''',
    "renamed": '''
        import torch


        def rotate_half(x):
            x1 = x[..., : x.shape[-1] // 2]
            x2 = x[..., x.shape[-1] // 2 :]
            return torch.cat((-x2, x1), dim=-1)


        def apply_rotary_pos_emb(query, key, cos, sin, unsqueeze_dim=1):
            cos = cos.unsqueeze(unsqueeze_dim)
            sin = sin.unsqueeze(unsqueeze_dim)
            q_out = (query * cos) + (rotate_half(query) * sin)
            k_out = (key * cos) + (rotate_half(key) * sin)
            return q_out, k_out
    ''',
}


@pytest.fixture
def fake_models(tmp_path, monkeypatch):
    """Package ``fakemodels`` with modules ``fakemodels.<name>.modeling_<name>``, patched through the real
    rms_norm and rope factories (as extra table rows); returns {name: module}."""
    for name, source in FAKE_MODELS.items():
        package = tmp_path / "fakemodels" / name
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / f"modeling_{name}.py").write_text(textwrap.dedent(source))
    (tmp_path / "fakemodels" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = tuple(
        Target(name=f"fake.{family}", family=family, module="fakemodels.*.modeling_*", attribute=family,
               factory=f"fl_patch.integrations.transformers:patch_{family}")
        for family in ("rms_norm", "rope")
    )
    runtime.apply(settings.load(kernels="reference", include=[row.name for row in rows]), extra_targets=rows)
    yield {name: importlib.import_module(f"fakemodels.{name}.modeling_{name}") for name in FAKE_MODELS}
    fl_patch.revert()
    for name in [m for m in sys.modules if m.startswith("fakemodels")]:
        del sys.modules[name]


def test_shape_classifier_accepts_exact_forms_only(fake_models):
    records = {r["where"].rsplit(".", 2)[-2] + "." + r["where"].rsplit(".", 1)[-1]: r for r in fl_patch.report()
               if r["where"].startswith("fakemodels.")}
    states = {where: (r["state"], r["variant"] if r["state"] == "patched" else r["reason"])
              for where, r in records.items()}
    assert states == {
        "OwnRMSNorm.forward": ("patched", "hf"),
        "ScaledRMSNorm.forward": ("skipped", "code matches no known rms_norm form"),
        "OptionalScaleRMSNorm.forward": ("skipped", "code matches no known rms_norm form"),
        "DecoratedRMSNorm.forward": ("skipped", "source unavailable, or wrapped by a decorator"),
        "CenteredRMSNorm.forward": ("patched", "gemma"),
        "OtherNormCenteredRMSNorm.forward": (
            "skipped", "overrides _norm, which the inherited patched forward would skip"),
        "modeling_standard.apply_rotary_pos_emb": ("patched", "hf"),
        "modeling_flipped.apply_rotary_pos_emb": ("skipped", "code matches no known rope form"),
        "modeling_renamed.apply_rotary_pos_emb": (
            "skipped", "signature (query, key, cos, sin, unsqueeze_dim=1) is not (q, k, cos, sin, unsqueeze_dim=1)"),
    }
    standard = fake_models["standard"]
    assert standard.InheritingRMSNorm.forward is standard.OwnRMSNorm.forward  # covered where it is defined
    x = torch.randn(2, 3, 8)
    other = standard.OtherNormCenteredRMSNorm(8)
    assert torch.equal(other(x), (x / x.abs().amax(-1, keepdim=True)) * (1.0 + other.weight))
    fl_patch.revert()
    assert "forward" not in vars(standard.OtherNormCenteredRMSNorm)


def test_classification_is_cached_per_code_object():
    from transformers.models.llama import modeling_llama

    integration.classify("rms_norm", modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRMSNorm)
    hits = integration._code_source.cache_info().hits
    form = integration.classify("rms_norm", modeling_llama.LlamaRMSNorm.forward, modeling_llama.LlamaRMSNorm)
    assert integration._code_source.cache_info().hits > hits  # the second classification read no source
    assert (form.variant, form.eps) == ("hf", "variance_epsilon")


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_torch_compile_same_logits_and_no_extra_graph_breaks(monkeypatch, model_type):
    input_ids, attention_mask = coverage.padded_batch()
    model = coverage.build(model_type)
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    torch._dynamo.reset()
    unpatched_breaks = torch._dynamo.explain(model)(**inputs).graph_break_count
    calls = coverage.spy_on_kernels(monkeypatch)
    fl_patch.apply(kernels="reference")
    eager = coverage.logits(model, input_ids, attention_mask)
    torch._dynamo.reset()
    calls.update(dict.fromkeys(calls, 0))
    patched_breaks = torch._dynamo.explain(model)(**inputs).graph_break_count
    assert calls["rms_norm"] and calls["rope"] and calls["attention"] and calls["swiglu"]  # traced the kernels
    assert patched_breaks == unpatched_breaks
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model)(**inputs).logits
    torch._dynamo.reset()
    assert relative_diff(compiled, eager) <= 1e-5


GENERATE = textwrap.dedent(
    """
    import json, sys, torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    sizes = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=1, head_dim=32, pad_token_id=0)
    tokens = []
    for config_class, model_class in ((LlamaConfig, LlamaForCausalLM), (Qwen3Config, Qwen3ForCausalLM)):
        torch.manual_seed(0)
        model = model_class(config_class(**sizes)).eval()
        prompt = torch.tensor([[5, 17, 99, 3, 42, 7]])
        out = model.generate(prompt, max_new_tokens=10, do_sample=False, min_new_tokens=10)
        tokens.append(out[0, prompt.shape[1]:].tolist())
    print(json.dumps(tokens))
    """
)


def test_zero_code_bootstrap_generates_the_same_tokens():
    reference = {"FL_PATCH_KERNELS": "reference", "FL_PATCH_REPORT": "1"}
    patched = run_python(GENERATE, env=reference)
    unpatched = run_python(GENERATE, env={"FL_PATCH": "0"})
    assert patched.returncode == 0, patched.stderr
    assert unpatched.returncode == 0, unpatched.stderr
    patched_tokens = json.loads(next(line for line in patched.stdout.splitlines() if line.startswith("[[")))
    assert patched_tokens == json.loads(unpatched.stdout.strip().splitlines()[-1])
    assert all(len(tokens) == 10 for tokens in patched_tokens)
    report = patched.stderr  # the report at exit goes to stderr, away from the program's output
    for place in ("modeling_llama.LlamaRMSNorm.forward", "modeling_qwen3.apply_rotary_pos_emb",
                  "modeling_qwen3.Qwen3MLP.forward", "AttentionInterface['sdpa']"):
        line = next(line for line in report.splitlines() if line.rstrip().endswith(place))
        assert " patched " in line and "torch reference" in line


def test_a_rope_function_turned_into_a_hub_kernel_layer_is_patched_and_restored(monkeypatch):
    """transformers >= 5.25 decorates apply_rotary_pos_emb with kernels' use_kernel_forward_from_hub, which makes
    the module global an nn.Module instance whose class's forward calls the function. Stand-in: the same wrapping
    of Llama's function. The rope place is patched by the function's code, its kernel runs, logits match, and
    revert puts the very instance back."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama import modeling_llama

    function = modeling_llama.apply_rotary_pos_emb
    if not isinstance(function, type(test_report_names_each_place_with_its_form_or_reason)):
        function = integration._function_inside(function, "apply_rotary_pos_emb")  # already a layer (>= 5.25)

    def layer_of(func):  # as kernels' _create_func_module
        class Func(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return func(*args, **kwargs)

        return Func()

    layer = layer_of(function)
    monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", layer)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        fl_patch.apply(kernels="reference")
        [record] = [r for r in fl_patch.report() if r["where"] == f"{modeling_llama.__name__}.apply_rotary_pos_emb"]
        assert (record["state"], record["variant"]) == ("patched", "hf")
        assert modeling_llama.apply_rotary_pos_emb is not layer
        actual = model(ids).logits
        fl_patch.revert()
    assert modeling_llama.apply_rotary_pos_emb is layer
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
