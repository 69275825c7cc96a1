"""A FlagGems that can't be imported, or a kernel that raises, never reaches the user's forward: the call runs the
original, is counted under its reason, is logged once, and shows in the report (strict mode raises instead).

CPU tensors stand in for device tensors (``gems.device_reason`` accepts them), with the gems provider."""

import logging
import sys

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from fl_patch.errors import PatchError
from fl_patch.kernels import gems


@pytest.fixture
def device_path(monkeypatch):
    """CPU tensors routed as accelerator tensors."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)


@pytest.fixture
def broken_flag_gems(tmp_path, monkeypatch, device_path):
    """A flag_gems package that is installed but whose import raises, as on a machine its device probe fails."""
    package = tmp_path / "flag_gems"
    package.mkdir()
    (package / "__init__.py").write_text("raise RuntimeError('No device were detected')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("flag_gems", None)
    gems._reset_for_tests()
    yield
    gems._reset_for_tests()
    sys.modules.pop("flag_gems", None)


def rms_norm_record():
    [record] = [r for r in fl_patch.report() if r["target"] == "torch.rms_norm"]
    return record


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def test_flag_gems_whose_import_raises_hands_every_call_to_the_original(broken_flag_gems, caplog):
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    assert rms_norm_record()["state"] == "patched" and rms_norm_record()["provider"] == "flag_gems"
    x, weight = bf16(4, 64), bf16(64)
    expected = torch.rms_norm(x, (64,), weight, 1e-6)
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        first = F.rms_norm(x, (64,), weight, 1e-6)
        second = F.rms_norm(x, (64,), weight, 1e-6)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    record = rms_norm_record()
    assert record["state"] == "fallback"
    assert "import flag_gems failed: RuntimeError: No device were detected" in record["reason"]
    assert record["fallbacks"] == {gems.UNUSABLE: 2}
    assert caplog.text.count("FlagGems can't be used") == 1


def test_a_broken_flag_gems_raises_in_strict_mode(broken_flag_gems):
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"], strict=True)
    with pytest.raises(PatchError, match="No device were detected"):
        F.rms_norm(bf16(4, 64), (64,), bf16(64), 1e-6)


def test_a_kernel_that_raises_falls_back_counted_and_logged_once(fake_gems, device_path, monkeypatch, caplog):
    def exploding(*args, **kwargs):
        raise RuntimeError("triton compilation failed")

    monkeypatch.setattr(fake_gems, "rms_norm", exploding)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    x, weight = bf16(4, 64), bf16(64)
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        outputs = [F.rms_norm(x, (64,), weight, 1e-6) for _ in range(3)]
    expected = torch.rms_norm(x, (64,), weight, 1e-6)
    assert all(torch.equal(out, expected) for out in outputs)
    record = rms_norm_record()
    assert record["state"] == "patched" and record["fallbacks"] == {"kernel error: RuntimeError": 3}
    assert caplog.text.count("triton compilation failed") == 1


def test_a_kernel_that_raises_in_a_transformers_forward_falls_back(fake_gems, device_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    monkeypatch.setattr(fake_gems, "rms_norm", lambda *a, **k: (_ for _ in ()).throw(ValueError("bad launch")))
    norm = LlamaRMSNorm(64).to(torch.bfloat16)
    x = bf16(3, 64)
    expected = norm(x)
    fl_patch.apply(kernels="gems", include=["transformers.rms_norm"])
    assert torch.equal(norm(x), expected)
    [record] = [r for r in fl_patch.report() if r["where"].endswith("modeling_llama.LlamaRMSNorm.forward")]
    assert record["fallbacks"] == {"kernel error: ValueError": 1}


def test_a_kernel_error_raises_in_strict_mode(fake_gems, device_path, monkeypatch):
    monkeypatch.setattr(fake_gems, "silu_and_mul", lambda *a: (_ for _ in ()).throw(RuntimeError("no kernel")))
    from transformers.models.llama.modeling_llama import LlamaMLP

    fl_patch.apply(kernels="gems", include=["transformers.swiglu"], strict=True)
    from transformers import LlamaConfig

    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128)).to(torch.bfloat16)
    with pytest.raises(PatchError, match="no kernel"):
        mlp(bf16(2, 64))


# ---------------------------------------------------------------------------------------------------------
# What is not the kernel's failure reaches the caller unchanged, counted nowhere (fl_patch.failures)


def fallbacks(target):
    [record] = [r for r in fl_patch.report() if r["target"] == target]
    return record["fallbacks"]


def block(x, w_linear, w_norm, last):
    """A layer whose last saved tensor is saved by `last` ("linear" or "rms_norm"), as in Llama / Gemma2."""
    if last == "linear":
        return F.linear(F.rms_norm(x, (16,), w_norm, 1e-6), w_linear)
    return F.rms_norm(F.linear(x, w_linear), (16,), w_norm, 1e-6)


def checkpointed_step(last, dtype, use_reentrant):
    """(output, gradients of x and both weights) of the block under torch.utils.checkpoint."""
    from torch.utils.checkpoint import checkpoint

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(4, 16, generator=generator).to(dtype).requires_grad_()
    w_linear = (torch.randn(16, 16, generator=generator) / 4).to(dtype).requires_grad_()
    w_norm = (1 + torch.randn(16, generator=generator) / 10).to(dtype).requires_grad_()
    out = checkpoint(block, x, w_linear, w_norm, last, use_reentrant=use_reentrant)
    out.float().square().sum().backward()
    return out.detach(), [t.grad for t in (x, w_linear, w_norm)]


@pytest.mark.parametrize("use_reentrant", [False, True])
@pytest.mark.parametrize("last", ["linear", "rms_norm"])
@pytest.mark.parametrize("kernels", ["reference", "gems"])
def test_gradient_checkpointing_stops_its_recomputation_through_a_kernel_call(kernels, last, use_reentrant, request):
    """Non-reentrant checkpoint stops recomputing by raising from the saved-tensor hook of the layer's last op,
    inside that op's kernel call: the exception must reach torch, not start a fallback (which saved extra tensors:
    "target_frame.early_stop is set")."""
    dtype = torch.float32
    if kernels == "gems":  # the RMSNorm on the stand-in FlagGems; linear refuses calls that need grad
        request.getfixturevalue("fake_gems")
        request.getfixturevalue("device_path")
        dtype = torch.bfloat16
    expected, expected_grads = checkpointed_step(last, dtype, use_reentrant)
    fl_patch.apply(kernels=kernels, include=["torch.linear", "torch.rms_norm"])
    out, grads = checkpointed_step(last, dtype, use_reentrant)
    rtol = 1e-5 if dtype == torch.float32 else 0.016
    torch.testing.assert_close(out, expected, rtol=rtol, atol=rtol)
    for grad, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(grad, want, rtol=rtol, atol=rtol * want.abs().max().item())
    assert fallbacks("torch.rms_norm") == {}
    assert set(fallbacks("torch.linear")) <= ({"requires grad"} if kernels == "gems" else set())


OUT_OF_MEMORY = {
    "torch": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "other device": lambda: RuntimeError("NPU out of memory. Tried to allocate 2.00 GiB"),
    "host": lambda: MemoryError(),
}


@pytest.mark.parametrize("strict", [False, True])
@pytest.mark.parametrize("kind", list(OUT_OF_MEMORY))
def test_out_of_memory_reaches_the_caller_unchanged(fake_gems, device_path, monkeypatch, caplog, kind, strict):
    """The user's code may catch it to shrink a batch; running the original would double the pressure."""
    error = OUT_OF_MEMORY[kind]()

    def out_of_memory(*args, **kwargs):
        raise error

    monkeypatch.setattr(fake_gems, "rms_norm", out_of_memory)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"], strict=strict)
    with caplog.at_level(logging.WARNING, logger="fl_patch"), pytest.raises(type(error)) as caught:
        F.rms_norm(bf16(4, 64), (64,), bf16(64), 1e-6)
    assert caught.value is error
    assert fallbacks("torch.rms_norm") == {} and caplog.text == ""


