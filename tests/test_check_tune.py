"""``fl-patch check`` and ``fl-patch tune`` on the CPU: the decision rule on synthetic timings, the commands'
--quick runs in subprocesses, failures they must catch (a wrong kernel, an attribute revert left behind, a
global override that gives wrong logits), and their gems paths against the fake FlagGems."""

import importlib.machinery
import json
import math
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from conftest import REPO


def fl_patch_command(*args, env=None, timeout=120):
    """``python -m fl_patch ARGS`` in a fresh interpreter (no FL_PATCH_* from here): (result, seconds)."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_PATCH", "LIGHTX2V_FL_", "PYTHONPATH"))}
    child_env.update(PYTHONPATH=str(REPO), **(env or {}))
    began = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "fl_patch", *args], env=child_env, capture_output=True, text=True,
                            timeout=timeout, cwd=str(REPO))
    return result, time.monotonic() - began


# ------------------------------------------------------------------------------------------- decision rule


def points(*timings, noise=0.03):
    """Points at 2**12, 2**14, ... from (gems_us, native_us) pairs."""
    return [{"elements": 1 << (12 + 2 * i), "gems_us": g, "native_us": n, "noise": noise}
            for i, (g, n) in enumerate(timings)]


def test_faster_everywhere_is_gems_at_every_size():
    from fl_patch.device.tuning import decide

    decision = decide(points((5, 10), (6, 10), (7, 10)))
    assert (decision["route"], decision["min_elements"]) == ("gems", 0)


def test_faster_from_a_size_on_is_gems_above_it():
    from fl_patch.device.tuning import decide

    decision = decide(points((20, 10), (12, 10), (8, 10), (50, 100)))
    assert (decision["route"], decision["min_elements"]) == ("gems", 1 << 16)
    assert "native below 65536" in decision["why"]


def test_slower_beyond_noise_at_a_larger_size_moves_the_threshold_or_makes_it_native():
    from fl_patch.device.tuning import decide

    assert decide(points((5, 10), (6, 10), (12, 10)))["route"] == "native"  # slower at the largest size
    decision = decide(points((5, 10), (12, 10), (6, 10), (7, 10)))  # slower in the middle: only above it
    assert (decision["route"], decision["min_elements"]) == ("gems", 1 << 16)
    assert decide(points((12, 10), (13, 10)))["route"] == "native"  # never faster


def test_noise_decides_what_counts_as_slower():
    from fl_patch.device.tuning import decide

    assert decide(points((5, 10), (10.2, 10)))["min_elements"] == 0  # 2% slower, within 3% noise
    assert decide(points((5, 10), (10.5, 10)))["route"] == "native"  # 5% slower
    assert decide(points((5, 10), (10.5, 10), noise=0.08))["min_elements"] == 0  # within this point's 8%
    assert decide(points((10, 10), (9, 10)))["min_elements"] == 1 << 14  # equal is not faster


def test_a_win_within_noise_does_not_count():
    from fl_patch.device.tuning import decide

    # 7% faster within 16% noise, then within noise: nothing to tell from chance, so native until a real win
    decision = decide(points((10, 10.7), (10, 10.1), (5, 10), noise=0.16))
    assert (decision["route"], decision["min_elements"]) == ("gems", 1 << 16)
    assert decide(points((10, 10.7), (10, 10.1), noise=0.16))["route"] == "native"


def test_redecide_rewrites_a_profile_from_its_measurements(tmp_path):
    from fl_patch.device import profiles, tuning

    point = {"form": "hf", "variant": "v", "shape": "s", "dtype": "bfloat16", "noise": 0.16}
    measured = [dict(point, elements=1 << 12, gems_us=10, native_us=10.7),
                dict(point, elements=1 << 24, gems_us=5, native_us=10)]
    source = profiles.write({"schema": 1, "device": {"name": "X"}, "versions": {}, "families": {
        "rope": {"route": "gems", "min_elements": 0, "why": "old rule", "forms": {"hf": {"route": "gems"}},
                 "measurements": measured}}}, tmp_path / "p.json")
    assert tuning.main(["--redecide", str(source), "--out", str(tmp_path / "new.json")]) == 0
    rope = profiles.read(tmp_path / "new.json", "test").forms["rope.hf"]
    assert (rope.route, rope.min_elements) == ("gems", 1 << 24)


def test_points_of_one_size_from_two_variants_must_both_hold():
    from fl_patch.device.tuning import decide

    both = points((5, 10), (5, 10)) + [{"elements": 1 << 14, "gems_us": 15, "native_us": 10, "noise": 0.03}]
    assert decide(both)["route"] == "native"


def test_family_takes_the_most_conservative_form():
    from fl_patch.device.tuning import family_decision

    gems = {"route": "gems", "min_elements": 0}
    assert family_decision({"a": gems, "b": {"route": "gems", "min_elements": 4096}})["min_elements"] == 4096
    assert family_decision({"a": gems, "b": {"route": "native", "min_elements": 0}})["route"] == "native"
    assert family_decision({"a": gems})["min_elements"] == 0


def test_bisection_finds_bad_functions_and_interactions():
    from fl_patch.global_check import narrow

    def judge(group):
        if "bad" in group:
            return "nan"
        return "error" if {"x", "y"} <= set(group) else "ok"

    found = {}
    assert narrow(["a", "bad", "c", "d"], judge, found) and found == {"bad": "nan"}
    found = {}
    narrow(["x", "y"], judge, found)
    assert found == {"together: x, y": "error"}
    found = {}
    assert not narrow(["bad", "c"], lambda group: "not-run", found) and found == {}


# ----------------------------------------------------------------------------------------- quick commands


def test_check_quick_passes_and_writes_every_case(tmp_path):
    out = tmp_path / "check.json"
    result, seconds = fl_patch_command("check", "--quick", "--global", "--json", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert seconds < 60, seconds
    report = json.loads(out.read_text())
    assert report["kind"] == "fl_patch.check" and report["provider"] == "reference"
    assert {"device", "versions", "date", "tolerance", "counts"} <= set(report)
    assert report["counts"]["fail"] == 0 and report["counts"]["pass"] > 100
    kernel_cases = [c for c in report["cases"] if c["family"] not in ("revert", "gems_global")]
    for case in kernel_cases:
        assert {"family", "target", "form", "shape", "dtype", "max_error", "tolerance", "verdict"} <= set(case), case
    keys = {(c["family"], c["form"]) for c in kernel_cases}
    assert keys == {tuple(key.split(".")) for key in ("attention.sdpa", "attention.varlen", "rms_norm.hf",
                                                       "rms_norm.gemma", "rms_norm.fp32", "rms_norm.gated",
                                                       "rms_norm.torch", "rope.hf", "rope.interleaved", "linear.linear",
                                                       "linear.in_out", "swiglu.swiglu", "layer_norm.layer_norm",
                                                       "cross_entropy.loss")}
    assert {c["dtype"] for c in kernel_cases} == {"float32", "bfloat16"}
    assert {c["dtype"] for c in kernel_cases if c["family"] == "cross_entropy"} == {"float32"}  # the loss's only one
    assert any(c.get("grad") == "checked" and "grad_error" in c for c in kernel_cases)
    reverted = [c for c in report["cases"] if c["family"] == "revert"]
    assert any(c["target"] == "torch.nn.functional.rms_norm" and c["verdict"] == "pass" for c in reverted)
    assert report["global"]["verdict"].startswith("skipped: FlagGems' kernels need an accelerator")
    assert "[rms_norm]" in result.stdout and "0 fail" in result.stdout.splitlines()[-1]


def test_tune_quick_writes_a_profile_that_parses(tmp_path):
    from fl_patch.device import profiles

    out = tmp_path / "profile.json"
    result, seconds = fl_patch_command("tune", "--quick", "--out", str(out))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert seconds < 60, seconds
    profile = profiles.read(out, "test")
    data = json.loads(out.read_text())
    assert data["schema"] == profiles.SCHEMA and {"vendor", "name", "type"} <= set(data["device"])
    assert {"fl_patch", "torch", "triton", "flag_gems"} <= set(data["versions"]) and data["date"]
    assert set(profile.families) == set(profiles.FAMILY_FORMS)
    every_key = {f"{family}.{form}" for family, forms in profiles.FAMILY_FORMS.items() for form in forms}
    assert set(profile.forms) == every_key
    point = data["families"]["rms_norm"]["measurements"][0]
    assert {"form", "shape", "elements", "dtype", "gems", "native", "noise", "native_path"} <= set(point)
    assert {"device_us", "host_us"} <= set(point["gems"])
    assert "rms_norm.hf" in result.stdout and str(out) in result.stdout


def test_tune_quick_without_out_checks_a_temporary_file_then_removes_it(tmp_path):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    result, _ = fl_patch_command("tune", "--quick", "--families", "swiglu",
                                 env={"XDG_CACHE_HOME": str(tmp_path), "TMPDIR": str(temporary)})
    assert result.returncode == 0, result.stderr
    assert not (tmp_path / "fl_patch").exists()  # not the user cache
    written = result.stdout.splitlines()[0].rsplit("profile: ", 1)[1].removesuffix(" (temporary: --out PATH keeps it)")
    assert written.startswith(str(temporary / "fl_patch_tune_"))
    assert f"fl-patch tune: {written} parses; removed with its temporary folder" in result.stdout
    assert list(temporary.iterdir()) == []


@pytest.mark.parametrize("command", [("tune", "--quick", "--out"), ("check", "--quick", "--json")])
@pytest.mark.parametrize("where, problem", [
    ("afile/p.json", "afile is a file, not a folder"),
    ("/proc/p.json", "nothing can be created in /proc"),
    (".", "it is a folder"),
])
def test_an_output_path_that_cannot_be_written_fails_before_measuring(tmp_path, command, where, problem):
    (tmp_path / "afile").write_text("")
    path = tmp_path / where if not where.startswith("/") else where
    result, seconds = fl_patch_command(*command, str(path))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [line] = result.stderr.splitlines()
    assert line.startswith(f"fl-patch {command[0]}: {command[2]} {path} can't be written: ")
    assert problem.replace("afile", str(tmp_path / "afile")) in line
    assert line.endswith("; give a file path in a folder you can write")
    assert "rms_norm" not in result.stdout  # nothing measured
    assert seconds < 30, seconds


def interrupted(args, out, first_line):
    """Start ``fl-patch ARGS``, press Ctrl-C once a line starting with `first_line` is printed: (rc, stdout, stderr)."""
    import signal

    env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_PATCH", "LIGHTX2V_FL_", "PYTHONPATH"))}
    # A shell's background job starts with SIGINT ignored, and an ignored signal stays ignored in its children
    # (Python then installs no KeyboardInterrupt handler): give the command the default, as a terminal would.
    process = subprocess.Popen([sys.executable, "-m", "fl_patch", *args, str(out)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=REPO, env={**env, "PYTHONPATH": str(REPO)},
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(first_line):
            process.send_signal(signal.SIGINT)
            break
    stdout, stderr = process.communicate(timeout=120)
    return process.returncode, "".join(lines) + stdout, stderr


def test_ctrl_c_in_tune_says_interrupted_keeps_the_forms_measured_and_exits_130(tmp_path):
    from fl_patch.device import profiles

    out = tmp_path / "p.json"
    rc, stdout, stderr = interrupted(("tune", "--quick", "--families", "rms_norm.hf,swiglu,layer_norm", "--out"),
                                     out, "  rms_norm.hf ")
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith(f"fl-patch tune: interrupted; {out} holds the ")
    data = json.loads(out.read_text())
    assert "rms_norm" in data["families"] and "layer_norm.layer_norm" in data["not_measured"]
    profiles.read(out, "test")


def test_ctrl_c_in_check_says_interrupted_writes_the_cases_so_far_and_exits_130(tmp_path):
    out = tmp_path / "check.json"
    rc, stdout, stderr = interrupted(("check", "--quick", "--json"), out, "  rms_norm.hf ")
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    [line] = stderr.splitlines()
    assert line.startswith("fl-patch check: interrupted after ") and line.endswith(f"; wrote {out}")
    data = json.loads(out.read_text())
    assert data["interrupted"] is True and data["counts"]["cases"] == len(data["cases"]) > 0
    assert data["counts"]["fail"] == 0


def test_a_side_that_fails_is_said_with_its_reason(monkeypatch, tmp_path, capsys):
    from fl_patch.device import tuning
    from fl_patch.kernels import swiglu

    def broken(*args):
        raise RuntimeError("no kernel for this shape\nsecond line")

    monkeypatch.setattr(swiglu, "reference", broken)
    assert tuning.main(["--quick", "--families", "swiglu", "--out", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "gems failed, " in out and "        gems failed: RuntimeError: no kernel for this shape\n" in out


def test_device_grid_keeps_linear_to_two_sizes_in_bfloat16():
    from fl_patch.device import conformance, kernel_cases

    forms = kernel_cases.select("linear,swiglu")
    check = conformance.Check("gems", torch.device("cuda"), forms, None)  # builds on a CPU-only torch too
    linear, swiglu = kernel_cases.BY_KEY["linear.linear"], kernel_cases.BY_KEY["swiglu.swiglu"]
    assert check._dtypes(linear) == (torch.bfloat16,) and check._sizes(linear) == (1 << 12, 1 << 20)
    assert check._dtypes(swiglu) == (torch.bfloat16, torch.float16) and check._sizes(swiglu) == conformance.DEVICE_SIZES
    decode = kernel_cases.BY_KEY["attention.sdpa"].variants[1]
    assert kernel_cases.grid(decode, conformance.DEVICE_SIZES) == [1 << 12, 1 << 16, 1 << 18]


@pytest.mark.parametrize("args, message", [
    (("check", "--families", "rms_nrom"), "unknown family or form 'rms_nrom'; accepted: attention"),
    (("check", "--quick", "--kernels", "gems"), "--quick runs the reference kernels on the CPU"),
    (("check", "--device", "cpu"), "FlagGems' kernels need an accelerator"),
    (("tune", "--budget-s", "0"), "--budget-s 0: give a number of seconds above 0"),
    (("tune", "--device", "cpu"), "FlagGems' kernels need an accelerator"),
])
def test_bad_arguments_exit_2_with_one_message(args, message):
    result, _ = fl_patch_command(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr


# ------------------------------------------------------------------------------------ failures it catches


@pytest.mark.parametrize("wrong, verdict", [
    (lambda x, weight, eps: 1.01 * weight * x, "error"),
    (lambda x, weight, eps: torch.full_like(x, math.nan), "NaN/Inf"),
    (lambda x, weight, eps: x.float(), "is float32"),
])
def test_a_wrong_kernel_fails_the_check(monkeypatch, tmp_path, wrong, verdict):
    from fl_patch.device import conformance
    from fl_patch.kernels import rms_norm

    monkeypatch.setattr(rms_norm, "reference_hf", wrong)
    out = tmp_path / "check.json"
    assert conformance.main(["--quick", "--families", "rms_norm.hf", "--json", str(out)]) == 1
    failed = [c for c in json.loads(out.read_text())["cases"] if c["verdict"].startswith("fail")]
    assert failed and all(c["target"] == "fl_patch.kernels.rms_norm.reference_hf" for c in failed)
    assert any(verdict in c["verdict"] for c in failed), failed[0]


def test_a_wrong_gradient_fails_the_check(monkeypatch):
    from fl_patch.device import conformance, kernel_cases
    from fl_patch.kernels import swiglu

    class WrongBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, gate, up):
            ctx.save_for_backward(gate, up)
            return torch.nn.functional.silu(gate) * up

        @staticmethod
        def backward(ctx, grad):
            gate, up = ctx.saved_tensors
            return grad * up, grad * torch.nn.functional.silu(gate)  # d/dgate is wrong: silu's derivative missing

    monkeypatch.setattr(swiglu, "reference", WrongBackward.apply)
    form = kernel_cases.BY_KEY["swiglu.swiglu"]
    case, native = conformance.run_case(form, form.variants[0], "reference", 1 << 10, torch.float32,
                                        torch.device("cpu"))
    assert case["grad"] == "checked" and case["verdict"].startswith("fail: gradient of argument 0 error")
    assert native["grad"] == "checked" and native["verdict"] == "pass"  # swiglu.native, the routed-native path


def test_revert_identity_catches_an_attribute_left_patched(monkeypatch):
    import torch.nn.functional as F

    import fl_patch
    from fl_patch import runtime
    from fl_patch.device import conformance

    leftover = lambda *args, **kwargs: None  # noqa: E731
    real_revert = runtime.revert

    def revert_leaving_one():
        errors = real_revert()
        monkeypatch.setattr(F, "rms_norm", leftover)  # the monkeypatch fixture puts the original back
        return errors

    monkeypatch.setattr(runtime, "revert", revert_leaving_one)
    cases = conformance.revert_identity("reference", ["rms_norm"])
    verdicts = {c["target"]: c["verdict"] for c in cases}
    assert verdicts["torch.nn.functional.rms_norm"].startswith("fail: ")
    assert "after revert, was torch.nn.functional.rms_norm" in verdicts["torch.nn.functional.rms_norm"]
    assert all(v == "pass" for t, v in verdicts.items() if t != "torch.nn.functional.rms_norm")
    monkeypatch.undo()
    fl_patch.revert()
    assert all(c["verdict"] == "pass" for c in conformance.revert_identity("reference", ["rms_norm"]))


# --------------------------------------------------------------------------- gems paths, against fakes


@pytest.fixture
def gems_on_cpu(fake_gems, monkeypatch):
    """The fake FlagGems, its paths taking CPU tensors (as test_kernels does)."""
    from fl_patch.kernels import gems

    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    yield fake_gems


def test_check_runs_the_gems_paths_and_records_what_they_do_not_take(gems_on_cpu, tmp_path):
    from fl_patch.device import conformance, kernel_cases

    out = tmp_path / "check.json"
    forms = kernel_cases.select("rms_norm.hf,attention,rope.hf")
    assert conformance.Check("gems", torch.device("cpu"), forms, out).run(False) == 0
    cases = json.loads(out.read_text())["cases"]
    assert {c["dtype"] for c in cases if "dtype" in c} == {"bfloat16", "float16"}
    masked = [c for c in cases if c.get("variant") == "masked"]
    assert masked and all(c["verdict"] == "not taken: attn mask" for c in masked)  # routed to the original
    rope_cases = [c for c in cases if c["form"] == "hf" and c["family"] == "rope"]
    assert all(c["grad"].startswith("not claimed (requires grad)") for c in rope_cases)
    norms = [c for c in cases if c["target"] == "fl_patch.kernels.rms_norm.gems_hf"]
    assert norms and all(c["verdict"] == "pass" and c["grad"] == "checked" for c in norms)
    assert any(c["target"] == "fl_patch.kernels.rms_norm.native_hf" for c in cases)
    assert ("rms_norm",) in {tuple(call) for call in gems_on_cpu.calls}


def test_tune_writes_to_the_user_cache_where_the_lookup_finds_it(gems_on_cpu, monkeypatch, tmp_path, capsys):
    from fl_patch.device import devices, kernel_cases, profiles, tuning

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(kernel_cases, "pick_device", lambda name, cpu_allowed: torch.device("cpu"))
    assert tuning.main(["--families", "swiglu,rms_norm.hf"]) == 0
    device = devices.identify(torch.device("cpu"))
    expected = profiles.cache_dir() / profiles.file_name(device.as_dict(), "5.0.2-fake")
    assert str(expected).startswith(str(tmp_path / "fl_patch" / "profiles"))
    found = profiles.find(device, None)
    assert found.profile is not None and found.profile.path == str(expected) and found.profile.source == "user cache"
    assert set(found.profile.forms) == {"swiglu.swiglu", "rms_norm.hf"}
    assert found.profile.data["provider"] == "gems"
    assert ("silu_and_mul",) in {tuple(call) for call in gems_on_cpu.calls}
    assert "swiglu.swiglu" in capsys.readouterr().out


def test_tune_budget_leaves_the_rest_not_measured(monkeypatch, tmp_path):
    from fl_patch.device import profiles, tuning

    clock = iter(range(0, 10_000, 100))  # every call to monotonic() is 100 s later
    monkeypatch.setattr(tuning.time, "monotonic", lambda: next(clock))
    out = tmp_path / "p.json"
    assert tuning.main(["--quick", "--out", str(out), "--families", "swiglu,layer_norm", "--budget-s", "150"]) == 0
    data = json.loads(out.read_text())
    assert data["not_measured"] == ["layer_norm.layer_norm"] and data["families"]["swiglu"]["forms"]
    profiles.parse(data, str(out), "test")


def test_tune_of_some_families_keeps_the_others_native(tmp_path):
    """A family tune did not measure is written native, not left absent (absent = FlagGems at every size): a profile
    of `--families rope` must not send linear and attention to FlagGems."""
    from fl_patch.device import profiles, routing, tuning

    out = tmp_path / "p.json"
    assert tuning.main(["--quick", "--out", str(out), "--families", "swiglu"]) == 0
    profile = profiles.read(out, "test")
    unmeasured = set(profiles.FAMILY_FORMS) - {"swiglu"}
    for family in unmeasured:
        decision = profile.decision(f"{family}.{profiles.FAMILY_FORMS[family][0]}")
        assert decision.route == "native" and decision.why == tuning.NOT_TUNED, (family, decision)
        threshold, reason = routing._from_decision(decision, lifted=False)[:2]
        assert threshold == routing.NATIVE and reason == routing.PROFILE_NATIVE
    assert profile.decision("swiglu.swiglu").why != tuning.NOT_TUNED
    assert tuning.redecide(out, tmp_path / "again.json") == 0  # decided again: the native entries stay
    again = profiles.read(tmp_path / "again.json", "test")
    assert {family for family in unmeasured if again.families[family].route == "native"} == unmeasured


def standin_flag_gems(cos_factor: float):
    """A flag_gems whose enable() registers CPU kernels: cos (times `cos_factor`: 1 is right) and rsqrt (NaN,
    but on fl_patch's default exclude list, so it must never run)."""
    fake = types.ModuleType("flag_gems")
    fake.__spec__ = importlib.machinery.ModuleSpec("flag_gems", loader=None)
    fake.__version__ = "standin"

    def cos(x):
        return torch.sin(x + math.pi / 2) * cos_factor

    def rsqrt(x):
        return x * math.nan

    fake._FULL_CONFIG = (("cos", cos), ("rsqrt", rsqrt))

    def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None):
        for key, function in fake._FULL_CONFIG:
            if function.__name__ not in (unused or ()):
                lib.impl(key, function, "CPU")

    fake.enable = enable
    return fake


