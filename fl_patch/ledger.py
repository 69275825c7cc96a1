"""The ledger: every change fl_patch makes, in order, so that revert() can undo each one exactly.

Three kinds of change: an attribute set on an object (``setattr``), a key set in a mapping (``setitem``),
and anything else, undone by a callback the patcher supplies (``on_revert``). Reverting walks the
entries newest first, so an attribute patched twice ends as the very first original object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MISSING = object()  # the attribute or key did not exist before the change


@dataclass
class Entry:
    kind: str  # "attr" | "item" | "callback"
    owner: Any
    key: Any
    original: Any
    replacement: Any


class Ledger:
    """An ordered record of changes. Not thread-safe by itself: the runtime holds its lock around it."""

    def __init__(self) -> None:
        self.entries: list[Entry] = []

    def setattr(self, owner: Any, name: str, replacement: Any) -> Any:
        """Set ``owner.name = replacement`` and record the original (taken from ``owner.__dict__`` for
        classes and modules, so an inherited attribute is restored by deleting ours). Returns the original
        value as seen through ``getattr``."""
        own = vars(owner) if hasattr(owner, "__dict__") else {}
        original = own.get(name, _MISSING)
        seen = getattr(owner, name)
        self.entries.append(Entry("attr", owner, name, original, replacement))
        setattr(owner, name, replacement)
        return seen

    def setitem(self, mapping: Any, key: Any, replacement: Any) -> Any:
        """Set ``mapping[key] = replacement`` and record the original (or its absence). Returns it or None."""
        original = mapping[key] if key in mapping else _MISSING
        self.entries.append(Entry("item", mapping, key, original, replacement))
        mapping[key] = replacement
        return None if original is _MISSING else original

    def on_revert(self, undo: Callable[[], None], what: Any = None) -> None:
        """Record a change made by other means; revert calls `undo()` in its turn."""
        self.entries.append(Entry("callback", what, None, undo, None))

    def revert(self) -> list[Exception]:
        """Undo every change, newest first, and forget them. Returns the errors of undos that failed
        (each is still attempted; the ledger ends empty)."""
        errors = []
        while self.entries:
            entry = self.entries.pop()
            try:
                _undo(entry)
            except Exception as exc:  # keep undoing the rest
                errors.append(exc)
        return errors

    def __len__(self) -> int:
        return len(self.entries)


def _undo(entry: Entry) -> None:
    if entry.kind == "attr":
        if entry.original is _MISSING:
            delattr(entry.owner, entry.key)
        else:
            setattr(entry.owner, entry.key, entry.original)
    elif entry.kind == "item":
        if entry.original is _MISSING:
            del entry.owner[entry.key]
        else:
            entry.owner[entry.key] = entry.original
    else:
        entry.original()
