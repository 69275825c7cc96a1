"""Device profiles decide which calls go to FlagGems: lookup order, stale / broken / missing profiles, strict mode,
what beats a profile, the native paths, and vendor detection with stand-in device modules.

CPU tensors stand in for a device's (``gems.device_reason`` accepts them) and ``devices.identify`` names a stand-in
device; the fake flag_gems (tests/fake_flag_gems) records which calls reached "FlagGems"."""

import json
import logging
import sys
import types
from importlib import metadata

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from fl_patch import environment
from fl_patch.device import devices, profiles, routing
from fl_patch.kernels import gems

DEVICE = devices.DeviceInfo(vendor="ascend", type="npu", name="Ascend 910B", index=0, capability=None)
INSTALLED = {"torch": torch.__version__, "flag_gems": None}


def profile_data(name="Ascend 910B", vendor="ascend", families=None, versions=None):
    return {
        "schema": 1, "kind": "fl_patch.profile",
        "device": {"vendor": vendor, "name": name, "type": "npu"},
        "versions": versions or {"torch": torch.__version__, "flag_gems": "5.0.2"},
        "date": "2026-12-03T00:00:00+00:00",
        "families": families if families is not None else {
            "linear": {"route": "native", "why": "mm 0.8x of the vendor's"},
            "rms_norm": {"route": "gems", "min_elements": 4096, "why": "faster from 4096 elements",
                         "forms": {"gemma": {"route": "gems", "min_elements": 0, "why": "always faster"}}},
        },
    }


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


