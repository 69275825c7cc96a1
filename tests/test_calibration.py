"""A device nobody measured: the prior, first-use verification, self-calibration and its persistence.

CPU tensors stand in for a device's (``gems.device_reason`` accepts them), ``devices.identify`` names a stand-in
device, the fake flag_gems (tests/fake_flag_gems) records which calls reached "FlagGems", and a stand-in clock
advances by what each side "costs", so decisions are exact."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import fl_patch
from fl_patch.device import calibration, devices, profiles, routing, verification
from fl_patch.kernels import gems
from test_routing import pose_as

DEVICE = devices.DeviceInfo(vendor="nvidia", type="cuda", name="NVIDIA H100 80GB HBM3", index=0, capability="9.0")
KEY = "rms_norm.torch"  # F.rms_norm's row: its native path is torch.rms_norm


class Clock:
    """A stand-in clock: time moves only when a side 'runs'."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def device(monkeypatch, tmp_path, fake_gems):
    """CPU tensors as tensors of DEVICE (an H100); the user cache and the shipped profiles in tmp_path."""
    return pose_as(DEVICE, monkeypatch, tmp_path)


@pytest.fixture
def costs(monkeypatch, fake_gems):
    """Set `costs.gems` / `costs.native` (seconds a call) before apply; the stand-in clock advances by them."""
    clock = Clock()
    monkeypatch.setattr(calibration, "CLOCK", clock)
    monkeypatch.setattr(calibration, "EVENTS", lambda device: None)
    table = {"gems": 50e-6, "native": 10e-6}

    real_gems = fake_gems.rms_norm

    def gems_rms_norm(*args, **kwargs):
        clock.now += table["gems"]
        return real_gems(*args, **kwargs)

    def native_rms_norm(*args, **kwargs):
        clock.now += table["native"]
        return torch.rms_norm(*args, **kwargs)

    monkeypatch.setattr(fake_gems, "rms_norm", gems_rms_norm)
    monkeypatch.setattr(calibration, "_natives_cache", {**calibration._natives(), KEY: native_rms_norm})
    return table


def x_of(rows, width=64):
    return torch.randn(rows, width).to(torch.bfloat16)


def call(rows, width=64):
    """One inference call (grad mode off, as generate() and inference loops run: calls in grad mode are never
    measured)."""
    x = x_of(rows, width)
    with torch.no_grad():
        return F.rms_norm(x, (width,), torch.ones(width, dtype=torch.bfloat16), 1e-6)


def gems_calls(fake_gems):
    return sum(1 for c in fake_gems.calls if c[0] == "rms_norm")


def record(where="torch.nn.functional.rms_norm"):
    [rec] = [r for r in fl_patch.report() if r["where"] == where]
    return rec


def calibrated_file(tmp_path, launch=profiles.FAST):
    """The calibrated profile of DEVICE for a way of calling FlagGems (by default the fast launch path's)."""
    return profiles.calibrated_dir({"XDG_CACHE_HOME": str(tmp_path / "cache")}) / profiles.calibrated_file_name(
        DEVICE.as_dict(), verification.stack()["flag_gems"], launch)


def apply_rms():
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])


# ------------------------------------------------------------------------------------------------- prior


def test_without_calibration_a_device_with_no_profile_runs_native_and_says_why(device, fake_gems, monkeypatch):
    monkeypatch.setenv("FL_PATCH_CALIBRATE", "0")
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    for rows in (1, 16, 4096):
        call(rows)
    assert gems_calls(fake_gems) == 0
    assert record()["fallbacks"] == {gems.NOT_MEASURED: 3}
    assert "not calibrating" in routing.describe()["summary"]


