"""The fl-patch command as a Unix tool, and the text report: subprocesses where the process matters."""

import configparser
import json
import os
import re
import subprocess
import sys

import pytest

import fl_patch
from conftest import REPO, run_python
from fl_patch import reporting
from fl_patch.cli import site_disabling_flag

STATUS = "import sys, fl_patch.cli as c; sys.exit(c.main(['status']))"


@pytest.mark.parametrize("env, message", [
    ({"FL_PATCH_EXCLUDE": "bogus"}, "fl-patch status: FL_PATCH_EXCLUDE / exclude: unknown name 'bogus'."),
    ({"FL_PATCH_DIST": "xyz"}, "fl-patch status: FL_PATCH_DIST='xyz' is not accepted; accepted: auto, flagcx, native"),
])
def test_status_with_a_bad_setting_says_it_once_exits_2_and_still_shows_the_rest(env, message):
    result = run_python(STATUS, env={**env, "FL_PATCH_KERNELS": "reference"}, bootstrap=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert result.stdout.startswith("fl_patch status") and "torch.rms_norm" in result.stdout


def test_status_piped_into_head_ends_quietly():
    result = subprocess.run(f"{sys.executable} -m fl_patch status | head -3", shell=True, capture_output=True,
                            text=True, cwd=REPO, timeout=180)
    assert len(result.stdout.splitlines()) == 3
    assert "Traceback" not in result.stderr and "BrokenPipe" not in result.stderr


@pytest.mark.parametrize("command, flag", [
    (["python", "-S", "train.py"], "-S"),
    (["python3", "-I", "-c", "pass"], "-I"),
    (["python3.11", "-bE", "train.py"], "-E"),
    (["python", "-W", "ignore", "-S", "x.py"], "-S"),
    (["python", "train.py", "-S"], None),  # the script's own argument
    (["python", "-c", "-S"], None),
    (["python", "-m", "torch.distributed.run", "-S"], None),
    (["torchrun", "-S"], None),
])
def test_run_knows_when_the_command_skips_sitecustomize(command, flag):
    assert site_disabling_flag(command) == flag


def test_run_warns_when_the_command_runs_unpatched():
    result = subprocess.run([sys.executable, "-m", "fl_patch", "run", "--", sys.executable, "-S", "-c", "pass"],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 0
    assert "fl-patch run: warning: -S makes Python skip sitecustomize" in result.stderr


def test_the_report_names_every_target_and_folds_rows_waiting_for_a_missing_library():
    import torch  # noqa: F401

    fl_patch.apply(kernels="reference")
    text = reporting.format_table(fl_patch.report())
    line = next(line for line in text.splitlines() if "torch.nn.functional.rms_norm" in line)
    assert " torch.rms_norm " in line
    assert "lightx2v.rope.flagos" not in text  # LightX2V is not installed here: its rows are one line
    assert re.search(r"\n  \d+ more rows wait for lightx2v, lightx2v_platform, not installed", text)


def test_the_summary_line_says_how_to_run_without_flag_gems(monkeypatch):
    import torch  # noqa: F401

    from fl_patch.kernels import gems

    monkeypatch.setattr(gems, "MODULE_NAME", "flag_gems_absent_for_tests")
    fl_patch.apply(kernels="gems")
    head = reporting.format_table(fl_patch.report()).splitlines()[0]
    assert "FlagGems is unavailable (flag_gems not installed)" in head
    assert "FL_PATCH_KERNELS=reference runs fl_patch's torch kernels" in head


def test_metadata_has_no_deprecated_license_classifier():
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    assert "License ::" not in config["metadata"].get("classifiers", "")
    assert config["metadata"]["license"] == "Apache-2.0"


def test_version_option_prints_fl_patch_version():
    result = subprocess.run([sys.executable, "-m", "fl_patch", "--version"], capture_output=True, text=True,
                            cwd=REPO, timeout=60)
    assert result.returncode == 0 and result.stdout == f"fl-patch {fl_patch.__version__}\n"


def test_status_shows_fl_patch_version_and_bootstrap_and_no_internal_setting():
    text = run_python(STATUS, env={"FL_PATCH_KERNELS": "reference"}, bootstrap=False)
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[1].split() == ["fl_patch", fl_patch.__version__, f"({REPO / 'fl_patch'})"]
    assert f"  bootstrap          {REPO / 'sitecustomize'}" in lines
    [settings_line] = [line for line in lines if line.startswith("  settings ")]
    assert settings_line.startswith("  settings           enabled=True,") and "kernels_explicit" not in settings_line
    as_json = run_python(STATUS.replace("'status'", "'status', '--json'"), bootstrap=False)
    status = json.loads(as_json.stdout)
    assert status["environment"]["fl_patch"].startswith(fl_patch.__version__ + " (")
    assert status["environment"]["bootstrap"] == str(REPO / "sitecustomize")
    assert "kernels_explicit" not in status["settings"]


def test_every_report_column_starts_at_one_offset_and_opt_in_rows_say_they_are_opt_in():
    import torch  # noqa: F401

    fl_patch.apply(kernels="reference")
    lines = reporting.format_table(fl_patch.report()).splitlines()[1:-1]
    assert any(line.split()[0] == "cross_entropy" for line in lines)
    state_columns = {re.search(r"\S+\s+(\S)", line).start(1) for line in lines}
    assert len(state_columns) == 1, lines
    opt_in = [r for r in fl_patch.report() if r["target"] == "transformers.fused_linear_cross_entropy"]
    assert [r["reason"] for r in opt_in] == [
        "opt-in, not selected by default: FL_PATCH_INCLUDE=transformers.fused_linear_cross_entropy selects it"]
    fl_patch.apply(kernels="reference", exclude=["cross_entropy"])
    reasons = {r["target"]: r["reason"] for r in fl_patch.report() if r["family"] == "cross_entropy"}
    assert set(reasons.values()) == {"excluded by FL_PATCH_EXCLUDE / exclude"}
    fl_patch.apply(kernels="reference", include=["rms_norm"])
    reasons = {r["target"]: r["reason"] for r in fl_patch.report()}
    assert reasons["torch.linear"] == "not named in FL_PATCH_INCLUDE / include"


def test_bootstrap_path_after_a_non_editable_install(tmp_path):
    """A wheel installed into a fresh environment: `fl-patch bootstrap-path` prints the folder the wheel put the
    bootstrap in, and an interpreter with that folder on PYTHONPATH runs fl_patch's sitecustomize."""
    import shutil
    import venv

    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("fl_patch", "sitecustomize"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(wheels), str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    target = tmp_path / "env"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    installed = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                                "--no-index", *map(str, wheels.glob("*.whl"))], capture_output=True, text=True,
                               timeout=300)
    assert installed.returncode == 0, installed.stderr
    result = subprocess.run([str(target / "bin" / "fl-patch"), "bootstrap-path"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=60, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{target / 'share' / 'fl_patch' / 'sitecustomize'}\n"
    started = subprocess.run([str(python), "-c", "import sys; print('fl_patch_sitecustomize' in sys.modules)"],
                             capture_output=True, text=True, cwd=tmp_path, timeout=60,
                             env={"PATH": os.environ["PATH"], "PYTHONPATH": result.stdout.strip()})
    assert started.stdout == "True\n", started.stderr


@pytest.mark.parametrize("command", [["status"], ["check", "--quick"], ["tune", "--quick"]])
def test_without_torch_a_command_says_so_in_one_line_and_exits_2(command):
    """`python -S`: no site-packages, so no torch; the checkout alone on the path."""
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)}
    hidden = subprocess.run([sys.executable, "-S", "-c", "import torch"], env=env, capture_output=True, text=True,
                            timeout=60)
    assert "No module named 'torch'" in hidden.stderr
    result = subprocess.run([sys.executable, "-S", "-m", "fl_patch", *command], env=env, capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [f"fl-patch {command[0]}: torch is not installed: fl_patch patches PyTorch's"
                                          " ops; install torch first (the CPU build: pip install torch --index-url"
                                          " https://download.pytorch.org/whl/cpu)"]


def bad_profiles(folder):
    """FL_PATCH_PROFILE values fl_patch can't use: a missing file, garbage, a JSON list, an unknown schema."""
    files = {"garbage.json": "garbage{", "list.json": "[1, 2]", "schema.json": '{"schema": 99}'}
    for name, text in files.items():
        (folder / name).write_text(text)
    return [str(folder / name) for name in ("missing.json", *files)]


@pytest.mark.parametrize("variable, value", [
    ("FL_PATCH_KERNELS", "bogus"), ("FL_PATCH_EXCLUDE", "bogus"), ("FL_PATCH_INCLUDE", "rms_norm,bogus"),
    *[("FL_PATCH_PROFILE", index) for index in range(4)], ("FL_PATCH_GEMS_UNUSED", "notanop"),
])
def test_every_bad_setting_follows_one_rule(tmp_path, variable, value):
    """`fl-patch status` exits 2 with one line per bad setting; the automatic activation says the same message once,
    naming its path; each names the setting, what is accepted and what was done instead."""
    if variable == "FL_PATCH_PROFILE":
        value = bad_profiles(tmp_path)[value]
    env = {variable: value, "FL_PATCH_KERNELS": "gems"} if variable != "FL_PATCH_KERNELS" else {variable: value}
    status = run_python(STATUS, env=env, bootstrap=False)
    assert status.returncode == 2 and "Traceback" not in status.stderr
    [line] = status.stderr.splitlines()
    assert line.startswith(f"fl-patch status: {variable}")
    message = line.removeprefix("fl-patch status: ").removesuffix(" (nothing was applied)")
    assert "accepted: " in message.lower() and "did you mean" not in message
    assert re.search(r"(ignored|nothing was applied)", line, re.IGNORECASE), line
    started = run_python("import torch", env=env)
    assert started.returncode == 0
    [said] = started.stderr.splitlines()
    assert said.startswith("fl_patch (sitecustomize): ") and said.endswith(message), said


def test_status_with_fl_patch_0_applies_nothing_and_says_why():
    result = run_python(STATUS.replace("'status'", "'status', '--json'"), env={"FL_PATCH": "0"}, bootstrap=False)
    assert result.returncode == 0, result.stderr
    targets = json.loads(result.stdout)["targets"]
    assert len(targets) > 30 and {r["state"] for r in targets} == {"skipped"}
    assert {r["reason"] for r in targets} == {
        "FL_PATCH=0: the bootstrap and `import fl_patch` do nothing; fl_patch.apply() in code still patches"}
