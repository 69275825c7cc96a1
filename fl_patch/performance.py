"""Performance defaults: what stays native by default on a vendor where FlagGems was measured slower.

Two rules: whole op families (below), and calls too small for FlagGems' kernels to pay for its per-call host
overhead (SMALL_INPUT_ELEMENTS, applied per call by ``fl_patch.kernels.gems.tensor_reason``; such calls run the
original, or a form's ``native_*`` torch path where it has one: ``fl_patch.kernels.rms_norm.native_hf``).

Correct numbers come first, then speed: where the vendor's own library beats FlagGems for a family (cuDNN /
flash attention and cuBLAS on NVIDIA, measured in benchmarks/results/bench_ops.md), fl_patch does not swap
that family unless asked to. Naming the family (or a target) in FL_PATCH_INCLUDE / ``include`` uses
FlagGems anyway. Rows the user's own code or config must name to use (``attn_implementation="flagos"``,
LightX2V's ``flagos_*`` keys) are never held back, and neither is the torch reference provider.
"""

from __future__ import annotations

import sys

# vendor -> family -> what was measured (NVIDIA H200, torch 2.11, triton 3.6, flag_gems 5.0.2, 2026-11-22).
MEASURED_SLOWER = {
    "nvidia": {
        "attention": "FlagGems attention ran at 0.74x (prefill 4x2048) to 0.1x (decode) the speed of torch's "
                     "cuDNN/flash SDPA on an H200",
        "linear": "FlagGems mm ran at 0.88x the speed of cuBLAS on an H200",
    },
}


# vendor -> calls whose deciding input has fewer elements stay native. FlagGems' per-call host overhead
# (40-120 µs against torch's 11-18 µs, benchmarks/results/bench_ops.md) outweighs its faster kernels while a
# forward is launch-bound: on an H200, a ~1B Llama with its RMSNorm, rope and SwiGLU on FlagGems ran 1.33x
# faster at 4x2048 tokens but 0.76x at 1x128 and 0.60x-0.85x per decode step (benchmarks/results/e2e*.md).
# 2**22 elements (e.g. 2048 tokens x hidden 2048) lies between those measured points. "Native" is the original,
# except for HF's RMSNorm, whose seven-op body becomes torch's fused rms_norm (10 µs of host time against 69).
SMALL_INPUT_ELEMENTS = {"nvidia": 1 << 22}


def small_input_elements() -> int:
    """The element count below which gems calls stay native on this vendor (0: no limit)."""
    return SMALL_INPUT_ELEMENTS.get(vendor() or "", 0)


def vendor() -> str | None:
    """The accelerator vendor torch was built for, read without touching the device (None if unknown)."""
    torch = sys.modules.get("torch")
    version = getattr(torch, "version", None)
    if version is None:
        return None
    if getattr(version, "hip", None):
        return "amd"
    if getattr(version, "cuda", None):
        return "nvidia"
    return None


def held_back(target, settings) -> str | None:
    """Why `target` stays native by default here, or None when it should be patched."""
    if settings.kernels != "gems" or target.explicit_choice:
        return None
    if target.family in settings.include or target.name in settings.include:
        return None
    measured = MEASURED_SLOWER.get(vendor() or "", {}).get(target.family)
    if measured is None:
        return None
    return f"left native by default: {measured}; FL_PATCH_INCLUDE={target.family} uses FlagGems anyway"