def test_the_prior_borrows_only_device_bound_decisions_of_the_same_architecture(device, fake_gems, monkeypatch):
    monkeypatch.setenv("FL_PATCH_CALIBRATE", "0")
    shipped = {"schema": 1, "kind": "fl_patch.profile",
               "device": {"vendor": "nvidia", "name": "NVIDIA H200", "type": "cuda", "capability": "9.0"},
               "versions": {}, "date": "2026-12-03T00:00:00+00:00",
               "families": {"rms_norm": {"route": "gems", "min_elements": 0, "why": "always",
                                         "device_bound": {"route": "gems", "min_elements": 4096, "why": "x"}}}}
    (device / "shipped").mkdir()
    (device / "shipped" / "h200.json").write_text(json.dumps(shipped))
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    monkeypatch.setattr(routing, "_busy", lambda d: True)
    call(1)  # 64 elements: under the borrowed device-bound threshold
    call(128)  # 8192 elements, device busy: FlagGems (the borrowed device time wins there)
    assert gems_calls(fake_gems) == 1
    monkeypatch.setattr(routing, "_busy", lambda d: False)
    call(128)  # launch-bound: native (host cost is not borrowed)
    assert gems_calls(fake_gems) == 1
    info = routing.describe()
    assert info["borrowed"]["made_on"]["name"] == "NVIDIA H200" and "borrowed" in info["summary"]


def test_another_architecture_is_not_borrowed(device, fake_gems, monkeypatch):
    monkeypatch.setenv("FL_PATCH_CALIBRATE", "0")
    other = {"schema": 1, "kind": "fl_patch.profile",
             "device": {"vendor": "nvidia", "name": "NVIDIA A100", "type": "cuda", "capability": "8.0"},
             "versions": {}, "date": "2026-12-03T00:00:00+00:00",
             "families": {"rms_norm": {"route": "gems", "device_bound": {"route": "gems", "min_elements": 0}}}}
    (device / "shipped").mkdir()
    (device / "shipped" / "a100.json").write_text(json.dumps(other))
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    monkeypatch.setattr(routing, "_busy", lambda d: True)
    call(128)
    assert gems_calls(fake_gems) == 0
    assert "borrowed" not in routing.describe()


# ------------------------------------------------------------------------------------------- calibration


def run_until_decided(rows, calls=40):
    for _ in range(calls):
        call(rows)


def test_calibration_learns_flag_gems_is_faster_and_then_routes_there_without_measuring(device, fake_gems, costs):
    costs.update(gems=5e-6, native=20e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16)
    state = calibration.state(KEY)
    assert not state.cells and list(state.points) == [(calibration.bucket_of(16 * 64), calibration.LAUNCH_BOUND)]
    point = next(iter(state.points.values()))
    assert (point["gems_us"], point["native_us"]) == (5.0, 20.0)
    assert point["samples"] == {"gems": calibration.SAMPLES, "native": calibration.SAMPLES}
    measured_calls = state.calls
    before = gems_calls(fake_gems)
    run_until_decided(16, 10)
    assert gems_calls(fake_gems) - before == 10 and state.calls == measured_calls  # decided: no more measuring
    learned = routing.describe()["calibration"]["keys"][KEY]
    assert learned["decision"]["route"] == "gems" and learned["timed_calls"] == 2 * calibration.SAMPLES