def pose_as(device_info, monkeypatch, tmp_path):
    """CPU tensors as tensors of `device_info`; the user cache and the shipped profiles in tmp_path."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    monkeypatch.setattr(devices, "identify", lambda device: device_info)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(profiles, "SHIPPED_DIR", tmp_path / "shipped")
    return tmp_path


@pytest.fixture
def stand_in_device(monkeypatch, tmp_path, fake_gems):
    """CPU tensors as tensors of DEVICE (an Ascend 910B); the user cache and the shipped profiles in tmp_path."""
    return pose_as(DEVICE, monkeypatch, tmp_path)


def cache(tmp_path):
    return tmp_path / "cache" / "fl_patch" / "profiles"


def fallbacks(target):
    [record] = [r for r in fl_patch.report() if r["target"] == target]
    return record["fallbacks"]


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


def test_no_profile_sends_every_call_to_flag_gems_and_says_so(stand_in_device, fake_gems):
    fl_patch.apply(kernels="gems", include=["torch.rms_norm", "torch.linear"])
    F.rms_norm(bf16(2, 8), (8,), bf16(8), 1e-6)
    F.linear(bf16(2, 8), bf16(4, 8))
    assert [call[0] for call in fake_gems.calls] == ["rms_norm", "mm"]
    info = routing.describe()
    assert info["state"] == "none"
    assert "no profile for Ascend 910B (ascend, npu:0)" in info["summary"] and "`fl-patch tune`" in info["summary"]
    assert "no profile for Ascend 910B" in fl_patch_report_text()


def fl_patch_report_text():
    from fl_patch import runtime

    return runtime.report_text()


def test_a_profile_in_the_user_cache_routes_by_family_form_and_size(stand_in_device, fake_gems):
    write(cache(stand_in_device) / "a.json", profile_data())
    fl_patch.apply(kernels="gems")  # nothing included: the profile decides
    weight = bf16(64)
    F.rms_norm(bf16(2, 64), (64,), weight, 1e-6)  # 128 elements: under 4096
    F.rms_norm(bf16(64, 64), (64,), weight, 1e-6)  # 4096: FlagGems
    big = bf16(256, 64)
    F.linear(big, bf16(8, 64))  # linear is native at every size
    assert [call[0] for call in fake_gems.calls] == ["rms_norm"]
    assert fallbacks("torch.rms_norm") == {"small input": 1}
    assert fallbacks("torch.linear") == {"native by profile": 1}
    info = routing.describe()
    assert info["state"] == "in force" and info["source"] == "user cache"
    assert info["families"]["linear"] == {"route": "native", "min_elements": 0, "why": "mm 0.8x of the vendor's"}
    assert info["families"]["rms_norm"]["forms"]["gemma"]["min_elements"] == 0
    assert info["families"]["swiglu"]["why"] == "not measured in this profile"


def test_lookup_order_fl_patch_profile_then_user_cache_then_shipped(stand_in_device, monkeypatch, fake_gems):
    shipped = write(stand_in_device / "shipped" / "s.json", profile_data(families={}))
    x = bf16(256, 64)

    def source():
        fl_patch.revert()  # the lookup is made once per apply
        fl_patch.apply(kernels="gems")
        F.linear(x, bf16(8, 64))
        return routing.describe()["source"], routing.describe()["path"]

    assert source() == ("shipped", str(shipped))
    cached = write(cache(stand_in_device) / "c.json", profile_data())
    write(cache(stand_in_device) / "other.json", profile_data(name="Another chip"))  # another device: passed over
    assert source() == ("user cache", str(cached))
    explicit = write(stand_in_device / "mine.json", profile_data(name="Made elsewhere", families={}))
    monkeypatch.setenv("FL_PATCH_PROFILE", str(explicit))
    assert source() == ("FL_PATCH_PROFILE", str(explicit))  # a file named explicitly is used whatever device
    assert "this device is Ascend 910B" in routing.describe()["summary"]
    monkeypatch.setenv("FL_PATCH_PROFILE", str(cache(stand_in_device)))  # a folder: this device's profile in it
    assert source() == ("FL_PATCH_PROFILE", str(cached))


def test_off_means_no_routing_at_all(stand_in_device, monkeypatch, fake_gems):
    write(cache(stand_in_device) / "a.json", profile_data())
    monkeypatch.setenv("FL_PATCH_PROFILE", "off")
    fl_patch.apply(kernels="gems", include=["torch.linear"])
    F.linear(bf16(4, 64), bf16(8, 64))
    assert [call[0] for call in fake_gems.calls] == ["mm"]
    assert routing.describe()["state"] == "off"


def test_a_profile_of_other_versions_is_used_and_flagged_stale(stand_in_device, fake_gems):
    write(cache(stand_in_device) / "a.json", profile_data(versions={"torch": "2.9.0", "flag_gems": "5.0.2"}))
    fl_patch.apply(kernels="gems")
    F.linear(bf16(4, 64), bf16(8, 64))
    info = routing.describe()
    assert info["state"] == "stale" and fake_gems.calls == []
    installed = metadata.version("torch")  # the distribution's: PyPI's CUDA build has no "+cu130" tag there
    assert info["stale"] == [f"made with torch 2.9.0, this process has {installed}"]
    assert "stale: made with torch 2.9.0" in info["summary"]


@pytest.mark.parametrize("content, problem", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    (json.dumps({**profile_data(), "schema": 99}), "unknown schema 99; this fl_patch reads schema 1"),
    (json.dumps(profile_data(families={"linear": {"route": "fast"}})),
     "families.linear.route is 'fast'; accepted: gems, native"),
    (json.dumps(profile_data(families={"lienar": {"route": "native"}})), "unknown family 'lienar'"),
])
def test_a_broken_fl_patch_profile_is_said_naming_the_file_and_carries_on_without(
        stand_in_device, monkeypatch, caplog, fake_gems, content, problem):
    path = stand_in_device / "broken.json"
    if content is not None:
        path.write_text(content)
    monkeypatch.setenv("FL_PATCH_PROFILE", str(path))
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        fl_patch.apply(kernels="gems", include=["torch.linear"])
        F.linear(bf16(4, 64), bf16(8, 64))
    assert f"profile {path}: {problem}" in caplog.text
    assert caplog.text.count(str(path)) == 1  # said once, at apply
    assert [call[0] for call in fake_gems.calls] == ["mm"]  # as with no profile
    assert routing.describe()["state"] == "none"


def test_a_broken_fl_patch_profile_is_an_error_in_strict_mode(stand_in_device, monkeypatch):
    path = write(stand_in_device / "broken.json", "[]")
    monkeypatch.setenv("FL_PATCH_PROFILE", str(path))
    with pytest.raises(profiles.ProfileError, match="expected a JSON object, found list"):
        fl_patch.apply(kernels="gems", strict=True)


def test_a_broken_file_in_the_cache_is_passed_over_with_a_warning(stand_in_device, caplog, fake_gems):
    write(cache(stand_in_device) / "a-broken.json", "{")
    good = write(cache(stand_in_device) / "b.json", profile_data())
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        fl_patch.apply(kernels="gems", include=["torch.linear"])
        F.linear(bf16(4, 64), bf16(8, 64))
    assert "a-broken.json: not JSON" in caplog.text and "passed over" in caplog.text
    assert routing.describe()["path"] == str(good)


def test_an_explicit_include_and_rows_the_user_names_beat_a_native_family(stand_in_device, fake_gems):
    write(cache(stand_in_device) / "a.json", profile_data())
    fl_patch.apply(kernels="gems", include=["linear", "torch.rms_norm"])
    F.linear(bf16(4, 64), bf16(8, 64))
    F.rms_norm(bf16(2, 64), (64,), bf16(64), 1e-6)  # rms_norm's measured size still holds
    assert [call[0] for call in fake_gems.calls] == ["mm"]
    assert fallbacks("torch.rms_norm") == {"small input": 1}
    assert "named in FL_PATCH_INCLUDE" in routing.describe()["families"]["linear"]["lifted"]


def test_attention_named_by_the_user_runs_flag_gems_where_the_default_sdpa_stays_native(stand_in_device, fake_gems):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    write(cache(stand_in_device) / "a.json", profile_data(families={"attention": {"route": "native"}}))
    fl_patch.apply(kernels="gems", include=["attention"])  # the family: both rows, and the profile is lifted...
    fl_patch.apply(kernels="gems")  # ...so take the defaults instead: "flagos" is lifted, "sdpa" is not
    module = types.SimpleNamespace(is_causal=True)
    q, k = bf16(1, 2, 16, 32), bf16(1, 2, 16, 32)
    ALL_ATTENTION_FUNCTIONS["flagos"](module, q, k, k, None, scaling=None)
    assert [call[0] for call in fake_gems.calls] == ["flash_attention_forward"]
    ALL_ATTENTION_FUNCTIONS["sdpa"](module, q, k, k, None, scaling=None)
    assert len(fake_gems.calls) == 1
    assert fallbacks("transformers.attention.sdpa") == {"native by profile": 1}


def test_launch_bound_calls_leave_before_the_shape_checks(stand_in_device, fake_gems):
    """Under the size, a call reports "small input" even where a shape check would refuse it: the routing runs
    first, in every family."""
    families = {family: {"route": "gems", "min_elements": 1 << 20} for family in profiles.FAMILY_FORMS}
    write(cache(stand_in_device) / "a.json", profile_data(families=families))
    fl_patch.apply(kernels="gems")
    from fl_patch.kernels import attention, layer_norm, linear, rms_norm, rope, swiglu
    from fl_patch.replacements import kernel_pair

    rec = types.SimpleNamespace(target="torch.linear", family="linear")
    x, odd = torch.ones(2, 8, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16)
    q = torch.ones(1, 2, 4, 8, dtype=torch.bfloat16)
    checks = {
        (rms_norm, "hf"): (x, odd), (rms_norm, "torch"): (x, (8,), odd), (rms_norm, "fp32"): (x, odd),
        (rms_norm, "gated"): (x, odd, odd), (rope, "hf"): (q, q, odd, odd, 1), (rope, "interleaved"): (x, x, odd),
        (swiglu, ""): (x, odd), (layer_norm, ""): (x, (8,), odd, None), (linear, ""): (x, odd, None),
        (linear, "in_out"): (x, odd, None), (attention, "sdpa"): (q, x, q, None, 0.0, False, None, False),
        (attention, "varlen"): (x, x, q, False, None),
    }
    for (module, form), args in checks.items():
        _, unsupported = kernel_pair(module, form, "gems", rec)
        assert unsupported("gems", *args) == "small input", (module.__name__, form)
    assert rms_norm.unsupported_hf("gems", x, odd) == "weight shape"  # the kernel's own check: no routing


def test_small_hf_rms_norm_calls_run_torch_fused_rms_norm(stand_in_device, monkeypatch, fake_gems):
    """Calls the profile routes away from FlagGems run one torch op instead of HF's seven; rope and the MLP keep
    the original. A tiny bf16 Llama: logits stay within bf16 tolerance of HF's own."""
    from transformers import LlamaConfig, LlamaForCausalLM

    families = {family: {"route": "gems", "min_elements": 1 << 22} for family in ("rms_norm", "rope", "swiglu")}
    natives = {"attention": {"route": "native"}, "linear": {"route": "native"}}
    write(cache(stand_in_device) / "a.json", profile_data(families={**families, **natives}))
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
            counted = {r["where"].rsplit(".", 2)[-2]: r["fallbacks"] for r in fl_patch.report()
                       if r["family"] in ("rms_norm", "rope", "swiglu") and r["state"] == "patched"}
    assert counted["LlamaRMSNorm"] == {"small input (torch rms_norm)": 5}  # 2 per layer + the final norm
    assert counted["LlamaMLP"] == {"small input": 2}
    assert len(fused) == 5 and fake_gems.calls == []
    torch.testing.assert_close(actual, expected, rtol=0.016, atol=0.05)