@pytest.mark.filterwarnings("ignore:Warning only once for all operators")  # torch: the stand-in overrides aten::cos
@pytest.mark.parametrize("cos_factor, verdict, would_add", [(1.0, "pass", []), (1.5, "fail", ["cos"])])
def test_global_check_judges_the_default_list_and_bisects_what_to_add(monkeypatch, cos_factor, verdict, would_add):
    from fl_patch import global_check
    from fl_patch.kernels import gems

    fake = standin_flag_gems(cos_factor)
    monkeypatch.setitem(sys.modules, "flag_gems", fake)
    gems._reset_for_tests()
    try:
        section = global_check.run(torch.device("cpu"), budget_s=30, flag_gems=fake)
    finally:
        gems._reset_for_tests()
    [case] = section["cases"]
    assert case["verdict"].startswith(verdict), section
    assert section["would_add"] == would_add
    assert section["override"][0]["state"] == "patched" and "cos" in section["override"][0]["reason"]
    assert torch.equal(torch.cos(torch.zeros(2)), torch.ones(2))  # the override is gone


def regimes(launch, bound, native_device_bound_from):
    """Points at 2**12, 2**14, ... with launch-bound and device-bound (gems_us, native_us) pairs; the native path
    is device-bound on its own (device time above host time) from index `native_device_bound_from` on."""
    measured = points(*launch)
    for index, (point, (gems_us, native_us)) in enumerate(zip(measured, bound, strict=True)):
        host = native_us / 2 if index >= native_device_bound_from else native_us * 2
        point.update(gems_device_bound_us=gems_us, native_device_bound_us=native_us, device_bound_noise=0.03,
                     native={"device_us": max(host, native_us), "host_us": host})
    return measured