def test_calibration_learns_native_is_faster_and_keeps_it_native(device, fake_gems, costs):
    costs.update(gems=60e-6, native=10e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(1)
    before, routed_native = gems_calls(fake_gems), record()["fallbacks"].get(gems.PROFILE_NATIVE, 0)
    run_until_decided(1, 10)
    assert gems_calls(fake_gems) == before
    assert record()["fallbacks"][gems.PROFILE_NATIVE] - routed_native == 10


def test_a_size_outside_the_measured_range_is_measured_when_it_comes(device, fake_gems, costs):
    costs.update(gems=60e-6, native=10e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(1)
    costs.update(gems=10e-6, native=60e-6)  # larger calls: FlagGems wins
    run_until_decided(4096)
    state = calibration.state(KEY)
    assert len(state.points) == 2
    decision = state.decision()
    assert decision["route"] == "gems" and decision["min_elements"] == calibration.bucket_range(
        calibration.bucket_of(4096 * 64))[0]


def learn_busy_large_and_idle_small(costs, monkeypatch) -> dict:
    """Apply and calibrate: large calls (4096 rows, 262144 elements) measured while the device is busy, where
    FlagGems wins; small ones (1 row, 64 elements) while it is idle, where native wins. Returns the switch
    (``busy["now"]``) the router's business check reads."""
    busy = {"now": True}
    monkeypatch.setattr(routing, "_busy", lambda device: busy["now"])
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    costs.update(gems=5e-6, native=20e-6)
    run_until_decided(4096)
    busy["now"] = False
    costs.update(gems=60e-6, native=10e-6)
    run_until_decided(1)
    return busy


def test_flag_gems_is_never_routed_below_the_smallest_size_measured_in_a_regime(device, fake_gems, costs,
                                                                                 monkeypatch):
    """Large calls measured while the device is busy (FlagGems wins there), small ones while it is idle (native
    wins): a small call that finds the device busy stays native. Its size was never measured busy, and on an H100
    such calls went to FlagGems' 60-130 µs call in every decode step (device-bound decided 'gems at every size')."""
    busy = learn_busy_large_and_idle_small(costs, monkeypatch)
    decision = calibration.state(KEY).decision()
    assert decision["route"] == "native"
    assert decision["device_bound"]["route"] == "gems" and decision["device_bound"]["min_elements"] == 2 ** 18
    busy["now"] = True
    before = gems_calls(fake_gems)
    call(4)  # 256 elements: inside the measured range, never measured busy
    assert gems_calls(fake_gems) == before and record()["fallbacks"][gems.PROFILE_NATIVE] >= 1
    call(4096)
    assert gems_calls(fake_gems) == before + 1  # where it was measured, FlagGems still wins


def test_a_calibrated_file_of_an_older_rule_routes_by_todays(device, fake_gems, costs, monkeypatch):
    """A calibrated profile written before the rule above (device-bound 'gems at every size' from points at large
    sizes only) is decided again from its points when read."""
    busy = learn_busy_large_and_idle_small(costs, monkeypatch)
    fl_patch.revert()
    path = calibrated_file(device)
    data = json.loads(path.read_text())
    [form] = [f for f in data["families"]["rms_norm"]["forms"]]
    data["families"]["rms_norm"]["forms"][form]["device_bound"]["min_elements"] = 0  # what the old rule wrote
    path.write_text(json.dumps(data))
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    fake_gems.calls.clear()
    busy["now"] = True
    call(4)
    assert gems_calls(fake_gems) == 0


def test_the_calibrated_profile_is_written_and_the_next_process_starts_from_it(device, fake_gems, costs):
    costs.update(gems=5e-6, native=20e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16)
    path = calibrated_file(device)
    data = json.loads(path.read_text())
    assert data["calibrated"][KEY]["points"][0]["samples"] == {"gems": calibration.SAMPLES,
                                                               "native": calibration.SAMPLES}
    profile = profiles.read(path, "calibrated")
    assert profile.calibrated and profile.decision(KEY).route == "gems"
    fl_patch.revert()  # a new process: nothing learned in memory
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    fake_gems.calls.clear()
    call(16)
    call(16)
    assert gems_calls(fake_gems) == 2 and calibration.state(KEY).calls == 0  # no calls measured
    info = routing.describe()
    assert info["source"] == "calibrated" and info["state"] == "in force"


def test_a_calibrated_profile_counts_only_for_the_way_flag_gems_was_called(device, fake_gems, costs):
    """What calibration learned with the fast launch path (the default) says nothing of FlagGems' own functions'
    host cost: a process with the fast path off calibrates again, into its own file."""
    costs.update(gems=5e-6, native=20e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16)
    fast = calibrated_file(device)
    assert fast.name.endswith("-fast.json") and json.loads(fast.read_text())["launch"] == profiles.FAST
    fl_patch.revert()
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"], fast_launch=False)
    call(16)
    assert routing.describe()["state"] == "none"  # the fast path's file is not this process's
    assert calibration.state(KEY).calls == 1  # measured again
    run_until_decided(16)
    public = calibrated_file(device, profiles.PUBLIC)
    assert public != fast and json.loads(public.read_text())["launch"] == profiles.PUBLIC
    fl_patch.revert()
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])  # the fast path again: its own file
    call(16)
    assert routing.describe()["path"] == str(fast) and calibration.state(KEY).calls == 0