def test_a_native_rms_norm_family_runs_torch_fused_rms_norm_at_every_size(stand_in_device, fake_gems):
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextRMSNormGated

    write(cache(stand_in_device) / "a.json", profile_data(families={"rms_norm": {"route": "native"}}))
    torch.manual_seed(0)
    norm = Qwen3NextRMSNormGated(64, eps=1e-6).to(torch.bfloat16)
    x, gate = torch.randn(2, 7, 64, dtype=torch.bfloat16) * 3, torch.randn(2, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        expected = norm(x, gate)
        with fl_patch.patched(kernels="gems", include=["transformers.rms_norm"]):
            # included, so lifted: FlagGems runs
            assert torch.allclose(norm(x, gate), expected, rtol=0.032, atol=0.032) and fake_gems.calls
        fake_gems.calls.clear()
        with fl_patch.patched(kernels="gems"):
            actual = norm(x, gate)
            [record] = [r for r in fl_patch.report() if r["where"].endswith("Qwen3NextRMSNormGated.forward")]
    assert record["fallbacks"] == {"native by profile (torch rms_norm)": 1} and fake_gems.calls == []
    torch.testing.assert_close(actual, expected, rtol=0.032, atol=0.032)  # 1 bf16 ulp: see test_kernels


def test_gems_calls_are_custom_ops_under_torch_compile_with_no_graph_break(stand_in_device, fake_gems):
    """Under torch.compile a gems call is traced as one fl_patch:: custom op (no graph break) that runs FlagGems
    when the graph does; a call routed away (fp32 here) runs the original; nothing is counted from inside a
    compiled graph, neither the gems calls nor the fallbacks."""
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    weight = torch.ones(64, dtype=torch.bfloat16)

    def norm(x):
        return torch.nn.functional.rms_norm(x, (64,), weight, 1e-6)

    x = torch.randn(8, 64, dtype=torch.bfloat16)
    eager = norm(x)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(norm)(x)
    assert explained.graph_break_count == 0
    assert "torch.ops.fl_patch.rms_norm_forward" in explained.graphs[0].code
    fake_gems.calls.clear()
    compiled = torch.compile(norm, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), eager)
    assert fake_gems.calls == [("rms_norm_forward",)]
    fp32 = torch.randn(8, 64)
    assert torch.equal(compiled(fp32), torch.rms_norm(fp32, (64,), weight, 1e-6))
    torch._dynamo.reset()
    assert fallbacks("torch.rms_norm") == {}  # nothing counted from inside the compiled graphs
    assert fake_gems.calls == [("rms_norm_forward",)]