def test_a_saved_tensor_hook_that_raises_reaches_the_caller_once():
    fl_patch.apply(kernels="reference", include=["torch.linear"])
    error, packed = ValueError("this hook refuses"), []

    def pack(tensor):
        packed.append(tensor.shape)
        raise error

    x, weight = torch.randn(2, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda packed_tensor: packed_tensor):
        with pytest.raises(ValueError) as caught:
            F.linear(x, weight)
    assert caught.value is error and len(packed) == 1
    assert fallbacks("torch.linear") == {}


def test_a_module_hook_that_raises_reaches_the_caller_once():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    fl_patch.apply(kernels="reference", include=["transformers.swiglu"])
    mlp = LlamaMLP(LlamaConfig(hidden_size=64, intermediate_size=128))
    error, seen = ValueError("this hook refuses"), []

    def hook(module, args, output):
        seen.append(module)
        raise error

    mlp.down_proj.register_forward_hook(hook)
    with pytest.raises(ValueError) as caught:
        mlp(torch.randn(2, 64))
    assert caught.value is error and seen == [mlp.down_proj]
    [record] = [r for r in fl_patch.report() if r["where"].endswith("LlamaMLP.forward")]
    assert record["fallbacks"] == {}


def test_a_library_flag_gems_calls_failing_is_the_kernels_failure(fake_gems, device_path, monkeypatch, tmp_path):
    """Code FlagGems calls (a dependency, a vendor library) is part of the kernel: its error falls back."""
    (tmp_path / "vendor_driver.py").write_text("def launch():\n    raise RuntimeError('driver refuses the launch')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import vendor_driver

    monkeypatch.setattr(fake_gems, "rms_norm", lambda *args: vendor_driver.launch())
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    x, weight = bf16(4, 64), bf16(64)
    assert torch.equal(F.rms_norm(x, (64,), weight, 1e-6), torch.rms_norm(x, (64,), weight, 1e-6))
    assert fallbacks("torch.rms_norm") == {"kernel error: RuntimeError": 1}


@pytest.mark.parametrize("error", [
    RuntimeError("out of resource: shared memory, Required: 262144, Hardware limit: 232448"),  # Triton's
    TypeError("rms_norm() got an unexpected keyword argument 'eps'"),
])
def test_other_kernel_errors_fall_back(fake_gems, device_path, monkeypatch, error):
    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(fake_gems, "rms_norm", failing)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    x, weight = bf16(4, 64), bf16(64)
    assert torch.equal(F.rms_norm(x, (64,), weight, 1e-6), torch.rms_norm(x, (64,), weight, 1e-6))
    assert fallbacks("torch.rms_norm") == {f"kernel error: {type(error).__name__}": 1}


def test_the_failure_message_names_the_provider_that_ran(monkeypatch, caplog):
    """FL_PATCH_KERNELS=reference: the torch reference kernel raised, not FlagGems."""
    from fl_patch.kernels import attention

    monkeypatch.setattr(attention, "unsupported_sdpa", lambda *args: None)  # let a call it can't take reach it
    fl_patch.apply(kernels="reference", include=["torch.scaled_dot_product_attention"])
    q = torch.randn(1, 2, 4, 16)
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)
    assert "the torch reference kernel of torch.nn.functional.scaled_dot_product_attention raised ValueError" \
        in caplog.text
    assert "FlagGems" not in caplog.text
    assert fallbacks("torch.scaled_dot_product_attention") == {"kernel error: ValueError": 1}


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
@pytest.mark.parametrize("mode", ["profiler", "anomaly mode"])
def test_a_kernel_error_still_falls_back_under_the_profiler_and_anomaly_mode(fake_gems, device_path, monkeypatch,
                                                                             mode):
    """Their being on puts none of their code between the replacement and the kernel."""
    def exploding(*args, **kwargs):
        raise RuntimeError("triton compilation failed")

    monkeypatch.setattr(fake_gems, "rms_norm", exploding)
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    context = torch.profiler.profile() if mode == "profiler" else torch.autograd.detect_anomaly()
    x, weight = bf16(4, 64), bf16(64)
    with context:
        out = F.rms_norm(x, (64,), weight, 1e-6)
    assert torch.equal(out, torch.rms_norm(x, (64,), weight, 1e-6))
    assert fallbacks("torch.rms_norm") == {"kernel error: RuntimeError": 1}


