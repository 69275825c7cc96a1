"""How replacement functions get their kernel: the provider's function of a kernel module.

Replacements themselves are plain closures written per target (fixed signatures are cheaper than
``*args`` and trace cleanly under torch.compile); each checks ``unsupported_*`` per call, hands what the
kernel can't take to the original (counting it on its report record), and calls the kernel otherwise.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from types import ModuleType


def kernel_pair(kernel_module: ModuleType, form: str, provider: str) -> tuple[Callable, Callable]:
    """(kernel, unsupported) for one form of an op: ``<provider>_<form>`` and ``unsupported_<form>``
    (``<provider>`` / ``unsupported`` when form is empty)."""
    suffix = f"_{form}" if form else ""
    return getattr(kernel_module, f"{provider}{suffix}"), getattr(kernel_module, f"unsupported{suffix}")


def like(replacement: Callable, original: Callable) -> Callable:
    """Give `replacement` the original's name, docstring and ``__wrapped__`` (signature for inspect)."""
    return functools.update_wrapper(replacement, original)