def test_a_tuned_profile_of_the_other_launch_path_is_used_and_the_status_says_so(device, fake_gems):
    tuned = {"schema": 1, "kind": "fl_patch.profile", "device": {"vendor": "nvidia", "name": DEVICE.name},
             "versions": {}, "date": "2026-12-04T00:00:00+00:00",
             "families": {"rms_norm": {"route": "native", "why": "tuned"}}}  # no "launch": FlagGems' own functions
    folder = profiles.cache_dir({"XDG_CACHE_HOME": str(device / "cache")})
    folder.mkdir(parents=True)
    (folder / "tuned.json").write_text(json.dumps(tuned))
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    call(16)
    info = routing.describe()
    assert info["source"] == "user cache" and "called here on the fast launch path" in info["summary"]
    fl_patch.revert()
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"], fast_launch=False)
    call(16)
    assert "launch path" not in routing.describe()["summary"]


def test_a_profile_with_an_unknown_launch_is_refused_by_name(tmp_path):
    data = {"schema": 1, "kind": "fl_patch.profile", "device": {"name": DEVICE.name}, "versions": {},
            "launch": "warp", "families": {}}
    with pytest.raises(profiles.ProfileError, match="unknown launch 'warp'; accepted: fast, public"):
        profiles.parse(data, "p.json", "test")


def test_a_tuned_profile_records_how_flag_gems_was_called(tmp_path):
    from fl_patch.device import tuning

    def launch_of(provider):
        tuner = tuning.Tuner(torch.device("cpu"), provider, [], 1.0, tmp_path / "p.json", {"device": {}})
        return tuner.profile()["launch"]

    assert launch_of("gems") == profiles.FAST
    gems.configure_fast_launch(False)
    try:
        assert launch_of("gems") == profiles.PUBLIC
    finally:
        gems.configure_fast_launch(None)
    assert launch_of("reference") == profiles.PUBLIC


def test_a_tuned_profile_wins_over_a_calibrated_one(device, fake_gems, costs):
    costs.update(gems=5e-6, native=20e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16)
    tuned = {"schema": 1, "kind": "fl_patch.profile", "device": {"vendor": "nvidia", "name": DEVICE.name},
             "versions": {}, "date": "2026-12-04T00:00:00+00:00",
             "families": {"rms_norm": {"route": "native", "why": "tuned"}}}
    tuned_path = profiles.cache_dir({"XDG_CACHE_HOME": str(device / "cache")}) / "tuned.json"
    tuned_path.write_text(json.dumps(tuned))
    fl_patch.revert()
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    fake_gems.calls.clear()
    call(16)
    assert gems_calls(fake_gems) == 0 and routing.describe()["source"] == "user cache"


def test_deterministic_algorithms_and_fl_patch_profile_turn_calibration_off(device, fake_gems, costs, tmp_path,
                                                                            monkeypatch):
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    torch.use_deterministic_algorithms(True)
    try:
        run_until_decided(16, 20)
    finally:
        torch.use_deterministic_algorithms(False)
    assert calibration.state(KEY).calls == 0 and gems_calls(fake_gems) == 0
    assert record()["fallbacks"] == {gems.NOT_MEASURED: 20}
    user = tmp_path / "mine.json"
    user.write_text(json.dumps({"schema": 1, "kind": "fl_patch.profile", "device": {"name": "x"}, "versions": {},
                                "families": {"linear": {"route": "native"}}}))
    monkeypatch.setenv("FL_PATCH_PROFILE", str(user))
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16, 20)
    assert calibration.state(KEY).calls == 0  # the user chose the routing: nothing is measured


