"""fl_patch's LightX2V integration against the stand-in (tests/lightx2v_standin, upstream's interfaces).

Every test imports the stand-in afresh (PLATFORM=cpu, lightx2v* modules dropped before and after) and calls
``fl_patch.apply`` itself: post-import hooks fire once per import, and ``apply`` registers them again for
modules not imported. ``FL_PATCH_AUTO=0`` keeps the ``lightx2v.platform_plugins`` entry point (live when
fl_patch is installed) from activating fl_patch behind a test's back. Patched outputs are compared with the
originals on the same op objects (compute, ``revert()``, compute again): bitwise where the reference kernel
does the same float operations, else with explicit tolerances. The gems paths run on CPU through the fake
FlagGems in tests/fake_flag_gems, with the device check lifted.
"""

import importlib
import json
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_python

import fl_patch
from fl_patch.integrations import lightx2v as integration
from fl_patch.kernels import gems

STANDIN = Path(__file__).resolve().parent / "lightx2v_standin"

ATTN_KEYS = ["flash_attn2", "flash_attn3", "flash_attn4", "sage_attn2", "sage_attn3", "torch_sdpa"]
RMS_KEYS = ["torch", "torch_native", "sgl-kernel", "fp32_variance", "fp32_variance_qwen", "self_forcing", "one-pass"]
FLAGOS_KEYS = {
    "ATTN_WEIGHT_REGISTER": "flagos_flash_attn",
    "RMS_WEIGHT_REGISTER": "flagos_rms_norm",
    "LN_WEIGHT_REGISTER": "flagos_layer_norm",
    "ROPE_REGISTER": "flagos_rope",
    "MM_WEIGHT_REGISTER": "flagos",
}
REGISTRIES = list(FLAGOS_KEYS)
BF16 = {"atol": 1e-2, "rtol": 1.6e-2}  # within one bf16 rounding of values of magnitude ~1
FP32 = {"atol": 1e-5, "rtol": 1e-5}


