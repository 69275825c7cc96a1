"""Every gems path against the native torch / HF function on CUDA, fp16 and bf16, small and large shapes.

Each case computes the native result in the test dtype and an "exact" one (the native function on fp32
copies of the inputs, cast to the test dtype, as FlagGems' own tests do). The gems result passes when it
is within FlagGems' tolerances of the exact one (rtol bf16 0.016, fp16 1e-3, atol 1e-4 x reduced size),
or at most twice as far from it as the native half-precision result is. Both errors are recorded in the
results file. What the gems path can't take (fp32, odd head dims, ...) must be routed by ``unsupported_*``.
"""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from fl_patch.kernels import attention, gems, layer_norm, linear, rms_norm, rope, swiglu

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(
    not CUDA or importlib.util.find_spec("flag_gems") is None, reason="needs CUDA and flag_gems"
)

DEVICE = "cuda"
RTOL = {torch.float16: 1e-3, torch.bfloat16: 0.016}
HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", autouse=True)
def flag_gems_module():
    module = gems.load()
    yield module


def check(record_property, actual, native, exact, reduce_dim=1, rows=None):
    """Assert `actual` is as good as `native`: same dtype and shape, and close to `exact` (see module doc).

    rows: optional bool mask broadcastable to the output; only those entries are compared (the rest must
    be finite).
    """
    assert actual.dtype == native.dtype, (actual.dtype, native.dtype)
    assert actual.shape == native.shape, (actual.shape, native.shape)
    dtype = native.dtype
    exact = exact.to(dtype)
    if rows is not None:
        assert torch.isfinite(actual).all()
        actual, native, exact = (torch.where(rows, t, 0) for t in (actual, native, exact))
    error = (actual.float() - exact.float()).abs().max().item()
    native_error = (native.float() - exact.float()).abs().max().item()
    record_property("max_error", error)
    record_property("native_max_error", native_error)
    rtol = RTOL.get(dtype, 1.3e-6)
    within = torch.allclose(actual.float(), exact.float(), rtol=rtol, atol=1e-4 * reduce_dim)
    assert within or error <= 2 * native_error, f"error {error:.3g} vs native {native_error:.3g}"


