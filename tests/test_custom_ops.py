"""FlagGems calls under torch.compile: fl_patch's custom ops (fl_patch/kernels/custom_ops.py) pass
``torch.library.opcheck``, their fakes give the real outputs' shapes, dtypes and strides, and tiny HF Llama and
Qwen3 models patched by fl_patch compile with ``fullgraph=True`` into graphs whose FlagGems calls reach the (fake)
FlagGems, with eager's logits and the original's gradients.

The fake flag_gems (tests/fake_flag_gems) stands in for the real one on CPU; ``gems.device_reason`` is patched to
take CPU tensors as a device's (as in test_routing.py), and no device profile is found (every call on FlagGems)."""

import shutil
import subprocess

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fl_patch
from fl_patch.device import profiles
from fl_patch.kernels import custom_ops, gems

FAMILIES = ["rms_norm", "rope", "attention", "swiglu", "linear"]
SIZES = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=32, pad_token_id=0)
BF16_LOGITS = 0.02  # relative to max |logit|: a few bf16 ulps (1/128) over two layers, kernels rounding once
BF16_GRADS = 0.05  # the same for bf16 gradients, which add the backward's own roundings


@pytest.fixture
def stand_in_device(monkeypatch, tmp_path, fake_gems):
    """CPU tensors as a device's; no device profile anywhere (every call goes to FlagGems); ops defined."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(profiles, "SHIPPED_DIR", tmp_path / "shipped")
    assert custom_ops.define() is None
    torch._dynamo.reset()
    yield fake_gems
    torch._dynamo.reset()


def bf16(*shape, grad=False):
    return torch.randn(*shape).to(torch.bfloat16).requires_grad_(grad)


def int8(*shape):
    return torch.randint(-127, 128, shape, dtype=torch.int8)


def op_cases():
    """(op name, args) per op, with the inputs fl_patch's kernels give it."""
    torch.manual_seed(0)
    x = bf16(4, 64, grad=True)
    cos, sin = bf16(16, 16), bf16(16, 16)
    cu_q = torch.tensor([0, 4, 10], dtype=torch.int32)
    weight_int8 = int8(32, 64)
    return [
        ("rms_norm_forward", (x, [64], bf16(64, grad=True), 1e-6)),
        ("rms_norm_forward", (bf16(2, 3, 8, 4, grad=True), [8, 4], bf16(8, 4, grad=True), 1e-5)),
        ("rms_norm_backward", (bf16(4, 64), x.detach(), torch.rand(4) + 0.5, [64], bf16(64), 1e-6)),
        ("silu_and_mul", (bf16(4, 32, grad=True), bf16(4, 32, grad=True))),
        ("silu_and_mul", (bf16(6, 32, grad=True).t(), bf16(6, 32).t())),  # a transposed gate: its layout is kept
        ("silu_and_mul_backward", (bf16(4, 32), bf16(4, 32), bf16(4, 32))),
        ("layer_norm", (bf16(2, 3, 64), [64], bf16(64), bf16(64), 1e-5)),
        ("layer_norm", (bf16(4, 64), [64], None, None, 1e-5)),
        ("apply_rotary_pos_emb", (bf16(1, 6, 2, 32), bf16(1, 6, 1, 32), cos, sin, None, False)),
        ("apply_rotary_pos_emb", (bf16(1, 2, 6, 32).transpose(1, 2), bf16(1, 1, 6, 32).transpose(1, 2), cos, sin,
                                  None, False)),
        ("apply_rotary_pos_emb", (bf16(1, 6, 2, 32), bf16(1, 6, 2, 32), cos, sin, None, True)),
        ("scaled_dot_product_attention", (bf16(1, 2, 6, 32), bf16(1, 1, 6, 32), bf16(1, 1, 6, 32), None, 0.0, True,
                                          None, True)),
        ("scaled_dot_product_attention", (bf16(1, 2, 6, 32), bf16(1, 2, 8, 32), bf16(1, 2, 8, 32),
                                          torch.zeros(1, 2, 6, 8), 0.0, False, 0.25, False)),
        ("flash_attention_forward", (bf16(1, 2, 6, 32).transpose(1, 2), bf16(1, 1, 6, 32).transpose(1, 2),
                                     bf16(1, 1, 6, 32).transpose(1, 2), 6, 6, True, None, True)),
        ("flash_attn_varlen_func", (bf16(10, 2, 32), bf16(10, 1, 32), bf16(10, 1, 32), 6, cu_q, 6, cu_q, None,
                                    True)),
        ("mm", (bf16(6, 64), bf16(32, 64).t())),
        ("addmm", (bf16(32), bf16(6, 64), bf16(32, 64).t(), 1.0, 1.0)),
        ("per_token_group_quant_fp8", (bf16(4, 64), 64, 1e-10, torch.float8_e4m3fn)),
        ("cutlass_scaled_mm", (torch.empty(4, 32, dtype=torch.bfloat16), int8(4, 64), weight_int8.t(),
                               torch.rand(4, 1), torch.rand(32), None)),
    ]