# ------------------------------------------------------------------------------------------- vendor detection


@pytest.fixture
def bare_torch_build(monkeypatch):
    """A torch build that says nothing about a vendor, and no vendor variables."""
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    for variable in (*devices.VENDOR_VARIABLES, "PPU_SDK"):
        monkeypatch.delenv(variable, raising=False)


def test_vendor_hint_reads_flaggems_variables_vendor_modules_and_the_torch_build(bare_torch_build, monkeypatch):
    assert devices.vendor_hint() is None
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert devices.vendor_hint() == "nvidia"
    monkeypatch.setattr(torch.version, "hip", "6.2")
    assert devices.vendor_hint() == "amd"
    monkeypatch.setattr(torch, "__hcu_version__", "1.0", raising=False)
    assert devices.vendor_hint() == "hygon"
    monkeypatch.delattr(torch, "__hcu_version__")
    monkeypatch.setitem(sys.modules, "torch_mlu", types.ModuleType("torch_mlu"))
    assert devices.vendor_hint() == "cambricon"
    assert devices.vendor_hint({"GEMS_VENDOR": "MetaX"}) == "metax"
    assert devices.vendor_hint({"GEMS_VENDOR": "unknownchip"}) == "cambricon"  # not a FlagGems name: not read
    assert devices.vendor_hint({"PPU_SDK": "/opt/ppu"}) == "thead"