def randn(*shape, dtype=torch.bfloat16, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ------------------------------------------------------------------------------------------------ RMSNorm


RMS_SHAPES = {"small": (2, 33, 1024), "large": (4096, 4096), "wide": (3, 8192)}


def native_rms_norm(form, x, weight, eps):
    """The original: F.rms_norm, or HF's LlamaRMSNorm / GemmaRMSNorm module holding `weight`."""
    from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    if form == "torch":
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    module = (LlamaRMSNorm if form == "hf" else GemmaRMSNorm)(x.shape[-1], eps=eps)
    module.weight = torch.nn.Parameter(weight, requires_grad=False)
    return module(x)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", list(RMS_SHAPES))
@pytest.mark.parametrize("form", ["hf", "gemma", "torch"])
def test_rms_norm(record_property, dtype, shape, form):
    x = randn(*RMS_SHAPES[shape], dtype=dtype, scale=3.0)
    hidden = x.shape[-1]
    weight = randn(hidden, dtype=dtype, scale=0.5) + (0 if form == "gemma" else 1)
    with torch.no_grad():
        if form == "torch":
            assert rms_norm.unsupported_torch("gems", x, (hidden,), weight) is None
            actual = rms_norm.gems_torch(x, (hidden,), weight, 1e-6)
        else:
            assert getattr(rms_norm, f"unsupported_{form}")("gems", x, weight) is None
            actual = getattr(rms_norm, f"gems_{form}")(x, weight, 1e-6)
        native = native_rms_norm(form, x, weight, 1e-6)
        exact = native_rms_norm(form, x.float(), weight.float(), 1e-6)
    check(record_property, actual, native, exact, reduce_dim=hidden)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", list(RMS_SHAPES))
def test_rms_norm_hf_native_path(record_property, dtype, shape):
    """torch's fused rms_norm, which HF RMSNorm calls under the small-input size run on NVIDIA."""
    x = randn(*RMS_SHAPES[shape], dtype=dtype, scale=3.0)
    weight = randn(x.shape[-1], dtype=dtype, scale=0.5) + 1
    with torch.no_grad():
        actual = rms_norm.native_hf(x, weight, 1e-6)
        native = native_rms_norm("hf", x, weight, 1e-6)
        exact = native_rms_norm("hf", x.float(), weight.float(), 1e-6)
    check(record_property, actual, native, exact, reduce_dim=x.shape[-1])


def test_small_hf_rms_norm_calls_take_the_native_path_on_the_device(record_property, monkeypatch, tmp_path):
    """With a profile that keeps RMSNorm calls under 2**22 elements native (the fixture turns profiles off for the
    other tests), a 1x16 forward of a tiny bf16 Llama runs its RMSNorms on torch's fused op and matches HF's logits
    within bf16 noise."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import fl_patch
    from fl_patch.device import profiles

    path = profiles.write({"schema": 1, "device": {"name": torch.cuda.get_device_name(0)}, "versions": {},
                           "families": {"rms_norm": {"route": "gems", "min_elements": 1 << 22}}},
                          tmp_path / "profile.json")
    monkeypatch.setenv("FL_PATCH_PROFILE", str(path))
    config = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DEVICE, torch.bfloat16).eval()
    ids = torch.randint(0, 256, (1, 16), device=DEVICE)
    with torch.no_grad():
        native = model(ids).logits
        exact = model.float()(ids).logits
        model.to(torch.bfloat16)
        with fl_patch.patched(kernels="gems"):
            actual = model(ids).logits
            fallbacks = [r["fallbacks"] for r in fl_patch.report() if r["where"].endswith("LlamaRMSNorm.forward")]
    assert fallbacks == [{"small input (torch rms_norm)": 5}]
    check(record_property, actual, native, exact, reduce_dim=256)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", list(RMS_SHAPES))
@pytest.mark.parametrize("with_scale", [True, False])
@pytest.mark.parametrize("path", ["gems", "native"])
def test_rms_norm_fp32_form(record_property, dtype, shape, with_scale, path):
    """Gemma 3n/4's RMSNorm with and without with_scale (without: NanoChat's unweighted norm too)."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4RMSNorm

    x = randn(*RMS_SHAPES[shape], dtype=dtype, scale=3.0)
    module = Gemma4RMSNorm(x.shape[-1], eps=1e-6, with_scale=with_scale).to(DEVICE, dtype)
    with torch.no_grad():
        if with_scale:
            module.weight.normal_(1.0, 0.5)
        weight = module.weight if with_scale else None
        assert rms_norm.unsupported_fp32("gems", x, weight) is None
        actual = getattr(rms_norm, f"{path}_fp32")(x, weight, 1e-6)
        native = module(x)
        exact = module.float()(x.float())
    check(record_property, actual, native, exact, reduce_dim=x.shape[-1])


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", list(RMS_SHAPES))
@pytest.mark.parametrize("path", ["gems", "native"])
def test_rms_norm_gated(record_property, dtype, shape, path):
    """Qwen3-Next / 3.5's gated norm: rms_norm then silu(gate) *, as FlagGems' two kernels or torch's ops."""
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    x = randn(*RMS_SHAPES[shape], dtype=dtype, scale=3.0)
    gate = randn(*RMS_SHAPES[shape], dtype=dtype, scale=2.0)
    module = Qwen3NextRMSNormGated(x.shape[-1], eps=1e-6).to(DEVICE, dtype)
    with torch.no_grad():
        module.weight.normal_(1.0, 0.5)
        assert rms_norm.unsupported_gated("gems", x, gate, module.weight) is None
        actual = getattr(rms_norm, f"{path}_gated")(x, gate, module.weight, 1e-6)
        native = module(x, gate)
        exact = module.float()(x.float(), gate.float())
    check(record_property, actual, native, exact, reduce_dim=x.shape[-1])


