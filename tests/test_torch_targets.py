"""torch-level targets: F.layer_norm, F.linear, F.scaled_dot_product_attention (and F.rms_norm's neighbours)."""

import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from conftest import run_python
from fl_patch.kernels import attention as attention_kernels
from fl_patch.kernels import layer_norm as layer_norm_kernels
from fl_patch.kernels import linear as linear_kernels

FAKE_GEMS = Path(__file__).resolve().parent / "fake_flag_gems"
TARGETS = {
    "torch.layer_norm": "layer_norm",
    "torch.linear": "linear",
    "torch.scaled_dot_product_attention": "scaled_dot_product_attention",
}
# fp32: the reference kernels do the same math in another order; bf16: one rounding step apart.
TOLERANCE = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=1e-2)}


def apply_reference(*names):
    fl_patch.apply(include=list(names or TARGETS), kernels="reference")


def record(target):
    (found,) = [r for r in fl_patch.report() if r["target"] == target]
    return found


class Marked(torch.Tensor):
    """A tensor subclass (as DTensor or a quantized weight would be): must go to the original."""


def test_each_target_patched_then_reverted_to_identical_objects():
    originals = {name: getattr(F, name) for name in TARGETS.values()}
    forwards = (torch.nn.Linear.forward, torch.nn.LayerNorm.forward)
    for _ in range(2):
        apply_reference()
        for target, name in TARGETS.items():
            assert getattr(F, name) is not originals[name]
            assert getattr(F, name).__wrapped__ is originals[name]
            assert getattr(F, name).__name__ == originals[name].__name__
            assert record(target)["state"] == "patched"
            assert record(target)["provider"] == "torch reference"
        fl_patch.revert()
        assert all(getattr(F, name) is originals[name] for name in TARGETS.values())
        assert (torch.nn.Linear.forward, torch.nn.LayerNorm.forward) == forwards


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_matches_original(dtype):
    x = torch.randn(2, 5, 16, dtype=dtype)
    weight, bias = torch.randn(16, dtype=dtype), torch.randn(16, dtype=dtype)
    cases = [((16,), weight, bias, 1e-5), ([5, 16], None, None, 1e-6), ((16,), weight, None, 1e-3)]
    expected = [F.layer_norm(x, shape, w, b, eps) for shape, w, b, eps in cases]
    module = torch.nn.LayerNorm(16, dtype=dtype)
    expected_module = module(x)
    apply_reference("torch.layer_norm")
    for (shape, w, b, eps), want in zip(cases, expected, strict=True):
        torch.testing.assert_close(F.layer_norm(x, shape, w, b, eps), want, **TOLERANCE[dtype])
    torch.testing.assert_close(F.layer_norm(x, (16,), weight=weight, bias=bias), expected[0], **TOLERANCE[dtype])
    torch.testing.assert_close(module(x), expected_module, **TOLERANCE[dtype])
    assert record("torch.layer_norm")["fallbacks"] == {}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_matches_original(dtype):
    x = torch.randn(3, 4, 24, dtype=dtype)
    weight, bias = torch.randn(12, 24, dtype=dtype), torch.randn(12, dtype=dtype)
    expected = [F.linear(x, weight), F.linear(x, weight, bias), F.linear(x[0, 0], weight, bias)]
    apply_reference("torch.linear")
    got = [F.linear(x, weight), F.linear(input=x, weight=weight, bias=bias), F.linear(x[0, 0], weight, bias)]
    for have, want in zip(got, expected, strict=True):
        assert have.shape == want.shape and have.dtype == want.dtype
        torch.testing.assert_close(have, want, **TOLERANCE[dtype])
    assert record("torch.linear")["fallbacks"] == {}