CASES = op_cases()


def test_every_op_has_a_case_and_the_ones_with_backward_are_named():
    assert {name for name, _ in CASES} == set(custom_ops.OPS)
    assert set(custom_ops.WITH_BACKWARD) <= set(custom_ops.OPS)


@pytest.mark.parametrize("name, args", CASES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(CASES)])
def test_opcheck(stand_in_device, name, args):
    torch.library.opcheck(getattr(torch.ops.fl_patch, name).default, args)


@pytest.mark.parametrize("name, args", CASES, ids=[f"{name}-{i}" for i, (name, _) in enumerate(CASES)])
def test_the_fake_gives_the_real_outputs_shapes_dtypes_and_strides(stand_in_device, name, args):
    op = getattr(torch.ops.fl_patch, name).default
    real = _tensors(op(*args))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = _tensors(op(*[mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]))
    assert [(t.shape, t.dtype, t.stride()) for t in fake] == [(t.shape, t.dtype, t.stride()) for t in real]


def _tensors(out):
    if out is None:
        return []
    return [out] if isinstance(out, torch.Tensor) else list(out)


def test_backward_of_rms_norm_and_silu_and_mul_equals_torch_autograd(stand_in_device):
    """fp32 inputs (the fake FlagGems computes in fp32): the ops' gradients are autograd's of the same math."""
    torch.manual_seed(0)
    x, w = torch.randn(5, 3, 16, requires_grad=True), torch.randn(3, 16, requires_grad=True)
    y = torch.ops.fl_patch.rms_norm_forward(x, [3, 16], w, 1e-6)[0]
    dy = torch.randn_like(y)
    x2, w2 = x.detach().requires_grad_(), w.detach().requires_grad_()
    actual = torch.autograd.grad(y, (x, w), dy)
    expected = torch.autograd.grad(torch.nn.functional.rms_norm(x2, (3, 16), w2, 1e-6), (x2, w2), dy)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-5)
    assert ("rms_norm_backward",) in stand_in_device.calls
    a, b = torch.randn(4, 32, requires_grad=True), torch.randn(4, 32, requires_grad=True)
    out = torch.ops.fl_patch.silu_and_mul(a, b)
    dout = torch.randn_like(out)
    a2, b2 = a.detach().requires_grad_(), b.detach().requires_grad_()
    for g, e in zip(torch.autograd.grad(out, (a, b), dout),
                    torch.autograd.grad(torch.nn.functional.silu(a2) * b2, (a2, b2), dout), strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert ("silu_and_mul_grad_kernel",) in stand_in_device.calls


def test_ops_without_backward_raise_at_backward_rather_than_give_a_wrong_gradient(stand_in_device):
    a = bf16(6, 64, grad=True)
    out = torch.ops.fl_patch.mm(a, bf16(64, 32))
    with pytest.raises(RuntimeError, match="(?i)autograd"):
        out.sum().backward()


def test_a_kernel_failure_inside_a_compiled_graph_is_a_clear_error(stand_in_device, monkeypatch):
    def broken(*args, **kwargs):
        raise ValueError("no kernel for this")

    monkeypatch.setattr(stand_in_device, "mm", broken)
    with pytest.raises(custom_ops.CompiledKernelError, match="fl_patch::mm: the FlagGems kernel raised ValueError"):
        torch.ops.fl_patch.mm(bf16(6, 64), bf16(64, 32))


# ------------------------------------------------------------------------------------------------- whole models


def tiny(family: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[
        family]
    torch.manual_seed(0)
    return model_class(config_class(**SIZES)).to(torch.bfloat16)


def relative_diff(actual, expected) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1))