def test_rms_norm_hf_fp32_weight_keeps_hf_dtype(record_property):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    module = LlamaRMSNorm(2048, eps=1e-6).to(DEVICE)
    x = randn(8, 2048, scale=3.0)
    with torch.no_grad():
        module.weight.normal_()
        native = module(x)
        actual = rms_norm.gems_hf(x, module.weight, 1e-6)
        exact = module(x.float())
    assert native.dtype == torch.float32
    check(record_property, actual, native, exact.to(native.dtype), reduce_dim=2048)


# --------------------------------------------------------------------------------------------------- rope


def hf_cos_sin(positions, head_dim, dtype, rotary_dim=None):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rotary_dim = rotary_dim or head_dim
    config = LlamaConfig(hidden_size=rotary_dim * 4, num_attention_heads=4, head_dim=rotary_dim,
                         max_position_embeddings=16384)
    embedding = LlamaRotaryEmbedding(config).to(DEVICE)
    return embedding(torch.zeros(1, device=DEVICE, dtype=dtype), positions.to(DEVICE))


ROPE_CASES = {
    "llama 4x32/8x2048x128": dict(batch=4, q_heads=32, kv_heads=8, seq=2048, head_dim=128),
    "shared positions": dict(batch=2, q_heads=8, kv_heads=2, seq=77, head_dim=128),
    "per-row positions": dict(batch=3, q_heads=8, kv_heads=2, seq=77, head_dim=128, offsets=(0, 5, 40)),
    "decode": dict(batch=3, q_heads=8, kv_heads=2, seq=1, head_dim=128, offsets=(9, 300, 4000)),
    "unsqueeze 2": dict(batch=2, q_heads=8, kv_heads=8, seq=64, head_dim=64, unsqueeze_dim=2),
    "partial rotary": dict(batch=2, q_heads=8, kv_heads=2, seq=50, head_dim=96, rotary_dim=32),
    "head dim 80": dict(batch=2, q_heads=4, kv_heads=4, seq=33, head_dim=80),
    "contiguous bhsd": dict(batch=2, q_heads=4, kv_heads=2, seq=40, head_dim=64, contiguous=True),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(ROPE_CASES))
def test_rope_hf(record_property, dtype, name):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as apply_partial

    case = ROPE_CASES[name]
    batch, seq, head_dim = case["batch"], case["seq"], case["head_dim"]
    offsets = torch.tensor(case.get("offsets", (0,)))[:, None]
    cos, sin = hf_cos_sin(offsets + torch.arange(seq)[None], head_dim, dtype, case.get("rotary_dim"))
    q = randn(batch, seq, case["q_heads"], head_dim, dtype=dtype).transpose(1, 2)
    k = randn(batch, seq, case["kv_heads"], head_dim, dtype=dtype).transpose(1, 2)
    unsqueeze_dim = case.get("unsqueeze_dim", 1)
    if unsqueeze_dim == 2:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    if case.get("contiguous"):
        q, k = q.contiguous(), k.contiguous()
    native_fn = apply_partial if "rotary_dim" in case else apply_rotary_pos_emb
    with torch.no_grad():
        assert rope.unsupported_hf("gems", q, k, cos, sin, unsqueeze_dim) is None
        actual = rope.gems_hf(q, k, cos, sin, unsqueeze_dim)
        native = native_fn(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)
        exact = native_fn(q.float(), k.float(), cos.float(), sin.float(), unsqueeze_dim=unsqueeze_dim)
    for a, n, e in zip(actual, native, exact, strict=True):
        check(record_property, a, n, e)


def _compiled_variants(kernel) -> int | None:
    """How many binaries Triton holds for a FlagGems kernel (None if this Triton keeps them elsewhere)."""
    jit = getattr(kernel, "jit_function", kernel)
    caches = getattr(jit, "device_caches", None)
    if caches is None:
        return None
    return sum(len(entry[0]) for entry in caches.values())