@pytest.mark.parametrize("kind, module_name, attribute, name, vendor", [
    ("npu", "torch_npu", "npu", "Ascend910B3", "ascend"),
    ("mlu", "torch_mlu", "mlu", "MLU590", "cambricon"),
    ("musa", "torch_musa", "musa", "MTT S4000", "mthreads"),
    ("cuda", None, "cuda", "MetaX C500", "metax"),  # a CUDA-compatible chip: told by its name
    ("cuda", None, "cuda", "Iluvatar BI-V150", "iluvatar"),
    ("cuda", None, "cuda", "NVIDIA H200", "nvidia"),
])
def test_identify_reads_the_device_through_its_torch_module(bare_torch_build, monkeypatch, kind, module_name,
                                                            attribute, name, vendor):
    stand_in = types.SimpleNamespace(get_device_name=lambda index: name, current_device=lambda: 3,
                                     get_device_capability=lambda index: (9, 0))
    monkeypatch.setattr(torch, attribute, stand_in, raising=False)
    if module_name:
        monkeypatch.setitem(sys.modules, module_name, types.ModuleType(module_name))
    else:
        monkeypatch.setattr(torch.version, "cuda", "12.8")  # the CUDA build every CUDA-compatible chip has
    info = devices.identify(types.SimpleNamespace(type=kind, index=None))
    assert (info.vendor, info.name, info.index, info.capability) == (vendor, name, 3, "9.0")
    assert profiles.file_name(info.as_dict(), "5.0.2") == f"{vendor}-{profiles._slug(name)}-flag_gems-5.0.2.json"


def test_every_flaggems_vendor_has_a_row_and_a_device_type():
    assert set(devices.BY_NAME) == {"nvidia", "amd", "hygon", "metax", "iluvatar", "kunlunxin", "thead", "mthreads",
                                    "cambricon", "ascend", "enflame", "sunrise", "tsingmicro", "aipu"}
    assert all(vendor.device_type for vendor in devices.VENDORS)


# ------------------------------------------------------------------------------------- device-bound regime


def bound_profile(launch, bound):
    """rms_norm's decision `launch` with the device-bound decision `bound` (dicts)."""
    return profile_data(families={"rms_norm": {**launch, "device_bound": bound, "why": "measured"}})


@pytest.fixture
def busy_device(monkeypatch):
    """The stand-in device's stream probe: `state["busy"]` says whether work is queued; `state["asked"]` counts."""
    state = {"busy": False, "asked": 0}

    def probe(device):
        state["asked"] += 1
        return state["busy"]

    monkeypatch.setitem(routing._routing.probes, "cpu", probe)
    return state


def test_between_the_thresholds_a_call_goes_to_flag_gems_only_while_the_device_is_busy(
        stand_in_device, busy_device, fake_gems):
    write(cache(stand_in_device) / "a.json",
          bound_profile({"route": "native"}, {"route": "gems", "min_elements": 4096}))
    fl_patch.apply(kernels="gems")
    weight = bf16(64)
    with torch.no_grad():  # as inference runs (and the device-bound regime is measured)
        F.rms_norm(bf16(2, 64), (64,), weight, 1e-6)  # under the device-bound threshold: native, no query
        assert busy_device["asked"] == 0
        F.rms_norm(bf16(64, 64), (64,), weight, 1e-6)  # at it, device idle: native
        busy_device["busy"] = True
        F.rms_norm(bf16(64, 64), (64,), weight, 1e-6)  # at it, device busy: FlagGems
    assert busy_device["asked"] == 2
    assert [call[0] for call in fake_gems.calls] == ["rms_norm"]
    assert fallbacks("torch.rms_norm") == {"native by profile": 2}
    torch.use_deterministic_algorithms(True)  # the path must not depend on timing: size alone decides
    try:
        with torch.no_grad():
            F.rms_norm(bf16(64, 64), (64,), weight, 1e-6)
    finally:
        torch.use_deterministic_algorithms(False)
    assert busy_device["asked"] == 2 and fallbacks("torch.rms_norm") == {"native by profile": 3}
    # grad mode on (training): size alone too, so that a checkpointed layer's recomputation takes its forward's path
    F.rms_norm(bf16(64, 64).requires_grad_(), (64,), weight, 1e-6)
    assert busy_device["asked"] == 2 and fallbacks("torch.rms_norm") == {"native by profile": 4}
    assert routing.describe()["families"]["rms_norm"]["device_bound"]["min_elements"] == 4096


