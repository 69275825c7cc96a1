"""FlagGems' global override, against a fake flag_gems that registers real CPU kernels into the Library it
is given (the real one needs a GPU)."""

import importlib.machinery
import importlib.util
import json
import logging
import math
import sys
import types

import pytest
import torch

import fl_patch
from conftest import REPO, run_python
from fl_patch.errors import PatchError, UnknownNameError
from fl_patch.integrations import gems_global
from fl_patch.kernels import gems

ROW = "flag_gems.enable"
BISECT = REPO / "benchmarks" / "gems_bisect.py"
# torch warns once when a Python kernel overrides a native one: what a global override does.
pytestmark = pytest.mark.filterwarnings("ignore:Warning only once for all operators")


def make_fake_flag_gems(refuse_second_registration=False):
    """A flag_gems with FlagGems 5.0.2's _FULL_CONFIG layout and enable(); abs and exp are real CPU kernels.

    refuse_second_registration: register as torch 2.11 does (no override of another Python kernel).
    """
    fake = types.ModuleType("flag_gems")
    fake.__spec__ = importlib.machinery.ModuleSpec("flag_gems", loader=None)
    fake.calls, fake.enabled = [], []

    def abs(x):  # noqa: A001 - FlagGems' function names shadow builtins too
        fake.calls.append("abs")
        return torch.where(x < 0, 0 - x, x)

    def exp(x):
        fake.calls.append("exp")
        return torch.pow(math.e, x)

    def named(name):
        def function(*args, **kwargs):
            raise AssertionError(f"{name} is never registered by this fake")
        function.__name__ = name
        return function

    never = lambda: False  # noqa: E731 - the condition slot of a _FULL_CONFIG entry
    fake._FULL_CONFIG = (
        ("abs", abs),
        ("exp", exp),
        ("_softmax", named("softmax"), never),
        ("div.Scalar", named("true_divide"), never),
        ("div.Tensor", named("true_divide"), never),
        ("div_.Tensor", named("true_divide_"), never),
        ("native_dropout", named("dropout"), never),
        ("native_layer_norm", named("layer_norm"), never),
        ("native_layer_norm_backward", named("layer_norm_backward"), never),
        ("rand", named("rand"), never),
        ("uniform_", named("uniform_"), never),
    )

    def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None):
        fake.enabled.append((lib, list(unused or [])))
        extra = {"allow_override": False} if refuse_second_registration else {}
        for key, function, *condition in fake._FULL_CONFIG:
            if function.__name__ in (unused or []) or (condition and not condition[0]()):
                continue
            try:
                lib.impl(key, function, "CPU", **extra)
            except Exception as exc:  # what FlagGems does: log and move on
                logging.warning(f"Skipped registering operator: {exc}")

    fake.enable = enable
    return fake


@pytest.fixture
def fake_gems(monkeypatch):
    fake = make_fake_flag_gems()
    monkeypatch.setitem(sys.modules, "flag_gems", fake)
    gems._reset_for_tests()
    yield fake
    fl_patch.revert()
    gems._reset_for_tests()


def row_records():
    return [r for r in fl_patch.report() if r["target"] == ROW]


def destroy_user_library(lib):
    """Destroy a test's own Library now, and disarm the finalizer torch gives it: at garbage collection, maybe
    tests later, it would remove this Library's op keys from torch's registry of Python kernels again, although
    another Library may hold them by then (a later test saw its own abs registration vanish that way)."""
    lib._destroy()
    lib._op_impls.clear()


def python_kernel_registered(op="abs", key="CPU"):
    return f"aten/{op}/{key}" in torch.library._impls


def test_off_by_default_imports_nothing(fake_gems):
    fl_patch.apply(include=["gems_global"])
    assert [(r["state"], r["reason"]) for r in row_records()] == [("skipped", "FL_PATCH_GEMS_GLOBAL is off")]
    assert fake_gems.enabled == [] and not gems.info()["loaded"]


def test_library_is_ours_and_destroyed_on_revert(fake_gems):
    x = torch.tensor([-2.0, 0.5])
    fl_patch.apply(include=["gems_global"], gems_global=True)
    ((lib, _),) = fake_gems.enabled
    assert isinstance(lib, torch.library.Library) and (lib.ns, lib.kind) == ("aten", "IMPL")
    assert torch.equal(torch.abs(x), torch.tensor([2.0, 0.5])) and fake_gems.calls == ["abs"]
    (record,) = row_records()
    assert record["state"] == "patched" and record["provider"] == "flag_gems"
    assert record["where"] == "aten::* at CPU (flag_gems.enable)"
    assert record["reason"].startswith("FlagGems owns 2 aten ops: abs, exp; unused: dropout, rand, uniform_")
    fl_patch.revert()
    assert lib.m is None and not python_kernel_registered()
    assert torch.equal(torch.abs(x), torch.tensor([2.0, 0.5])) and fake_gems.calls == ["abs"]  # native again
    assert row_records()[0]["state"] == "reverted"


