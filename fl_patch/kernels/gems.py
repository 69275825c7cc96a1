"""Lazy FlagGems loader.

``import flag_gems`` is heavy (seconds), initialises the device and may run vendor tools, so it happens
on the first ``load()`` only, when a kernel is about to run on a device tensor. This module imports
neither torch nor flag_gems; ``installed()`` only looks for the package on disk.

Also home of the per-call tensor checks every family shares (device and dtype), written without torch
so that they stay cheap and this module stays light.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from types import ModuleType

from fl_patch.versions import installed_version

MODULE_NAME = "flag_gems"

_load_lock = threading.Lock()
_module: ModuleType | None = None
_load_error: str | None = None
_ops = None  # what ops() gives in eager: fl_patch.kernels.fast_launch.FastOps over the module, or the module
_fast_launch: bool | None = None  # None: FL_PATCH_FAST_LAUNCH decides, read on the first ops()
FAST_LAUNCH_VARIABLE = "FL_PATCH_FAST_LAUNCH"


class GemsUnavailable(RuntimeError):
    """FlagGems can't be imported; the message is the short reason."""


def installed() -> str | None:
    """None when ``flag_gems`` can be found on the path, else why not. Imports nothing."""
    try:
        spec = importlib.util.find_spec(MODULE_NAME)
    except (ImportError, ValueError) as exc:
        return f"flag_gems lookup failed: {type(exc).__name__}: {first_line(exc)}"
    if spec is None:
        return "flag_gems not installed"
    return None


def load() -> ModuleType:
    """The ``flag_gems`` module, imported on the first call (thread-safe) and cached.

    A failed import is cached too: this and every later call raise ``GemsUnavailable(reason)``.
    """
    if _module is not None:
        return _module
    with _load_lock:
        if _module is None and _load_error is None:
            _import()
        if _module is None:
            raise GemsUnavailable(_load_error)
        return _module