def test_above_the_launch_bound_threshold_no_query_is_made(stand_in_device, busy_device, fake_gems):
    write(cache(stand_in_device) / "a.json", bound_profile({"route": "gems", "min_elements": 1024},
                                                           {"route": "gems", "min_elements": 256}))
    fl_patch.apply(kernels="gems")
    weight = bf16(64)
    F.rms_norm(bf16(16, 64), (64,), weight, 1e-6)  # 1024: launch-bound threshold met
    F.rms_norm(bf16(2, 64), (64,), weight, 1e-6)  # 128: under both
    assert busy_device["asked"] == 0
    assert [call[0] for call in fake_gems.calls] == ["rms_norm"]
    assert fallbacks("torch.rms_norm") == {"small input": 1}


def test_a_device_bound_native_decision_never_queries(stand_in_device, busy_device, fake_gems):
    write(cache(stand_in_device) / "a.json", bound_profile({"route": "native"}, {"route": "native"}))
    busy_device["busy"] = True
    fl_patch.apply(kernels="gems")
    F.rms_norm(bf16(256, 64), (64,), bf16(64), 1e-6)
    assert busy_device["asked"] == 0 and fake_gems.calls == []


def test_the_busy_probe_reads_the_device_type_stream_and_never_queries_a_capture(monkeypatch):
    queried = []

    class Stream:
        def __init__(self, pending):
            self.pending = pending

        def query(self):  # torch's Stream.query: True when all its work has completed
            queried.append(1)
            return not self.pending

    def probe(stream, capturing=False):
        backend = types.SimpleNamespace(current_stream=stream, is_current_stream_capturing=lambda: capturing)
        monkeypatch.setattr(torch, "npu", backend, raising=False)
        return routing._busy_probe("npu")(torch.device("cpu"))

    assert probe(lambda device: Stream(True)) is True
    assert probe(lambda device: Stream(False)) is False
    assert probe(lambda device: Stream(True), capturing=True) is False and len(queried) == 2  # no query
    assert probe(lambda device: (_ for _ in ()).throw(RuntimeError("no stream"))) is False  # can't tell: idle
    assert routing._busy_probe("no_such_device_type")(torch.device("cpu")) is False


def compiled_routes(sizes, key="rms_norm.hf", lifted=False):
    """What one compiled graph per size routes for `key`: the reason a traced call goes native, None for FlagGems."""
    route = routing.router(key, lifted)
    reasons = []

    def routed(x):
        reasons.append(route(x))
        return x + 1

    compiled = torch.compile(routed, backend="eager", fullgraph=True)
    for size in sizes:  # a new size traces again (torch._dynamo.reset() would also drop fl_patch's start callback)
        compiled(torch.zeros(size))
    torch._dynamo.reset()
    return reasons


def test_under_compile_routing_is_by_size_with_the_compiled_decision(stand_in_device, monkeypatch):
    """A compile that starts before any eager call looks the profile up for the device in use (its start
    callback); tracing then routes by size alone, with the profile's compiled decision, not the eager ones."""
    write(cache(stand_in_device) / "a.json", profile_data(families={"rms_norm": {
        "route": "native", "device_bound": {"route": "gems", "min_elements": 64},
        "compiled": {"route": "gems", "min_elements": 4096}, "why": "measured"}}))
    monkeypatch.setattr(environment, "first_device", lambda initialized_only=False: torch.device("cpu"))
    fl_patch.apply(kernels="gems")
    assert compiled_routes([64 * 64, 2 * 64]) == [None, gems.SMALL_INPUT]
    assert routing.describe()["state"] == "in force"
    assert routing.describe()["families"]["rms_norm"]["compiled"]["min_elements"] == 4096