def _drop_standin_modules():
    for name in [n for n in sys.modules if n.startswith("lightx2v")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("PLATFORM", "cpu")
    monkeypatch.setenv("FL_PATCH_AUTO", "0")
    for name in ("SKIP_PLATFORM_CHECK", "DTYPE", "SENSITIVE_LAYER_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    _drop_standin_modules()
    yield
    fl_patch.revert()
    _drop_standin_modules()


@pytest.fixture
def fake_gems(fake_gems, monkeypatch):
    """conftest's fake FlagGems, with CPU tensors accepted by the device check."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    return fake_gems


def load(kernels="reference", first="lightx2v"):
    """Apply, import `first` then the rest of the stand-in, return ``lightx2v.utils.registry_factory``."""
    fl_patch.apply(kernels=kernels)
    importlib.import_module(first)
    importlib.import_module("lightx2v")
    return importlib.import_module("lightx2v.utils.registry_factory")


def lightx2v_records():
    return [r for r in fl_patch.report() if r["target"].startswith("lightx2v")]


def fallbacks():
    """{where: {reason: count}} for the LightX2V records that handed calls to the original."""
    return {r["where"]: r["fallbacks"] for r in lightx2v_records() if r["fallbacks"]}


def patched_then_original(call):
    """``call()`` patched, then again after ``revert()`` (class-level revert reaches the same op objects)."""
    patched = call()
    fl_patch.revert()
    return patched, call()


def assert_same(actual, expected, tolerance=None):
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    if tolerance is None:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, **tolerance)


def wan_style(cls, *names):
    """An op built as the Wan model builds it (upstream constructor: lora_prefix / lora_path keywords)."""
    return cls(*names, False, False, False, None, lora_prefix="diffusion_model.blocks", lora_path="")


def loaded(op, tensors):
    op.load(dict(tensors))
    op.to_cuda()  # AI_DEVICE is "cpu" here
    return op


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


# --------------------------------------------------------------------------- rows, start-up, import order


def test_rows_hook_lightx2v_modules_and_importing_the_integration_loads_nothing_heavy():
    from fl_patch._bootstrap import WATCHED_PACKAGES

    assert all(t.module.split(".")[0] in WATCHED_PACKAGES and "*" not in t.module for t in integration.TARGETS)
    code = ("import sys, fl_patch.integrations.lightx2v as m; "
            "print(sorted(n for n in ('torch', 'lightx2v', 'lightx2v_platform', 'wrapt') if n in sys.modules))")
    result = run_python(code, env={"FL_PATCH": "0"}, bootstrap=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("first", ["lightx2v", "lightx2v.utils.registry_factory",
                                   "lightx2v.common.ops.norm.rms_norm_weight", "lightx2v_platform"])
def test_every_row_patches_whichever_module_is_imported_first(first):
    platform = importlib.import_module("lightx2v_platform.registry_factory")

    @platform.PLATFORM_RMS_WEIGHT_REGISTER("chip_rms")  # a chip op, registered before the one-time copy
    class ChipRms:
        pass

    reg = load(first=first)
    states = {r["where"]: r["state"] for r in lightx2v_records()}
    assert not [w for w, s in states.items() if s in ("failed", "waiting")], states
    assert sum(s == "patched" for s in states.values()) == 27  # 19 applies, 5 flagos* keys, flagos-fp8/int8, the check
    assert reg.RMS_WEIGHT_REGISTER["chip_rms"] is ChipRms  # the copy was not taken early
    for registry, key in FLAGOS_KEYS.items():
        assert getattr(reg, registry)[key].__module__ == "fl_patch.integrations.lightx2v"


def test_modules_imported_before_apply_are_patched_at_once():
    importlib.import_module("lightx2v")
    reg = importlib.import_module("lightx2v.utils.registry_factory")
    norm_class = reg.RMS_WEIGHT_REGISTER["torch"]
    original = norm_class.apply
    fl_patch.apply(kernels="reference")
    assert norm_class.apply is not original and "flagos_rms_norm" in reg.RMS_WEIGHT_REGISTER


def test_revert_restores_every_apply_and_every_registry():
    importlib.import_module("lightx2v")
    reg = importlib.import_module("lightx2v.utils.registry_factory")
    tables = {name: dict(getattr(reg, name)._dict) for name in REGISTRIES}
    classes = {cls for table in tables.values() for cls in table.values()}
    applies = {cls: vars(cls).get("apply") for cls in classes}

    fl_patch.apply(kernels="reference")
    assert sum(vars(cls).get("apply") is not applies[cls] for cls in classes) == 19
    fl_patch.revert()

    assert all(vars(cls).get("apply") is applies[cls] for cls in classes)
    for name, table in tables.items():
        assert getattr(reg, name)._dict == table  # flagos keys gone, every value the original object
    assert "apply" not in vars(reg.ROPE_REGISTER["torch_real_rope"])  # inherited before: deleted again


def test_flagos_keys_replace_a_seed_plugin_key_and_revert_restores_it():
    importlib.import_module("lightx2v")
    reg = importlib.import_module("lightx2v.utils.registry_factory")
    seed = type("SeedFlagOSRms", (), {})
    reg.RMS_WEIGHT_REGISTER["flagos_rms_norm"] = seed
    fl_patch.apply(kernels="reference")
    assert reg.RMS_WEIGHT_REGISTER["flagos_rms_norm"] is not seed
    fl_patch.revert()
    assert reg.RMS_WEIGHT_REGISTER["flagos_rms_norm"] is seed


# --------------------------------------------------------------------------- attention


def attention_call(op, q, k, v, **extra):
    sq, sk = q.shape[-3], k.shape[-3]
    return lambda: op.apply(q=q, k=k, v=v, cu_seqlens_q=torch.tensor([0, sq], dtype=torch.int32),
                            cu_seqlens_kv=torch.tensor([0, sk], dtype=torch.int32), max_seqlen_q=sq,
                            max_seqlen_kv=sk, model_cls="wan2.1", **extra)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("key", ATTN_KEYS)
def test_attention_matches_each_original_as_wan_calls_it(key, dtype):
    op = load().ATTN_WEIGHT_REGISTER[key]()
    q, k, v = (torch.randn(s, 4, 32).to(dtype) for s in (12, 7, 7))
    patched, original = patched_then_original(attention_call(op, q, k, v))
    assert_same(patched, original, FP32 if dtype == torch.float32 else BF16)


@pytest.mark.parametrize("key", ["flash_attn2", "flash_attn3"])
def test_flash_attention_causal_scale_and_batched_varlen(key):
    op = load().ATTN_WEIGHT_REGISTER[key]()
    q, k, v = torch.randn(6, 4, 32), torch.randn(9, 2, 32), torch.randn(9, 2, 32)  # grouped heads
    qb, kb, vb = torch.randn(2, 5, 4, 32), torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)

    def calls():
        return (op.apply(q, k, v, None, None, 6, 9, causal=True, softmax_scale=0.3),
                op.apply(qb, kb, vb, torch.tensor([0, 5, 10]), torch.tensor([0, 3, 6]), 5, 3))

    assert not fallbacks()
    for patched, original in zip(*patched_then_original(calls), strict=True):
        assert_same(patched, original, FP32)


def test_sage_attention_reads_batch_rows_as_sequences():
    op = load().ATTN_WEIGHT_REGISTER["sage_attn2"]()
    q, k, v = torch.randn(2, 5, 4, 32), torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)
    patched, original = patched_then_original(lambda: op.apply(q, k, v))
    assert_same(patched, original, FP32)


def test_torch_sdpa_mask_causal_and_dropout_fallback():
    op = load().ATTN_WEIGHT_REGISTER["torch_sdpa"]()
    q, k, v = (torch.randn(2, 6, 4, 32) for _ in range(3))
    mask = torch.randn(6, 6)

    def calls():
        torch.manual_seed(0)
        return op.apply(q, k, v, 0, mask), op.apply(q, k, v, 0, None, True), op.apply(q, k, v, 0.5)

    results = patched_then_original(calls)
    for patched, original in zip(*results, strict=True):
        assert_same(patched, original, FP32)
    assert list(fallbacks().values()) == [{"dropout": 1}]


def test_flagos_flash_attn_has_flash_attn2_semantics_and_a_torch_fallback():
    reg = load()
    flagos, flash = reg.ATTN_WEIGHT_REGISTER["flagos_flash_attn"](), reg.ATTN_WEIGHT_REGISTER["flash_attn2"]()
    q, k, v = torch.randn(2, 5, 4, 32), torch.randn(2, 3, 4, 32), torch.randn(2, 3, 4, 32)
    cu_q, cu_k = torch.tensor([0, 5, 10]), torch.tensor([0, 3, 6])
    out = flagos.apply(q, k, v, cu_q, cu_k, 5, 3, causal=True)
    fl_patch.revert()
    assert_same(out, flash.apply(q, k, v, cu_q, cu_k, 5, 3, causal=True), FP32)

    odd = [torch.randn(6, 2, 20) for _ in range(3)]  # head dim 20: no kernel takes it -> torch fallback
    assert_same(flagos.apply(*odd, None, None, 6, 6), flash.apply(*odd, None, None, 6, 6), FP32)
    assert fallbacks() == {"lightx2v.utils.registry_factory.ATTN_WEIGHT_REGISTER['flagos_flash_attn']":
                           {"head dim 20": 1}}


# --------------------------------------------------------------------------- RMSNorm


def rms_op(reg, key, weight=None, diff=None):
    name = "blocks.0.self_attn.norm_q.weight"
    op = wan_style(reg.RMS_WEIGHT_REGISTER[key], None if weight is None else name)
    if weight is None:
        op.load({})
        return op
    loaded(op, {name: weight})
    if diff is not None:
        op.register_diff({"diffusion_model.blocks.0.self_attn.norm_q.diff": diff})
    return op


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")  # F.rms_norm, bf16 x fp32 weight
@pytest.mark.parametrize("key", RMS_KEYS)
def test_rms_norm_keys_match_their_originals(key):
    reg = load()
    x = bf16(2, 5, 64)
    half = rms_op(reg, key, bf16(64), diff=bf16(64) * 0.1)
    full = rms_op(reg, key, torch.randn(64))  # a float32 weight
    patched, original = patched_then_original(lambda: (half.apply(x), full.apply(x), full.apply(x.float())))
    tolerance = BF16 if key == "torch_native" else None  # F.rms_norm's own kernel; every other key: same ops
    for p, o in zip(patched, original, strict=True):
        assert_same(p, o, tolerance if p.dtype == torch.bfloat16 else (FP32 if tolerance else None))
    assert not fallbacks()


def test_rms_norm_falls_back_without_weight_and_under_a_sensitive_dtype(monkeypatch):
    monkeypatch.setenv("SENSITIVE_LAYER_DTYPE", "FP32")
    reg = load()
    x = torch.randn(3, 64)
    ops = [rms_op(reg, key, torch.randn(64)) for key in ("torch", "sgl-kernel")] + [rms_op(reg, "torch")]
    patched, original = patched_then_original(lambda: [op.apply(x) for op in ops])
    for p, o in zip(patched, original, strict=True):
        assert_same(p, o)
    where = "lightx2v.common.ops.norm.rms_norm_weight"
    assert fallbacks() == {f"{where}.RMSWeight.apply ['torch']": {"sensitive dtype": 1, "no weight": 1},
                           f"{where}.RMSWeightSgl.apply ['sgl-kernel']": {"sensitive dtype": 1}}


def test_rms_norm_keeps_each_apply_parameter_name():
    reg = load()
    op = rms_op(reg, "self_forcing", bf16(64))
    qwen = rms_op(reg, "fp32_variance_qwen", bf16(64))
    x = bf16(3, 64)
    patched, original = patched_then_original(lambda: (op.apply(x=x), qwen.apply(hidden_states=x)))
    for p, o in zip(patched, original, strict=True):
        assert_same(p, o)


def test_flagos_rms_norm_is_the_torch_key_with_upstream_constructor():
    reg = load()
    weight, diff, x = bf16(64), bf16(64), bf16(4, 64)
    flagos = rms_op(reg, "flagos_rms_norm", weight, diff)
    torch_key = rms_op(reg, "torch", weight, diff)
    out = flagos.apply(x)
    fl_patch.revert()
    assert isinstance(flagos, reg.RMS_WEIGHT_REGISTER["torch"])
    assert_same(out, torch_key.apply(x))


# --------------------------------------------------------------------------- LayerNorm


@pytest.mark.parametrize("key", ["torch", "Triton", "flagos_layer_norm"])
def test_layer_norm_matches_the_torch_and_triton_originals(key):
    reg = load()
    names = ("blocks.0.norm3.weight", "blocks.0.norm3.bias")
    affine = loaded(wan_style(reg.LN_WEIGHT_REGISTER[key], *names), dict(zip(names, (bf16(48), bf16(48)), strict=True)))
    plain = reg.LN_WEIGHT_REGISTER[key]()
    plain.load({})
    x = bf16(6, 48)
    if key == "flagos_layer_norm":
        torch_key = loaded(wan_style(reg.LN_WEIGHT_REGISTER["torch"], *names),
                           {names[0]: affine.weight, names[1]: affine.bias})
        out = affine.apply(x)
        fl_patch.revert()
        assert_same(out, torch_key.apply(x), BF16)
        return
    patched, original = patched_then_original(lambda: (affine.apply(x), plain.apply(x)))
    for p, o in zip(patched, original, strict=True):
        assert isinstance(p, torch.Tensor)  # one tensor, not FlagGems' (y, mean, rstd)
        assert_same(p, o, None if key == "Triton" else BF16)  # Triton's torch twin: the same float32 ops


def test_triton_layer_norm_keeps_its_2d_only_contract():
    op = load().LN_WEIGHT_REGISTER["Triton"]()
    op.load({})
    with pytest.raises(ValueError, match="2-D"):
        op.apply(bf16(2, 3, 48))
    assert list(fallbacks().values()) == [{"not 2-d": 1}]


def test_layer_norm_under_a_sensitive_dtype_falls_back(monkeypatch):
    monkeypatch.setenv("SENSITIVE_LAYER_DTYPE", "FP32")
    op = load().LN_WEIGHT_REGISTER["torch"]()
    op.load({})
    x = bf16(4, 48)
    patched, original = patched_then_original(lambda: op.apply(x))
    assert_same(patched, original)
    assert list(fallbacks().values()) == [{"sensitive dtype": 1}]


# --------------------------------------------------------------------------- rope


def wan_cache(seq_len, head_dim):
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def rope_op(reg, key, layout="interleaved"):
    if key == "chunked_rope":
        inner = reg.ROPE_REGISTER["flashinfer_rope"](layout=layout, compute_dtype=torch.float32)
        return reg.ROPE_REGISTER["chunked_rope"](inner=inner, chunk_size=4)
    return reg.ROPE_REGISTER[key](layout=layout, compute_dtype=torch.float32)


def wan_rope_call(op, q, k, cache):
    """The Wan model's use: prepare once, then apply with positions when the op gives them. Fresh q/k clones."""
    prepared = op.prepare_freqs(cache, rotary_dim=q.shape[-1])
    positions = op.prepare_positions(prepared)
    extra = {} if positions is None else {"positions": positions}
    return lambda: op.apply(q.clone(), k.clone(), prepared, **extra)


@pytest.mark.parametrize("key", ["flashinfer_rope", "torch_complex_rope", "torch_real_rope", "chunked_rope",
                                 "flagos_rope"])
def test_rope_matches_the_original_as_wan_drives_it(key):
    reg = load()
    op = rope_op(reg, key)
    q, k, cache = bf16(10, 3, 32), bf16(10, 2, 32), wan_cache(10, 32)
    call = wan_rope_call(op, q, k, cache)
    patched = call()
    assert not fallbacks()
    fl_patch.revert()
    original = (rope_op(reg, "torch_complex_rope") if key == "flagos_rope" else op)
    tolerance = None if key in ("torch_complex_rope", "flagos_rope") else BF16  # the same complex product
    for p, o in zip(patched, wan_rope_call(original, q, k, cache)(), strict=True):
        assert_same(p, o, tolerance)


def test_flashinfer_rope_still_rotates_in_place_at_any_positions():
    reg = load()
    op = rope_op(reg, "flashinfer_rope")
    prepared = op.prepare_freqs(wan_cache(16, 32), rotary_dim=32)
    positions = torch.tensor([3, 1, 4, 1, 5, 9])
    q, k = bf16(6, 3, 32), bf16(6, 3, 32)
    q_strided = bf16(6, 32, 3).transpose(1, 2)  # not contiguous: flashinfer rotates a copy

    def call():
        q_in, k_in, strided_in = q.clone(), k.clone(), q_strided.clone()
        q_out, k_out = op.apply(q_in, k_in, prepared, positions=positions)
        strided_out, _ = op.apply(strided_in, k.clone(), prepared, positions=positions)
        assert q_out.data_ptr() == q_in.data_ptr() and torch.equal(q_in, q_out) and torch.equal(k_in, k_out)
        assert strided_out.data_ptr() != strided_in.data_ptr() and torch.equal(strided_in, q_strided)
        return q_out, k_out, strided_out

    for p, o in zip(*patched_then_original(call), strict=True):
        assert_same(p, o, BF16)


def test_rope_forms_the_kernel_does_not_reproduce_fall_back():
    reg = load()
    q, k, cache = bf16(8, 2, 32), bf16(8, 2, 32), wan_cache(8, 32)
    split = rope_op(reg, "torch_complex_rope", layout="split_half")
    complex_rope = rope_op(reg, "torch_complex_rope")

    def calls():
        return (split.apply(q, k, cache), complex_rope.apply(q, k, wan_cache(8, 16), rotary_dim=16),
                complex_rope.apply(q, k, (cache.real.squeeze(1), cache.imag.squeeze(1)), rotary_dim=32))

    for p, o in zip(*patched_then_original(calls), strict=True):
        assert_same(p[0], o[0])
        assert_same(p[1], o[1])
    assert list(fallbacks().values()) == [{"split_half layout": 1, "partial rotary": 1, "freqs not complex": 1}]


# --------------------------------------------------------------------------- linear


def mm_op(reg, key, dtype=torch.bfloat16, bias=True, lora=False):
    names = ("blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias" if bias else None)
    tensors = {names[0]: torch.randn(24, 16).to(dtype)}
    if bias:
        tensors[names[1]] = torch.randn(24).to(dtype)
    op = loaded(wan_style(reg.MM_WEIGHT_REGISTER[key], *names), tensors)
    op.register_diff({"diffusion_model.blocks.0.ffn.0.diff": torch.randn(24, 16).to(dtype) * 0.1})
    if lora:
        op.register_lora({"diffusion_model.blocks.0.ffn.0.lora_down.weight": torch.randn(4, 16).to(dtype),
                          "diffusion_model.blocks.0.ffn.0.lora_up.weight": torch.randn(24, 4).to(dtype),
                          "diffusion_model.blocks.0.ffn.0.alpha": torch.tensor(8.0)}, lora_strength=0.5)
    return op


def test_default_mm_matches_bitwise_with_bias_diff_and_lora():
    reg = load()
    ops = [mm_op(reg, "Default"), mm_op(reg, "Default", bias=False, lora=True),
           mm_op(reg, "Default-ForceFp32", dtype=torch.float32)]
    x = bf16(5, 16)

    def calls():
        return ops[0].apply(x), ops[1].apply(x), ops[2].apply(x.float())

    for p, o in zip(*patched_then_original(calls), strict=True):
        assert_same(p, o)
    assert not fallbacks()


def test_flagos_mm_is_default_with_upstream_constructor():
    reg = load()
    flagos = mm_op(reg, "flagos", lora=True)
    x = bf16(5, 16)
    out = flagos.apply(x)
    fl_patch.revert()
    assert isinstance(flagos, reg.MM_WEIGHT_REGISTER["Default"]) and flagos.weight.shape == (16, 24)
    assert_same(out, reg.MM_WEIGHT_REGISTER["Default"].apply(flagos, x))


def test_default_mm_keeps_its_2d_contract():
    op = mm_op(load(), "Default")
    with pytest.raises(RuntimeError):
        op.apply(bf16(2, 5, 16))
    assert list(fallbacks().values()) == [{"not 2-d": 1}]


# --------------------------------------------------------------------------- the FlagGems path (fake FlagGems)


def test_gems_path_runs_every_family_and_counts_fp32_fallbacks(fake_gems, monkeypatch):
    monkeypatch.setenv("FL_PATCH_PROFILE", "off")  # no routing: every family on FlagGems (no profile: the prior)
    reg = load(kernels="gems")
    kernel_free = {t.name for t in integration.TARGETS if t.kernel_free}  # the dit_quantized check runs no kernel
    assert {r["provider"] for r in lightx2v_records() if r["state"] == "patched" and r["target"] not in kernel_free
            } == {"flag_gems"}
    q, k, v = bf16(12, 4, 32), bf16(7, 4, 32), bf16(7, 4, 32)
    for key in ("flash_attn2", "sage_attn3", "torch_sdpa", "flagos_flash_attn"):
        attention_call(reg.ATTN_WEIGHT_REGISTER[key](), q, k, v)()
    x = bf16(6, 64)
    for key in (*RMS_KEYS, "flagos_rms_norm"):
        rms_op(reg, key, bf16(64)).apply(x)
    ln = reg.LN_WEIGHT_REGISTER["flagos_layer_norm"]()
    ln.load({})
    ln.apply(x)
    for key in ("flashinfer_rope", "torch_complex_rope", "flagos_rope"):
        wan_rope_call(rope_op(reg, key), bf16(10, 3, 32), bf16(10, 3, 32), wan_cache(10, 32))()
    mm_op(reg, "flagos").apply(bf16(5, 16))
    force_fp32 = mm_op(reg, "Default-ForceFp32", dtype=torch.float32)
    expected = torch.addmm(force_fp32._get_actual_bias(), x[:, :16].float(), force_fp32._get_actual_weight())

    assert not fallbacks()
    called = {name for name, *_ in fake_gems.calls}
    assert called >= {"flash_attn_varlen_func", "rms_norm", "layer_norm", "apply_rotary_pos_emb", "addmm"}
    assert called & {"flash_attention_forward", "scaled_dot_product_attention"}  # torch_sdpa, as the kernel routes it
    assert_same(force_fp32.apply(x[:, :16].float()), expected)
    rms_op(reg, "torch", torch.randn(64)).apply(x.float())
    assert fallbacks() == {
        "lightx2v.common.ops.mm.mm_weight.MMWeight.apply ['Default']": {"dtype float32": 1},
        "lightx2v.common.ops.norm.rms_norm_weight.RMSWeight.apply ['torch']": {"dtype float32": 1},
    }


# --------------------------------------------------------------------------- PLATFORM=flagos and the entry point


def test_platform_flagos_runs_on_the_available_device_and_reverts(monkeypatch):
    monkeypatch.setenv("PLATFORM", "flagos")
    load()
    devices = importlib.import_module("lightx2v_platform.registry_factory").PLATFORM_DEVICE_REGISTER
    global_var = importlib.import_module("lightx2v_platform.base.global_var")
    assert (global_var.PLATFORM, global_var.AI_DEVICE) == ("flagos", "cpu")  # the stand-in's cpu device
    assert devices["flagos"].is_available() and devices["flagos"].name == "flagos"
    fl_patch.revert()
    assert "flagos" not in devices


def install_entry_point(tmp_path, monkeypatch):
    """fl_patch's ``lightx2v.platform_plugins`` entry point, as setup.cfg declares it, on sys.path."""
    dist_info = tmp_path / "fl_patch_entry_point-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: fl-patch-entry-point\nVersion: 0.1\n")
    (dist_info / "entry_points.txt").write_text(
        "[lightx2v.platform_plugins]\nflagos = fl_patch.integrations.lightx2v:register_platform\n")
    monkeypatch.syspath_prepend(str(tmp_path))


def test_entry_point_activates_fl_patch_for_platform_flagos(tmp_path, monkeypatch):
    install_entry_point(tmp_path, monkeypatch)
    monkeypatch.delenv("FL_PATCH_AUTO")
    monkeypatch.setenv("FL_PATCH_KERNELS", "reference")
    monkeypatch.setenv("PLATFORM", "flagos")
    assert not fl_patch.is_active()
    reg = importlib.import_module("lightx2v.utils.registry_factory")
    assert fl_patch.is_active()
    assert importlib.import_module("lightx2v_platform.base.global_var").AI_DEVICE == "cpu"
    assert "flagos_rms_norm" in reg.RMS_WEIGHT_REGISTER


def test_entry_point_is_cheap_and_respects_auto_off(monkeypatch):
    importlib.import_module("lightx2v_platform.registry_factory")
    integration.register_platform()  # FL_PATCH_AUTO=0 (fixture)
    assert not fl_patch.is_active()
    monkeypatch.delenv("FL_PATCH_AUTO")
    monkeypatch.setenv("FL_PATCH_KERNELS", "reference")
    integration.register_platform()
    assert fl_patch.is_active()
    assert not [n for n in sys.modules if n.startswith("lightx2v.")]  # no early registry copy


def test_setup_cfg_declares_the_entry_point():
    text = (REPO / "setup.cfg").read_text()
    assert "lightx2v.platform_plugins =\n    flagos = fl_patch.integrations.lightx2v:register_platform" in text


# --------------------------------------------------------------------------- the GPU script and the example


def test_gpu_script_dry_run_on_the_standin(tmp_path):
    out = tmp_path / "result.json"
    result = subprocess.run([sys.executable, str(REPO / "tests/gpu/lightx2v_gpu.py"), "--dry-run", "--out", str(out)],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(out.read_text())
    assert data["pass"] and data["provider"] == "torch reference"
    assert {op["op"] for op in data["ops"]} >= {"attention flash_attn2", "rms_norm sgl-kernel", "layer_norm torch",
                                                "rope torch_complex_rope", "linear Default", "rms_norm flagos_rms_norm"}


def check_quant_script_result(data, kernels):
    assert data["complete"] and data["summary"]["pass"], (data["errors"], data["skipped"], data["summary"])
    assert data["kernels"] == kernels and data["platform"] == "flagos" and data["ai_device"] == "cpu"
    assert [case["gemm"] for case in data["gemm"]] == ["attn q/k/v/o, cross q/o", "cross k/v (text)", "ffn.0", "ffn.2"]
    for case in data["gemm"]:
        assert set(case["ms"]) == set(case["accuracy"]["structured"]) == {
            "Default", "fp8-triton", "flagos-fp8", "int8-triton", "flagos-int8"}
        assert case["within_lightx2v_error"] and not case["fallbacks"] and not case["errors"]
    variants = {v["variant"]: v for v in data["e2e"]["variants"]}
    assert list(variants) == ["native", "fp8-triton", "int8-triton", "flagos", "flagos-fp8", "flagos-int8"]
    assert variants["flagos-int8"]["classes"] == {
        "self_attn_1": "FlagOSFlashAttnWeight", "rms_norm": "FlagOSRmsNormWeight", "rope": "FlagOSRope",
        "layer_norm": "FlagOSLayerNormWeight", "ffn_0": "FlagOSInt8MMWeight"}
    assert variants["native"]["classes"]["ffn_0"] == "MMWeight" and variants["native"]["noise_rel_diff"] == 0
    assert variants["flagos"]["noise_rel_diff"] < 0.02  # bf16: the same math as the native keys
    assert data["upstream_facts"]["int8_quantize_triton"]["equals_truncation"]


def test_quant_gpu_script_dry_run_on_the_standin(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "tests/gpu/lightx2v_quant_gpu.py"), "--dry-run", "--reps", "1",
                             "--out-dir", str(tmp_path)], capture_output=True, text=True, timeout=180, cwd=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    check_quant_script_result(json.loads((tmp_path / "lightx2v-quant.json").read_text()), "reference")


def test_quant_gpu_script_gems_paths_through_the_fake_flaggems(tmp_path):
    code = ("import sys\n"
            "from fl_patch.kernels import gems, quant_linear\n"
            "gems.device_reason = lambda tensor: None\n"
            "quant_linear._chip_reason = lambda tensor: None\n"
            "sys.path.insert(0, 'tests/gpu')\n"
            "import lightx2v_quant_gpu\n"
            f"sys.exit(lightx2v_quant_gpu.main(['--dry-run', '--kernels', 'gems', '--reps', '1', '--out-dir', "
            f"{str(tmp_path)!r}]))\n")
    result = run_python(code, bootstrap=False, extra_path=[REPO / "tests" / "fake_flag_gems"])
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "lightx2v-quant.json").read_text())
    check_quant_script_result(data, "gems")
    assert data["versions"]["flag_gems"] is None or "fake" in str(data["versions"]["flag_gems"])


