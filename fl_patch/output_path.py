"""The files fl_patch writes: ``fl-patch check --json`` and ``fl-patch tune --out`` checked before anything is
measured (a path that can't be written fails at once, in one line, instead of after minutes of measuring); those and
the caches (calibrated profiles, first-use checks) replaced whole each time they are rewritten, the caches' merges
under an exclusive lock."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def check(path: Path, option: str) -> None:
    """Raise ValueError naming `option`, `path` and what is wrong when `path` can't be written as a file; return
    None when it can. Creates and changes nothing: a folder that doesn't exist yet is fine where the first folder
    above it that exists can be written (the run makes the rest)."""
    problem = _problem(Path(path))
    if problem:
        raise ValueError(f"{option} {path} can't be written: {problem}; give a file path in a folder you can write")


def _problem(path: Path) -> str | None:
    if path.is_dir():
        return "it is a folder"
    if path.exists():
        if not path.is_file():
            return "it is not a regular file"
        try:
            with open(path, "r+b"):  # opened for writing, nothing written: the file is unchanged
                pass
        except OSError as exc:
            return exc.strerror or str(exc)
        return None
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        return f"nothing can be created in {folder} ({exc.strerror or exc})"
    return None


def write_json(data: dict, path: Path) -> None:
    """Write `data` as indented JSON to `path` (its folders made), all at once: a complete file written beside it
    under a name of its own is renamed into place, so a run stopped while writing (Ctrl-C) leaves the previous
    version, never half of one, and concurrent writers never write into each other's temporary file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(json.dumps(data, indent=1, default=str) + "\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive advisory lock on ``<path>.lock``, for a read-merge-write of `path` (fcntl where it exists;
    elsewhere writers rely on :func:`write_json`'s atomic rename alone)."""
    path = Path(path)
    with open(path.with_suffix(path.suffix + ".lock"), "a+") as handle:
        try:
            import fcntl
        except ImportError:
            yield
            return
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
