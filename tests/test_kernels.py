"""CPU tests of fl_patch.kernels: every reference against the torch / HF original it stands in for, every
``unsupported_*`` routing decision, and every gems path against the reference through the CPU stand-in
for FlagGems in ``tests/fake_flag_gems`` (same signatures and quirks as FlagGems 5.0.2)."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch
import torch.nn.functional as F

from conftest import FAKE_GEMS_DIR, REPO
from fl_patch.kernels import attention, gems, layer_norm, linear, rms_norm, rope, swiglu


# Tolerances of FlagGems' own tests (flag_gems.testing): rtol per dtype, atol scaled by the reduced size.
RTOL = {torch.float32: 1.3e-6, torch.float16: 1e-3, torch.bfloat16: 0.016}


def assert_close(actual, expected, reduce_dim=1, rtol=None):
    """``torch.testing.assert_close`` with FlagGems' tolerances for expected's dtype; dtype must match."""
    assert actual.dtype == expected.dtype
    dtype = expected.dtype
    rtol = RTOL[dtype] if rtol is None else rtol
    atol = 1e-4 * reduce_dim if dtype == torch.float32 else max(1e-4 * reduce_dim, rtol)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


@pytest.fixture
def no_gems(monkeypatch):
    """A path where ``flag_gems`` can't be found, and a fresh loader."""
    sys.modules.pop("flag_gems", None)
    monkeypatch.setattr(gems, "MODULE_NAME", "flag_gems_absent_for_tests")
    gems._reset_for_tests()
    yield
    gems._reset_for_tests()