def test_example_runs_quick_on_the_standin():
    result = subprocess.run([sys.executable, str(REPO / "examples/with_lightx2v/run_ops.py"), "--quick"],
                            capture_output=True, text=True, timeout=120, cwd=str(REPO))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "flagos_rms_norm" in result.stdout and "patched" in result.stdout


def test_flagos_keys_stay_registered_on_torch_paths_without_flagGems(monkeypatch):
    monkeypatch.setattr(gems, "installed", lambda: "No module named 'flag_gems'")
    reg = load(kernels="gems")
    for registry, key in FLAGOS_KEYS.items():
        assert key in getattr(reg, registry), (registry, key)
    by_target = {}
    for record in lightx2v_records():
        by_target.setdefault(record["target"], set()).add((record["state"], record["provider"]))
    assert by_target["lightx2v.rms_norm.flagos"] == {("patched", "original")}
    assert by_target["lightx2v.rms_norm"] == {("skipped", "original")}  # nothing to swap without a provider
    weight, diff, x = bf16(64), bf16(64), bf16(4, 64)
    assert_same(rms_op(reg, "flagos_rms_norm", weight, diff).apply(x), rms_op(reg, "torch", weight, diff).apply(x))


# --------------------------------------------------------------------------- quantised linear: flagos-fp8 / -int8

