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