@pytest.fixture
def accelerator(monkeypatch):
    """Make CPU tensors pass the device check, so the gems checks after it can be exercised."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)


def bf16(*shape, scale=1.0):
    return (torch.randn(*shape) * scale).to(torch.bfloat16)


# --------------------------------------------------------------------------------------------- gems loader


def test_import_of_gems_module_imports_neither_torch_nor_flag_gems():
    code = (
        "import sys, fl_patch.kernels.gems\n"
        "print(sorted(m for m in ('torch', 'flag_gems') if m in sys.modules))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_PATCH", "PYTHONPATH"))}
    env.update(FL_PATCH_AUTO="0", PYTHONPATH=os.pathsep.join([str(REPO), str(FAKE_GEMS_DIR)]))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_installed_finds_the_package_without_importing_it(monkeypatch):
    monkeypatch.syspath_prepend(str(FAKE_GEMS_DIR))
    sys.modules.pop("flag_gems", None)
    assert gems.installed() is None
    assert "flag_gems" not in sys.modules


def test_load_without_flag_gems_raises_a_clear_cached_reason(no_gems, monkeypatch):
    assert gems.installed() == "flag_gems not installed"
    with pytest.raises(gems.GemsUnavailable, match="^flag_gems not installed$"):
        gems.load()
    imports = []
    monkeypatch.setattr(gems.importlib, "import_module", lambda name: imports.append(name))
    monkeypatch.setattr(gems, "MODULE_NAME", "flag_gems")
    monkeypatch.syspath_prepend(str(FAKE_GEMS_DIR))
    with pytest.raises(gems.GemsUnavailable, match="^flag_gems not installed$"):
        gems.load()
    assert imports == []
    assert gems.info()["load_error"] == "flag_gems not installed"


def test_failing_import_gives_type_and_first_line_of_the_error(tmp_path, monkeypatch):
    package = tmp_path / "flag_gems"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('No device were detected\\nmore detail')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flag_gems", None)
    gems._reset_for_tests()
    try:
        with pytest.raises(gems.GemsUnavailable) as raised:
            gems.load()
        assert str(raised.value) == "import flag_gems failed: RuntimeError: No device were detected"
        with pytest.raises(gems.GemsUnavailable):
            gems.load()
    finally:
        gems._reset_for_tests()
        sys.modules.pop("flag_gems", None)


def test_load_imports_once_across_threads(fake_gems):
    gems._reset_for_tests()
    sys.modules.pop("flag_gems", None)
    loaded = []
    threads = [threading.Thread(target=lambda: loaded.append(gems.load())) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loaded) == 8 and all(module is loaded[0] for module in loaded)


def test_info_reports_the_loaded_module(fake_gems):
    info = gems.info()
    assert info["loaded"] and info["load_error"] is None and info["install_problem"] is None
    assert info["version"] == "5.0.2-fake"
    assert (info["vendor"], info["device"]) == ("fake", "cpu")


def test_shared_tensor_checks():
    assert gems.tensor_reason(torch.zeros(2)) == "cpu tensor"
    assert gems.tensor_reason(torch.zeros(2, device="meta")) == "meta tensor"
    assert gems.dtype_reason(torch.float32) == "dtype float32"
    assert gems.dtype_reason(torch.bfloat16) is None and gems.dtype_reason(torch.float16) is None


def test_shared_tensor_checks_past_the_device(accelerator):
    assert gems.tensor_reason(torch.zeros(2)) == "dtype float32"
    assert gems.tensor_reason(torch.zeros(0, dtype=torch.bfloat16)) == "empty tensor"
    assert gems.tensor_reason(torch.zeros(2, dtype=torch.bfloat16)) is None


# ----------------------------------------------------------------------------------------------- RMSNorm


@pytest.mark.parametrize("x_dtype, w_dtype", [
    (torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
])
def test_reference_hf_rms_norm_is_bitwise_llama(x_dtype, w_dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(64, eps=1e-6).to(w_dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64))
        x = (torch.randn(3, 5, 64) * 4).to(x_dtype)
        expected = norm(x)
        actual = rms_norm.reference_hf(x, norm.weight, norm.variance_epsilon)
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gemma_rms_norm_is_bitwise_gemma(dtype):
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm

    norm = GemmaRMSNorm(64, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64) * 0.1)
        x = (torch.randn(3, 5, 64) * 4).to(dtype)
        assert torch.equal(rms_norm.reference_gemma(x, norm.weight, norm.eps), norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape, normalized_shape", [((4, 7, 64), (64,)), ((4, 7, 64), [7, 64]), ((5, 32), 32)])
@pytest.mark.parametrize("eps", [None, 1e-6])
def test_reference_torch_rms_norm_matches_f_rms_norm(dtype, shape, normalized_shape, eps):
    x = (torch.randn(*shape) * 3).to(dtype)
    weight_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    weight = torch.randn(*weight_shape).to(dtype)
    for w in (weight, None):
        expected = F.rms_norm(x, weight_shape, w, eps)
        assert torch.equal(rms_norm.reference_torch(x, normalized_shape, w, eps), expected)


def test_unsupported_rms_norm_routes():
    x, w = bf16(4, 64), bf16(64)
    for check in (rms_norm.unsupported_hf, rms_norm.unsupported_gemma):
        assert check("reference", x, w) is None
        assert check("reference", x.float(), w.float()) is None
        assert check("gems", x, w) == "cpu tensor"
        assert check("gems", x.to("meta"), w.to("meta")) == "meta tensor"
        assert check("reference", x, bf16(32)) == "weight shape"
        assert check("reference", x, bf16(1, 64)) == "weight shape"
    assert rms_norm.unsupported_torch("reference", x, (64,), w) is None
    assert rms_norm.unsupported_torch("reference", x, 64, w) is None
    assert rms_norm.unsupported_torch("reference", x, [64], w) is None
    assert rms_norm.unsupported_torch("reference", x, (64,), None) == "no weight"
    assert rms_norm.unsupported_torch("reference", x, (32,), bf16(32)) == "shape mismatch"
    assert rms_norm.unsupported_torch("reference", x, (64,), bf16(32)) == "shape mismatch"
    assert rms_norm.unsupported_torch("gems", x, (64,), w) == "cpu tensor"


def test_unsupported_rms_norm_gems_past_the_device(accelerator):
    x, w = bf16(4, 64), bf16(64)
    assert rms_norm.unsupported_hf("gems", x, w) is None
    assert rms_norm.unsupported_hf("gems", x, w.float()) is None
    assert rms_norm.unsupported_hf("gems", x.float(), w.float()) == "dtype float32"
    assert rms_norm.unsupported_hf("gems", x.half(), w) is None
    assert rms_norm.unsupported_hf("gems", bf16(0, 64), w) == "empty tensor"
    assert rms_norm.unsupported_torch("gems", x.float(), (64,), w) == "dtype float32"


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float16), (torch.float32, torch.float32)])
def test_gems_hf_rms_norm_matches_reference(fake_gems, x_dtype, w_dtype):
    x = (torch.randn(3, 5, 64) * 4).to(x_dtype)
    w = torch.randn(64).to(w_dtype)
    expected = rms_norm.reference_hf(x, w, 1e-6)
    assert_close(rms_norm.gems_hf(x, w, 1e-6), expected, rtol=RTOL[x_dtype] if w_dtype != x_dtype else None)
    assert fake_gems.calls == [("rms_norm",)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_fp32_rms_norm_is_bitwise_nanochat_and_close_to_gemma4(dtype):
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm
    from transformers.models.nanochat.modeling_nanochat import NanoChatRMSNorm

    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm.reference_fp32(x, None, 1e-6), NanoChatRMSNorm(eps=1e-6)(x))
        for with_scale in (True, False):
            norm = Gemma4RMSNorm(64, eps=1e-6, with_scale=with_scale).to(dtype)
            weight = None
            if with_scale:
                norm.weight.copy_(torch.randn(64))
                weight = norm.weight
            # Gemma 4 takes pow(mean, -0.5) where this takes rsqrt: the same up to one fp32 rounding
            assert_close(rms_norm.reference_fp32(x, weight, 1e-6), norm(x), reduce_dim=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [True, False])
def test_gems_and_native_fp32_rms_norm_match_reference(fake_gems, dtype, weighted):
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    w = torch.randn(64).to(dtype) if weighted else None
    expected = rms_norm.reference_fp32(x, w, 1e-6)
    assert_close(rms_norm.gems_fp32(x, w, 1e-6), expected)
    assert_close(rms_norm.native_fp32(x, w, 1e-6), expected)
    [(name,)] = fake_gems.calls
    assert name == "rms_norm"
    if not weighted:  # FlagGems requires a weight: ones, made once per size, dtype and device
        assert rms_norm._ones_like_last_dim(x) is rms_norm._ones_like_last_dim(x)


def test_native_fp32_rms_norm_with_a_weight_of_another_dtype_is_the_reference():
    x, w = bf16(3, 64), torch.randn(64)
    assert torch.equal(rms_norm.native_fp32(x, w, 1e-6), rms_norm.reference_fp32(x, w, 1e-6))


def test_unsupported_fp32_rms_norm_routes(accelerator):
    x = bf16(4, 64)
    assert rms_norm.unsupported_fp32("gems", x, None) is None
    assert rms_norm.unsupported_fp32("gems", x, bf16(64)) is None
    assert rms_norm.unsupported_fp32("gems", x.float(), None) == "dtype float32"
    assert rms_norm.unsupported_fp32("reference", x, bf16(32)) == "weight shape"
    assert rms_norm.unsupported_fp32("reference", torch.tensor(1.0), None) == "weight shape"
    assert rms_norm.unsupported_fp32("reference", x.float(), None) is None


def qwen3_next_gated_norm(dtype, size=64):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    norm = Qwen3NextRMSNormGated(size, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(size))
    return norm


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_gated_rms_norm_is_bitwise_qwen3_next(dtype):
    norm = qwen3_next_gated_norm(dtype)
    x, gate = (torch.randn(3, 5, 64) * 4).to(dtype), (torch.randn(3, 5, 64) * 2).to(dtype)
    with torch.no_grad():
        assert torch.equal(rms_norm.reference_gated(x, gate, norm.weight, 1e-6), norm(x, gate))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gems_and_native_gated_rms_norm_match_reference(fake_gems, dtype):
    x, gate, w = (torch.randn(3, 5, 64) * 4).to(dtype), (torch.randn(3, 5, 64) * 2).to(dtype), torch.randn(64).to(dtype)
    expected = rms_norm.reference_gated(x, gate, w, 1e-6)
    rtol = 2 * RTOL[dtype]  # HF rounds the weighted norm and then the product; these round each once: 1 ulp apart
    assert_close(rms_norm.gems_gated(x, gate, w, 1e-6), expected, rtol=rtol)
    assert fake_gems.calls == [("rms_norm",), ("silu_and_mul",)]
    assert_close(rms_norm.native_gated(x, gate, w, 1e-6), expected, rtol=rtol)


def test_native_rms_norms_take_hf_s_route_for_inputs_the_fused_op_cant():
    """Small calls reach the native paths before any shape check: what the fused op would refuse or compute
    differently (a weight of another dtype or shape, a broadcast gate) runs HF's exact math instead."""
    x = bf16(3, 64)
    for weight in (torch.randn(64), bf16(1)):
        assert torch.equal(rms_norm.native_hf(x, weight, 1e-6), rms_norm.reference_hf(x, weight, 1e-6))
        assert torch.equal(rms_norm.native_fp32(x, weight, 1e-6), rms_norm.reference_fp32(x, weight, 1e-6))
        gate = bf16(3, 64)
        assert torch.equal(rms_norm.native_gated(x, gate, weight, 1e-6),
                           rms_norm.reference_gated(x, gate, weight, 1e-6))
    gate, weight = bf16(1, 64), bf16(64)  # a gate broadcast over the rows, as HF's product allows
    assert torch.equal(rms_norm.native_gated(x, gate, weight, 1e-6), rms_norm.reference_gated(x, gate, weight, 1e-6))


