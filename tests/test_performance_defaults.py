"""Families FlagGems was measured slower on stay native by default on that vendor, unless included."""

import pytest
import torch

import fl_patch


def reasons(target):
    return {r["reason"] for r in fl_patch.report() if r["target"] == target}


@pytest.fixture
def nvidia_build(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.version, "hip", None)


@pytest.fixture
def nvidia_routing_without_flag_gems(nvidia_build, monkeypatch):
    """CPU tensors routed as CUDA ones on an NVIDIA build, with the gems provider and no FlagGems: a call that
    reaches a FlagGems kernel fails the test."""
    from fl_patch.kernels import gems

    monkeypatch.setattr(gems, "installed", lambda: None)
    monkeypatch.setattr(gems, "load", lambda: pytest.fail("a small call reached a FlagGems kernel"))
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    gems._reset_for_tests()
    yield
    gems._reset_for_tests()


def test_attention_and_linear_stay_native_on_nvidia_by_default(nvidia_build):
    fl_patch.apply(kernels="gems")
    [linear] = reasons("torch.linear")
    assert linear.startswith("left native by default: FlagGems mm ran at 0.88x")
    assert "FL_PATCH_INCLUDE=linear uses FlagGems anyway" in linear
    assert any("left native by default" in r for r in reasons("torch.scaled_dot_product_attention"))
    assert not any("left native by default" in r for r in reasons("torch.rms_norm"))


def test_including_the_family_overrides_the_default(nvidia_build):
    fl_patch.apply(kernels="gems", include=["linear", "rms_norm"])
    assert not any("left native by default" in r for r in reasons("torch.linear"))


def test_no_default_on_other_builds_or_with_the_reference_provider(nvidia_build, monkeypatch):
    fl_patch.apply(kernels="reference")
    assert [r["state"] for r in fl_patch.report() if r["target"] == "torch.linear"] == ["patched"]
    fl_patch.revert()
    monkeypatch.setattr(torch.version, "cuda", None)
    fl_patch.apply(kernels="gems")
    assert not any("left native by default" in r for r in reasons("torch.linear"))


def test_small_inputs_stay_native_on_nvidia_only(nvidia_build, monkeypatch):
    from fl_patch.kernels import gems, rms_norm

    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)  # pretend CPU tensors are on the device
    gems._reset_for_tests()
    try:
        small, large = torch.ones(128, 2048, dtype=torch.bfloat16), torch.ones(4096, 2048, dtype=torch.bfloat16)
        weight = torch.ones(2048, dtype=torch.bfloat16)
        assert rms_norm.unsupported_hf("gems", small, weight) == "small input"
        assert rms_norm.unsupported_hf("gems", large, weight) is None
        assert rms_norm.unsupported_hf("reference", small, weight) is None
        gems._reset_for_tests()
        monkeypatch.setattr(torch.version, "cuda", None)
        assert rms_norm.unsupported_hf("gems", small, weight) is None
    finally:
        gems._reset_for_tests()


def test_small_inputs_leave_before_the_shape_checks(nvidia_build, monkeypatch):
    """The launch-bound path (every call under the size on NVIDIA) runs only the tensor check: a small call
    reports "small input" even where a shape check would have refused it, in every family."""
    from fl_patch.kernels import attention, gems, layer_norm, linear, rms_norm, rope, swiglu

    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    gems._reset_for_tests()
    try:
        x, odd = torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
        q = torch.ones(1, 2, 4, 8, dtype=torch.bfloat16)
        calls = {
            "rms_norm": rms_norm.unsupported_hf("gems", x, odd),
            "rms_norm torch": rms_norm.unsupported_torch("gems", x, (8,), odd),
            "rms_norm fp32": rms_norm.unsupported_fp32("gems", x, odd),
            "rms_norm gated": rms_norm.unsupported_gated("gems", x, odd, odd),
            "rope": rope.unsupported_hf("gems", q, q, odd, odd, 1),
            "rope interleaved": rope.unsupported_interleaved("gems", x, x, odd),
            "swiglu": swiglu.unsupported("gems", x, odd),
            "layer_norm": layer_norm.unsupported("gems", x, (8,), odd, None),
            "linear": linear.unsupported("gems", x, odd, None),
            "linear in_out": linear.unsupported_in_out("gems", x, odd, None),
            "sdpa": attention.unsupported_sdpa("gems", q, x, q, None, 0.0, False, None, False),
            "varlen": attention.unsupported_varlen("gems", x, x, q, False, None),
        }
        assert calls == dict.fromkeys(calls, "small input")
        assert rms_norm.unsupported_hf("reference", x, odd) == "weight shape"  # the checks themselves still run
    finally:
        gems._reset_for_tests()


def test_small_hf_rms_norm_calls_run_torch_fused_rms_norm_on_nvidia(nvidia_routing_without_flag_gems, monkeypatch):
    """Launch-bound HF RMSNorm calls run one torch op instead of HF's seven; rope and the MLP keep the original.
    A tiny bf16 Llama on CPU, routed as on an NVIDIA GPU: logits stay within bf16 tolerance of HF's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fused = []
    real = torch.rms_norm
    monkeypatch.setattr(torch, "rms_norm", lambda *args: fused.append(1) or real(*args))
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        expected = model(ids).logits
        with fl_patch.patched(kernels="gems"):
            actual = model(ids).logits
            fallbacks = {r["where"].rsplit(".", 2)[-2]: r["fallbacks"] for r in fl_patch.report()
                         if r["family"] in ("rms_norm", "rope", "swiglu") and r["state"] == "patched"}
    assert fallbacks["LlamaRMSNorm"] == {"small input (torch rms_norm)": 5}  # 2 per layer + the final norm
    assert fallbacks["LlamaMLP"] == {"small input": 2}
    assert len(fused) == 5
    torch.testing.assert_close(actual, expected, rtol=0.016, atol=0.05)


def test_small_gated_rms_norm_calls_run_torch_fused_rms_norm_on_nvidia(nvidia_routing_without_flag_gems):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    torch.manual_seed(0)
    norm = Qwen3NextRMSNormGated(64, eps=1e-6).to(torch.bfloat16)
    x, gate = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 3, torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = norm(x, gate)
        with fl_patch.patched(kernels="gems", include=["transformers.rms_norm"]):
            actual = norm(x, gate)
            [record] = [r for r in fl_patch.report() if r["where"].endswith("Qwen3NextRMSNormGated.forward")]
    assert record["fallbacks"] == {"small input (torch rms_norm)": 1}
    torch.testing.assert_close(actual, expected, rtol=0.032, atol=0.032)  # 1 bf16 ulp: see test_kernels


def test_gems_calls_go_to_the_original_under_torch_compile_with_no_graph_break(monkeypatch):
    """FlagGems' Triton launcher can't be traced by dynamo: compiled graphs keep the originals, unbroken."""
    from fl_patch.kernels import gems

    monkeypatch.setattr(gems, "installed", lambda: None)  # the gems provider, without importing FlagGems
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    weight = torch.ones(64)

    def norm(x):
        return torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)

    x = torch.randn(8, 64, dtype=torch.bfloat16)
    explained = torch._dynamo.explain(norm)(x)
    assert explained.graph_break_count == 0
    compiled = torch.compile(norm, backend="eager")(x)
    torch._dynamo.reset()
    fl_patch.revert()
    assert torch.equal(compiled, norm(x))
    [record] = [r for r in fl_patch.report() if r["target"] == "torch.rms_norm"]
    assert record["fallbacks"] == {}  # nothing counted from inside the compiled graph