def test_default_unused_list_when_none_and_given_list_replaces_it(fake_gems):
    fl_patch.apply(include=["gems_global"], gems_global=True)
    fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused="exp")
    fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused=["default", "abs"])
    fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused="")
    fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused="none")
    unused_lists = [unused for _, unused in fake_gems.enabled]
    assert unused_lists == [["dropout", "rand", "uniform_"], ["exp"], ["dropout", "rand", "uniform_", "abs"], [], []]
    assert gems_global.DEFAULT_UNUSED[: len(gems_global.RNG_FUNCTIONS)] == gems_global.RNG_FUNCTIONS


def test_environment_variable_and_lightx2v_alias(fake_gems, monkeypatch):
    monkeypatch.setenv("LIGHTX2V_FL_GLOBAL_GEMS", "1")
    monkeypatch.setenv("LIGHTX2V_FL_GEMS_UNUSED", "native_layer_norm,exp")
    fl_patch.apply(include=["gems_global"])
    assert fake_gems.enabled[-1][1] == ["layer_norm", "exp"]
    monkeypatch.setenv("FL_PATCH_GEMS_UNUSED", "abs")
    fl_patch.apply(include=["gems_global"])
    assert fake_gems.enabled[-1][1] == ["abs"]


def test_aten_names_map_to_flag_gems_function_names(fake_gems):
    table = gems_global.function_table(fake_gems)
    assert table["div.Tensor"] == "true_divide" and table["abs"] == "abs"
    names = ["native_layer_norm", "aten::div.Tensor", "layer_norm.default", "div_", "_softmax.default", "div",
             "softmax", "aten::abs"]
    assert gems_global.resolve_unused(names, table) == (
        "layer_norm", "true_divide", "true_divide_", "softmax", "abs")
    assert gems_global.resolve_unused(None, table) == ("dropout", "rand", "uniform_")


@pytest.mark.parametrize("name, closest", [("layer_nrom", "layer_norm"), ("native_layer_nrom", "native_layer_norm"),
                                           ("aten::ab", "abs")])
def test_unknown_unused_name_is_an_error_naming_the_closest(fake_gems, name, closest):
    table = gems_global.function_table(fake_gems)
    with pytest.raises(UnknownNameError, match=f"did you mean {closest!r}"):
        gems_global.resolve_unused([name], table)
    fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused=[name])
    (record,) = row_records()
    assert record["state"] == "skipped" and f"did you mean {closest!r}" in record["reason"]
    assert record["reason"].endswith("the aten-wide override is not enabled: an op the list meant to keep off FlagGems"
                                     " would run on it")
    assert fake_gems.enabled == []  # nothing registered with a list we could not read
    with pytest.raises(PatchError, match=f"did you mean {closest!r}"):
        fl_patch.apply(include=["gems_global"], gems_global=True, gems_unused=[name], strict=True)


def test_after_users_own_enable_takeover_is_reported_and_undone(fake_gems, caplog):
    user_lib = torch.library.Library("aten", "IMPL")
    try:
        fake_gems.enable(lib=user_lib, unused=["exp"])  # the user's own flag_gems.enable()
        with caplog.at_level(logging.WARNING, logger="fl_patch"):
            fl_patch.apply(include=["gems_global"], gems_global=True)
        assert "flag_gems.enable() ran before fl_patch's global override" in caplog.text
        (record,) = row_records()
        assert record["state"] == "patched" and "taken over from another Library until revert: abs" in record["reason"]
        fl_patch.revert()
        torch.abs(torch.ones(1))
        assert fake_gems.calls[-1] == "abs"  # the user's registration is in force again
        with pytest.raises(PatchError, match="1 ops had a Python kernel from another Library"):
            fl_patch.apply(include=["gems_global"], gems_global=True, strict=True)
    finally:
        destroy_user_library(user_lib)