def test_rope_sequence_lengths_share_compiled_kernels(record_property, flag_gems_module):
    from flag_gems.fused.rotary_embedding import apply_rotary_pos_emb_kernel

    lengths = (100, 300, 1000, 2047, 3000, 4096)
    before = _compiled_variants(apply_rotary_pos_emb_kernel)
    with torch.no_grad():
        for seq in lengths:
            cos, sin = hf_cos_sin(torch.arange(seq)[None], 128, torch.bfloat16)
            q = randn(2, seq, 8, 128).transpose(1, 2)
            k = randn(2, seq, 2, 128).transpose(1, 2)
            rope.gems_hf(q, k, cos, sin)
    torch.cuda.synchronize()
    after = _compiled_variants(apply_rotary_pos_emb_kernel)
    record_property("compiled_before", before)
    record_property("compiled_after", after)
    record_property("sequence_lengths", list(lengths))
    if before is None:
        pytest.skip("this Triton doesn't expose device_caches")
    assert after - before <= 2, f"{after - before} compiles for {len(lengths)} sequence lengths"


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1024, 12, 128), (4096, 40, 128)])
def test_rope_interleaved(record_property, dtype, shape):
    seq, heads, head_dim = shape
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(seq, dtype=torch.float64), inv_freq)
    freqs = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)[:, None, :].to(DEVICE)
    q, k = randn(seq, heads, head_dim, dtype=dtype), randn(seq, heads, head_dim, dtype=dtype)
    assert rope.unsupported_interleaved("gems", q, k, freqs) is None
    actual = rope.gems_interleaved(q, k, freqs)
    native = rope.reference_interleaved(q, k, freqs)
    for a, n in zip(actual, native, strict=True):
        check(record_property, a, n, n)


# ------------------------------------------------------------------------------------------ swiglu, norm


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(2, 33, 1376), (8192, 14336)])
def test_swiglu(record_property, dtype, shape):
    gate, up = randn(*shape, dtype=dtype, scale=3.0), randn(*shape, dtype=dtype)
    assert swiglu.unsupported("gems", gate, up) is None
    with torch.no_grad():
        actual = swiglu.gems(gate, up)
        native = F.silu(gate) * up
        exact = F.silu(gate.float()) * up.float()
    check(record_property, actual, native, exact)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(8, 77, 1024), (4096, 4096), (2, 8192)])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm(record_property, dtype, shape, affine):
    x = randn(*shape, dtype=dtype, scale=3.0) + 1
    hidden = shape[-1]
    weight = randn(hidden, dtype=dtype) if affine else None
    bias = randn(hidden, dtype=dtype) if affine else None
    assert layer_norm.unsupported("gems", x, (hidden,), weight, bias) is None
    with torch.no_grad():
        actual = layer_norm.gems(x, (hidden,), weight, bias, 1e-5)
        native = F.layer_norm(x, (hidden,), weight, bias, 1e-5)
        exact = F.layer_norm(x.float(), (hidden,), None if weight is None else weight.float(),
                             None if bias is None else bias.float(), 1e-5)
    check(record_property, actual, native, exact, reduce_dim=hidden)


# ---------------------------------------------------------------------------------------------- routing