def test_frames_are_told_apart_by_module_and_file(fake_gems, tmp_path, monkeypatch):
    """FlagGems' generated code is FlagGems whatever its module name: pointwise_dynamic's modules take their scalar
    function's globals, ``__name__`` included."""
    import importlib.util
    import json

    from fl_patch import failures

    monkeypatch.setenv("FLAGGEMS_CACHE_DIR", str(tmp_path))
    generated = tmp_path / "code_cache" / "pointwise_dynamic_abc_add_kernel_rank_2.py"
    generated.parent.mkdir()
    generated.write_text("import sys\n\n\ndef add_wrapper_rank_2():\n    return sys._getframe()\n")
    spec = importlib.util.spec_from_file_location("_gen_module_abc_rank_2", generated)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.__dict__["__name__"] = "vendor_ops.scalar_functions"
    frames = {
        "generated": module.add_wrapper_rank_2(),
        "fl_patch": frame_in(vars(failures)),
        "flag_gems": frame_in(vars(fake_gems)),
        "torch": frame_in(vars(torch)),
        "stdlib": frame_in(vars(json)),
        "user code": sys._getframe(),
    }
    assert {name: failures._kind(frame) for name, frame in frames.items()} == {
        "generated": "gems", "fl_patch": "fl_patch", "flag_gems": "gems", "torch": "torch", "stdlib": "neutral",
        "user code": "other"}


def frame_in(module_globals: dict):
    """A frame running with `module_globals`, as the code of that module does."""
    return eval("sys._getframe()", module_globals, {"sys": sys})
