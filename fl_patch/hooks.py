"""Import hooks: "call me when module X has been imported", on wrapt's post-import hooks.

Contract of :func:`watch`: the callback runs right after the module finishes importing, or at once if it
already has; while a (module name, callback) pair waits for its import it is registered with wrapt only
once, so calling ``watch`` again (a second ``apply()``) never makes it fire twice for one import. The
callback must not raise unless it means to abort the user's import (the runtime only does so in strict
mode).

:func:`expand` turns a module pattern (``transformers.models.*.modeling_*``) into module names by listing
files, without importing any of them.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import sys
import threading
from collections.abc import Callable

_lock = threading.Lock()
_pending: set[tuple[str, Callable]] = set()  # registered with wrapt, module not imported yet


def watch(module_name: str, callback: Callable) -> None:
    """Run ``callback(module)`` when `module_name` is imported, or now if it already is."""
    import wrapt

    key = (module_name, callback)
    with _lock:
        if key in _pending:
            return
        module = sys.modules.get(module_name)
        if module is None:
            _pending.add(key)
    if module is not None:
        callback(module)
        return

    def fire(imported):
        with _lock:
            _pending.discard(key)
        callback(imported)

    wrapt.register_post_import_hook(fire, module_name)


def top_package(pattern: str) -> str:
    """The first dotted component of a module name or pattern."""
    return pattern.split(".", 1)[0]


def expand(pattern: str) -> list[str]:
    """Module names matching `pattern` (``*`` = one component), found on disk without importing them.

    The first component must be a plain package name; an absent package gives an empty list.
    """
    parts = pattern.split(".")
    spec = importlib.util.find_spec(parts[0])
    if spec is None or not spec.submodule_search_locations:
        return []
    found = []
    for root in spec.submodule_search_locations:
        found.extend(_walk(root, parts[0], parts[1:]))
    return sorted(set(found))


def _walk(directory: str, prefix: str, parts: list[str]) -> list[str]:
    """Names under `directory` (the package `prefix`) matching the remaining pattern `parts`."""
    head, rest = parts[0], parts[1:]
    try:
        entries = os.listdir(directory)
    except OSError:
        return []
    names = []
    for entry in entries:
        path = os.path.join(directory, entry)
        if rest:
            if os.path.isdir(path) and fnmatch.fnmatchcase(entry, head):
                names.extend(_walk(path, f"{prefix}.{entry}", rest))
        elif entry.endswith(".py") and fnmatch.fnmatchcase(entry[:-3], head) and entry != "__init__.py":
            names.append(f"{prefix}.{entry[:-3]}")
        elif os.path.isfile(os.path.join(path, "__init__.py")) and fnmatch.fnmatchcase(entry, head):
            names.append(f"{prefix}.{entry}")
    return names


def matches(module_name: str, pattern: str) -> bool:
    """Whether a module name matches a row's module (exact name or ``*`` pattern, one component each)."""
    if "*" not in pattern:
        return module_name == pattern
    name_parts, pattern_parts = module_name.split("."), pattern.split(".")
    return len(name_parts) == len(pattern_parts) and all(
        fnmatch.fnmatchcase(n, p) for n, p in zip(name_parts, pattern_parts, strict=True)
    )
