"""CPU tests of fl_patch.kernels.quant_linear: the per-token activation quantisers against their formulas, the
W8A8 reference against an exact dequantised product, every ``unsupported_*`` routing decision, and the gems
paths through the fake FlagGems (tests/fake_flag_gems: the 5.0.2 signatures, asserts and quirks)."""

import types

import pytest
import torch

from fl_patch.kernels import gems, quant_linear

FP8 = torch.float8_e4m3fn
FORMS = {"fp8": FP8, "int8": torch.int8}


@pytest.fixture
def accelerator(monkeypatch):
    """CPU tensors pass the device check and the chip check, so the gems checks after them run."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    monkeypatch.setattr(quant_linear, "_chip_reason", lambda tensor: None)


def quantized_weight(out_features, in_features, form, seed=0):
    """A per-channel checkpoint as LightX2V's converter writes it: ``(q [out, in], scale [out, 1] fp32)``."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed)) / in_features**0.5
    qmax = 448.0 if form == "fp8" else 127.0
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
    scaled = (w / scale).clamp(-qmax, qmax)
    q = scaled.to(FP8) if form == "fp8" else scaled.round().to(torch.int8)
    return q, scale


def call(form, provider, x, weight, scale, bias=None, out_dtype=torch.bfloat16):
    kernel = getattr(quant_linear, f"{provider}_{form}")
    return kernel(x, weight, scale, bias, out_dtype)


def reasons(form, provider, *args):
    return getattr(quant_linear, f"unsupported_{form}")(provider, *args)


# --------------------------------------------------------------------------------------------- quantisers


def test_int8_activation_quantiser_is_per_token_round_half_even():
    x = torch.tensor([[127.0, 63.5, -0.5, 1.5], [0.0, 0.0, 0.0, 0.0], [2.54, -1.27, 0.0, 1.905]])
    q, scale = quant_linear.quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (3, 1)
    assert q[0].tolist() == [127, 64, 0, 2]  # 63.5 -> 64 and 1.5 -> 2 (half to even), -0.5 -> 0
    assert q[1].tolist() == [0, 0, 0, 0] and scale[1].item() == pytest.approx(1e-10 / 127)  # no 0/0 for a zero row
    torch.testing.assert_close(scale[2], torch.tensor([2.54 / 127]))
    assert q[2].tolist() == [127, -64, 0, 95]  # -63.5 -> -64, 95.25 -> 95


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_quantisers_follow_flaggems_formula(dtype):
    x = (torch.randn(7, 96) * torch.logspace(-2, 2, 7).unsqueeze(1)).to(dtype)
    rows = x.float()
    amax = rows.abs().amax(dim=-1, keepdim=True)
    q8, s8 = quant_linear.quantize_fp8(x)
    assert torch.equal(s8, amax / 448.0) and q8.dtype == FP8
    assert torch.equal(q8.float(), (rows / (amax / 448.0)).clamp(-448, 448).to(FP8).float())
    qi, si = quant_linear.quantize_int8(x)
    assert torch.equal(si, amax / 127.0)
    assert torch.equal(qi, torch.round(rows / (amax / 127.0)).to(torch.int8))


def test_fp8_quantiser_matches_flaggems_per_token_group_quant(fake_gems):
    x = torch.randn(5, 64).to(torch.bfloat16)
    q, scale = quant_linear.quantize_fp8(x)
    q_gems, scale_gems = fake_gems.per_token_group_quant_fp8(x, 64, dtype=FP8)
    assert torch.equal(q.float(), q_gems.float()) and torch.equal(scale, scale_gems) and scale_gems.shape == (5, 1)