def test_unsupported_gated_rms_norm_routes(accelerator):
    x, gate, w = bf16(4, 64), bf16(4, 64), bf16(64)
    assert rms_norm.unsupported_gated("gems", x, gate, w) is None
    assert rms_norm.unsupported_gated("gems", x, gate.float(), w) == "mixed dtypes"
    assert rms_norm.unsupported_gated("gems", x, gate, w.float()) == "mixed dtypes"
    assert rms_norm.unsupported_gated("reference", x, gate, w.float()) is None
    assert rms_norm.unsupported_gated("reference", x, bf16(1, 64), w) == "gate shape"
    assert rms_norm.unsupported_gated("reference", x, gate, bf16(32)) == "weight shape"
    assert rms_norm.unsupported_gated("gems", x.float(), gate, w) == "dtype float32"


@pytest.mark.parametrize("x_dtype, w_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                              (torch.float32, torch.float32), (torch.bfloat16, torch.float32)])
def test_native_hf_rms_norm_matches_reference_in_hf_dtype(x_dtype, w_dtype):
    x = (torch.randn(3, 5, 64) * 4).to(x_dtype)
    w = torch.randn(64).to(w_dtype)
    expected = rms_norm.reference_hf(x, w, 1e-6)
    actual = rms_norm.native_hf(x, w, 1e-6)
    if w_dtype != x_dtype:  # HF's promotion: no fused op takes it, so it is HF's body exactly
        assert torch.equal(actual, expected)
    else:
        assert_close(actual, expected)


def test_native_hf_rms_norm_is_torch_fused_op_not_f_rms_norm(monkeypatch):
    """One aten call, never F.rms_norm (which fl_patch's torch row may have replaced)."""
    calls = []
    real = torch.rms_norm
    monkeypatch.setattr(torch, "rms_norm", lambda *args: calls.append(args[1:]) or real(*args))
    monkeypatch.setattr(F, "rms_norm", lambda *args, **kwargs: pytest.fail("F.rms_norm was called"))
    rms_norm.native_hf(bf16(2, 64), bf16(64), 1e-5)
    assert len(calls) == 1 and calls[0][0] == (64,) and calls[0][2] == 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gems_gemma_rms_norm_matches_reference_and_caches_one_plus_weight(fake_gems, dtype):
    x = (torch.randn(3, 5, 64) * 4).to(dtype)
    w = (torch.randn(64) * 0.1).to(dtype)
    assert_close(rms_norm.gems_gemma(x, w, 1e-6), rms_norm.reference_gemma(x, w, 1e-6))
    first = rms_norm._gemma_scale(w)
    assert rms_norm._gemma_scale(w) is first
    w.add_(1.0)
    assert rms_norm._gemma_scale(w) is not first
    assert_close(rms_norm.gems_gemma(x, w, 1e-6), rms_norm.reference_gemma(x, w, 1e-6))


def test_gemma_scale_is_not_cached_when_autograd_needs_it(fake_gems):
    w = torch.nn.Parameter(torch.randn(64) * 0.1)
    scale = rms_norm._gemma_scale(w)
    assert scale.requires_grad and rms_norm._gemma_scale(w) is not scale
    with torch.no_grad():
        assert rms_norm._gemma_scale(w) is rms_norm._gemma_scale(w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("normalized_shape", [(64,), [7, 64], 64])
def test_gems_torch_rms_norm_matches_reference(fake_gems, dtype, normalized_shape):
    x = (torch.randn(4, 7, 64) * 3).to(dtype)
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    w = torch.randn(*shape).to(dtype)
    for eps in (None, 1e-6):
        expected = rms_norm.reference_torch(x, normalized_shape, w, eps)
        assert_close(rms_norm.gems_torch(x, normalized_shape, w, eps), expected)


# --------------------------------------------------------------------------------------------------- rope


def hf_cos_sin(batch_positions, head_dim, dtype, rotary_dim=None):
    """cos, sin ``(B, S, rotary_dim)`` exactly as HF's LlamaRotaryEmbedding builds them."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary_dim = rotary_dim or head_dim
    config = LlamaConfig(hidden_size=rotary_dim * 4, num_attention_heads=4, head_dim=rotary_dim,
                         max_position_embeddings=8192)
    embedding = LlamaRotaryEmbedding(config)
    dummy = torch.zeros(1, dtype=dtype)
    return embedding(dummy, batch_positions)


def hf_qk(batch, q_heads, kv_heads, seq, head_dim, dtype):
    """q, k as HF attention produces them: ``proj(x).view(B, S, H, D).transpose(1, 2)``."""
    q = torch.randn(batch, seq, q_heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, seq, kv_heads, head_dim).to(dtype).transpose(1, 2)
    return q, k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("unsqueeze_dim", [1, 2])
def test_reference_rope_is_bitwise_llama(dtype, unsqueeze_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = hf_qk(2, 4, 2, 6, 16, dtype)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    cos, sin = hf_cos_sin(torch.arange(6).expand(2, 6), 16, dtype)
    expected = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
    actual = rope.reference_hf(q, k, cos, sin, unsqueeze_dim)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_rope_partial_rotary_is_bitwise_phi3(dtype):
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    q, k = hf_qk(2, 4, 2, 6, 32, dtype)
    cos, sin = hf_cos_sin(torch.arange(6)[None], 32, dtype, rotary_dim=16)
    expected = apply_rotary_pos_emb(q, k, cos, sin)
    assert all(torch.equal(a, e) for a, e in zip(rope.reference_hf(q, k, cos, sin), expected, strict=True))


def test_unsupported_rope_routes():
    q, k = hf_qk(2, 4, 2, 6, 16, torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(6)[None], 16, torch.bfloat16)
    assert rope.unsupported_hf("reference", q, k, cos, sin, 1) is None
    assert rope.unsupported_hf("reference", q.float(), k.float(), cos.float(), sin.float(), 1) is None
    assert rope.unsupported_hf("reference", q.transpose(1, 2), k.transpose(1, 2), cos, sin, 2) is None
    assert rope.unsupported_hf("gems", q, k, cos, sin, 1) == "cpu tensor"
    assert rope.unsupported_hf("reference", q, k, cos, sin, 0) == "unsqueeze dim"
    assert rope.unsupported_hf("reference", q[0], k[0], cos, sin, 1) == "shape"
    assert rope.unsupported_hf("reference", q, k, cos[0], sin[0], 1) == "shape"
    assert rope.unsupported_hf("reference", q, k, cos[:, :5], sin[:, :5], 1) == "cos shape"
    assert rope.unsupported_hf("reference", q, k, cos.expand(3, 6, 16), sin.expand(3, 6, 16), 1) == "cos shape"
    assert rope.unsupported_hf("reference", q, k, cos, sin[..., :8], 1) == "cos shape"
    assert rope.unsupported_hf("reference", q, k[:1], cos, sin, 1) == "cos shape"
    assert rope.unsupported_hf("reference", q, k, cos[..., :7], sin[..., :7], 1) == "rotary dim"
    wide_cos, wide_sin = hf_cos_sin(torch.arange(6)[None], 32, torch.bfloat16)
    assert rope.unsupported_hf("reference", q, k, wide_cos, wide_sin, 1) == "rotary dim"


def test_unsupported_rope_gems_past_the_device(accelerator):
    q, k = hf_qk(2, 4, 2, 6, 16, torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(6)[None], 16, torch.bfloat16)
    assert rope.unsupported_hf("gems", q, k, cos, sin, 1) is None
    assert rope.unsupported_hf("gems", q.float(), k.float(), cos.float(), sin.float(), 1) == "dtype float32"
    assert rope.unsupported_hf("gems", q, k, cos.float(), sin.float(), 1) == "mixed dtypes"
    assert rope.unsupported_hf("gems", q.requires_grad_(), k, cos, sin, 1) == "requires grad"
    with torch.no_grad():
        assert rope.unsupported_hf("gems", q, k, cos, sin, 1) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["shared positions", "per-row positions", "one row", "unsqueeze 2",
                                  "contiguous bhsd", "partial rotary", "decode", "per-row contiguous bhsd",
                                  "per-row unsqueeze 2", "per-row partial rotary"])
def test_gems_rope_matches_reference(fake_gems, dtype, case):
    batch, seq, head_dim, rotary_dim = 3, 7, 32, None
    positions = torch.arange(seq)[None]
    if case.startswith("per-row"):  # cos per batch row: the batch folded into one sequence
        positions = torch.stack([torch.arange(seq) + offset for offset in (0, 5, 11)])
        case = case.removeprefix("per-row ")
    if case == "one row":
        batch = 1
    if case == "decode":
        seq, positions = 1, torch.tensor([[9], [4], [0]])
    if case == "partial rotary":
        rotary_dim = 16
    q, k = hf_qk(batch, 4, 2, seq, head_dim, dtype)
    cos, sin = hf_cos_sin(positions, head_dim, dtype, rotary_dim)
    unsqueeze_dim = 1
    if case == "unsqueeze 2":
        q, k, unsqueeze_dim = q.transpose(1, 2), k.transpose(1, 2), 2
    if case == "contiguous bhsd":
        q, k = q.contiguous(), k.contiguous()
    assert rope.unsupported_hf("reference", q, k, cos, sin, unsqueeze_dim) is None
    expected = rope.reference_hf(q, k, cos, sin, unsqueeze_dim)
    actual = rope.gems_hf(q, k, cos, sin, unsqueeze_dim)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape
        assert_close(a, e, rtol=1e-5 if dtype == torch.float32 else None)


def test_gems_rope_table_length_is_bucketed_and_cached(fake_gems, monkeypatch):
    """The table row count (a compile-time constant of the real kernel) is the same for every sequence
    length up to 4096, and the padded table is built once per cos/sin pair."""
    builds = []
    build = rope._padded_tables
    monkeypatch.setattr(rope, "_padded_tables", lambda *tables: builds.append(1) or build(*tables))
    for seq in (1, 5, 17, 300, 4096, 4097):
        q, k = hf_qk(2, 4, 2, seq, 16, torch.bfloat16)
        cos, sin = hf_cos_sin(torch.arange(seq)[None], 16, torch.bfloat16)
        for _ in range(3):  # three layers of one forward
            rope.gems_hf(q, k, cos, sin)
    table_rows = [call[1] for call in fake_gems.calls]
    assert table_rows == [4096] * 15 + [8192] * 3
    assert len(builds) == 6


def test_gems_rope_table_is_rebuilt_when_cos_changes_in_place(fake_gems):
    q, k = hf_qk(2, 4, 2, 5, 16, torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(5)[None], 16, torch.bfloat16)
    rope.gems_hf(q, k, cos, sin)
    cos.mul_(0.5)
    expected = rope.reference_hf(q, k, cos, sin)
    for a, e in zip(rope.gems_hf(q, k, cos, sin), expected, strict=True):
        assert_close(a, e)


def lightx2v_freqs(seq, head_dim):
    """Complex ``(S, 1, D/2)`` frequencies as Wan / LightX2V build them (``torch.polar``)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_interleaved_rope_rotates_channel_pairs(dtype):
    seq, heads, head_dim = 6, 3, 16
    q, k = torch.randn(seq, heads, head_dim).to(dtype), torch.randn(seq, heads, head_dim).to(dtype)
    freqs = lightx2v_freqs(seq, head_dim)
    cos, sin = freqs.real.float(), freqs.imag.float()
    for x, actual in zip((q, k), rope.reference_interleaved(q, k, freqs), strict=True):
        even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
        expected = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(2).to(dtype)
        assert_close(actual, expected, rtol=1e-6 if dtype == torch.float32 else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gems_interleaved_rope_matches_reference(fake_gems, dtype):
    seq, heads, head_dim = 9, 3, 16
    q, k = torch.randn(seq, heads, head_dim).to(dtype), torch.randn(seq, heads, head_dim).to(dtype)
    freqs = lightx2v_freqs(seq, head_dim)
    for a, e in zip(rope.gems_interleaved(q, k, freqs), rope.reference_interleaved(q, k, freqs), strict=True):
        assert a.shape == e.shape
        assert_close(a, e, rtol=1e-5 if dtype == torch.float32 else None)
    rope.gems_interleaved(q, k, freqs)
    assert [call[1] for call in fake_gems.calls] == [4096, 4096]


def test_unsupported_interleaved_rope_routes(accelerator):
    q, k, freqs = bf16(6, 3, 16), bf16(6, 3, 16), lightx2v_freqs(6, 16)
    assert rope.unsupported_interleaved("reference", q, k, freqs) is None
    assert rope.unsupported_interleaved("gems", q, k, freqs) is None
    assert rope.unsupported_interleaved("reference", q[None], k, freqs) == "shape"
    assert rope.unsupported_interleaved("reference", q, k, freqs.real) == "freqs dtype"
    assert rope.unsupported_interleaved("reference", q, k, freqs[:5]) == "freqs shape"
    assert rope.unsupported_interleaved("reference", q, k, lightx2v_freqs(6, 8)) == "freqs shape"
    assert rope.unsupported_interleaved("gems", q.float(), k.float(), freqs) == "dtype float32"
    assert rope.unsupported_interleaved("gems", q, k.float(), freqs) == "mixed dtypes"


def test_unsupported_interleaved_rope_gems_on_cpu():
    q, k, freqs = bf16(6, 3, 16), bf16(6, 3, 16), lightx2v_freqs(6, 16)
    assert rope.unsupported_interleaved("gems", q, k, freqs) == "cpu tensor"


# ---------------------------------------------------------------------------------------------- attention


def qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype=torch.float32):
    q = torch.randn(batch, q_len, q_heads, head_dim).to(dtype).transpose(1, 2)
    k = torch.randn(batch, kv_len, kv_heads, head_dim).to(dtype).transpose(1, 2)
    v = torch.randn(batch, kv_len, kv_heads, head_dim).to(dtype).transpose(1, 2)
    return q, k, v


def padding_mask(batch, q_len, kv_len, shape):
    """A bool keep-mask: left padding per batch row plus causal, in one of several broadcast shapes."""
    keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
    if shape == "2d":
        return keep
    pads = torch.tensor([0, 2, 3, 1, 4, 0])[:batch]
    key_ok = torch.arange(kv_len)[None, :] >= pads[:, None]
    if shape == "b11k":
        return key_ok[:, None, None, :]
    return (keep[None] & key_ok[:, None, :])[:, None]


SDPA_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal q<kv": dict(is_causal=True, q_len=3),
    "causal q>kv": dict(is_causal=True, kv_len=4),
    "gqa": dict(kv_heads=2, enable_gqa=True),
    "gqa causal": dict(kv_heads=2, enable_gqa=True, is_causal=True),
    "scale": dict(scale=0.3),
    "cross": dict(q_len=5, kv_len=9),
    "decode": dict(q_len=1, kv_len=9, kv_heads=2, enable_gqa=True),
    "decode mha": dict(q_len=1, kv_len=9),
    "bool mask 2d": dict(mask="2d"),
    "bool mask b1qk": dict(mask="b1qk"),
    "bool mask b11k": dict(mask="b11k", q_len=1),
    "float mask": dict(mask="float"),
    "float mask min": dict(mask="float min"),
    "gqa mask": dict(mask="b1qk", kv_heads=2, enable_gqa=True),
    "head dim 16": dict(head_dim=16),
}


def sdpa_case(name, dtype=torch.float32):
    case = dict(SDPA_CASES[name])
    batch, q_heads = 3, 4
    q_len, kv_len = case.pop("q_len", 7), case.pop("kv_len", 7)
    q, k, v = qkv(batch, q_heads, case.pop("kv_heads", q_heads), q_len, kv_len, case.pop("head_dim", 32), dtype)
    mask = case.pop("mask", None)
    if mask in ("2d", "b1qk", "b11k"):
        case["attn_mask"] = padding_mask(batch, q_len, kv_len, mask)
    elif mask == "float":
        bias = torch.randn(batch, 1, q_len, kv_len)
        bias[1, :, :, :2] = float("-inf")
        case["attn_mask"] = bias.to(dtype)
    elif mask == "float min":
        bias = torch.zeros(q_len, kv_len, dtype=dtype)
        case["attn_mask"] = bias.masked_fill(~padding_mask(batch, q_len, kv_len, "2d"), torch.finfo(dtype).min)
    return (q, k, v), case


def attended_rows(case, q_len, kv_len):
    """Bool ``(..., Sq, 1)``: query rows whose mask keeps at least one key (torch gives zeros elsewhere)."""
    mask = case.get("attn_mask")
    if mask is None:
        return torch.ones(q_len, 1, dtype=torch.bool)
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return keep.expand(*keep.shape[:-2], q_len, kv_len).any(dim=-1, keepdim=True)


@pytest.mark.parametrize("name", list(SDPA_CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_sdpa_matches_torch(name, dtype):
    (q, k, v), case = sdpa_case(name, dtype)
    expected = F.scaled_dot_product_attention(q, k, v, **case)
    assert_close(attention.reference_sdpa(q, k, v, **case), expected, rtol=1e-5 if dtype == torch.float32 else None)


def test_reference_sdpa_is_not_a_call_to_torch(monkeypatch):
    (q, k, v), case = sdpa_case("bool mask b1qk")
    expected = F.scaled_dot_product_attention(q, k, v, **case)

    def refuse(*args, **kwargs):
        raise AssertionError("reference_sdpa called F.scaled_dot_product_attention")

    monkeypatch.setattr(F, "scaled_dot_product_attention", refuse)
    monkeypatch.setattr(torch, "_scaled_dot_product_attention_math", refuse, raising=False)
    assert_close(attention.reference_sdpa(q, k, v, **case), expected, rtol=1e-5)


def test_reference_sdpa_fully_masked_rows_and_causal_with_mask_follow_torch():
    q, k, v = qkv(2, 2, 2, 4, 5, 32)
    mask = torch.rand(2, 1, 4, 5) > 0.4
    mask[:, :, 1] = False
    causal = torch.ones(4, 5, dtype=torch.bool).tril()  # torch's is_causal: top-left aligned
    # torch 2.14 refuses a mask together with is_causal (2.13's CPU kernel took it): compare the pair with the
    # one mask it means. fl_patch never sends that pair to a kernel (unsupported_sdpa: "causal with mask").
    for kwargs, same_as in ((dict(attn_mask=mask), mask), (dict(attn_mask=mask, is_causal=True), mask & causal)):
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=same_as)
        assert_close(attention.reference_sdpa(q, k, v, **kwargs), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="dropout"):
        attention.reference_sdpa(q, k, v, dropout_p=0.1)


@pytest.mark.parametrize("name", list(SDPA_CASES))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gems_sdpa_matches_reference(fake_gems, name, dtype):
    (q, k, v), case = sdpa_case(name, dtype)
    args = (case.get("attn_mask"), 0.0, case.get("is_causal", False), case.get("scale"), case.get("enable_gqa", False))
    assert attention.unsupported_sdpa("reference", q, k, v, *args) is None
    expected = attention.reference_sdpa(q, k, v, **case)
    actual = attention.gems_sdpa(q, k, v, **case)
    assert actual.shape == expected.shape and torch.isfinite(actual).all()
    rows = attended_rows(case, q.shape[2], k.shape[2])
    assert_close(torch.where(rows, actual, 0), torch.where(rows, expected, 0), reduce_dim=q.shape[-1])
    flash = "attn_mask" not in case and (not case.get("is_causal") or q.shape[2] == k.shape[2]) and q.shape[-1] != 16
    assert fake_gems.calls[0][0] == ("flash_attention_forward" if flash else "scaled_dot_product_attention")
    if flash:
        split_kv_allowed = q.shape[2] == 1 and q.shape[1] > k.shape[1]
        assert fake_gems.calls[0][2] == (not split_kv_allowed)


def test_untranslated_masks_are_wrong_on_flag_gems_5_0_2(fake_gems):
    """Why gems_sdpa translates masks: the raw kernel reads a bool mask inverted and weights a float mask
    by ln 2, and a mask that isn't (B, Hq, Sq, Skv) is read out of bounds."""
    (q, k, v), case = sdpa_case("bool mask b1qk", torch.bfloat16)
    mask = case["attn_mask"]
    expected = attention.reference_sdpa(q, k, v, attn_mask=mask)
    with pytest.raises(AssertionError, match="out of bounds"):
        fake_gems.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    raw = fake_gems.scaled_dot_product_attention(q, k, v, attn_mask=mask.expand(3, 4, 7, 7))
    assert (raw.float() - expected.float()).abs().max() > 0.1
    bias = torch.randn(3, 4, 7, 7, dtype=torch.bfloat16) * 3
    raw = fake_gems.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    assert (raw.float() - attention.reference_sdpa(q, k, v, attn_mask=bias).float()).abs().max() > 0.05


def test_gems_sdpa_fully_masked_rows_stay_finite(fake_gems):
    q, k, v = qkv(2, 2, 2, 4, 5, 32, torch.bfloat16)
    mask = torch.rand(2, 1, 4, 5) > 0.4
    mask[:, :, 1] = False
    out = attention.gems_sdpa(q, k, v, attn_mask=mask)
    assert torch.isfinite(out).all()
    float_mask = torch.zeros(2, 1, 4, 5, dtype=torch.bfloat16).masked_fill(~mask, float("-inf"))
    assert torch.isfinite(attention.gems_sdpa(q, k, v, attn_mask=float_mask)).all()


def test_unsupported_sdpa_routes():
    q, k, v = qkv(2, 4, 2, 6, 6, 64, torch.bfloat16)
    mask = torch.ones(6, 6, dtype=torch.bool)

    def check(provider="reference", q=q, k=k, v=v, mask=None, dropout=0.0, causal=False, scale=None, gqa=True):
        return attention.unsupported_sdpa(provider, q, k, v, mask, dropout, causal, scale, gqa)

    assert check() is None
    assert check(mask=mask) is None
    assert check(mask=mask.float()) is None
    assert check(causal=True) is None
    assert check(q=q.float(), k=k.float(), v=v.float()) is None
    assert check("gems") == "cpu tensor"
    assert check(dropout=0.1) == "dropout"
    assert check(q=q[0]) == "not 4-d"
    assert check(v=v[..., :32]) == "value shape"
    assert check(k=k[:1], v=v[:1]) == "batch mismatch"
    assert check(k=k[..., :32], v=v[..., :32]) == "head dim mismatch"
    assert check(gqa=False) == "head count mismatch"
    q3, _, _ = qkv(2, 3, 2, 6, 6, 64, torch.bfloat16)
    assert check(q=q3) == "head count mismatch"
    assert check(mask=mask, causal=True) == "causal with mask"
    assert check(mask=mask.int()) == "mask dtype"
    assert check(scale=0.0) == "zero scale"
    for head_dim, unmasked, masked in ((16, None, None), (32, None, None), (80, "head dim 80", "head dim 80"),
                                       (96, None, "head dim 96"), (192, None, "head dim 192"),
                                       (256, None, None), (512, "head dim 512", "head dim 512")):
        qd, kd, vd = qkv(1, 2, 2, 4, 4, head_dim, torch.bfloat16)
        assert check(q=qd, k=kd, v=vd) == unmasked
        assert check(q=qd, k=kd, v=vd, mask=torch.ones(4, 4, dtype=torch.bool)) == masked
    q96, k96, v96 = qkv(1, 2, 2, 4, 6, 96, torch.bfloat16)
    assert check(q=q96, k=k96, v=v96, causal=True) == "head dim 96"


def test_unsupported_sdpa_gems_past_the_device(accelerator, monkeypatch):
    q, k, v = qkv(2, 4, 2, 6, 6, 64, torch.bfloat16)
    assert attention.unsupported_sdpa("gems", q, k, v, None, 0.0, True, None, True) is None
    assert attention.unsupported_sdpa("gems", q.float(), k.float(), v.float(), None, 0.0, True, None, True) == (
        "dtype float32"
    )
    assert attention.unsupported_sdpa("gems", q, k, v.half(), None, 0.0, True, None, True) == "mixed dtypes"
    assert attention.unsupported_sdpa("gems", q.requires_grad_(), k, v, None, 0.0, True, None, True) == "requires grad"
    mask = torch.zeros(6, 6, requires_grad=True)
    assert attention.unsupported_sdpa("gems", q.detach(), k, v, mask, 0.0, False, None, True) == "attn mask"
    monkeypatch.setattr(attention, "ROUTE_MASKS_TO_GEMS", True)
    assert attention.unsupported_sdpa("gems", q.detach(), k, v, mask, 0.0, False, None, True) == "requires grad"
    empty_q, empty_k, empty_v = qkv(0, 4, 2, 6, 6, 64, torch.bfloat16)
    assert attention.unsupported_sdpa("gems", empty_q, empty_k, empty_v, None, 0.0, False, None, True) == (
        "empty tensor"
    )


def varlen_inputs(q_lens, kv_lens, q_heads=4, kv_heads=2, head_dim=32, dtype=torch.float32):
    cu_q = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    cu_kv = torch.tensor([0, *torch.tensor(kv_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(cu_q[-1]), q_heads, head_dim).to(dtype)
    k = torch.randn(int(cu_kv[-1]), kv_heads, head_dim).to(dtype)
    v = torch.randn(int(cu_kv[-1]), kv_heads, head_dim).to(dtype)
    return q, k, v, cu_q, cu_kv, max(q_lens), max(kv_lens)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [([5, 3, 8], [5, 3, 8]), ([2, 4, 1], [6, 4, 9])])
def test_reference_varlen_matches_torch_per_sequence(causal, lens):
    q, k, v, cu_q, cu_kv, max_q, max_kv = varlen_inputs(*lens)
    out = attention.reference_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=causal, softmax_scale=0.2)
    for i in range(len(lens[0])):
        qs = q[cu_q[i]:cu_q[i + 1]].transpose(0, 1)[None]
        ks = k[cu_kv[i]:cu_kv[i + 1]].transpose(0, 1)[None]
        vs = v[cu_kv[i]:cu_kv[i + 1]].transpose(0, 1)[None]
        q_len, kv_len = qs.shape[2], ks.shape[2]
        bottom_right = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len) if causal else None
        expected = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=bottom_right, scale=0.2, enable_gqa=True)
        assert_close(out[cu_q[i]:cu_q[i + 1]], expected[0].transpose(0, 1), rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lens", [([5, 3, 8], [5, 3, 8]), ([2, 4, 1], [6, 4, 9]), ([1, 1], [7, 3])])
def test_gems_varlen_matches_reference(fake_gems, causal, lens):
    q, k, v, cu_q, cu_kv, max_q, max_kv = varlen_inputs(*lens, dtype=torch.bfloat16)
    cu_q, cu_kv = cu_q.long(), cu_kv.long()
    expected = attention.reference_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=causal)
    assert_close(attention.gems_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=causal), expected, reduce_dim=32)
    assert fake_gems.calls == [("flash_attn_varlen_func", causal)]


