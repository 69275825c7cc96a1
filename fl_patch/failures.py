"""Which exceptions raised during a kernel call are the kernel's own failure, and which pass through unchanged.

Every replacement calls its kernel inside ``try: ... except Exception`` and, when the kernel fails, counts the call
(:func:`fl_patch.runtime.kernel_failed`) and runs the original. Not everything raised during that call is the
kernel failing. Torch runs other code inside any op (saved-tensor hooks, dispatch modes, the profiler), and some
of it raises on purpose: gradient checkpointing stops its recomputation by raising from a saved-tensor hook, and
running the original after that saves extra tensors (torch then fails with "target_frame.early_stop is set").
A user's hook would run twice, and a second try after an out-of-memory error doubles the pressure that the
user's code may be about to relieve by catching it. :func:`passes_through` is the one rule.

An exception passes through unchanged when

1. it is out of memory: ``torch.OutOfMemoryError`` (CUDA, ROCm, XPU), ``MemoryError``, or a RuntimeError whose
   message says "out of memory" or "can't allocate memory" (other devices' allocators and torch's CPU one: the
   texts ``accelerate.find_executable_batch_size`` looks for);
2. its class is torch's control flow: defined in one of :data:`CONTROL_MODULES` (checkpoint's
   ``_StopRecomputationError`` and ``CheckpointError``);
3. its traceback, followed from the replacement inward, enters one of :data:`CONTROL_MODULES` (checkpoint's
   hooks, ``torch.autograd.graph``, ``torch.utils.hooks``, anomaly mode, the profiler), or code that fl_patch or
   torch called back into: a frame of any other package (the user's code, peft, ...) whose caller is fl_patch's
   or torch's code, as a saved-tensor hook, a module hook or a ``__torch_function__`` / ``__torch_dispatch__``
   mode is.

Everything else is the kernel's failure and falls back: what FlagGems, its generated code and Triton raise, and
what the code they call raises (their dependencies, vendor libraries), and torch's own errors inside the kernel
(a dtype or a fake tensor it refuses). Interrupts (KeyboardInterrupt, SystemExit) are BaseExceptions, which no
replacement catches.

Frames are told apart by module name (``f_globals["__name__"]``) and file. FlagGems is its package's files, its
generated code (its code generators write modules under ``FLAGGEMS_CACHE_DIR``, default ``~/.flaggems``, and
name them ``_gen_*``; pointwise_dynamic's take the name of the flag_gems module they were made for), and any
function the ``flag_gems`` module exports, wherever it is defined (what fl_patch calls as FlagGems is FlagGems).
Triton is its package. torch is ``torch`` and device extensions named ``torch_*`` (torch_npu, torch_musa, ...).
The standard library, the libraries torch and FlagGems require (sympy, numpy, ...) and code with no module name
(exec'd launchers) count as part of whoever called them.

Limit: a hook that torch runs inside an op called by FlagGems' own code looks like a library FlagGems calls, so it
counts as the kernel's failure; the original then runs, and a hook that raises again raises from there.
Checkpoint's early stop and out-of-memory errors are recognised by their class wherever they are raised.
"""

from __future__ import annotations

import os
import sys
from types import CodeType, FrameType, TracebackType

# torch's hook and control-flow modules (each with its submodules and same-prefix siblings, e.g. profiler_util).
CONTROL_MODULES = (
    "torch.utils.checkpoint",
    "torch.autograd.graph",
    "torch.utils.hooks",
    "torch.autograd.anomaly_mode",
    "torch.autograd.profiler",
    "torch.profiler",
)
OUT_OF_MEMORY_TEXTS = ("out of memory", "can't allocate memory")
# Code that counts as part of its caller: the standard library and what torch and FlagGems require.
NEUTRAL_PACKAGES = frozenset(sys.stdlib_module_names) | {
    "sympy", "mpmath", "networkx", "numpy", "filelock", "fsspec", "jinja2", "typing_extensions", "yaml",
    "sqlalchemy", "packaging",
}
GENERATED_PREFIX = "_gen_"  # FlagGems' generated modules (besides pointwise_dynamic's)


def passes_through(exc: BaseException) -> bool:
    """True when `exc`, raised during a kernel call and caught by the replacement, is not the kernel's failure and
    must reach the caller unchanged; False when the replacement should fall back to the original (see the module
    docstring for the rule). Never raises."""
    return (out_of_memory(exc) or _is_control(type(exc).__module__)
            or _through_callback(exc.__traceback__))


def out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` says a device or the host ran out of memory."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(sys.modules.get("torch"), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    if not isinstance(exc, RuntimeError):
        return False
    try:
        text = str(exc).lower()
    except Exception:  # an exception whose message can't be made says nothing about memory
        return False
    return any(words in text for words in OUT_OF_MEMORY_TEXTS)


def _is_control(module_name: str) -> bool:
    return module_name.startswith(CONTROL_MODULES)


def _through_callback(tb: TracebackType | None) -> bool:
    """Whether the traceback, from the replacement's frame (which caught it, skipped) inward, enters a control
    module or code that fl_patch or torch called back into."""
    caller = "fl_patch"
    tb = tb.tb_next if tb is not None else None
    while tb is not None:
        kind = _kind(tb.tb_frame)
        if kind == "control":
            return True
        if kind == "other":
            if caller in ("fl_patch", "torch"):
                return True
            kind = "gems"  # called by FlagGems, Triton or their dependencies: one of those dependencies
        if kind != "neutral":
            caller = kind
        tb = tb.tb_next
    return False


def _kind(frame: FrameType) -> str:
    """``control``, ``fl_patch``, ``gems`` (FlagGems and Triton), ``torch``, ``neutral`` or ``other``."""
    name = frame.f_globals.get("__name__") or ""
    package = name.partition(".")[0]
    if _is_control(name):
        return "control"
    if package == "fl_patch":
        return "fl_patch"
    if package in ("flag_gems", "triton") or name.startswith(GENERATED_PREFIX):
        return "gems"
    if package == "torch" or package.startswith("torch_"):
        return "torch"
    if _flag_gems_code(frame.f_code):
        return "gems"
    if not name or package in NEUTRAL_PACKAGES:
        return "neutral"
    return "other"


def _flag_gems_code(code: CodeType) -> bool:
    """Whether `code` is in FlagGems' package or generated-code folder, or is a function the module exports."""
    flag_gems = sys.modules.get("flag_gems")
    if flag_gems is None:
        return False
    if any(getattr(value, "__code__", None) is code for value in list(vars(flag_gems).values())):
        return True
    cache = os.environ.get("FLAGGEMS_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".flaggems")
    package = os.path.dirname(getattr(flag_gems, "__file__", None) or "") or None
    path = os.path.abspath(code.co_filename)
    return any(folder and path.startswith(os.path.abspath(folder) + os.sep) for folder in (package, cache))