# --------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_reference_is_the_dequantised_product_of_per_token_activations(form, out_dtype):
    weight, scale = quantized_weight(48, 64, form)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    bias = torch.randn(48)
    out = call(form, "reference", x, weight, scale, bias, out_dtype)
    quantize = quant_linear.quantize_fp8 if form == "fp8" else quant_linear.quantize_int8
    q, s = quantize(x.reshape(-1, 64))
    exact = (q.double() * s.double()) @ (weight.double() * scale.double()).t() + bias.double()
    assert out.dtype == out_dtype and out.shape == (2, 5, 48)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[out_dtype]
    torch.testing.assert_close(out.double(), exact.reshape(2, 5, 48), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("form", FORMS)
def test_reference_is_close_to_the_unquantised_product(form):
    weight, scale = quantized_weight(64, 128, form, seed=1)
    w = weight.float() * scale
    x = torch.randn(16, 128)
    out = call(form, "reference", x, weight, scale, out_dtype=torch.float32)
    relative = (out - x @ w.t()).norm() / (x @ w.t()).norm()
    assert relative < (0.05 if form == "fp8" else 0.01)  # e4m3 keeps 3 mantissa bits, int8 ~7


# --------------------------------------------------------------------------------------------- routing


@pytest.mark.parametrize("form", FORMS)
def test_gems_tensor_check_comes_first_and_small_inputs_stay_on_the_kernel(form, monkeypatch):
    weight, scale = quantized_weight(32, 64, form)
    bad_weight = torch.zeros(32, 48, dtype=FORMS[form])
    assert reasons(form, "gems", torch.randn(4, 64).bfloat16(), bad_weight, scale, None, torch.bfloat16) == "cpu tensor"
    assert reasons(form, "reference", torch.randn(4, 64).bfloat16(), bad_weight, scale, None, torch.bfloat16) == (
        "weight shape")
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    assert reasons(form, "gems", torch.randn(4, 64), weight, scale, None, torch.bfloat16) == "dtype float32"
    assert reasons(form, "gems", torch.randn(0, 64).bfloat16(), weight, scale, None, torch.bfloat16) == "empty tensor"
    assert reasons(form, "gems", torch.randn(4, 64).bfloat16(), weight, scale, None, torch.bfloat16) == "not sm90"
    # no device-profile routing in front: the alternative to the kernel is the fp32 reference, never faster
    from fl_patch.replacements import kernel_pair

    record = types.SimpleNamespace(target="lightx2v.linear.flagos_fp8", family="linear")
    _, unsupported = kernel_pair(quant_linear, form, "gems", record)
    assert unsupported is getattr(quant_linear, f"unsupported_{form}")


@pytest.mark.parametrize("form", FORMS)
def test_unsupported_routes_past_the_device(form, accelerator):
    weight, scale = quantized_weight(32, 64, form)
    x, bias = torch.randn(4, 64).bfloat16(), torch.randn(32)
    other = torch.int8 if form == "fp8" else FP8
    assert reasons(form, "gems", x, weight, scale, bias, torch.bfloat16) is None
    assert reasons(form, "gems", x, weight, scale.reshape(-1)[:1].clone(), None, torch.float16) is None  # per tensor
    cases = {
        "weight shape": (x, weight[:, :32], scale, bias, torch.bfloat16),
        "weight dtype": (x, weight.float().to(other), scale, bias, torch.bfloat16),
        "scale shape": (x, weight, scale[:16], bias, torch.bfloat16),
        "bias shape": (x, weight, scale, bias[:16], torch.bfloat16),
        "out dtype": (x, weight, scale, bias, torch.float32),
        "scale dtype": (x, weight, scale.bfloat16(), bias, torch.bfloat16),
        "bias layout": (x, weight, scale, torch.randn(32, 2)[:, 0], torch.bfloat16),
        "weight layout": (x, weight.t().contiguous().t(), scale, bias, torch.bfloat16),
        "alignment": (x, torch.zeros(24, 64, dtype=FORMS[form]), scale[:24], bias[:24], torch.bfloat16),
    }
    for reason, args in cases.items():
        assert reasons(form, "gems", *args) == reason, reason
    assert reasons(form, "reference", *cases["out dtype"]) is None  # the reference takes any layout and dtype
    assert reasons(form, "reference", *cases["weight layout"]) is None
    assert reasons(form, "gems", x.requires_grad_(), weight, scale, bias, torch.bfloat16) == "requires grad"
    with torch.no_grad():
        assert reasons(form, "gems", x, weight, scale, bias, torch.bfloat16) is None


def test_chip_check_needs_an_nvidia_sm90_device(monkeypatch):
    monkeypatch.setattr(quant_linear, "_chip_reasons", {})
    assert quant_linear._chip_reason(torch.zeros(1)) == "not sm90"
    assert quant_linear._chip_reasons == {torch.device("cpu"): "not sm90"}  # asked once per device


# --------------------------------------------------------------------------------------------- gems paths


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias_dtype", [None, torch.float32, torch.bfloat16])
def test_gems_paths_match_the_reference(fake_gems, accelerator, form, bias_dtype):
    weight, scale = quantized_weight(48, 64, form)
    x = torch.randn(3, 7, 64).to(torch.bfloat16)
    bias = None if bias_dtype is None else torch.randn(48).to(bias_dtype)
    out = call(form, "gems", x, weight, scale, bias)
    expected = call(form, "reference", x, weight, scale, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (3, 7, 48)
    # The kernel adds the bias after its output cast: at most one more bf16 rounding than the reference.
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-2, rtol=8e-3)
    used = [c for c in fake_gems.calls if c[0] in ("per_token_group_quant_fp8", "cutlass_scaled_mm")]
    quant_call = [("per_token_group_quant_fp8", 64)] if form == "fp8" else []  # int8 activations: torch
    assert used == [*quant_call, ("cutlass_scaled_mm", str(FORMS[form]).removeprefix("torch."))]


def test_gems_fp8_asks_for_e4m3_activations(fake_gems, accelerator):
    weight, scale = quantized_weight(32, 64, "fp8")
    x = torch.randn(4, 64).to(torch.bfloat16)
    assert fake_gems.per_token_group_quant_fp8(x, 64)[0].dtype == torch.float32  # FlagGems' default off sm90
    out = call("fp8", "gems", x, weight, scale)
    torch.testing.assert_close(out, call("fp8", "reference", x, weight, scale), atol=1e-2, rtol=8e-3)