def originals():
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    return {"llama_norm": modeling_llama.LlamaRMSNorm.forward, "llama_rope": modeling_llama.apply_rotary_pos_emb,
            "qwen3_mlp": modeling_qwen3.Qwen3MLP.forward, "qwen3_rope": modeling_qwen3.apply_rotary_pos_emb,
            "linear": torch.nn.functional.linear}


def c_compiler_works() -> bool:
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return False
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.parametrize("family, backend", [
    ("llama", "aot_eager"), ("qwen3", "aot_eager"),
    pytest.param("llama", "inductor", marks=pytest.mark.skipif(not c_compiler_works(), reason="no C++ compiler")),
])
def test_a_patched_model_compiles_whole_onto_flag_gems_with_eager_logits(stand_in_device, family, backend):
    fake_gems = stand_in_device
    model = tiny(family).eval()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7], [8, 1, 2, 250, 11, 4]])
    before = originals()
    with torch.no_grad():
        hf = model(ids).logits
    fl_patch.apply(kernels="gems", include=FAMILIES)
    with torch.no_grad():
        eager = model(ids).logits
        assert torch._dynamo.explain(model)(ids).graph_break_count == 0
        torch._dynamo.reset()
        fake_gems.calls.clear()
        compiled = torch.compile(model, fullgraph=True, backend=backend)(ids).logits
    reached = {call[0] for call in fake_gems.calls}
    assert {"rms_norm_forward", "apply_rotary_pos_emb", "flash_attention_forward", "silu_and_mul", "mm"} <= reached
    assert relative_diff(compiled, eager) <= BF16_LOGITS
    assert relative_diff(compiled, hf) <= BF16_LOGITS
    records = [r for r in fl_patch.report() if r["family"] in FAMILIES]
    assert all(not r["fallbacks"] for r in records if r["state"] == "patched")  # nothing counted in the graph
    fl_patch.revert()
    assert originals() == before


def test_gradients_through_the_compiled_model_match_the_original(stand_in_device):
    """Training: rms_norm and silu_and_mul run their custom ops' backward; linear, rope and attention need grad
    and go to the original (their FlagGems kernels have no backward)."""
    fake_gems = stand_in_device
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])

    def grads(model, run=None):
        model.train()
        (model if run is None else run)(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    expected = grads(tiny("llama"))
    fl_patch.apply(kernels="gems", include=FAMILIES)
    model = tiny("llama")
    with torch.no_grad():
        model(ids)  # an eager call first: routing decides on a device in use (CPU stands in for none here)
    fake_gems.calls.clear()
    actual = grads(model, torch.compile(model, fullgraph=True, backend="aot_eager"))
    reached = {call[0] for call in fake_gems.calls}
    assert {"rms_norm_forward", "rms_norm_backward", "silu_and_mul", "silu_and_mul_grad_kernel"} <= reached
    assert "mm" not in reached and "flash_attention_forward" not in reached  # routed away: requires grad
    assert actual.keys() == expected.keys()
    for name, grad in expected.items():
        assert relative_diff(actual[name], grad) <= BF16_GRADS, name


def test_where_the_ops_cant_be_used_compiled_calls_run_the_original_unbroken(stand_in_device, monkeypatch):
    reason = "torch.compile (torch 2.3 has no torch.library.custom_op)"
    monkeypatch.setattr(custom_ops, "define", lambda: reason)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    weight = torch.ones(64, dtype=torch.bfloat16)

    def norm(x):
        return torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)

    x = bf16(8, 64)
    norm(x)  # eager: on FlagGems (and routing has decided for this device)
    assert stand_in_device.calls == [("rms_norm",)]
    stand_in_device.calls.clear()
    assert torch._dynamo.explain(norm)(x).graph_break_count == 0
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")(x)
    assert stand_in_device.calls == []
    torch._dynamo.reset()
    fl_patch.revert()
    assert torch.equal(compiled, norm(x))


