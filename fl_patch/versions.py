"""Installed-version checks for patch-table requirements, without importing the packages."""

from __future__ import annotations

import functools
import re
from importlib import metadata

_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(>=|<|==)?\s*([0-9][0-9A-Za-z.+\-]*)?\s*$")


@functools.lru_cache(maxsize=None)
def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed.

    Read once per process: reading it parses the distribution's METADATA (about 2 ms), and every row of a
    package asks for the same few."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def release(version: str) -> tuple[int, ...]:
    """The numeric release part of a version ("2.13.0+cpu" -> (2, 13, 0))."""
    numbers = re.match(r"^(\d+(?:\.\d+)*)", version)
    return tuple(int(n) for n in numbers.group(1).split(".")) if numbers else ()


def check(requirement: str) -> str | None:
    """None if `requirement` ("torch>=2.4", "transformers", "wrapt<3") is met, else why not."""
    match = _REQUIREMENT.match(requirement)
    if not match:
        raise ValueError(f"requirement {requirement!r} is not 'name', 'name>=X', 'name<X' or 'name==X'")
    name, op, wanted = match.groups()
    have = installed_version(name)
    if have is None:
        return f"{name} is not installed"
    if op is None:
        return None
    ok = {
        ">=": release(have) >= release(wanted),
        "<": release(have) < release(wanted),
        "==": release(have) == release(wanted),
    }[op]
    return None if ok else f"needs {requirement}, found {name} {have}"


def stack_versions() -> dict[str, str | None]:
    """The versions a device profile or conformance report records: fl_patch, torch, triton, flag_gems and
    transformers, from the installed distributions, else the loaded module's ``__version__`` (a checkout on
    PYTHONPATH has no distribution); None: neither."""
    import sys

    found = {}
    for name, distribution in (("fl_patch", "fl_patch"), ("torch", "torch"), ("triton", "triton"),
                               ("flag_gems", "flag-gems"), ("transformers", "transformers")):
        found[name] = installed_version(distribution) or getattr(sys.modules.get(name), "__version__", None)
    return found