def test_the_device_bound_regime_is_decided_from_its_own_times_above_the_floor():
    """Host-bound FlagGems (launch-bound: faster only at the largest size) that is faster on the device from 2**16
    on; the native path is device-bound on its own from 2**18 on: the floor."""
    from fl_patch.device.tuning import decide_regimes, device_bound_floor, family_decision

    launch = ((80, 20), (80, 20), (80, 60), (90, 150))
    decision = decide_regimes(regimes(launch, ((4, 3), (6, 5), (20, 40), (70, 150)), native_device_bound_from=1))
    assert (decision["route"], decision["min_elements"]) == ("gems", 1 << 18)
    assert (decision["device_bound"]["route"], decision["device_bound"]["min_elements"]) == ("gems", 1 << 16)
    floored = decide_regimes(regimes(launch, ((4, 3), (6, 5), (20, 40), (70, 150)), native_device_bound_from=3))
    assert floored["device_bound"]["min_elements"] == 1 << 18
    assert "device-bound floor 2**18" in floored["device_bound"]["why"]
    never = decide_regimes(regimes(launch, ((4, 3), (6, 5), (20, 40), (70, 150)), native_device_bound_from=4))
    assert never["device_bound"]["route"] == "native"
    assert device_bound_floor(regimes(launch, launch, native_device_bound_from=2)) == 1 << 16
    assert "device_bound" not in decide_regimes(points((5, 10)))  # no device-bound times: no such decision
    family = family_decision({"a": decision, "b": {**decision, "device_bound": {"route": "native",
                                                                                "min_elements": 0}}})
    assert family["device_bound"]["route"] == "native"
    assert "device_bound" not in family_decision({"a": decision, "b": decide_regimes(points((5, 10)))})