def test_concurrent_writers_keep_every_point(tmp_path):
    path = tmp_path / "calibrated" / "dev.json"
    code = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from fl_patch.device import calibration
        rank = int(sys.argv[1])
        for bucket in range(5, 15):
            point = {{"elements": 1 << (bucket - 1), "bucket": bucket, "regime": "launch_bound", "gems_us": 1.0,
                      "native_us": 2.0, "noise": 0.03, "samples": {{"gems": 6, "native": 6}}}}
            calibration.merge(Path({str(path)!r}), {{"name": "dev"}}, {{}}, {{f"rms_norm.hf{{rank}}": [point]}})
    """)
    # distinct (fake) keys per writer: every writer's every point must survive the others' merges
    children = [subprocess.Popen([sys.executable, "-c", code, str(rank)]) for rank in range(4)]
    assert [child.wait(timeout=120) for child in children] == [0, 0, 0, 0]
    data = json.loads(path.read_text())
    assert {key: len(entry["points"]) for key, entry in data["calibrated"].items()} == {
        f"rms_norm.hf{rank}": 10 for rank in range(4)}
    assert not list(path.parent.glob("*.tmp"))


def test_merge_keeps_the_point_resting_on_more_calls(tmp_path):
    path = tmp_path / "dev.json"
    few = {"elements": 16, "bucket": 5, "regime": "launch_bound", "gems_us": 9.0, "native_us": 2.0, "noise": 0.03,
           "samples": {"gems": 2, "native": 2}}
    many = {**few, "gems_us": 1.0, "samples": {"gems": 6, "native": 6}}
    calibration.merge(path, {"name": "dev"}, {}, {"rms_norm.hf": [many]})
    data = calibration.merge(path, {"name": "dev"}, {}, {"rms_norm.hf": [few]})
    assert data["calibrated"]["rms_norm.hf"]["points"] == [many]
    assert profiles.parse(data, str(path), "calibrated").decision("rms_norm.hf").route == "gems"


# ------------------------------------------------------------------------------------------ verification


def test_a_flag_gems_that_returns_wrong_numbers_never_reaches_the_user(device, fake_gems, monkeypatch, caplog):
    real = fake_gems.rms_norm
    monkeypatch.setattr(fake_gems, "rms_norm", lambda *a, **k: real(*a, **k) * 2)  # wrong by a factor of two
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])  # lifted: FlagGems at every size
    x, w = x_of(4), torch.full((64,), 0.5, dtype=torch.bfloat16)
    expected = torch.rms_norm(x, (64,), w, 1e-6)
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        first = F.rms_norm(x, (64,), w, 1e-6)
        second = F.rms_norm(x, (64,), w, 1e-6)
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert gems_calls(fake_gems) == 1  # the verifying call alone
    warnings = [r.getMessage() for r in caplog.records if "differs from the native path" in r.getMessage()]
    assert len(warnings) == 1 and KEY in warnings[0] and "(4, 64)" in warnings[0] and "tolerance" in warnings[0]
    assert record()["fallbacks"] == {gems.NOT_VERIFIED: 1}
    assert "differs" in routing.describe()["verification"][KEY]["failed"]
    # the next process reads the checks cache: native from its first call, FlagGems never asked
    fl_patch.revert()
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    fake_gems.calls.clear()
    assert torch.equal(F.rms_norm(x, (64,), w, 1e-6), expected)
    assert gems_calls(fake_gems) == 0


def test_a_verified_key_is_not_checked_again_by_the_next_process(device, fake_gems, monkeypatch):
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    call(4)
    assert torch.bfloat16 in verification.checks(KEY).verified
    fl_patch.revert()
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    called = []
    monkeypatch.setattr(verification, "first_call", lambda *a: called.append(a))
    call(4)
    assert called == []


def test_verification_on_a_model_keeps_logits_equal_to_unpatched(device, fake_gems, monkeypatch):
    transformers = pytest.importorskip("transformers")
    real = fake_gems.rms_norm
    monkeypatch.setattr(fake_gems, "rms_norm", lambda *a, **k: real(*a, **k) + 1.0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        unpatched = model(ids).logits
        fl_patch.apply(kernels="gems", include=["rms_norm"])
        patched = model(ids).logits
    # the kept-native path is torch's fused rms_norm: one bf16 rounding from HF's body, nothing more
    torch.testing.assert_close(patched, unpatched, atol=0.05, rtol=0.02)
    assert "rms_norm.hf" in routing.describe()["verification"]
    assert routing.describe()["verification"]["rms_norm.hf"]["failed"]


def test_the_report_and_status_say_what_was_learned_and_what_is_kept_native(device, fake_gems, costs, monkeypatch):
    from fl_patch import runtime

    costs.update(gems=5e-6, native=20e-6)
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    run_until_decided(16)
    call(1)  # a new size: being measured
    text = runtime.report_text()
    # FlagGems from the smallest size measured (16 rows of 64), not below it
    assert f"calibrated {KEY}: gems >= {16 * 64} (from {2 * calibration.SAMPLES} timed calls" in text
    assert f"measuring {KEY}: 64+ elements, launch-bound: 1+0 calls" in text
    monkeypatch.setitem(verification.checks(KEY).__dict__, "failed", "FlagGems' x differs")
    assert f"kept native {KEY}: FlagGems' x differs" in runtime.report_text()


def test_fl_patch_check_certifies_forms_and_keeps_a_failed_one_native(device, fake_gems):
    cases = [
        {"family": "rms_norm", "form": "torch", "dtype": "bfloat16", "target": "fl_patch.kernels.rms_norm.gems_torch",
         "verdict": "pass", "shape": "x 4x64", "max_error": 0.0, "tolerance": 1.0},
        {"family": "rope", "form": "hf", "dtype": "bfloat16", "target": "fl_patch.kernels.rope.gems_hf",
         "verdict": "pass", "shape": "small"},
        {"family": "rope", "form": "hf", "dtype": "bfloat16", "target": "fl_patch.kernels.rope.gems_hf",
         "verdict": "fail: output 0 error 3 > tolerance 0.1", "shape": "large"},
        {"family": "rope", "form": "hf", "dtype": "bfloat16", "target": "fl_patch.kernels.rope.reference_hf",
         "verdict": "pass", "shape": "large"},
    ]
    path = verification.certify(DEVICE.as_dict(), cases)
    recorded = json.loads(path.read_text())["checks"]
    assert recorded["rms_norm.torch"]["bfloat16"]["verdict"] == "pass"
    assert recorded["rope.hf"]["bfloat16"]["verdict"].startswith("fail") and "large" in str(recorded["rope.hf"])
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])
    call(4)  # certified: FlagGems, no verifying call of the native path
    assert gems_calls(fake_gems) == 1 and verification.describe()["rms_norm.torch"]["results"]["bfloat16"][
        "by"] == "fl-patch check"
    assert verification.failed("rope.hf") is not None


def test_calls_in_grad_mode_are_never_measured_nor_routed_by_the_device_business(device, fake_gems, costs,
                                                                                   monkeypatch):
    """Gradient checkpointing recomputes the forward and needs each call to take the same path again."""
    fl_patch.apply(kernels="gems", exclude=["attention", "linear"])
    monkeypatch.setattr(routing, "_busy", lambda d: True)
    for _ in range(20):
        x = x_of(16).requires_grad_()
        F.rms_norm(x, (64,), torch.ones(64, dtype=torch.bfloat16), 1e-6).sum().backward()
    assert calibration.state(KEY).calls == 0 and gems_calls(fake_gems) == 0
    assert record()["fallbacks"] == {gems.NOT_MEASURED: 20}