def test_refused_second_registration_is_reported_not_silent(monkeypatch, caplog):
    """torch 2.11 refuses a second Python kernel and FlagGems only logs: fl_patch must say so."""
    fake = make_fake_flag_gems(refuse_second_registration=True)
    monkeypatch.setitem(sys.modules, "flag_gems", fake)
    gems._reset_for_tests()
    user_lib = torch.library.Library("aten", "IMPL")
    try:
        fake.enable(lib=user_lib, unused=[])
        with caplog.at_level(logging.WARNING):
            fl_patch.apply(include=["gems_global"], gems_global=True)
        assert "Skipped registering operator" in caplog.text  # FlagGems' own log line
        assert "2 ops already had a Python kernel from another Library and were NOT registered" in caplog.text
        states = {r["where"]: (r["state"], r["reason"]) for r in row_records()}
        assert states["aten::* at CPU (flag_gems.enable)"] == ("skipped", "FlagGems registered no op")
        assert states["aten::* at CPU, ops another Library registered first"] == (
            "skipped", "not registered, torch refused a second Python kernel: abs, exp")
        fl_patch.revert()
        with pytest.raises(PatchError, match="were NOT registered"):
            fl_patch.apply(include=["gems_global"], gems_global=True, strict=True)
        ours = fake.enabled[-1][0]
        assert ours.m is None  # destroyed before raising
    finally:
        destroy_user_library(user_lib)
        fl_patch.revert()
        gems._reset_for_tests()


def test_flag_gems_unavailable_fails_the_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "flag_gems", None)  # import flag_gems raises
    gems._reset_for_tests()
    try:
        fl_patch.apply(include=["gems_global"], gems_global=True)
        (record,) = row_records()
        assert record["state"] == "failed" and "FL_PATCH_GEMS_GLOBAL=1 but FlagGems can't be used" in record["reason"]
        fl_patch.revert()
        with pytest.raises(PatchError, match="FlagGems can't be used"):
            fl_patch.apply(include=["gems_global"], gems_global=True, strict=True)
    finally:
        gems._reset_for_tests()


def load_bisect_script():
    # As `python benchmarks/gems_bisect.py` would: the script's folder (its model_configs) on sys.path.
    if str(BISECT.parent) not in sys.path:
        sys.path.insert(0, str(BISECT.parent))
    spec = importlib.util.spec_from_file_location("gems_bisect", BISECT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bisection_narrows_a_group_to_its_culprits_and_interactions():
    bisect = load_bisect_script()
    study = bisect.Study.__new__(bisect.Study)
    study.poisoned, tried = False, []

    def run(enabled, label):  # "b" and "e" are bad alone; "c" and "d" only together
        tried.append(sorted(enabled))
        bad = {"b", "e"} & set(enabled) or {"c", "d"} <= set(enabled)
        return {"verdict": "nan" if bad else "ok"}

    study.run = run
    found = {}
    study.bisect(list("abcdefgh"), "rest", found)
    assert sorted(found) == ["b", "e", "interaction: c, d"]
    assert len(tried) < 2 * 8  # fewer runs than testing each half-set of 8 names


def test_bisect_script_quick_mode_finds_the_standin_faults(tmp_path):
    argv = ["gems_bisect.py", "--quick", "--models", "llama", "--out", str(tmp_path)]
    code = f"import runpy, sys; sys.argv = {argv!r}; runpy.run_path({str(BISECT)!r}, run_name='__main__')"
    # The script's folder on sys.path, as `python benchmarks/gems_bisect.py` has it.
    result = run_python(code, bootstrap=False, timeout=120, extra_path=[BISECT.parent])
    assert result.returncode == 0, result.stderr[-3000:]
    findings = json.loads((tmp_path / "gems_bisect.json").read_text())
    llama = findings["models"]["llama"]
    assert llama["native"]["finite"] and "mm" in llama["native"]["ops_called"]
    verdicts = {name: r["verdict"] for name, r in llama["candidates"].items()}
    assert verdicts["rsqrt"] == "nan" and verdicts["cos"] == "error" and verdicts["mm"] == "slow"
    assert verdicts["add"] in ("ok", "slow")  # right; a Python kernel may cost time on a busy CPU
    assert llama["check_all_but_rng"]["verdict"] == "nan"
    assert llama["check_recommended"]["verdict"] in ("ok", "slow")
    assert findings["rng_functions"] == ["dropout", "rand", "uniform_"]
    assert {"cos", "mm", "rsqrt"} <= set(findings["measured_unsafe"])
    assert findings["recommended_default_unused"][:3] == ["dropout", "rand", "uniform_"]
    assert "MEASURED_UNSAFE = (" in result.stdout
