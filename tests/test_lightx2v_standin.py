"""The LightX2V stand-in (tests/lightx2v_standin) behaves as upstream LightX2V does.

Registration and the one-time PLATFORM_* copy, device selection and platform plugins, and each op
built the way the Wan model builds it, checked against plain torch math. Every test imports the
stand-in afresh: the fixture puts it on sys.path with PLATFORM=cpu and drops lightx2v* modules
before and after.
"""

import importlib
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

STANDIN = Path(__file__).resolve().parent / "lightx2v_standin"

HAS_GPU = torch.cuda.is_available()


def _drop_standin_modules():
    for name in [n for n in sys.modules if n.startswith("lightx2v")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def standin(monkeypatch):
    monkeypatch.syspath_prepend(str(STANDIN))
    monkeypatch.setenv("PLATFORM", "cpu")
    monkeypatch.setenv("FL_PATCH_AUTO", "0")  # fl_patch's lightx2v.platform_plugins entry point stays idle
    for name in ("SKIP_PLATFORM_CHECK", "DTYPE", "SENSITIVE_LAYER_DTYPE"):
        monkeypatch.delenv(name, raising=False)
    _drop_standin_modules()
    yield
    _drop_standin_modules()


def registries():
    """Import the stand-in as a model would and return ``lightx2v.utils.registry_factory``."""
    importlib.import_module("lightx2v")
    return importlib.import_module("lightx2v.utils.registry_factory")


def platform_registries():
    return importlib.import_module("lightx2v_platform.registry_factory")


def install_plugin(tmp_path, monkeypatch, source, entry_points):
    """Make ``lightx2v_test_plugin`` importable with the given entry points in ``lightx2v.platform_plugins``."""
    (tmp_path / "lightx2v_test_plugin.py").write_text(source)
    dist_info = tmp_path / "lightx2v_test_plugin-0.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: lightx2v-test-plugin\nVersion: 0.1\n")
    lines = [f"{name} = lightx2v_test_plugin:{func}" for name, func in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("[lightx2v.platform_plugins]\n" + "\n".join(lines) + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))


# --------------------------------------------------------------------------- registries


def test_register_decorator_forms_and_refusals():
    Register = platform_registries().Register
    reg = Register()

    @reg("named")
    class Named:
        pass

    @reg
    class ByName:
        pass

    def factory():
        pass

    assert reg.register(factory, key="fn") is factory
    assert dict(reg) == {"named": Named, "ByName": ByName, "fn": factory}
    with pytest.raises(Exception, match="named already exists."):
        reg("named")(ByName)
    with pytest.raises(Exception, match="must be callable"):
        reg.register(42, key="x")
    reg["named"] = ByName  # item assignment overwrites without complaint
    assert reg["named"] is ByName
    with pytest.raises(Exception, match="fn already exists in target register."):
        reg.merge(Register(fn=factory))


def test_platform_tables_are_copied_once_at_first_import():
    platform = platform_registries()

    @platform.PLATFORM_ATTN_WEIGHT_REGISTER("chip_attn")
    class ChipAttn:
        pass

    @platform.PLATFORM_RMS_WEIGHT_REGISTER("chip_rms")
    class ChipRms:
        pass

    framework = importlib.import_module("lightx2v.utils.registry_factory")
    assert framework.ATTN_WEIGHT_REGISTER["chip_attn"] is ChipAttn
    assert framework.RMS_WEIGHT_REGISTER["chip_rms"] is ChipRms
    assert framework.ATTN_WEIGHT_REGISTER is not platform.PLATFORM_ATTN_WEIGHT_REGISTER

    platform.PLATFORM_ATTN_WEIGHT_REGISTER("late_attn")(type("LateAttn", (), {}))
    importlib.import_module("lightx2v")
    assert "late_attn" not in registries().ATTN_WEIGHT_REGISTER


def test_every_merged_table_pairs_with_its_platform_table():
    platform = platform_registries()
    pairs = {
        "ATTN_WEIGHT_REGISTER": "PLATFORM_ATTN_WEIGHT_REGISTER",
        "MM_WEIGHT_REGISTER": "PLATFORM_MM_WEIGHT_REGISTER",
        "RMS_WEIGHT_REGISTER": "PLATFORM_RMS_WEIGHT_REGISTER",
        "LN_WEIGHT_REGISTER": "PLATFORM_LAYERNORM_WEIGHT_REGISTER",
        "ROPE_REGISTER": "PLATFORM_ROPE_REGISTER",
        "FUSED_MOE_REGISTER": "PLATFORM_FUSED_MOE_REGISTER",
    }
    for platform_name in pairs.values():
        getattr(platform, platform_name)(f"from_{platform_name}")(type("Op", (), {}))
    framework = registries()
    for name, platform_name in pairs.items():
        assert f"from_{platform_name}" in getattr(framework, name)


