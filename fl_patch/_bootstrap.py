"""Deferred activation: wait, at almost no cost, until a package fl_patch patches starts importing.

Importing wrapt costs 60-95 ms and the patch table needs more, so automatic activation (the
``sitecustomize`` bootstrap and ``import fl_patch``) does not apply at once when none of the watched
packages is imported yet. It puts a tiny finder at the front of ``sys.meta_path`` that only compares
each imported name with a fixed set. The first time one of them is imported, the finder removes itself,
runs the real activation (which registers wrapt's post-import hooks) and hands this very import to wrapt's
finder, so that its hooks fire for it too.

This module must import nothing but sys: it is on every Python start-up's path when the bootstrap is used.
Every built-in patch-table row hooks a module inside one of WATCHED_PACKAGES (a test checks this); vendor
rows are read when activation happens, that is when the first of these packages is imported.
"""

import sys

BOOTSTRAP_SOURCE = "sitecustomize"
WATCHED_PACKAGES = frozenset({"torch", "transformers", "lightx2v", "lightx2v_platform", "flag_gems", "flagcx"})


class _Trigger:
    """A meta-path finder that never finds anything; it only notices the first watched import."""

    def __init__(self, source):
        self.source = source

    def find_spec(self, name, path=None, target=None):
        if name not in WATCHED_PACKAGES:
            return None
        uninstall()
        _activate_now(self.source)
        # The import system is iterating over sys.meta_path, which we just changed (we left it, wrapt's
        # finder came in at the front): ask the finders now in it ourselves, in order, so none is skipped
        # and wrapt's finder sees this very import and fires its hooks for it.
        for finder in list(sys.meta_path):
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(name, path, target) if find_spec else None
            if spec is not None:
                return spec
        return None


def _activate_now(source):
    from fl_patch import runtime

    runtime.activate(source)


def installed():
    """Whether the trigger is waiting in sys.meta_path."""
    return any(isinstance(finder, _Trigger) for finder in sys.meta_path)


def uninstall():
    """Remove the trigger (if present) from sys.meta_path."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, _Trigger)]


def activate(source):
    """Apply from the environment now if a watched package is already imported, else at its import.

    Idempotent: a second call while the trigger waits, or after activation, does nothing more.
    """
    if any(name in sys.modules for name in WATCHED_PACKAGES):
        _activate_now(source)
    elif not installed():
        sys.meta_path.insert(0, _Trigger(source))
    elif source == BOOTSTRAP_SOURCE:
        # The bootstrap's own import of the package installed the trigger as "import fl_patch": the bootstrap is
        # the real activation path, and messages should say so.
        for finder in sys.meta_path:
            if isinstance(finder, _Trigger):
                finder.source = source
