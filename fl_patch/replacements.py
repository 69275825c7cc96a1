"""How replacement functions get their kernel: the provider's function of a kernel module, with the device's
performance routing (:mod:`fl_patch.device.routing`) in front of the kernel's own check.

Replacements themselves are plain closures written per target (fixed signatures are cheaper than
``*args`` and trace cleanly under torch.compile); each checks ``unsupported`` per call, hands what the
kernel can't take (or should not, for speed) to the original or a native path, counting it on its report
record, and calls the kernel otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType


def kernel_pair(kernel_module: ModuleType, form: str, provider: str, rec) -> tuple[Callable, Callable]:
    """(kernel, unsupported) for one form of an op: ``<provider>_<form>`` and ``unsupported_<form>``
    (``<provider>`` / ``unsupported`` when form is empty), for the place `rec` records.

    With the gems provider, ``unsupported(provider, tensor, ...)`` first asks the router of routing key
    ``<family>.<form>`` (the module's FAMILY; form defaults to it) about the deciding tensor, the first one: a
    launch-bound call leaves there, before the shape checks. A module whose FAMILY is None has no routing (no
    faster native path to route to)."""
    suffix = f"_{form}" if form else ""
    kernel = getattr(kernel_module, f"{provider}{suffix}")
    unsupported = getattr(kernel_module, f"unsupported{suffix}")
    family = kernel_module.FAMILY
    if provider != "gems" or family is None:
        return kernel, unsupported
    from fl_patch.device import routing

    key = f"{family}.{form or family}"
    route = routing.router(key, routing.is_lifted(rec.target, rec.family))

    def routed(provider, tensor, *rest):
        return route(tensor) or unsupported(provider, tensor, *rest)

    return watched(key, kernel, getattr(kernel_module, f"reference{suffix}")), routed


def watched(key: str, kernel: Callable, reference: Callable) -> Callable:
    """`kernel` behind its watch: a call in a dtype not yet verified on this device is verified first
    (:mod:`fl_patch.device.verification`), a call the router handed to calibration is measured
    (:mod:`fl_patch.device.calibration`); every other call, and every call while torch.compile traces, goes straight to
    `kernel` (a set lookup and an attribute read). The native path both use is the key's calibration native, or
    the form's torch reference where it has none."""
    import torch

    from fl_patch.device import calibration, verification

    is_compiling = torch.compiler.is_compiling
    verified = verification.checks(key).verified
    measuring = calibration.state(key)
    native_path = calibration.native(key) or reference

    def kernel_call(*args, **kwargs):
        if is_compiling() or (args[0].dtype in verified and measuring.sample is None):
            return kernel(*args, **kwargs)
        if args[0].dtype not in verified:
            return verification.first_call(key, kernel, native_path, args, kwargs)
        return calibration.measure(key, kernel, native_path, args, kwargs)

    return kernel_call


def like(replacement: Callable, original: Callable) -> Callable:
    """Give `replacement` the original's name, docstring and ``__wrapped__`` (signature for inspect)."""
    return functools.update_wrapper(replacement, original)