def test_unsupported_varlen_routes(accelerator):
    q, k, v, *_ = varlen_inputs([3, 4], [3, 4], dtype=torch.bfloat16)
    assert attention.unsupported_varlen("reference", q, k, v, False, None) is None
    assert attention.unsupported_varlen("gems", q, k, v, True, 0.1) is None
    assert attention.unsupported_varlen("reference", q[None], k, v, False, None) == "shape"
    assert attention.unsupported_varlen("reference", q, k, v[:, :1], False, None) == "shape"
    assert attention.unsupported_varlen("reference", q[..., :16], k, v, False, None) == "head dim mismatch"
    assert attention.unsupported_varlen("reference", q[:, :3], k, v, False, None) == "head count mismatch"
    q80, k80, v80, *_ = varlen_inputs([3], [3], head_dim=80, dtype=torch.bfloat16)
    assert attention.unsupported_varlen("reference", q80, k80, v80, False, None) == "head dim 80"
    assert attention.unsupported_varlen("gems", q.float(), k.float(), v.float(), False, None) == "dtype float32"
    assert attention.unsupported_varlen("gems", q, k, v.half(), False, None) == "mixed dtypes"
    assert attention.unsupported_varlen("gems", q.requires_grad_(), k, v, False, None) == "requires grad"


