"""Shared fixtures: every test starts and ends with fl_patch reverted and no FL_PATCH_* variables set."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAP_DIR = REPO / "sitecustomize"
FAKE_GEMS_DIR = REPO / "tests" / "fake_flag_gems"


@pytest.fixture(autouse=True)
def clean_fl_patch(monkeypatch):
    for name in list(os.environ):
        if name.startswith(("FL_PATCH", "LIGHTX2V_FL_")):
            monkeypatch.delenv(name)
    import fl_patch

    fl_patch.revert()
    yield
    fl_patch.revert()


@pytest.fixture
def fake_gems(monkeypatch):
    """The fake FlagGems (tests/fake_flag_gems) on sys.path, the loader's cache and the rope table cache reset
    around the test; yields the module, its ``calls`` cleared."""
    from fl_patch.kernels import gems, rope

    monkeypatch.syspath_prepend(str(FAKE_GEMS_DIR))
    _forget_flag_gems()
    gems._reset_for_tests()
    monkeypatch.setattr(rope, "_table_cache", None)
    module = gems.load()
    module.calls.clear()
    yield module
    gems._reset_for_tests()
    _forget_flag_gems()


def _forget_flag_gems():
    for name in [name for name in sys.modules if name == "flag_gems" or name.startswith("flag_gems.")]:
        del sys.modules[name]


def run_python(code, env=None, bootstrap=True, extra_path=(), timeout=180):
    """Run `code` in a fresh interpreter (optionally with the bootstrap on PYTHONPATH) and return the
    CompletedProcess; FL_PATCH_* from this process are not inherited unless given in `env`."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith(("FL_PATCH", "LIGHTX2V_FL_", "PYTHONPATH"))}
    path = [str(p) for p in extra_path]
    if bootstrap:
        path.insert(0, str(BOOTSTRAP_DIR))
    path.append(str(REPO))
    child_env["PYTHONPATH"] = os.pathsep.join(path)
    child_env.update(env or {})
    return subprocess.run([sys.executable, "-c", code], env=child_env, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))