def test_eager_calls_get_the_flag_gems_module_and_compiled_ones_the_ops(stand_in_device):
    assert gems.ops().module is stand_in_device  # eager, by default: the module's hot functions on the fast path
    assert gems.ops().mm is stand_in_device.mm
    gems.configure_fast_launch(False)
    assert gems.ops() is stand_in_device  # without it: the module itself
    gems.configure_fast_launch(None)

    def which(x):
        return torch.tensor(1.0) if gems.ops() is custom_ops.namespace else torch.tensor(0.0)

    assert which(bf16(2)) == 0
    assert torch.compile(which, fullgraph=True, backend="eager")(bf16(2)) == 1


def test_calls_the_routing_sends_native_under_compile_run_the_native_path(stand_in_device, monkeypatch):
    """As fl_patch.device.routing does under compile for a family the profile keeps native: the RMSNorms run torch's
    fused rms_norm inside the graph, the other families stay on FlagGems; nothing is counted."""
    from fl_patch.device import routing

    def router(key, lifted):
        return (lambda tensor: gems.PROFILE_NATIVE) if key.startswith("rms_norm.") else (lambda tensor: None)

    monkeypatch.setattr(routing, "router", router)
    model = tiny("llama").eval()
    ids = torch.tensor([[5, 17, 99, 3, 42, 7]])
    with torch.no_grad():
        hf = model(ids).logits
        fl_patch.apply(kernels="gems", include=FAMILIES)
        explained = torch._dynamo.explain(model)(ids)
        torch._dynamo.reset()
        stand_in_device.calls.clear()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(ids).logits
    assert explained.graph_break_count == 0
    reached = {call[0] for call in stand_in_device.calls}
    assert "rms_norm_forward" not in reached and {"mm", "silu_and_mul", "flash_attention_forward"} <= reached
    assert relative_diff(compiled, hf) <= BF16_LOGITS
    assert all(not r["fallbacks"] for r in fl_patch.report())


@pytest.mark.parametrize("form", ["int8", "fp8"])
def test_the_quantised_linear_compiles_whole_onto_flag_gems(stand_in_device, monkeypatch, form):
    """LightX2V's W8A8 linear: activation quantiser and cutlass_scaled_mm (an op that writes its output argument)
    in one graph, equal to the eager gems path."""
    from fl_patch.kernels import quant_linear

    monkeypatch.setattr(quant_linear, "_chip_reason", lambda tensor: None)  # the stand-in passes as sm90
    torch.manual_seed(0)
    weight = torch.randint(-127, 128, (32, 64), dtype=torch.int8)
    if form == "fp8":
        weight = (torch.randn(32, 64) * 8).to(quant_linear.FP8)
    scale, x, bias = torch.rand(32, 1), bf16(2, 3, 64), bf16(32)
    kernel = getattr(quant_linear, f"gems_{form}")

    def linear(x):
        assert getattr(quant_linear, f"unsupported_{form}")("gems", x, weight, scale, bias, torch.bfloat16) is None
        return kernel(x, weight, scale, bias, torch.bfloat16)

    eager = linear(x)
    assert torch._dynamo.explain(linear)(x).graph_break_count == 0
    stand_in_device.calls.clear()
    compiled = torch.compile(linear, fullgraph=True, backend="aot_eager")(x)
    assert ("cutlass_scaled_mm", form.replace("fp8", "float8_e4m3fn")) in stand_in_device.calls
    assert torch.equal(compiled, eager)


def test_a_kernel_failure_in_a_compiled_model_raises_naming_the_op(stand_in_device, monkeypatch):
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    weight = torch.ones(64, dtype=torch.bfloat16)

    def norm(x):
        return torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)

    def broken(*args, **kwargs):
        raise RuntimeError("triton: out of resources")

    norm(bf16(8, 64))  # eager first: routing decided
    monkeypatch.setattr(stand_in_device, "rms_norm_forward", broken)
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    with pytest.raises(custom_ops.CompiledKernelError, match="rms_norm_forward.*out of resources.*eagerly"):
        compiled(bf16(8, 64))