QUANT_KEYS = {"flagos-fp8": ("fp8-triton", torch.float8_e4m3fn), "flagos-int8": ("int8-triton", torch.int8)}
PREFIX = "blocks.0.self_attn.q"


def per_channel(weight, dtype):
    """LightX2V's converter on a float ``[out, in]`` weight: ``(q, scale [out, 1])``, scale ``max|w| / qmax``."""
    qmax = 127.0 if dtype == torch.int8 else 448.0
    scale = weight.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
    scaled = (weight.float() / scale).clamp(-qmax, qmax)
    return (scaled.round().to(dtype) if dtype == torch.int8 else scaled.to(dtype)), scale


def quant_checkpoint(weight, dtype, bias):
    q, scale = per_channel(weight, dtype)
    # Wan's _load_quant_ckpt casts every float tensor (scales too) to the infer dtype: bf16 scales reach load.
    return {f"{PREFIX}.weight": q, f"{PREFIX}.weight_scale": scale.to(torch.bfloat16), f"{PREFIX}.bias": bias}


def quant_op(reg, key, tensors):
    return loaded(wan_style(reg.MM_WEIGHT_REGISTER[key], f"{PREFIX}.weight", f"{PREFIX}.bias"), dict(tensors))


@pytest.fixture
def no_chip_check(monkeypatch):
    from fl_patch.kernels import quant_linear

    monkeypatch.setattr(quant_linear, "_chip_reason", lambda tensor: None)