def test_unsupported_varlen_gems_on_cpu():
    q, k, v, *_ = varlen_inputs([3, 4], [3, 4], dtype=torch.bfloat16)
    assert attention.unsupported_varlen("gems", q, k, v, False, None) == "cpu tensor"


# ------------------------------------------------------------------------------------------------ linear


LINEAR_INPUTS = {
    "2-d": lambda: torch.randn(6, 64),
    "3-d": lambda: torch.randn(2, 5, 64),
    "4-d": lambda: torch.randn(2, 3, 4, 64),
    "1-d": lambda: torch.randn(64),
    "non-contiguous 3-d": lambda: torch.randn(5, 2, 64).transpose(0, 1),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(LINEAR_INPUTS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_linear_matches_f_linear(dtype, name, with_bias):
    x = LINEAR_INPUTS[name]().to(dtype)
    weight, bias = torch.randn(32, 64).to(dtype), torch.randn(32).to(dtype) if with_bias else None
    expected = F.linear(x, weight, bias)
    actual = linear.reference(x, weight, bias)
    if x.is_contiguous():
        assert torch.equal(actual, expected)
    else:  # torch multiplies the strided input itself (another BLAS call, and adds a bias after rounding the
        # product), where the reference flattens a copy: equal to rounding, not bitwise
        assert_close(actual, expected, reduce_dim=64)
    assert_close(linear.reference_in_out(x, weight.t().contiguous(), bias), expected, reduce_dim=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(LINEAR_INPUTS))
@pytest.mark.parametrize("with_bias", [False, True])
def test_gems_linear_matches_reference(fake_gems, dtype, name, with_bias):
    x = LINEAR_INPUTS[name]().to(dtype)
    weight, bias = torch.randn(32, 64).to(dtype), torch.randn(32).to(dtype) if with_bias else None
    expected = linear.reference(x, weight, bias)
    assert_close(linear.gems(x, weight, bias), expected, reduce_dim=64)
    assert_close(linear.gems_in_out(x, weight.t().contiguous(), bias), expected, reduce_dim=64)
    assert [call[0] for call in fake_gems.calls] == ["addmm" if with_bias else "mm"] * 2


def test_unsupported_linear_routes(accelerator):
    x, w, b = bf16(3, 64), bf16(32, 64), bf16(32)
    assert linear.unsupported("gems", x, w, b) is None
    assert linear.unsupported("gems", x, w, None) is None
    assert linear.unsupported("reference", x.float(), w.float(), None) is None
    assert linear.unsupported("reference", x, w.t(), b) == "weight shape"
    assert linear.unsupported("reference", x, w[0], b) == "weight shape"
    assert linear.unsupported("reference", torch.tensor(1.0), w, b) == "weight shape"
    assert linear.unsupported("reference", x, w, b[:4]) == "bias shape"
    assert linear.unsupported("reference", x, w, b[None]) == "bias shape"
    assert linear.unsupported("gems", x.float(), w.float(), None) == "dtype float32"
    assert linear.unsupported("gems", x, w.float(), None) == "mixed dtypes"
    assert linear.unsupported("gems", x, w, b.half()) == "mixed dtypes"
    assert linear.unsupported("gems", x, torch.nn.Parameter(w), None) == "requires grad"
    with torch.no_grad():
        assert linear.unsupported("gems", x, torch.nn.Parameter(w), None) is None
    assert linear.unsupported("gems", bf16(0, 64), w, None) == "empty tensor"
    wt = w.t().contiguous()
    assert linear.unsupported_in_out("gems", x, wt, b) is None
    assert linear.unsupported_in_out("reference", x, w, b) == "weight shape"
    assert linear.unsupported_in_out("reference", x, wt, b[:4]) == "bias shape"


def test_unsupported_linear_gems_on_cpu():
    assert linear.unsupported("gems", bf16(3, 64), bf16(32, 64), None) == "cpu tensor"
    assert linear.unsupported_in_out("gems", bf16(3, 64), bf16(64, 32), None) == "cpu tensor"


# ------------------------------------------------------------------------------------------------ swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_swiglu_reference_and_gems(fake_gems, dtype):
    gate, up = (torch.randn(4, 6, 48) * 3).to(dtype), torch.randn(4, 6, 48).to(dtype)
    assert torch.equal(swiglu.reference(gate, up), F.silu(gate) * up)
    assert_close(swiglu.gems(gate, up), swiglu.reference(gate, up))
    assert fake_gems.calls == [("silu_and_mul",)]


def test_unsupported_swiglu_routes(accelerator):
    gate, up = bf16(4, 48), bf16(4, 48)
    assert swiglu.unsupported("gems", gate, up) is None
    assert swiglu.unsupported("reference", gate.float(), up.float()) is None
    assert swiglu.unsupported("reference", gate, up[:1]) == "shape mismatch"
    assert swiglu.unsupported("gems", gate.float(), up.float()) == "dtype float32"
    assert swiglu.unsupported("gems", gate, up.half()) == "mixed dtypes"
    assert swiglu.unsupported("gems", bf16(0, 48), bf16(0, 48)) == "empty tensor"


def test_unsupported_swiglu_gems_on_cpu():
    assert swiglu.unsupported("gems", bf16(4, 48), bf16(4, 48)) == "cpu tensor"


# -------------------------------------------------------------------------------------------- layer norm


LAYER_NORM_CASES = [((4, 7, 64), (64,), True, True), ((4, 7, 64), [7, 64], True, False),
                    ((5, 48), 48, False, False), ((5, 48), (48,), False, True)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, normalized_shape, with_weight, with_bias", LAYER_NORM_CASES)
def test_layer_norm_reference_and_gems(fake_gems, dtype, shape, normalized_shape, with_weight, with_bias):
    x = (torch.randn(*shape) * 3 + 1).to(dtype)
    norm_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    weight = torch.randn(*norm_shape).to(dtype) if with_weight else None
    bias = torch.randn(*norm_shape).to(dtype) if with_bias else None
    expected = F.layer_norm(x, norm_shape, weight, bias, 1e-5)
    reference = layer_norm.reference(x, normalized_shape, weight, bias, 1e-5)
    assert_close(reference, expected, rtol=1e-5 if dtype == torch.float32 else None)
    assert_close(layer_norm.gems(x, normalized_shape, weight, bias, 1e-5), reference,
                 rtol=1e-5 if dtype == torch.float32 else None)
    assert fake_gems.calls == [("layer_norm",)]


def test_unsupported_layer_norm_routes(accelerator):
    x, w, b = bf16(4, 64), bf16(64), bf16(64)
    assert layer_norm.unsupported("gems", x, (64,), w, b) is None
    assert layer_norm.unsupported("gems", x, 64, None, None) is None
    assert layer_norm.unsupported("reference", x.float(), [64], w.float(), None) is None
    assert layer_norm.unsupported("reference", x, (32,), None, None) == "shape mismatch"
    assert layer_norm.unsupported("reference", x, (64,), bf16(32), None) == "shape mismatch"
    assert layer_norm.unsupported("reference", x, (64,), None, bf16(32)) == "shape mismatch"
    assert layer_norm.unsupported("gems", x.float(), (64,), None, None) == "dtype float32"
    assert layer_norm.unsupported("gems", x, (64,), w.float(), None) == "mixed dtypes"
    assert layer_norm.unsupported("gems", x, (64,), torch.nn.Parameter(w), None) == "requires grad"


def test_unsupported_layer_norm_gems_on_cpu():
    assert layer_norm.unsupported("gems", bf16(4, 64), (64,), None, None) == "cpu tensor"


# ---------------------------------------------------------------------------------------- cost of checks


def test_checks_do_no_tensor_work():
    """Per-call checks read metadata only (shape, dtype, device, strides): not one aten op runs, so a check costs
    Python time alone, whatever the tensor's size or device (no sync, no allocation, no .item())."""
    from fl_patch.global_check import OpRecorder  # the aten-op counter of `fl-patch check --global`

    q, k, v = qkv(2, 4, 2, 6, 6, 64, torch.bfloat16)
    cos, sin = hf_cos_sin(torch.arange(6)[None], 64, torch.bfloat16)
    x, w, linear_weight = bf16(4, 64), bf16(64), bf16(32, 64)
    checks = {
        "attention": lambda: attention.unsupported_sdpa("gems", q, k, v, None, 0.0, True, None, True),
        "rope": lambda: rope.unsupported_hf("reference", q, k, cos, sin, 1),
        "rms_norm": lambda: rms_norm.unsupported_hf("reference", x, w),
        "linear": lambda: linear.unsupported("reference", x, linear_weight, None),
    }
    for name, check in checks.items():
        with OpRecorder() as recorded:
            check()
        assert not recorded.calls, f"{name}'s check ran {dict(recorded.calls)}"
    with OpRecorder() as recorded:  # the recorder itself sees ops, so the assertion above can fail
        x.sum()
    assert recorded.calls["sum"] == 1


def test_tolerance_helper_scales_atol_by_the_reduced_size():
    a = torch.ones(3, dtype=torch.bfloat16)
    assert_close(a + 0.01, a)
    with pytest.raises(AssertionError):
        assert_close(a + 0.1, a)
    assert math.isclose(RTOL[torch.bfloat16], 0.016)