def test_the_floor_needs_every_variant_of_a_size():
    from fl_patch.device.tuning import device_bound_floor

    measured = regimes(((1, 1), (1, 1)), ((1, 1), (1, 1)), native_device_bound_from=0)
    other = dict(measured[0], native={"device_us": 10.0, "host_us": 10.0})  # another variant at 2**12: launch-bound
    assert device_bound_floor([*measured, other]) == 1 << 14
    assert device_bound_floor([other, *measured]) == 1 << 14


class FakeEvents:
    """A device backend whose events report `elapsed_ms` and whose query says whether the device was still busy
    with the blocker when the host had enqueued the loop (`ahead` per try)."""

    def __init__(self, ahead):
        self.ahead = list(ahead)
        outer = self

        class Event:
            def __init__(self, enable_timing=False):
                self.recorded = False

            def record(self):
                self.recorded = True

            def query(self):
                return not outer.ahead.pop(0)

            def synchronize(self):
                pass

            def elapsed_time(self, other):
                return 2.0  # ms

        self.Event = Event

    def synchronize(self):
        pass


def test_device_bound_timing_gets_the_host_ahead_or_says_it_could_not(monkeypatch):
    from fl_patch.device import tuning

    backend = FakeEvents(ahead=[False, True])
    clock = tuning.Clock(torch.device("cpu"))
    clock._synchronize, clock._event = backend.synchronize, backend.Event
    blocked = []
    monkeypatch.setattr(clock, "_block", blocked.append)
    calls = []
    assert clock.device_bound_loop(lambda: calls.append(1), 10, 1e-4) == pytest.approx(2e-4)  # 2 ms / 10 calls
    assert blocked == pytest.approx([1.5e-3, 3e-3]) and len(calls) == 20  # the second try: a blocker twice as long
    backend.ahead = [False] * tuning.BLOCKER_TRIES
    assert clock.device_bound_loop(lambda: None, 10, 1e-4) is None
    assert not tuning.Clock(torch.device("cpu")).has_device_bound  # the CPU: no events, no device-bound times