def test_quant_keys_are_lightx2v_quant_template_subclasses_and_revert_exactly():
    importlib.import_module("lightx2v")
    reg = importlib.import_module("lightx2v.utils.registry_factory")
    mm_module = importlib.import_module("lightx2v.common.ops.mm.mm_weight")
    seed = type("SeedFlagOSFp8", (), {})
    reg.MM_WEIGHT_REGISTER["flagos-fp8"] = seed  # as the seed plugin would have registered it
    table = dict(reg.MM_WEIGHT_REGISTER._dict)
    fl_patch.apply(kernels="reference")
    for key, (peer, _) in QUANT_KEYS.items():
        cls = reg.MM_WEIGHT_REGISTER[key]
        assert issubclass(cls, mm_module.MMWeightQuantTemplate) and cls.__module__ == integration.__name__
        assert not issubclass(cls, reg.MM_WEIGHT_REGISTER[peer])
    records = {r["where"]: r for r in lightx2v_records() if r["target"].endswith(("flagos_fp8", "flagos_int8"))}
    assert {w: (r["state"], r["provider"]) for w, r in records.items()} == {
        "lightx2v.utils.registry_factory.MM_WEIGHT_REGISTER['flagos-fp8']": ("patched", "torch reference"),
        "lightx2v.utils.registry_factory.MM_WEIGHT_REGISTER['flagos-int8']": ("patched", "torch reference")}
    fl_patch.revert()
    assert reg.MM_WEIGHT_REGISTER._dict == table and reg.MM_WEIGHT_REGISTER["flagos-fp8"] is seed
    assert "flagos-int8" not in reg.MM_WEIGHT_REGISTER


