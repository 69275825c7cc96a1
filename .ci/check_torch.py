"""Says which torch .ci/setup installed, and refuses one it did not mean to: another version, or a GPU (CUDA or
ROCm) build on a machine without a GPU, which runs but weighs several GB for nothing (PyPI's Linux wheel of torch
is the CUDA build). ``FL_PATCH_TORCH_CUDA_OK=1`` accepts that one.

    python .ci/check_torch.py 2.13.0    # exit 0 and one line: intended; exit 1 and one line: why not, what to do
"""

import os
import sys
import warnings


def verdict(wanted: str) -> tuple[bool, str]:
    """(whether the installed torch is what .ci/setup means to install, one line saying what it is)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Failed to initialize NumPy": numpy comes later, with the test extra
        import torch

    version = torch.__version__
    if version.split("+")[0] != wanted:
        return False, f"torch {version} is installed, .ci/setup pins {wanted}: remove .venv and run .ci/setup again"
    cuda, hip = getattr(torch.version, "cuda", None), getattr(torch.version, "hip", None)
    if not cuda and not hip:
        return True, f"torch {version}: the CPU build"
    build = f"CUDA {cuda}" if cuda else f"ROCm {hip}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Found no NVIDIA driver": the case said below
        gpu = torch.cuda.is_available()
    if gpu:
        return True, f"torch {version}: the {build} build, and this machine has a GPU"
    if os.environ.get("FL_PATCH_TORCH_CUDA_OK") == "1":
        return True, f"torch {version}: the {build} build, on a machine without a GPU (FL_PATCH_TORCH_CUDA_OK=1)"
    return False, (f"torch {version} is the {build} build and this machine has no GPU: .ci/setup means the CPU build. "
                   "Remove .venv and run .ci/setup again with FL_PATCH_TORCH_INDEX set to an index that has the CPU "
                   "build, or keep this one with FL_PATCH_TORCH_CUDA_OK=1")


def main() -> int:
    ok, line = verdict(sys.argv[1])
    print(f"setup: {line}", file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