def _import() -> None:
    global _module, _load_error
    problem = installed()
    if problem is not None:
        _load_error = problem
        return
    try:
        _module = importlib.import_module(MODULE_NAME)
    except Exception as exc:  # any failure of a third-party import means "unavailable"
        _load_error = f"import flag_gems failed: {type(exc).__name__}: {first_line(exc)}"


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, cut to `limit` characters."""
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def info() -> dict:
    """What the report shows about FlagGems: version, whether loaded, load error, vendor and device."""
    return {
        "version": installed_version(MODULE_NAME) or getattr(_module, "__version__", None),
        "install_problem": installed(),
        "loaded": _module is not None,
        "load_error": _load_error,
        "vendor": getattr(_module, "vendor_name", None),
        "device": getattr(_module, "device", None),
    }


def _reset_for_tests() -> None:
    """Forget the cached module or failure so that the next ``load()`` imports again, and the fast launch setting."""
    global _module, _load_error, _ops, _fast_launch
    with _load_lock:
        _module = None
        _load_error = None
        _ops = None
        _fast_launch = None


# Per-call checks shared by the families. Reasons are stable strings (counter keys).

HALF_DTYPE_NAMES = ("torch.float16", "torch.bfloat16")
UNUSABLE = "flag_gems unusable"  # FlagGems was tried and can't be imported: every gems call runs the original
SMALL_INPUT = "small input"  # below the size this device's profile sends to FlagGems (fl_patch.device.routing)
PROFILE_NATIVE = "native by profile"  # this device's profile keeps the call's family native at every size
NOT_MEASURED = "native until measured"  # no measured profile: the prior (fl_patch.device.routing.prior)
NOT_VERIFIED = "native: FlagGems' result differed"  # first-use verification failed here (fl_patch.device.verification)
# Reasons of calls routed to the native path for speed or trust, not because of a limit of the kernel.
NATIVE_ROUTES = (SMALL_INPUT, PROFILE_NATIVE, NOT_MEASURED, NOT_VERIFIED)
_dtype_reasons: dict = {}


def device_reason(tensor) -> str | None:
    """None when `tensor` lives on an accelerator FlagGems can run on, else "cpu tensor" / "meta tensor"."""
    if tensor.is_cpu:
        return "cpu tensor"
    if tensor.is_meta:
        return "meta tensor"
    return None


def dtype_reason(dtype) -> str | None:
    """None for float16 / bfloat16 (what the gems paths take), else e.g. "dtype float32"."""
    try:
        return _dtype_reasons[dtype]
    except KeyError:
        name = str(dtype)
        reason = None if name in HALF_DTYPE_NAMES else "dtype " + name.removeprefix("torch.")
        _dtype_reasons[dtype] = reason
        return reason


def tensor_reason(tensor) -> str | None:
    """Under torch.compile, why gems calls can't be traced here (see below); then "flag_gems unusable", device,
    dtype, "empty tensor" for the tensor that decides a gems call; None if all pass.

    Every ``unsupported_*`` calls this first, before its shape checks. Under torch.compile gems calls are traced
    as fl_patch's custom ops (:mod:`fl_patch.kernels.custom_ops`, reached through :func:`ops`); where those
    can't be used (FlagGems can't be imported, torch without ``torch.library.custom_op``) the reason is returned
    and the call runs the original. Which calls *should* go to FlagGems on this device, for speed, is
    :mod:`fl_patch.device.routing`'s question, asked before this one (``fl_patch.replacements.kernel_pair``).
    """
    if sys.modules["torch"].compiler.is_compiling():
        from fl_patch.kernels import custom_ops

        reason = custom_ops.compile_reason()  # a constant of the trace: runs once, outside the graph
        if reason is not None:
            return reason
    if _load_error is not None:
        return UNUSABLE
    reason = device_reason(tensor) or dtype_reason(tensor.dtype)
    if reason is None and tensor.numel() == 0:
        return "empty tensor"
    return reason


def ops():
    """What the kernel modules call FlagGems through: the ``flag_gems`` module (loaded as by :func:`load`) with its
    hot functions on the fast launch path (:class:`fl_patch.kernels.fast_launch.FastOps`: same names, arguments
    and results); with the fast launch path off (``FL_PATCH_FAST_LAUNCH=0``, ``apply(fast_launch=False)``), the
    module itself.

    While torch.compile traces, dynamo sees :data:`fl_patch.kernels.custom_ops.namespace` in its place, whose
    functions have the same names and signatures and are single opaque ops: ``custom_ops.define`` registers that
    substitution (``torch.compiler.substitute_in_graph``), so eager calls pay nothing for it. ``tensor_reason``,
    asked first on every gems path, has defined the ops by then.
    """
    if _ops is not None:
        return _ops
    return _make_ops()


def _make_ops():
    global _ops
    module = load()
    with _load_lock:
        if _ops is None:
            if fast_launch_enabled():
                from fl_patch.kernels import fast_launch

                _ops = fast_launch.FastOps(module)
            else:
                _ops = module
        return _ops


def composed(ops, name: str, body: Callable) -> Callable:
    """``body(ops, *args)`` as one call, called as ``composed(ops, name, body)(*args)``: `body` takes views of its
    tensors, calls FlagGems' `name` through `ops` and returns views of the results. On the fast launch path (`ops`
    a FastOps) that call is bound on the caller's tensors, so a bound call takes none of the views
    (:meth:`fl_patch.kernels.fast_launch.FastOps.composed`); otherwise (FlagGems' module, the compiled stand-in)
    it is `body` with `ops`."""
    compose = getattr(type(ops), "composed", None)
    if compose is None:
        return functools.partial(body, ops)
    return compose(ops, name, body)


def calling_through(ops, fn: Callable) -> Callable:
    """`fn` with :func:`ops` giving `ops` while it runs (FlagGems' module, or a FastOps over it): how the fast launch
    path's GPU suite and host-cost benchmark run both sides in one process without switching the setting (a switch
    rebuilds ``ops()``, dropping the signatures bound so far)."""
    def call(*args):
        global _ops
        saved = _ops
        _ops = ops
        try:
            return fn(*args)
        finally:
            _ops = saved

    return call


def configure_fast_launch(enabled: bool | None) -> None:
    """Turn the fast launch path on or off for the next ``ops()`` (``fl_patch.apply`` passes its setting); None
    goes back to reading FL_PATCH_FAST_LAUNCH. A change of the setting that leaves it as it was keeps the
    signatures bound so far."""
    global _fast_launch, _ops
    with _load_lock:
        _fast_launch = enabled
        if _ops is not None and isinstance(_ops, ModuleType) == fast_launch_enabled():
            _ops = None  # made for the other setting


def fast_launch_enabled() -> bool:
    """Whether ``ops()`` gives the fast launch path: the setting ``fl_patch.apply`` passed, else
    FL_PATCH_FAST_LAUNCH (default on; a value that is not a boolean is said once and leaves it on)."""
    if _fast_launch is not None:
        return _fast_launch
    from fl_patch import settings

    enabled, problem = settings.from_environment("fast_launch")
    if problem is not None and FAST_LAUNCH_VARIABLE not in _said:
        _said.add(FAST_LAUNCH_VARIABLE)
        logging.getLogger("fl_patch").warning("fl_patch: %s", problem)
    return enabled


_said: set = set()


def fast_launch_info() -> dict:
    """The fast launch path for reports: ``enabled``, and once a FlagGems call has used it,
    :func:`fl_patch.kernels.fast_launch.stats` (imports nothing)."""
    fast_launch = sys.modules.get("fl_patch.kernels.fast_launch")
    info = {"enabled": fast_launch_enabled()}
    if fast_launch is not None:
        info.update(fast_launch.stats())
    return info


def fast_launch_line() -> str:
    """One report line about the fast launch path (imports nothing)."""
    if not fast_launch_enabled():
        return f"fast launch: off ({FAST_LAUNCH_VARIABLE}=0 or apply(fast_launch=False))"
    fast_launch = sys.modules.get("fl_patch.kernels.fast_launch")
    if fast_launch is None:
        return "fast launch: on, no FlagGems call yet"
    return fast_launch.summary_line()