@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_load_the_checkpoints_of_lightx2v_per_channel_schemes(key):
    reg = load()
    peer, dtype = QUANT_KEYS[key]
    tensors = quant_checkpoint(torch.randn(32, 64) / 8, dtype, torch.randn(32).to(torch.bfloat16))
    weight_dict = dict(tensors)
    op = wan_style(reg.MM_WEIGHT_REGISTER[key], f"{PREFIX}.weight", f"{PREFIX}.bias")
    op.load(weight_dict)
    assert weight_dict == {} and op.weight is None  # CPU checkpoint: pinned copies until to_cuda, as LightX2V
    op.to_cuda()
    ours = quant_op(reg, peer, tensors)
    assert op.weight_scale_name == ours.weight_scale_name == f"{PREFIX}.weight_scale"
    assert op.weight.dtype == dtype and torch.equal(op.weight, ours.weight) and op.weight.shape == (32, 64)
    assert op.bias.dtype == ours.bias.dtype == torch.float32 and torch.equal(op.bias, ours.bias)
    assert op.weight_scale.dtype == torch.float32 and torch.equal(op.weight_scale, ours.weight_scale.float())
    assert op.load_func == getattr(op, "load_fp8_perchannel_sym" if key == "flagos-fp8" else "load_int8_perchannel_sym")