def test_platform_key_equal_to_a_framework_key_breaks_the_import():
    platform_registries().PLATFORM_ATTN_WEIGHT_REGISTER("flash_attn2")(type("ChipFlash", (), {}))
    with pytest.raises(Exception, match="flash_attn2 already exists."):
        importlib.import_module("lightx2v")


def test_keys_registered_into_the_final_tables_after_import_are_found():
    reg = registries()
    template = importlib.import_module("lightx2v.common.ops.attn.template")

    @reg.ATTN_WEIGHT_REGISTER("flagos_test_attn")
    class FlagOSAttn(template.AttnWeightTemplate):
        def __init__(self):
            self.config = {}

        def apply(
            self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs
        ):
            return q

    assert isinstance(reg.ATTN_WEIGHT_REGISTER["flagos_test_attn"](), FlagOSAttn)


def test_upstream_keys_and_class_names():
    reg = registries()

    def names(table):
        return {key: cls.__name__ for key, cls in table.items()}

    assert names(reg.ATTN_WEIGHT_REGISTER) == {
        "flash_attn2": "FlashAttn2Weight",
        "flash_attn3": "FlashAttn3Weight",
        "flash_attn4": "FlashAttn4Weight",
        "sage_attn2": "SageAttn2Weight",
        "sage_attn3": "SageAttn3Weight",
        "torch_sdpa": "TorchSDPAWeight",
    }
    assert names(reg.RMS_WEIGHT_REGISTER) == {
        "torch": "RMSWeight",
        "torch_native": "RMSWeightNative",
        "sgl-kernel": "RMSWeightSgl",
        "fp32_variance": "RMSWeightFP32",
        "fp32_variance_qwen": "RMSWeightFP32Qwen",
        "self_forcing": "RMSWeightSF",
        "one-pass": "RMSWeightOnePass",
    }
    assert names(reg.LN_WEIGHT_REGISTER) == {"torch": "LNWeight", "Triton": "LNWeight"}
    assert names(reg.ROPE_REGISTER) == {
        "chunked_rope": "ChunkedRope",
        "flashinfer_rope": "FlashInferRope",
        "torch_complex_rope": "TorchComplexRope",
        "torch_real_rope": "TorchRealRope",
    }
    assert names(reg.MM_WEIGHT_REGISTER) == {
        "Default": "MMWeight",
        "Default-ForceFp32": "MMWeightForceFp32",
        "fp8-triton": "MMWeightWfp8channelAfp8channeldynamicTriton",
        "int8-triton": "MMWeightWint8channelAint8channeldynamicTriton",
    }


def test_layer_norm_module_attribute_is_the_triton_class():
    reg = registries()
    module = importlib.import_module("lightx2v.common.ops.norm.layer_norm_weight")
    assert module.LNWeight is reg.LN_WEIGHT_REGISTER["Triton"]
    assert reg.LN_WEIGHT_REGISTER["torch"] is not module.LNWeight


# --------------------------------------------------------------------------- device and plugins


def test_platform_selects_ai_device():
    importlib.import_module("lightx2v")
    global_var = importlib.import_module("lightx2v_platform.base.global_var")
    assert (global_var.PLATFORM, global_var.AI_DEVICE) == ("cpu", "cpu")


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without CUDA")
def test_default_platform_is_cuda_and_refuses_a_machine_without_gpu(monkeypatch):
    monkeypatch.delenv("PLATFORM")
    with pytest.raises(RuntimeError, match="AI device for platform 'cuda' is not available"):
        importlib.import_module("lightx2v")


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without CUDA")
def test_skip_platform_check_imports_but_ops_cannot_be_built_on_cpu(monkeypatch):
    monkeypatch.delenv("PLATFORM")
    monkeypatch.setenv("SKIP_PLATFORM_CHECK", "1")
    reg = registries()
    assert importlib.import_module("lightx2v_platform.base.global_var").AI_DEVICE == "cuda"
    with pytest.raises((AssertionError, RuntimeError)):
        reg.RMS_WEIGHT_REGISTER["torch"]("blocks.0.norm.weight")


def test_unknown_platform_lists_the_registered_ones(monkeypatch):
    monkeypatch.setenv("PLATFORM", "nope")
    with pytest.raises(RuntimeError, match=r"Unsupported PLATFORM: nope. Available PLATFORM: \['cpu', 'cuda'\]"):
        importlib.import_module("lightx2v")


def test_platform_is_read_once_per_process(monkeypatch):
    importlib.import_module("lightx2v")
    monkeypatch.setenv("PLATFORM", "nope")
    importlib.import_module("lightx2v")  # cached: no second device set-up
    with pytest.raises(RuntimeError, match="Unsupported PLATFORM: nope"):
        importlib.import_module("lightx2v_platform.set_ai_device").set_ai_device()


