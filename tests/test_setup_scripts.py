"""The install steps of .ci/setup (and so examples/demo.sh): which torch build they try for, and what they accept."""

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import REPO

CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def stub_python(folder, failing_index=None):
    """A `python` for .ci/install_torch that records each pip command line and fails, as an unreachable index makes
    pip fail, when it is given `--index-url` `failing_index`."""
    folder.mkdir()
    script = folder / "python"
    error = "ERROR: Could not find a version that satisfies the requirement torch==2.13.0 (from versions: none)"
    script.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        echo "$*" >> {folder / "calls"}
        if [[ " $* " == *" --index-url {failing_index} "* ]]; then
            echo "{error}" >&2
            exit 1
        fi
    """))
    script.chmod(0o755)
    return folder


def install_torch(folder, **env):
    result = subprocess.run(["bash", str(REPO / ".ci" / "install_torch"), "2.13.0"], capture_output=True, text=True,
                            timeout=60, env={**os.environ, "PATH": f"{folder}{os.pathsep}{os.environ['PATH']}", **env})
    return result, (folder / "calls").read_text().splitlines()


def test_install_torch_asks_pytorch_s_cpu_index_first_quickly(tmp_path):
    result, calls = install_torch(stub_python(tmp_path / "bin"))
    assert result.returncode == 0 and result.stderr == ""
    assert calls == [f"-m pip install -q --timeout 15 --retries 0 --index-url {CPU_INDEX} torch==2.13.0"]


@pytest.mark.parametrize("index", [CPU_INDEX, "https://mirror.invalid/torch-cpu"])
def test_install_torch_falls_back_to_the_configured_index_and_says_so(tmp_path, index):
    env = {} if index == CPU_INDEX else {"FL_PATCH_TORCH_INDEX": index}
    result, calls = install_torch(stub_python(tmp_path / "bin", failing_index=index), **env)
    assert result.returncode == 0
    assert calls == [f"-m pip install -q --timeout 15 --retries 0 --index-url {index} torch==2.13.0",
                     "-m pip install -q torch==2.13.0"]
    assert result.stderr.splitlines() == [
        f"setup: torch==2.13.0 could not be installed from {index} (ERROR: Could not find a version that satisfies"
        " the requirement torch==2.13.0 (from versions: none))",
        "setup: installing torch==2.13.0 from pip's configured index instead; on Linux, PyPI's is the CUDA build"
        " (several GB). For the CPU build, set FL_PATCH_TORCH_INDEX to an index that has it."]


def fake_torch(folder, version, cuda=None, gpu=False):
    """A `torch` package with only what .ci/check_torch.py reads."""
    package = folder / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(textwrap.dedent(f"""\
        import types, warnings
        __version__ = {version!r}
        version = types.SimpleNamespace(cuda={cuda!r}, hip=None)
        def _is_available():
            warnings.warn("CUDA initialization: Found no NVIDIA driver on your system.")
            return {gpu!r}
        cuda = types.SimpleNamespace(is_available=_is_available)
    """))
    return folder


def check_torch(path=None, **env):
    child_env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FL_PATCH_TORCH_CUDA_OK")}
    if path is not None:
        child_env["PYTHONPATH"] = str(path)
    return subprocess.run([sys.executable, str(REPO / ".ci" / "check_torch.py"), "2.13.0"], capture_output=True,
                          text=True, timeout=120, env={**child_env, **env})


def test_check_torch_accepts_the_cpu_build_installed_here():
    import torch

    if torch.__version__.split("+")[0] != "2.13.0" or torch.version.cuda or torch.version.hip:
        pytest.skip(f"torch {torch.__version__} here is not the CPU build .ci/setup installs (its own check refuses "
                    "any other, and a GPU build on a machine without a GPU unless FL_PATCH_TORCH_CUDA_OK=1)")
    result = check_torch()
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("setup: torch 2.13.0") and result.stdout.endswith(": the CPU build\n")


@pytest.mark.parametrize("version, cuda, gpu, env, ok, line", [
    ("2.13.0", None, False, {}, True, "setup: torch 2.13.0: the CPU build"),
    ("2.13.0+cu130", "13.0", True, {}, True,
     "setup: torch 2.13.0+cu130: the CUDA 13.0 build, and this machine has a GPU"),
    ("2.13.0+cu130", "13.0", False, {"FL_PATCH_TORCH_CUDA_OK": "1"}, True,
     "setup: torch 2.13.0+cu130: the CUDA 13.0 build, on a machine without a GPU (FL_PATCH_TORCH_CUDA_OK=1)"),
    ("2.13.0+cu130", "13.0", False, {}, False,
     "setup: torch 2.13.0+cu130 is the CUDA 13.0 build and this machine has no GPU: .ci/setup means the CPU build. "
     "Remove .venv and run .ci/setup again with FL_PATCH_TORCH_INDEX set to an index that has the CPU build, or keep "
     "this one with FL_PATCH_TORCH_CUDA_OK=1"),
    ("2.12.1+cpu", None, False, {}, False,
     "setup: torch 2.12.1+cpu is installed, .ci/setup pins 2.13.0: remove .venv and run .ci/setup again"),
])
def test_check_torch_accepts_only_what_setup_means(tmp_path, version, cuda, gpu, env, ok, line):
    result = check_torch(fake_torch(tmp_path, version, cuda, gpu), **env)
    assert result.returncode == (0 if ok else 1)
    assert (result.stdout if ok else result.stderr).splitlines() == [line]


def test_the_sdist_holds_every_tracked_file(tmp_path):
    """Built from the files git tracks (or would: not ignored) alone, the sdist holds each of them (the tests'
    conftest and stand-ins, the examples, benchmarks and .ci/ the README's commands run), so those commands work
    from an unpacked sdist too."""
    import shutil
    import tarfile

    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], capture_output=True,
                            text=True, cwd=REPO)
    if listed.returncode != 0:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    tracked = [name for name in listed.stdout.splitlines() if name != ".gitignore" and (REPO / name).exists()]
    source = tmp_path / "source"
    for name in tracked:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    built = subprocess.run([sys.executable, "-c", "from setuptools import setup; setup()", "-q", "sdist", "-d",
                            str(tmp_path / "dist")], capture_output=True, text=True, cwd=source, timeout=300)
    assert built.returncode == 0, built.stderr
    [archive] = (tmp_path / "dist").glob("fl_patch-*.tar.gz")
    with tarfile.open(archive) as sdist:
        members = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    assert sorted(set(tracked) - members) == []