def test_modules_reach_the_kernels(monkeypatch):
    """nn.Linear.forward and nn.LayerNorm.forward look F.linear / F.layer_norm up at call time."""
    calls = []

    def spy(kernel, name):
        def wrapped(*args):
            calls.append(name)
            return kernel(*args)
        return wrapped

    monkeypatch.setattr(linear_kernels, "reference", spy(linear_kernels.reference, "linear"))
    monkeypatch.setattr(layer_norm_kernels, "reference", spy(layer_norm_kernels.reference, "layer_norm"))
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(2, 8)
    expected = model(x)
    apply_reference()
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, **TOLERANCE[torch.float32])
    assert calls == ["linear", "layer_norm"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_matches_original(dtype):
    q = torch.randn(2, 4, 6, 32, dtype=dtype)
    k, v = torch.randn(2, 4, 6, 32, dtype=dtype), torch.randn(2, 4, 6, 32, dtype=dtype)
    k2, v2 = k[:, :2].contiguous(), v[:, :2].contiguous()
    bool_mask = torch.rand(2, 1, 6, 6) > 0.3
    bool_mask[..., 0] = True
    float_mask = torch.randn(6, 6, dtype=dtype)
    calls = [
        ((q, k, v), {}),
        ((q, k, v), {"is_causal": True}),
        ((q, k, v, bool_mask), {}),
        ((q, k, v), {"attn_mask": float_mask, "scale": 0.3}),
        ((q, k2, v2), {"is_causal": True, "enable_gqa": True}),
    ]
    expected = [F.scaled_dot_product_attention(*args, **kwargs) for args, kwargs in calls]
    apply_reference("torch.scaled_dot_product_attention")
    for (args, kwargs), want in zip(calls, expected, strict=True):
        torch.testing.assert_close(F.scaled_dot_product_attention(*args, **kwargs), want, **TOLERANCE[dtype])
    assert record("torch.scaled_dot_product_attention")["fallbacks"] == {}
    with pytest.raises(TypeError):  # scale is keyword-only, as in the builtin
        F.scaled_dot_product_attention(q, k, v, None, 0.0, False, 0.3)


def test_sdpa_reaches_the_kernel(monkeypatch):
    calls = []
    reference = attention_kernels.reference_sdpa
    monkeypatch.setattr(attention_kernels, "reference_sdpa", lambda *a: calls.append(1) or reference(*a))
    apply_reference("torch.scaled_dot_product_attention")
    q = torch.randn(1, 2, 3, 16)
    F.scaled_dot_product_attention(q, q, q)
    assert calls == [1]


def test_unsupported_inputs_fall_back_and_are_counted():
    x = torch.randn(2, 3, 8)
    q = torch.randn(2, 3, 16)  # 3-d: (heads, seq, dim)
    weight_1d = torch.randn(8)
    marked_x = x.as_subclass(Marked)
    expected = (F.linear(x, weight_1d), F.scaled_dot_product_attention(q, q, q), F.layer_norm(x, (8,)))
    apply_reference()
    torch.testing.assert_close(F.linear(x, weight_1d), expected[0])
    torch.testing.assert_close(F.scaled_dot_product_attention(q, q, q), expected[1])
    torch.manual_seed(0)
    F.scaled_dot_product_attention(q[None], q[None], q[None], dropout_p=0.5)
    F.scaled_dot_product_attention(q[None], q[None], q[None], dropout_p=0.5)
    torch.testing.assert_close(F.layer_norm(marked_x, (8,)).as_subclass(torch.Tensor), expected[2])
    F.linear(marked_x, torch.randn(4, 8))
    assert record("torch.linear")["fallbacks"] == {"weight shape": 1, "tensor subclass": 1}
    assert record("torch.scaled_dot_product_attention")["fallbacks"] == {"not 4-d": 1, "dropout": 2}
    # Twice: F.layer_norm's __torch_function__ path calls torch.nn.functional.layer_norm, the replacement, again.
    assert record("torch.layer_norm")["fallbacks"] == {"tensor subclass": 2}


def test_gems_provider_on_cpu_tensors_falls_back_to_the_original(monkeypatch):
    """With FlagGems installed, CPU tensors go to the original, counted (FlagGems is not even imported)."""
    monkeypatch.syspath_prepend(str(FAKE_GEMS))
    x, weight = torch.randn(2, 8), torch.randn(4, 8)
    q = torch.randn(1, 2, 3, 16)
    expected = (F.linear(x, weight), F.layer_norm(x, (8,)), F.scaled_dot_product_attention(q, q, q))
    fl_patch.apply(include=list(TARGETS), kernels="gems")
    for target in TARGETS:
        assert record(target)["provider"] == "flag_gems"
    assert torch.equal(F.linear(x, weight), expected[0])
    assert torch.equal(F.layer_norm(x, (8,)), expected[1])
    assert torch.equal(F.scaled_dot_product_attention(q, q, q), expected[2])
    for target in TARGETS:
        assert record(target)["fallbacks"] == {"cpu tensor": 1}


def test_torch_compile_traces_the_layer_norm_replacement():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.LayerNorm(8))
    x = torch.randn(2, 8)
    expected = model(x)
    apply_reference(*TARGETS, "torch.layer_norm.dynamo")
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), expected, **TOLERANCE[torch.float32])
    # "skipped" when dynamo's rule map was built while an earlier replacement was installed: the new
    # one is then not in it, and is traced anyway.
    assert record("torch.layer_norm.dynamo")["state"] in ("patched", "skipped")
    # Run as an opaque graph node, the replacement would have met fake tensors and fallen back.
    for target in TARGETS:
        assert record(target)["fallbacks"] == {}
    from torch._dynamo import trace_rules

    replacement = F.layer_norm
    fl_patch.revert()
    assert trace_rules.get_torch_obj_rule_map().get(replacement) is not trace_rules.UserFunctionVariable


def test_status_warns_about_a_module_that_bound_linear_early(tmp_path):
    (tmp_path / "early_user.py").write_text("from torch.nn.functional import linear\n")
    code = textwrap.dedent(
        """
        import early_user  # binds F.linear before fl_patch patches it
        from fl_patch import cli
        cli.main(["status"])
        """
    )
    env = {"FL_PATCH_KERNELS": "reference", "FL_PATCH_INCLUDE": "torch.linear", "FL_PATCH_AUTO": "0"}
    result = run_python(code, env=env, bootstrap=False, extra_path=[tmp_path])
    assert result.returncode == 0, result.stderr
    assert ("warning: early_user.linear still refers to the original torch.nn.functional.linear"
            in result.stdout), result.stdout