def test_routing_on_the_device():
    x32, w32 = randn(4, 64, dtype=torch.float32), randn(64, dtype=torch.float32)
    assert rms_norm.unsupported_hf("gems", x32, w32) == "dtype float32"
    assert layer_norm.unsupported("gems", x32, (64,), None, None) == "dtype float32"
    assert swiglu.unsupported("gems", x32, x32) == "dtype float32"
    assert linear.unsupported("gems", x32, randn(8, 64, dtype=torch.float32), None) == "dtype float32"
    q, k, v = qkv(2, 8, 2, 16, 16, 128, torch.float32)
    assert attention.unsupported_sdpa("gems", q, k, v, None, 0.0, True, None, True) == "dtype float32"
    q, k, v = qkv(2, 8, 2, 16, 16, 80, torch.bfloat16)
    assert attention.unsupported_sdpa("gems", q, k, v, None, 0.0, True, None, True) == "head dim 80"
    q, k, v = qkv(2, 8, 2, 16, 16, 128, torch.bfloat16)
    assert attention.unsupported_sdpa("gems", q, k, v, None, 0.1, True, None, True) == "dropout"
    assert attention.unsupported_sdpa("gems", q, k, v, None, 0.0, True, None, False) == "head count mismatch"
    assert attention.unsupported_sdpa("gems", q.requires_grad_(), k, v, None, 0.0, True, None, True) == "requires grad"
    cos, sin = hf_cos_sin(torch.arange(16)[None], 128, torch.float32)
    assert rope.unsupported_hf("gems", q.detach(), k, cos, sin, 1) == "mixed dtypes"


def test_gems_info_on_the_device(record_property):
    info = gems.info()
    record_property("info", info)
    assert info["loaded"] and info["load_error"] is None
    assert info["vendor"] == "nvidia"


# ---------------------------------------------------------------------------------------------- attention


def qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype):
    """q, k, v as HF attention produces them: ``(B, S, H, D)`` projections transposed to ``(B, H, S, D)``."""
    q = randn(batch, q_len, q_heads, head_dim, dtype=dtype).transpose(1, 2)
    k = randn(batch, kv_len, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    v = randn(batch, kv_len, kv_heads, head_dim, dtype=dtype).transpose(1, 2)
    return q, k, v


def padded_causal_mask(batch, q_len, kv_len, pads, shape="b1qk"):
    keep = torch.ones(q_len, kv_len, dtype=torch.bool, device=DEVICE).tril(kv_len - q_len)
    key_ok = torch.arange(kv_len, device=DEVICE)[None, :] >= torch.tensor(pads, device=DEVICE)[:, None]
    if shape == "b11k":
        return key_ok[:, None, None, :]
    if shape == "qk":
        return keep
    return (keep[None] & key_ok[:, None, :])[:, None]


SDPA_CASES = {
    "causal gqa 2x16/4x512x128": dict(shape=(2, 16, 4, 512, 512, 128), is_causal=True),
    "causal gqa 4x32/8x2048x128": dict(shape=(4, 32, 8, 2048, 2048, 128), is_causal=True),
    "non-causal mha 2x8x300x128": dict(shape=(2, 8, 8, 300, 300, 128)),
    "cross 2x8x77/300x64": dict(shape=(2, 8, 8, 77, 300, 64)),
    "decode gqa 3x16/4x1/513x128": dict(shape=(3, 16, 4, 1, 513, 128)),
    "decode mha 3x8x1/513x128": dict(shape=(3, 8, 8, 1, 513, 128)),
    "odd lengths 1x4x333/1000x128": dict(shape=(1, 4, 4, 333, 1000, 128)),
    "head dim 96": dict(shape=(2, 8, 8, 128, 128, 96), is_causal=True),
    "scale": dict(shape=(2, 8, 2, 128, 128, 128), is_causal=True, scale=0.05),
    "causal q<kv top-left": dict(shape=(2, 8, 2, 128, 256, 128), is_causal=True),
    "padded bool mask": dict(shape=(3, 16, 4, 256, 256, 128), mask="bool", pads=(0, 17, 200)),
    "padded bool mask mha": dict(shape=(3, 8, 8, 256, 256, 128), mask="bool", pads=(0, 3, 60)),
    "padded decode mask": dict(shape=(3, 16, 4, 1, 256, 128), mask="bool b11k", pads=(0, 17, 200)),
    "2-d bool mask": dict(shape=(2, 16, 4, 256, 256, 128), mask="bool qk", pads=(0, 0)),
    "float mask -inf": dict(shape=(3, 16, 4, 256, 256, 128), mask="float", pads=(0, 17, 200)),
    "float mask finfo.min": dict(shape=(3, 16, 4, 256, 256, 128), mask="float min", pads=(0, 17, 200)),
    "float bias": dict(shape=(2, 16, 4, 256, 256, 128), mask="bias"),
}


FP16_SDPA_CASES = ("causal gqa 2x16/4x512x128", "padded bool mask", "decode gqa 3x16/4x1/513x128",
                   "non-causal mha 2x8x300x128", "decode mha 3x8x1/513x128")


def sdpa_inputs(name, dtype):
    case = dict(SDPA_CASES[name])
    batch, q_heads, kv_heads, q_len, kv_len, head_dim = case.pop("shape")
    q, k, v = qkv(batch, q_heads, kv_heads, q_len, kv_len, head_dim, dtype)
    kwargs = {"enable_gqa": q_heads != kv_heads, "is_causal": case.get("is_causal", False)}
    if "scale" in case:
        kwargs["scale"] = case["scale"]
    mask_kind = case.get("mask")
    if mask_kind:
        shape = {"bool b11k": "b11k", "bool qk": "qk"}.get(mask_kind, "b1qk")
        keep = padded_causal_mask(batch, q_len, kv_len, case.get("pads", (0,) * batch), shape)
        zeros = torch.zeros(keep.shape, device=DEVICE, dtype=dtype)
        if mask_kind == "float":
            kwargs["attn_mask"] = zeros.masked_fill(~keep, float("-inf"))
        elif mask_kind == "float min":
            kwargs["attn_mask"] = zeros.masked_fill(~keep, torch.finfo(dtype).min)
        elif mask_kind == "bias":
            kwargs["attn_mask"] = randn(batch, 1, q_len, kv_len, dtype=dtype, scale=2.0)
        else:
            kwargs["attn_mask"] = keep
    return (q, k, v), kwargs


def attended(mask, q_len, kv_len):
    """Bool ``(..., Sq, 1)``: query rows whose mask keeps some key (None: all rows)."""
    if mask is None:
        return None
    keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min
    return keep.expand(*keep.shape[:-2], q_len, kv_len).any(dim=-1, keepdim=True)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(SDPA_CASES))