@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_refuse_a_bf16_checkpoint_with_a_clear_message(key):
    reg = load()
    other = torch.int8 if key == "flagos-fp8" else torch.float8_e4m3fn
    bf16_ckpt = {f"{PREFIX}.weight": bf16(32, 64), f"{PREFIX}.bias": bf16(32)}
    op = wan_style(reg.MM_WEIGHT_REGISTER[key], f"{PREFIX}.weight", f"{PREFIX}.bias")
    with pytest.raises(ValueError, match=rf"dit_quant_scheme '{key}' needs '{PREFIX}.weight' as .* with "
                                         rf"'{PREFIX}.weight_scale' \[out, 1\].*found a bfloat16 weight and no scale"
                                         r".*converter.py --quantized"):
        op.load(dict(bf16_ckpt))
    with pytest.raises(ValueError, match=f"found a {str(other).removeprefix('torch.')} weight"):
        op.load(quant_checkpoint(torch.randn(32, 64), other, bf16(32)))
    per_tensor = quant_checkpoint(torch.randn(32, 64), QUANT_KEYS[key][1], bf16(32))
    per_tensor[f"{PREFIX}.weight_scale"] = per_tensor[f"{PREFIX}.weight_scale"][:1]
    with pytest.raises(ValueError, match="with 1 scales \\(per-channel: one per output row\\)"):
        op.load(per_tensor)


@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_auto_quantise_through_lightx2v_loader_when_a_model_asks(key):
    reg = load()
    peer, dtype = QUANT_KEYS[key]
    weight = torch.randn(32, 64)
    ops = [wan_style(reg.MM_WEIGHT_REGISTER[k], f"{PREFIX}.weight", f"{PREFIX}.bias") for k in (key, peer)]
    for op in ops:
        op.set_config({"weight_auto_quant": True})
        op.load_func({f"{PREFIX}.weight": weight})
    assert ops[0].weight.dtype == dtype and torch.equal(ops[0].weight, ops[1].weight)
    assert torch.equal(ops[0].weight_scale, ops[1].weight_scale)


@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_on_the_reference_provider_compute_the_w8a8_product(key):
    from fl_patch.kernels import quant_linear

    reg = load()
    tensors = quant_checkpoint(torch.randn(32, 64) / 8, QUANT_KEYS[key][1], bf16(32))
    op = quant_op(reg, key, tensors)
    x = bf16(5, 64)
    form = "fp8" if key == "flagos-fp8" else "int8"
    expected = getattr(quant_linear, f"reference_{form}")(x, op.weight, op.weight_scale, op.bias, torch.bfloat16)
    out = op.apply(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected) and not fallbacks()
    op.register_diff({"diffusion_model.blocks.0.self_attn.q.diff_b": torch.ones(32)})  # a bias diff is used
    torch.testing.assert_close(op.apply(x).float(), expected.float() + 1, **BF16)
    op.register_lora({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": bf16(4, 64),
                      "diffusion_model.blocks.0.self_attn.q.lora_up.weight": bf16(32, 4)}, lora_strength=0.5)
    with_lora = expected.float() + 1 + op.apply_lora(x).float()  # two bf16 sums in another order: two roundings
    torch.testing.assert_close(op.apply(x).float(), with_lora, atol=6e-2, rtol=1.6e-2)


@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_run_flaggems_and_count_calls_it_cannot_take(fake_gems, no_chip_check, key):
    reg = load(kernels="gems")
    tensors = quant_checkpoint(torch.randn(32, 64) / 8, QUANT_KEYS[key][1], bf16(32))
    op = quant_op(reg, key, tensors)
    x = bf16(5, 64)
    out = op.apply(x)
    assert ("cutlass_scaled_mm", str(QUANT_KEYS[key][1]).removeprefix("torch.")) in fake_gems.calls
    fl_patch.revert()
    fl_patch.apply(kernels="reference")
    torch.testing.assert_close(out.float(), quant_op(reg, key, tensors).apply(x).float(), atol=1e-2, rtol=8e-3)
    fl_patch.revert()
    reg = load(kernels="gems")
    op = quant_op(reg, key, tensors)
    assert op.apply(x.float()).dtype == torch.bfloat16  # the infer dtype, as fp8-triton's output
    assert fallbacks() == {f"lightx2v.utils.registry_factory.MM_WEIGHT_REGISTER['{key}']": {"dtype float32": 1}}


def test_quant_keys_off_sm90_use_the_reference_and_say_why(fake_gems):
    reg = load(kernels="gems")
    op = quant_op(reg, "flagos-fp8", quant_checkpoint(torch.randn(32, 64), torch.float8_e4m3fn, bf16(32)))
    op.apply(bf16(4, 64))
    assert not [c for c in fake_gems.calls if c[0] == "cutlass_scaled_mm"]
    assert list(fallbacks().values()) == [{"not sm90": 1}]


def test_quant_keys_without_flaggems_are_registered_and_count_every_reference_call(monkeypatch):
    monkeypatch.setattr(gems, "installed", lambda: "No module named 'flag_gems'")
    reg = load(kernels="gems")
    for key, (_, dtype) in QUANT_KEYS.items():
        op = quant_op(reg, key, quant_checkpoint(torch.randn(32, 64), dtype, bf16(32)))
        assert op.apply(bf16(3, 64)).shape == (3, 32)
    assert {w.rsplit("[", 1)[1]: f for w, f in fallbacks().items()} == {
        "'flagos-fp8']": {"no kernel provider": 1}, "'flagos-int8']": {"no kernel provider": 1}}
    states = {r["target"]: (r["state"], r["provider"]) for r in lightx2v_records()}
    assert states["lightx2v.linear.flagos_fp8"] == states["lightx2v.linear.flagos_int8"] == ("patched", "original")