# ----------------------------------------------------------------------------------------- compiled regime


def test_the_compiled_decision_comes_from_the_compiled_points_alone():
    """Eager FlagGems wins everywhere, compiled it loses to inductor at the larger sizes: each regime its own
    decision, and the family takes the most conservative compiled one only when every form has one."""
    from fl_patch.device.tuning import COMPILED, decide_all, family_decision

    eager = points((5, 10), (5, 10))
    compiled = [dict(p, regime=COMPILED) for p in points((5, 10), (12, 10))]
    decision = decide_all(eager + compiled)
    assert (decision["route"], decision["min_elements"]) == ("gems", 0)
    assert decision["compiled"]["route"] == "native" and "under torch.compile" in decision["compiled"]["why"]
    assert "compiled" not in decide_all(eager)
    compiled_wins = decide_all(eager + [dict(p, regime=COMPILED) for p in points((12, 10), (5, 10))])
    assert (compiled_wins["compiled"]["route"], compiled_wins["compiled"]["min_elements"]) == ("gems", 1 << 14)
    assert family_decision({"a": decision, "b": compiled_wins})["compiled"]["route"] == "native"
    assert "compiled" not in family_decision({"a": decision, "b": decide_all(eager)})


def test_redecide_keeps_compiled_points_out_of_the_eager_decision(tmp_path):
    from fl_patch.device import profiles, tuning

    point = {"form": "hf", "variant": "v", "shape": "s", "dtype": "bfloat16", "noise": 0.03}
    measured = [dict(point, elements=1 << 12, gems_us=5, native_us=10),
                dict(point, elements=1 << 12, gems_us=50, native_us=10, regime=tuning.COMPILED)]
    source = profiles.write({"schema": 1, "device": {"name": "X"}, "versions": {}, "families": {
        "rope": {"route": "native", "why": "old", "measurements": measured}}}, tmp_path / "p.json")
    assert tuning.main(["--redecide", str(source), "--out", str(tmp_path / "new.json")]) == 0
    rope = profiles.read(tmp_path / "new.json", "test").forms["rope.hf"]
    assert (rope.route, rope.compiled.route) == ("gems", "native")


def test_tune_quick_compiled_writes_compiled_decisions_the_routing_reads(tmp_path):
    from fl_patch.device import profiles

    out = tmp_path / "profile.json"
    result, _ = fl_patch_command("tune", "--quick", "--compiled", "--families", "rms_norm.hf", "--out", str(out),
                                 timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    compiled = [p for p in data["families"]["rms_norm"]["measurements"] if p.get("regime") == "compiled"]
    assert compiled and all("gems_us" in p and "native_us" in p for p in compiled), compiled
    profile = profiles.read(out, "test")
    assert profile.forms["rms_norm.hf"].compiled is not None
    assert profile.families["rms_norm"].compiled is not None
    assert "compiled" in result.stdout