def test_under_compile_a_profile_without_a_compiled_decision_keeps_the_originals(stand_in_device, monkeypatch):
    """Eager decisions say nothing about inductor's code: without a compiled decision every size stays native
    under compile, even where the device-bound decision sends eager calls to FlagGems; a lifted family runs it."""
    write(cache(stand_in_device) / "a.json",
          bound_profile({"route": "gems", "min_elements": 4096}, {"route": "gems", "min_elements": 64}))
    monkeypatch.setattr(environment, "first_device", lambda initialized_only=False: torch.device("cpu"))
    fl_patch.apply(kernels="gems")
    assert compiled_routes([1 << 20, 64]) == [gems.PROFILE_NATIVE, gems.PROFILE_NATIVE]
    fl_patch.apply(kernels="gems")  # again: the reset above dropped the compile-start callback
    assert compiled_routes([64], lifted=True) == [None]


def test_under_compile_a_native_compiled_decision_holds_unless_lifted(stand_in_device, monkeypatch):
    write(cache(stand_in_device) / "a.json", profile_data(families={"rms_norm": {
        "route": "gems", "compiled": {"route": "native"}, "why": "measured"}}))
    monkeypatch.setattr(environment, "first_device", lambda initialized_only=False: torch.device("cpu"))
    fl_patch.apply(kernels="gems")
    assert routing.router("rms_norm.hf", False)(torch.zeros(64)) is None  # eager: FlagGems
    assert compiled_routes([1 << 20]) == [gems.PROFILE_NATIVE]
    fl_patch.apply(kernels="gems")
    assert compiled_routes([1 << 20], lifted=True) == [None]


def test_under_compile_with_no_profile_the_originals_stay_and_a_lifted_row_runs_flag_gems(stand_in_device,
                                                                                         monkeypatch):
    monkeypatch.setattr(environment, "first_device", lambda initialized_only=False: torch.device("cpu"))
    fl_patch.apply(kernels="gems")
    assert compiled_routes([64]) == [gems.NOT_MEASURED]  # the prior: nothing measured under compile
    fl_patch.apply(kernels="gems", include=["rms_norm"])
    assert compiled_routes([64], lifted=True) == [None]


def test_a_profile_with_a_broken_compiled_entry_is_refused_naming_the_field(tmp_path):
    data = profile_data(families={"rms_norm": {"route": "native", "compiled": {"route": "gems", "min_elements": -1}}})
    with pytest.raises(profiles.ProfileError, match=r"families\.rms_norm\.compiled\.min_elements is -1"):
        profiles.read(write(tmp_path / "p.json", data), "test")


def test_under_compile_with_no_profile_looked_up_the_originals_stay(stand_in_device, monkeypatch):
    monkeypatch.setattr(environment, "first_device", lambda initialized_only=False: None)  # none in use yet
    fl_patch.apply(kernels="gems")
    route = routing.router("rms_norm.hf", False)
    reasons = []

    def routed(x):
        reasons.append(route(x))
        return x + 1

    torch.compile(routed, backend="eager", fullgraph=True)(torch.zeros(64, 64))
    torch._dynamo.reset()
    assert reasons == [routing.NOT_LOOKED_UP_UNDER_COMPILE]


def test_a_profile_with_a_broken_device_bound_entry_is_refused_naming_the_field(tmp_path):
    path = write(tmp_path / "p.json", bound_profile({"route": "native"}, {"route": "fast"}))
    with pytest.raises(profiles.ProfileError, match=r"families\.rms_norm\.device_bound\.route is 'fast'"):
        profiles.read(path, "test")


def test_route_words_name_the_compiled_decision_or_its_absence():
    assert profiles.route_words("native", 0, None, {"route": "gems", "min_elements": 4096}) == (
        "native; compiled gems >= 4096")
    assert profiles.route_words("gems", 0, compiled_shown=True) == (
        "gems; compiled: originals (not measured: fl-patch tune --compiled)")
    assert profiles.route_words("gems", 0) == "gems"
