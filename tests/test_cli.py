"""The fl-patch command as a Unix tool, and the text report: subprocesses where the process matters."""

import configparser
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