def structured(out_features, in_features, tokens, seed):
    """Weights and activations shaped like a trained DiT's: per-row weight magnitudes spread over two decades,
    a few input channels with large weights and activations, tokens of very different norms."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    weight *= torch.exp(torch.randn(out_features, 1, generator=gen))
    outliers = torch.randperm(in_features, generator=gen)[:4]
    weight[:, outliers] *= 8
    x = torch.randn(tokens, in_features, generator=gen) * torch.exp(torch.randn(tokens, 1, generator=gen))
    x[:, outliers] *= 20
    return weight.to(torch.bfloat16), x.to(torch.bfloat16)


@pytest.mark.parametrize("kind", ["random", "structured"])
@pytest.mark.parametrize("key", QUANT_KEYS)
def test_quant_keys_are_as_close_to_default_as_lightx2v_own_schemes(key, kind):
    reg = load()
    peer, dtype = QUANT_KEYS[key]
    torch.manual_seed(0)
    if kind == "random":
        weight, x = (torch.randn(128, 256) / 16).to(torch.bfloat16), bf16(64, 256)
    else:
        weight, x = structured(128, 256, 64, seed=3)
    bias = bf16(128)
    default = loaded(wan_style(reg.MM_WEIGHT_REGISTER["Default"], f"{PREFIX}.weight", f"{PREFIX}.bias"),
                     {f"{PREFIX}.weight": weight, f"{PREFIX}.bias": bias}).apply(x).float()
    tensors = quant_checkpoint(weight, dtype, bias)

    def error(scheme):
        return ((quant_op(reg, scheme, tensors).apply(x).float() - default).norm() / default.norm()).item()

    ours, theirs = error(key), error(peer)
    assert ours <= theirs * 1.02, (ours, theirs)
    assert ours < (0.06 if key == "flagos-fp8" else 0.03)


# --------------------------------------------------------------------------- a Wan DiT on the flagos* keys


def wan_step(tmp_path, keys, quantize=None):
    """Build the stand-in's tiny Wan2.1 from a random checkpoint file (LightX2V's layout, tests/lightx2v_wan.py)
    with `keys`, run one denoising step, return (noise_pred, latents after the step, model)."""
    import lightx2v_wan
    from safetensors.torch import save_file

    from lightx2v.models.networks.wan.model import WanModel
    from lightx2v.models.schedulers.wan.scheduler import WanScheduler

    tensors = lightx2v_wan.checkpoint("tiny", seed=5)
    path = tmp_path / (quantize or "bf16")
    if not path.exists():
        path.mkdir()
        save_file(lightx2v_wan.quantized(tensors, quantize) if quantize else tensors, str(path / "model.safetensors"))
    config = lightx2v_wan.lightx2v_config("tiny", keys)
    model = WanModel(str(path), config, torch.device("cpu"))
    model.to_cuda()
    scheduler = WanScheduler(config)
    model.set_scheduler(scheduler)
    latent_shape, text = lightx2v_wan.inputs("tiny", frames=3, height=8, width=6, seed=5)
    scheduler.prepare(seed=0, latent_shape=latent_shape)
    scheduler.step_pre(0)
    model.infer({"text_encoder_output": text})
    noise = scheduler.noise_pred
    scheduler.step_post()
    return noise, scheduler.latents, model


def test_dit_quantized_check_accepts_the_registered_flagos_schemes_and_reverts():
    base = importlib.import_module("lightx2v.models.networks.base_model").BaseTransformerModel
    original = base._check_dit_quantized
    probe = types.SimpleNamespace(config={"dit_quant_scheme": "flagos-fp8"})
    with pytest.raises(AssertionError):
        original(probe)
    fl_patch.apply(kernels="reference")
    for scheme in ("flagos", "flagos-fp8", "flagos-int8", "fp8-triton"):
        base._check_dit_quantized(types.SimpleNamespace(config={"dit_quant_scheme": scheme}))
    with pytest.raises(AssertionError):
        base._check_dit_quantized(types.SimpleNamespace(config={"dit_quant_scheme": "flagos-fp4"}))
    fl_patch.revert()
    assert vars(base)["_check_dit_quantized"] is original


def test_dit_quantized_check_refuses_flagos_schemes_whose_key_is_not_registered():
    fl_patch.apply(kernels="reference", exclude=["lightx2v.linear.flagos_fp8"])
    importlib.import_module("lightx2v")
    base = importlib.import_module("lightx2v.models.networks.base_model").BaseTransformerModel
    base._check_dit_quantized(types.SimpleNamespace(config={"dit_quant_scheme": "flagos-int8"}))
    with pytest.raises(AssertionError):
        base._check_dit_quantized(types.SimpleNamespace(config={"dit_quant_scheme": "flagos-fp8"}))


def test_wan_dit_on_the_flagos_keys_matches_the_native_keys_and_the_quantized_schemes(tmp_path, monkeypatch):
    import lightx2v_wan

    monkeypatch.setenv("PLATFORM", "flagos")
    fl_patch.apply(kernels="reference", include=[t.name for t in integration.TARGETS
                                                 if t.family == "platform" or "flagos" in t.name])
    importlib.import_module("lightx2v")
    assert importlib.import_module("lightx2v_platform.base.global_var").PLATFORM == "flagos"
    native, native_latents, model = wan_step(tmp_path, lightx2v_wan.NATIVE_KEYS)
    assert type(model.transformer_weights.blocks[0].compute_phases[2].ffn_0).__name__ == "MMWeight"  # unpatched
    flagos, flagos_latents, model = wan_step(tmp_path, lightx2v_wan.FLAGOS_KEYS)
    phases = model.transformer_weights.blocks[0].compute_phases
    assert [type(op).__name__ for op in (phases[0].self_attn_1, phases[0].self_attn_norm_q, phases[0].rope,
                                         phases[1].norm3, phases[2].ffn_0)] == [
        "FlagOSFlashAttnWeight", "FlagOSRmsNormWeight", "FlagOSRope", "FlagOSLayerNormWeight", "FlagOSMMWeight"]
    torch.testing.assert_close(flagos, native, atol=5e-2, rtol=2e-2)  # the same math, other bf16 roundings
    torch.testing.assert_close(flagos_latents, native_latents, atol=5e-2, rtol=2e-2)

    def relative(a, b):
        return ((a - b).norm() / b.norm()).item()

    for key, (peer, _) in QUANT_KEYS.items():
        quantize = "fp8" if key == "flagos-fp8" else "int8"
        ours, _, model = wan_step(tmp_path, dict(lightx2v_wan.FLAGOS_KEYS, dit_quant_scheme=key), quantize)
        assert type(model.transformer_weights.blocks[1].compute_phases[0].self_attn_o).__name__ in (
            "FlagOSFp8MMWeight", "FlagOSInt8MMWeight")
        theirs, _, _ = wan_step(tmp_path, dict(lightx2v_wan.NATIVE_KEYS, dit_quant_scheme=peer), quantize)
        assert relative(ours, native) <= relative(theirs, native) * 1.05 + 1e-3, (key, relative(ours, native),
                                                                                  relative(theirs, native))
    assert not fallbacks()  # the reference provider takes every call