def test_sdpa(record_property, dtype, name):
    if dtype == torch.float16 and name not in FP16_SDPA_CASES:
        pytest.skip("fp16 runs a subset: each new dtype autotunes FlagGems' sdpa kernel again")
    (q, k, v), kwargs = sdpa_inputs(name, dtype)
    mask, is_causal = kwargs.get("attn_mask"), kwargs["is_causal"]
    q_len, kv_len, head_dim = q.shape[2], k.shape[2], q.shape[3]
    scale, enable_gqa = kwargs.get("scale"), kwargs["enable_gqa"]
    routed = attention.unsupported_sdpa("gems", q, k, v, mask, 0.0, is_causal, scale, enable_gqa)
    assert routed == (None if mask is None else "attn mask")  # masked calls stay native by default
    rows = attended(mask, q_len, kv_len)
    with torch.no_grad():
        actual = attention.gems_sdpa(q, k, v, **kwargs)
        native = F.scaled_dot_product_attention(q, k, v, **kwargs)
        if mask is not None and mask.dtype != torch.bool:
            kwargs["attn_mask"] = mask.float()
        exact = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)
    record_property("kernel", "flash" if attention._takes_flash(mask, is_causal, q_len, kv_len, head_dim) else "sdpa")
    check(record_property, actual, native, exact, reduce_dim=head_dim, rows=rows)


