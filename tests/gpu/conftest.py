"""GPU test support: writes each GPU test's outcome, and what it recorded, to a JSON file.

The file goes to ``$FL_PATCH_GPU_RESULTS`` (default ``tests/gpu/results/kernels.json``) with the device
name, the torch / triton / flag_gems / transformers versions and the date. It is rewritten after every
test (a run cut short by a time limit still leaves what it got), and only once some GPU test actually
ran (not all skipped), so CPU-only runs leave the committed results alone.
"""

import datetime
import json
import os
import platform
import sys
from pathlib import Path

import pytest

from fl_patch.versions import installed_version

GPU_DIR = Path(__file__).resolve().parent
DEFAULT_RESULTS = GPU_DIR / "results" / "kernels.json"

# Read once: tests/conftest.py clears FL_PATCH_* variables around every test.
RESULTS_PATH = Path(os.environ.get("FL_PATCH_GPU_RESULTS") or DEFAULT_RESULTS)

_outcomes: dict = {}
_environment: dict = {}


@pytest.fixture(autouse=True)
def every_call_on_flag_gems(monkeypatch):
    """These tests prove the FlagGems paths: no device profile (FL_PATCH_PROFILE=off), so that the small shapes and
    the families a profile keeps native run FlagGems too. A test that needs a profile sets its own."""
    monkeypatch.setenv("FL_PATCH_PROFILE", "off")


def pytest_runtest_logreport(report):
    entry = _outcomes.setdefault(report.nodeid, {"outcome": "passed"})
    if report.failed:
        entry["outcome"] = "failed" if report.when == "call" else f"error in {report.when}"
        entry["message"] = str(report.longrepr).strip().splitlines()[-1][:400] if report.longrepr else ""
    elif report.skipped and entry["outcome"] == "passed":
        entry["outcome"] = "skipped"
        entry["message"] = report.longrepr[-1] if isinstance(report.longrepr, tuple) else ""
    if report.when == "call":
        entry["seconds"] = round(report.duration, 3)
        if report.user_properties:
            entry["recorded"] = {name: value for name, value in report.user_properties}
    if report.when == "teardown":
        _write_results()


def pytest_sessionfinish(session):
    _write_results()


def _write_results() -> None:
    if all(entry["outcome"] == "skipped" for entry in _outcomes.values()):
        return
    if not _environment:
        _environment.update(
            device=_device_name(),
            versions={name: _version(name) for name in ("torch", "triton", "flag_gems", "transformers")},
            python=platform.python_version(),
        )
    counts = {}
    for entry in _outcomes.values():
        counts[entry["outcome"]] = counts.get(entry["outcome"], 0) + 1
    results = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **_environment,
        "counts": counts,
        "tests": _outcomes,
    }
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=1, sort_keys=True, default=str) + "\n")


def _device_name() -> str | None:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # the report must be written even when the device can't be queried
        return f"unknown ({type(exc).__name__})"


def _version(distribution: str) -> str | None:
    return installed_version(distribution) or getattr(sys.modules.get(distribution), "__version__", None)