PLUGIN = """
from lightx2v_platform.ops.attn.template import AttnWeightTemplate
from lightx2v_platform.registry_factory import PLATFORM_ATTN_WEIGHT_REGISTER, PLATFORM_DEVICE_REGISTER


class PluginDevice:
    name = "plugin"
    init_device_env = staticmethod(lambda: None)
    is_available = staticmethod(lambda: True)
    get_device = staticmethod(lambda: "cpu")


class PluginAttn(AttnWeightTemplate):
    def __init__(self):
        self.config = {}

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        return q


def register():
    PLATFORM_DEVICE_REGISTER("plugin")(PluginDevice)
    PLATFORM_ATTN_WEIGHT_REGISTER("plugin_attn")(PluginAttn)


def explode():
    raise RuntimeError("boom")
"""


def test_plugin_entry_points_run_before_device_selection_and_merge(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, PLUGIN, {"good": "register", "bad": "explode"})
    monkeypatch.setenv("PLATFORM", "plugin")
    reg = registries()
    plugin = sys.modules["lightx2v_test_plugin"]
    assert reg.ATTN_WEIGHT_REGISTER["plugin_attn"] is plugin.PluginAttn
    assert importlib.import_module("lightx2v_platform.base.global_var").PLATFORM == "plugin"


EARLY_IMPORT_PLUGIN = """
def register():
    import lightx2v.utils.registry_factory  # takes the PLATFORM_* copy now
    from lightx2v_platform.registry_factory import PLATFORM_ROPE_REGISTER

    PLATFORM_ROPE_REGISTER("after_copy_rope")(type("AfterCopyRope", (), {}))
"""


def test_plugin_that_imports_the_framework_tables_loses_later_platform_registrations(tmp_path, monkeypatch):
    install_plugin(tmp_path, monkeypatch, EARLY_IMPORT_PLUGIN, {"early": "register"})
    reg = registries()
    assert "after_copy_rope" in platform_registries().PLATFORM_ROPE_REGISTER
    assert "after_copy_rope" not in reg.ROPE_REGISTER


def test_platform_templates_keep_apply_abstract():
    attn_template = importlib.import_module("lightx2v_platform.ops.attn.template")
    with pytest.raises(TypeError):
        attn_template.AttnWeightTemplate("w")


@pytest.mark.skipif(HAS_GPU, reason="needs a machine without an accelerator")
def test_platform_norm_template_cannot_pin_cpu_weights_without_an_accelerator():
    norm_template = importlib.import_module("lightx2v_platform.ops.norm.norm_template")

    class PlainRms(norm_template.RMSWeightTemplate):
        def apply(self, input_tensor):
            return input_tensor

    # torch's CPU build names pin_memory; its CUDA build on a machine without a driver says so
    with pytest.raises(RuntimeError, match="pin_memory|no NVIDIA driver"):
        PlainRms("blocks.0.norm.weight").load({"blocks.0.norm.weight": torch.ones(4)})


# --------------------------------------------------------------------------- attention


def reference_attention(q, k, v, scale=None, causal=False):
    """softmax(q k^T * scale) v per head, in float32: (Sq, H, D) with (Sk, H, D) -> (Sq, H * D)."""
    q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    if causal:
        sq, sk = q.shape[0], k.shape[0]
        keep = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
        scores = scores.masked_fill(~keep, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(q.shape[0], -1)


def qkv(sq, sk, heads=4, dim=16, batch=None):
    shape = (lambda s: (s, heads, dim)) if batch is None else (lambda s: (batch, s, heads, dim))
    return torch.randn(shape(sq)), torch.randn(shape(sk)), torch.randn(shape(sk))


@pytest.mark.parametrize("key", ["flash_attn2", "flash_attn3", "flash_attn4", "sage_attn2", "sage_attn3", "torch_sdpa"])
@pytest.mark.parametrize(("sq", "sk"), [(12, 12), (12, 7)])
def test_attention_as_the_wan_model_calls_it(key, sq, sk):
    attn = registries().ATTN_WEIGHT_REGISTER[key]()
    q, k, v = qkv(sq, sk)
    out = attn.apply(
        q=q,
        k=k,
        v=v,
        cu_seqlens_q=torch.tensor([0, sq], dtype=torch.int32),
        cu_seqlens_kv=torch.tensor([0, sk], dtype=torch.int32),
        max_seqlen_q=sq,
        max_seqlen_kv=sk,
        model_cls="wan2.1",  # models pass extra keywords through
    )
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["flash_attn2", "flash_attn3"])
def test_flash_attention_reads_causal_and_softmax_scale(key):
    attn = registries().ATTN_WEIGHT_REGISTER[key]()
    q, k, v = qkv(6, 9)
    out = attn.apply(q, k, v, None, None, 6, 9, causal=True, softmax_scale=0.3)
    torch.testing.assert_close(out, reference_attention(q, k, v, scale=0.3, causal=True), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["flash_attn2", "flash_attn3"])