VARLEN_CASES = {
    "self": dict(q_lens=(100, 37, 256), kv_lens=(100, 37, 256)),
    "self causal": dict(q_lens=(100, 37, 256), kv_lens=(100, 37, 256), causal=True),
    "cross": dict(q_lens=(64, 9), kv_lens=(200, 300)),
    "chunked causal": dict(q_lens=(16, 32), kv_lens=(80, 40), causal=True),
    "decode": dict(q_lens=(1, 1, 1), kv_lens=(50, 70, 90), causal=True),
    "lightx2v 1x32760x12x128": dict(q_lens=(32760,), kv_lens=(32760,), heads=(12, 12)),
}


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_varlen(record_property, dtype, name):
    case = VARLEN_CASES[name]
    q_heads, kv_heads = case.get("heads", (16, 4))
    cu_q = torch.tensor([0, *torch.tensor(case["q_lens"]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    cu_kv = torch.tensor([0, *torch.tensor(case["kv_lens"]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    q = randn(int(cu_q[-1]), q_heads, 128, dtype=dtype)
    k = randn(int(cu_kv[-1]), kv_heads, 128, dtype=dtype)
    v = randn(int(cu_kv[-1]), kv_heads, 128, dtype=dtype)
    causal = case.get("causal", False)
    max_q, max_kv = max(case["q_lens"]), max(case["kv_lens"])
    assert attention.unsupported_varlen("gems", q, k, v, causal, None) is None
    with torch.no_grad():
        actual = attention.gems_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=causal)
        if len(case["q_lens"]) == 1 and not causal:  # one long sequence: torch's sdpa is the native path
            native = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
            exact = F.scaled_dot_product_attention(*(t.float().transpose(0, 1)[None] for t in (q, k, v)))
            exact = exact[0].transpose(0, 1)
        else:
            native = attention.reference_varlen(q, k, v, cu_q, cu_kv, max_q, max_kv, causal=causal)
            exact = attention.reference_varlen(q.float(), k.float(), v.float(), cu_q, cu_kv, max_q, max_kv,
                                               causal=causal)
    check(record_property, actual, native, exact, reduce_dim=128)


# ------------------------------------------------------------------------------------------------ linear


# (input shape, out features, dtype, bias, weight layout): a short list, since FlagGems autotunes its GEMM
# per shape, dtype and weight strides, and each tuning compiles a few dozen kernels.
LINEAR_CASES = {
    "3-d 2x33x1024->3072 bf16": ((2, 33, 1024), 3072, torch.bfloat16, False, "out_in"),
    "3-d 2x33x1024->3072 bf16 bias": ((2, 33, 1024), 3072, torch.bfloat16, True, "out_in"),
    "4-d 2x3x5x512->256 bf16 bias [in,out]": ((2, 3, 5, 512), 256, torch.bfloat16, True, "in_out"),
    "2-d 64x4096->4096 bf16": ((64, 4096), 4096, torch.bfloat16, False, "out_in"),
    "decode 4x1x2048->8192 bf16": ((4, 1, 2048), 8192, torch.bfloat16, False, "out_in"),
    "3-d 2x33x1024->3072 fp16": ((2, 33, 1024), 3072, torch.float16, False, "out_in"),
    "4-d 2x3x5x512->256 fp16 bias [in,out]": ((2, 3, 5, 512), 256, torch.float16, True, "in_out"),
}


@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear(record_property, name):
    shape, out_features, dtype, with_bias, layout = LINEAR_CASES[name]
    x = randn(*shape, dtype=dtype)
    weight = randn(out_features, shape[-1], dtype=dtype, scale=shape[-1] ** -0.5)
    bias = randn(out_features, dtype=dtype) if with_bias else None
    with torch.no_grad():
        if layout == "out_in":
            assert linear.unsupported("gems", x, weight, bias) is None
            actual = linear.gems(x, weight, bias)
        else:
            weight_t = weight.t().contiguous()
            assert linear.unsupported_in_out("gems", x, weight_t, bias) is None
            actual = linear.gems_in_out(x, weight_t, bias)
        native = F.linear(x, weight, bias)
        exact = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    check(record_property, actual, native, exact, reduce_dim=shape[-1])