def test_flash_attention_batched_input_uses_the_varlen_kernel(key):
    attn = registries().ATTN_WEIGHT_REGISTER[key]()
    q, k, v = qkv(5, 3, batch=2)
    out = attn.apply(q, k, v, torch.tensor([0, 5, 10]), torch.tensor([0, 3, 6]), 5, 3)
    expected = torch.cat([reference_attention(q[b], k[b], v[b]) for b in range(2)])
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_flash_attention_treats_a_packed_3d_input_as_one_sequence():
    attn = registries().ATTN_WEIGHT_REGISTER["flash_attn2"]()
    q, k, v = qkv(8, 8)
    cu_seqlens = torch.tensor([0, 3, 8], dtype=torch.int32)
    out = attn.apply(q, k, v, cu_seqlens, cu_seqlens, 8, 8)
    torch.testing.assert_close(out, reference_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_torch_sdpa_fourth_positional_argument_is_drop_rate():
    attn = registries().ATTN_WEIGHT_REGISTER["torch_sdpa"]()
    q, k, v = qkv(4, 4)
    out = attn.apply(q, k, v, 0, None, True)  # drop_rate, attn_mask, causal
    torch.testing.assert_close(out, reference_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- norms


def reference_rms(x, weight=None, eps=1e-6):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.float()


def upstream_style(cls, *names, lora_prefix="blocks"):
    """Build an op as the Wan model does: names, create_cuda_buffer, create_cpu_buffer, lazy_load,
    lazy_load_file, lora_prefix=..., lora_path=..."""
    return cls(*names, False, False, False, None, lora_prefix=lora_prefix, lora_path="")


RMS_KEYS = ["torch", "torch_native", "sgl-kernel", "fp32_variance", "fp32_variance_qwen", "self_forcing", "one-pass"]


@pytest.mark.parametrize("key", RMS_KEYS)
def test_rms_norm_load_to_cuda_apply(key):
    name = "blocks.0.self_attn.norm_q.weight"
    weight = torch.randn(32).to(torch.bfloat16)
    weight_dict = {name: weight}
    norm = upstream_style(registries().RMS_WEIGHT_REGISTER[key], name)

    norm.load(weight_dict)
    assert name not in weight_dict  # CPU weights are moved out of the dict ...
    assert norm.weight is None and torch.equal(norm.pin_weight, weight)  # ... into pin_weight
    norm.to_cuda()  # AI_DEVICE is cpu here
    assert torch.equal(norm.weight, weight)

    x = torch.randn(2, 5, 32).to(torch.bfloat16)
    out = norm.apply(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    torch.testing.assert_close(out.float(), reference_rms(x, weight), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("key", ["torch", "torch_native", "sgl-kernel", "self_forcing", "one-pass"])
def test_rms_norm_without_weight(key):
    norm = upstream_style(registries().RMS_WEIGHT_REGISTER[key], None)
    norm.load({})
    x = torch.randn(3, 32).to(torch.bfloat16)
    torch.testing.assert_close(norm.apply(x).float(), reference_rms(x), atol=3e-2, rtol=3e-2)


def test_rms_norm_keeps_device_weights_in_place_and_applies_diffs():
    rms = registries().RMS_WEIGHT_REGISTER["torch"]
    name = "blocks.0.norm.weight"
    weight = torch.randn(8, device="meta")
    weight_dict = {name: weight}
    norm = rms(name, lora_prefix="blocks")
    norm.load(weight_dict)
    assert norm.weight is weight and norm.pin_weight is None and name in weight_dict

    real = upstream_style(rms, name)
    real.load({name: torch.ones(8, dtype=torch.bfloat16)})
    real.to_cuda()
    real.register_diff({"blocks.0.norm.diff": torch.full((8,), 1.0, dtype=torch.bfloat16)})
    x = torch.randn(2, 8).to(torch.bfloat16)
    torch.testing.assert_close(real.apply(x).float(), reference_rms(x) * 2, atol=3e-2, rtol=3e-2)


def test_sgl_kernel_rms_norm_falls_back_under_a_sensitive_dtype(monkeypatch):
    monkeypatch.setenv("SENSITIVE_LAYER_DTYPE", "FP32")
    norm = upstream_style(registries().RMS_WEIGHT_REGISTER["sgl-kernel"], "blocks.0.norm.weight")
    weight = torch.randn(16)
    norm.load({"blocks.0.norm.weight": weight})
    norm.to_cuda()
    x = torch.randn(4, 16)
    out = norm.apply(x)
    assert out.dtype == torch.bfloat16  # the fallback casts to infer_dtype
    torch.testing.assert_close(out.float(), reference_rms(x, weight), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("key", ["torch", "Triton"])
def test_layer_norm(key):
    cls = registries().LN_WEIGHT_REGISTER[key]
    x = torch.randn(6, 24).to(torch.bfloat16)
    plain = cls()
    plain.load({})
    torch.testing.assert_close(plain.apply(x).float(), F.layer_norm(x.float(), (24,), eps=1e-6), atol=3e-2, rtol=3e-2)

    weight, bias = torch.randn(24).to(torch.bfloat16), torch.randn(24).to(torch.bfloat16)
    affine = upstream_style(cls, "blocks.0.norm3.weight", "blocks.0.norm3.bias")
    affine.load({"blocks.0.norm3.weight": weight, "blocks.0.norm3.bias": bias})
    assert affine.weight is None and affine.bias is None
    affine.to_cuda()
    out = affine.apply(x)
    assert out.dtype == torch.bfloat16
    expected = F.layer_norm(x.float(), (24,), weight.float(), bias.float(), eps=1e-6)
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)


# --------------------------------------------------------------------------- rope


def wan_cache(seq_len, head_dim):
    """A complex [S, 1, D/2] cache like the Wan model's (cos + i*sin of position * inverse frequency)."""
    inv_freq = 1.0 / torch.pow(10000, torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return torch.polar(torch.ones_like(angles), angles).unsqueeze(1)


def reference_rope(x, cache, layout):
    """Rotate channel pairs of x [S, H, D] by the angles of cache [S, 1, D/2]."""
    cos, sin = cache.real, cache.imag
    xf = x.float()
    a, b = (xf[..., 0::2], xf[..., 1::2]) if layout == "interleaved" else xf.chunk(2, dim=-1)
    ra, rb = a * cos - b * sin, a * sin + b * cos
    if layout == "interleaved":
        return torch.stack((ra, rb), dim=-1).flatten(-2)
    return torch.cat((ra, rb), dim=-1)


def build_rope(reg, key, layout):
    if key == "chunked_rope":
        inner = reg.ROPE_REGISTER["torch_complex_rope"](layout=layout, compute_dtype=torch.float32)
        return reg.ROPE_REGISTER["chunked_rope"](inner=inner, chunk_size=3)
    return reg.ROPE_REGISTER[key](layout=layout, compute_dtype=torch.float32)


@pytest.mark.parametrize("layout", ["interleaved", "split_half"])
@pytest.mark.parametrize("key", ["flashinfer_rope", "torch_complex_rope", "torch_real_rope", "chunked_rope"])
def test_rope_as_the_wan_model_drives_it(key, layout):
    seq_len, heads, head_dim = 10, 3, 16
    rope = build_rope(registries(), key, layout)
    cache = wan_cache(seq_len, head_dim)
    prepared = rope.prepare_freqs(cache, rotary_dim=head_dim)
    positions = rope.prepare_positions(prepared)
    q = torch.randn(seq_len, heads, head_dim).to(torch.bfloat16)
    k = torch.randn(seq_len, heads, head_dim).to(torch.bfloat16)
    expected_q, expected_k = reference_rope(q, cache, layout), reference_rope(k, cache, layout)

    if positions is None:
        q_out, k_out = rope.apply(q.clone(), k.clone(), prepared)
    else:
        q_out, k_out = rope.apply(q.clone(), k.clone(), prepared, positions=positions)
    assert q_out.dtype == torch.bfloat16
    torch.testing.assert_close(q_out.float(), expected_q, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(k_out.float(), expected_k, atol=3e-2, rtol=3e-2)


def test_flashinfer_rope_prepares_a_real_cos_sin_cache_and_rotates_in_place():
    rope = registries().ROPE_REGISTER["flashinfer_rope"](layout="interleaved", compute_dtype=torch.float32)
    cache = wan_cache(6, 8)
    prepared = rope.prepare_freqs(cache, rotary_dim=8)
    assert prepared.dtype == torch.float32 and prepared.shape == (6, 8)
    torch.testing.assert_close(prepared, torch.cat([cache.real, cache.imag], dim=-1).squeeze(1))
    assert torch.equal(rope.prepare_positions(prepared), torch.arange(6))

    q, k = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    original_q = q.clone()
    q_out, _ = rope.apply(q, k, prepared, positions=torch.arange(6))
    assert q_out.data_ptr() == q.data_ptr()  # contiguous inputs are overwritten
    torch.testing.assert_close(q, reference_rope(original_q, cache, "interleaved"))


def test_only_flashinfer_rope_gives_positions():
    reg = registries()
    cache = wan_cache(4, 8)
    for key in ("torch_complex_rope", "torch_real_rope"):
        rope = reg.ROPE_REGISTER[key](layout="interleaved", compute_dtype=torch.float32)
        prepared = rope.prepare_freqs(cache, rotary_dim=8)
        assert prepared is cache and rope.prepare_positions(prepared) is None


# --------------------------------------------------------------------------- linear


def test_default_mm_stores_the_weight_transposed_and_computes_a_linear():
    reg = registries()
    w_name, b_name = "blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias"
    weight, bias = torch.randn(6, 4), torch.randn(6)  # checkpoint layout [out, in]
    weight_dict = {w_name: weight, b_name: bias}
    mm = upstream_style(reg.MM_WEIGHT_REGISTER["Default"], w_name, b_name)

    mm.load(weight_dict)
    assert weight_dict == {} and mm.weight is None and mm.bias is None
    assert mm.pin_weight.shape == (4, 6) and torch.equal(mm.pin_weight, weight.t())
    mm.to_cuda()
    assert mm.weight.shape == (4, 6) and torch.equal(mm.bias, bias)

    x = torch.randn(3, 4)
    torch.testing.assert_close(mm.apply(x), F.linear(x, weight, bias))


def test_default_mm_without_bias_and_with_a_lora_branch():
    reg = registries()
    weight = torch.randn(5, 4)
    mm = upstream_style(reg.MM_WEIGHT_REGISTER["Default"], "blocks.1.attn.o.weight", None)
    mm.load({"blocks.1.attn.o.weight": weight})
    mm.to_cuda()
    x = torch.randn(2, 4)
    torch.testing.assert_close(mm.apply(x), x @ weight.t())

    down, up = torch.randn(2, 4), torch.randn(5, 2)
    mm.register_lora(
        {
            "blocks.1.attn.o.lora_down.weight": down,
            "blocks.1.attn.o.lora_up.weight": up,
            "blocks.1.attn.o.alpha": torch.tensor(4.0),
        },
        lora_strength=0.5,
    )
    torch.testing.assert_close(mm.apply(x), x @ weight.t() + 0.5 * (4.0 / 2) * (x @ down.t() @ up.t()))


def test_default_mm_keeps_device_weights_as_transposed_views():
    default = registries().MM_WEIGHT_REGISTER["Default"]
    mm = default("head.head.weight", "head.head.bias", lora_prefix="diffusion_model.head")  # Wan's head
    weight, bias = torch.empty(6, 4, device="meta"), torch.empty(6, device="meta")
    weight_dict = {"head.head.weight": weight, "head.head.bias": bias}
    mm.load(weight_dict)
    assert mm.weight.shape == (4, 6) and mm.bias is bias and len(weight_dict) == 2


def test_force_fp32_mm_keeps_float32_weights():
    force_fp32 = registries().MM_WEIGHT_REGISTER["Default-ForceFp32"]
    mm = upstream_style(force_fp32, "blocks.0.fc2.weight", "blocks.0.fc2.bias")
    weight, bias = torch.randn(3, 2).to(torch.bfloat16), torch.randn(3).to(torch.bfloat16)
    mm.load({"blocks.0.fc2.weight": weight, "blocks.0.fc2.bias": bias})
    mm.to_cuda()
    assert mm.weight.dtype == torch.float32 and mm.bias.dtype == torch.float32
    x = torch.randn(4, 2)
    torch.testing.assert_close(mm.apply(x), F.linear(x, weight.float(), bias.float()))


# --------------------------------------------------------------------------- quantised linear


def per_channel_checkpoint(prefix, out_features, in_features, dtype, seed=0):
    """``{prefix.weight, prefix.weight_scale, prefix.bias}`` as LightX2V's converter writes a per-channel
    checkpoint: ``scale = max|w| / qmax`` per output row (``[out, 1]``), int8 rounded, fp8 clipped."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) / in_features**0.5
    qmax = 127.0 if dtype == torch.int8 else 448.0
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
    scaled = (w / scale).clamp(-qmax, qmax)
    q = scaled.round().to(dtype) if dtype == torch.int8 else scaled.to(dtype)
    return {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale, f"{prefix}.bias": torch.randn(out_features)}


QUANT_SCHEMES = {"fp8-triton": torch.float8_e4m3fn, "int8-triton": torch.int8}


@pytest.mark.parametrize("key", QUANT_SCHEMES)
def test_triton_quant_schemes_load_weight_scale_and_a_float32_bias(key):
    reg = registries()
    mm_module = importlib.import_module("lightx2v.common.ops.mm.mm_weight")
    prefix = "blocks.0.self_attn.q"
    tensors = per_channel_checkpoint(prefix, 32, 64, QUANT_SCHEMES[key])
    weight_dict = dict(tensors)
    mm = upstream_style(reg.MM_WEIGHT_REGISTER[key], f"{prefix}.weight", f"{prefix}.bias")
    assert isinstance(mm, mm_module.MMWeightQuantTemplate) and mm.weight_scale_name == f"{prefix}.weight_scale"
    assert mm.load_func == mm.load_fp8_perchannel_sym if key == "fp8-triton" else mm.load_int8_perchannel_sym
    mm.load(weight_dict)
    assert weight_dict == {} and mm.weight is None and mm.pin_weight.shape == (32, 64)  # not transposed
    mm.to_cuda()
    assert torch.equal(mm.weight, tensors[f"{prefix}.weight"])
    assert torch.equal(mm.weight_scale, tensors[f"{prefix}.weight_scale"])
    assert mm.bias.dtype == torch.float32  # bias_force_fp32


def test_triton_quant_activation_quantisers_keep_upstream_quirks():
    importlib.import_module("lightx2v")
    kernels = importlib.import_module("lightx2v.common.ops.mm.triton_kernels")
    q, scale = kernels.int8_quantize_triton(torch.tensor([[2.0, 1.4, -0.9, 0.0]]))
    assert q.tolist() == [[127, 88, -57, 0]]  # 88.9 -> 88 and -57.15 -> -57: truncated, not rounded
    assert scale.dtype == torch.float32 and scale.tolist() == pytest.approx([2.0 / 127])
    x = torch.randn(3, 64) * 3
    q, scale = kernels.fp8_quantize_triton(x)
    exact = x.abs().amax(dim=-1) / 448.0
    assert scale.dtype == torch.bfloat16 and torch.equal(scale, exact.to(torch.bfloat16))  # rounded after use
    assert torch.equal(q.float(), (x / exact.unsqueeze(1)).clamp(-448, 448).to(torch.float8_e4m3fn).float())


@pytest.mark.parametrize("key", QUANT_SCHEMES)
def test_triton_quant_schemes_compute_the_scaled_product_in_the_infer_dtype(key):
    reg = registries()
    kernels = importlib.import_module("lightx2v.common.ops.mm.triton_kernels")
    prefix = "blocks.0.ffn.0"
    tensors = per_channel_checkpoint(prefix, 48, 64, QUANT_SCHEMES[key])
    mm = upstream_style(reg.MM_WEIGHT_REGISTER[key], f"{prefix}.weight", f"{prefix}.bias")
    mm.load(dict(tensors))
    mm.to_cuda()
    x = torch.randn(5, 64).to(torch.bfloat16)
    quantize = kernels.fp8_quantize_triton if key == "fp8-triton" else kernels.int8_quantize_triton
    q, scale = quantize(x)
    w = tensors[f"{prefix}.weight"].double() * tensors[f"{prefix}.weight_scale"].double()
    expected = (q.double() * scale.double().unsqueeze(1)) @ w.t() + tensors[f"{prefix}.bias"].double()
    out = mm.apply(x)
    assert out.dtype == torch.bfloat16 and out.shape == (5, 48)
    torch.testing.assert_close(out.double(), expected, atol=1e-2, rtol=8e-3)
    assert mm.apply(x.unsqueeze(0)).shape == (5, 48)  # a 3-D call is squeezed back to 2-D


def test_a_bf16_checkpoint_loads_silently_into_a_quant_scheme_and_fails_at_the_first_call():
    reg = registries()
    prefix = "blocks.0.ffn.0"
    mm = upstream_style(reg.MM_WEIGHT_REGISTER["fp8-triton"], f"{prefix}.weight", f"{prefix}.bias")
    mm.load({f"{prefix}.weight": torch.randn(16, 32).bfloat16(), f"{prefix}.bias": torch.randn(16)})
    mm.to_cuda()
    assert mm.weight_scale is None  # the missing scale is skipped, as upstream's create_default_tensors does
    with pytest.raises(AssertionError, match="is not FP8 E4M3"):
        mm.apply(torch.randn(2, 32).bfloat16())


@pytest.mark.parametrize("key", QUANT_SCHEMES)
def test_quant_loaders_auto_quantise_a_float_weight_when_the_config_asks(key):
    reg = registries()
    prefix = "blocks.0.ffn.0"
    weight = torch.randn(16, 32)
    mm = upstream_style(reg.MM_WEIGHT_REGISTER[key], f"{prefix}.weight", f"{prefix}.bias")
    mm.load_func({f"{prefix}.weight": weight})  # without weight_auto_quant: load_quantized, no scale
    assert mm.weight is None and mm.pin_weight.dtype == torch.float32 and mm.pin_weight_scale is None
    mm.set_config({"weight_auto_quant": True})
    mm.load_func({f"{prefix}.weight": weight})
    qmax = 448.0 if key == "fp8-triton" else 127.0
    assert mm.weight.dtype == QUANT_SCHEMES[key] and mm.weight.shape == (16, 32)
    assert mm.weight_scale.dtype == torch.float32
    assert torch.equal(mm.weight_scale, weight.abs().amax(1, keepdim=True) / qmax)
    error = (mm.weight.float() * mm.weight_scale - weight).abs()
    bound = 0.5 * mm.weight_scale if key == "int8-triton" else weight.abs() / 16 + mm.weight_scale / 512
    assert (error <= bound * 1.0001).all()  # half a step of int8, or of e4m3's 3-bit mantissa (subnormals)


# --------------------------------------------------------------------------- the Wan model


def build_wan(tmp_path, keys, quantize=None, **extra):
    """A tiny Wan2.1 built by WanModel from a random checkpoint file (tests/lightx2v_wan.py), with a scheduler
    prepared and at step 0; returns (model, scheduler, text_encoder_output)."""
    import lightx2v_wan

    importlib.import_module("lightx2v")
    from lightx2v.models.networks.wan.model import WanModel
    from lightx2v.models.schedulers.wan.scheduler import WanScheduler
    from safetensors.torch import save_file

    tensors = lightx2v_wan.checkpoint("tiny")
    path = tmp_path / (quantize or "bf16")
    path.mkdir(exist_ok=True)
    save_file(lightx2v_wan.quantized(tensors, quantize) if quantize else tensors, str(path / "model.safetensors"))
    config = lightx2v_wan.lightx2v_config("tiny", keys, **extra)
    model = WanModel(str(path), config, torch.device("cpu"))
    model.to_cuda()
    scheduler = WanScheduler(config)
    model.set_scheduler(scheduler)
    latent_shape, text = lightx2v_wan.inputs("tiny", frames=3, height=8, width=6)
    scheduler.prepare(seed=0, latent_shape=latent_shape)
    scheduler.step_pre(0)
    return model, scheduler, {"text_encoder_output": text}


def test_wan_model_builds_its_ops_from_the_config_keys_and_runs_a_denoising_step(tmp_path):
    import lightx2v_wan

    reg = registries()
    model, scheduler, inputs = build_wan(tmp_path, lightx2v_wan.NATIVE_KEYS)
    block = model.transformer_weights.blocks[1]
    self_attn, cross_attn, ffn = block.compute_phases
    assert type(self_attn.self_attn_1) is reg.ATTN_WEIGHT_REGISTER["torch_sdpa"]
    assert type(self_attn.self_attn_norm_q) is reg.RMS_WEIGHT_REGISTER["torch"]
    assert type(self_attn.rope) is reg.ROPE_REGISTER["torch_complex_rope"]
    assert type(cross_attn.norm3) is reg.LN_WEIGHT_REGISTER["torch"] and cross_attn.norm3.weight.shape == (64,)
    assert type(ffn.ffn_0) is reg.MM_WEIGHT_REGISTER["Default"] and ffn.ffn_0.weight.shape == (64, 128)
    assert self_attn.self_attn_q.weight_name == "blocks.1.self_attn.q.weight"
    assert self_attn.modulation.tensor.shape == (1, 6, 64)
    before = scheduler.latents.clone()
    model.infer(inputs)
    assert scheduler.noise_pred.shape == (4, 3, 8, 6) and scheduler.noise_pred.dtype == torch.float32
    assert torch.isfinite(scheduler.noise_pred).all()
    scheduler.step_post()
    assert scheduler.latents.dtype == torch.float32 and not torch.equal(scheduler.latents, before.float())
    with pytest.raises(NotImplementedError, match="first step only"):
        scheduler.step_post()


def test_wan_model_quant_schemes_need_dit_quantized_and_a_listed_scheme(tmp_path):
    import lightx2v_wan

    keys = dict(lightx2v_wan.NATIVE_KEYS, dit_quant_scheme="fp8-triton")
    with pytest.raises(AssertionError):  # WanTransformerWeights asserts dit_quantized for a non-Default scheme
        build_wan(tmp_path, keys, quantize="fp8", dit_quantized=False)
    with pytest.raises(AssertionError):  # _check_dit_quantized: not one of upstream's schemes
        build_wan(tmp_path, dict(keys, dit_quant_scheme="my-fp8"), quantize="fp8")


@pytest.mark.parametrize("scheme, quantize", [("fp8-triton", "fp8"), ("int8-triton", "int8")])
def test_wan_model_runs_a_quantized_checkpoint_close_to_the_bf16_one(tmp_path, scheme, quantize):
    import lightx2v_wan

    model, scheduler, inputs = build_wan(tmp_path, dict(lightx2v_wan.NATIVE_KEYS, dit_quant_scheme=scheme),
                                         quantize=quantize)
    q = model.transformer_weights.blocks[0].compute_phases[0].self_attn_q
    assert q.weight.dtype == (torch.float8_e4m3fn if quantize == "fp8" else torch.int8)
    assert q.weight_scale.dtype == torch.bfloat16  # the float scale went through the loader's dtype cast
    head = model.transformer_weights.head
    assert head.weight.dtype == torch.bfloat16  # the head stays Default
    model.infer(inputs)
    quantized = scheduler.noise_pred
    model, scheduler, inputs = build_wan(tmp_path, lightx2v_wan.NATIVE_KEYS)
    model.infer(inputs)
    relative = (quantized - scheduler.noise_pred).norm() / scheduler.noise_pred.norm()
    assert relative < 0.1
