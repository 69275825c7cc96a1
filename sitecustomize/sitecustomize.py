"""fl_patch's zero-code bootstrap: put this directory on PYTHONPATH (``fl-patch run`` does it for you).

Keep this file tiny: it runs at every Python start-up of the process and of its children. Its only jobs
are to start fl_patch's deferred activation (the real work lives in ``fl_patch._bootstrap``) and to run
the ``sitecustomize`` it hides, so that a user's or a distribution's own one still works.
"""

import os
import sys


def _start_fl_patch():
    value = os.environ.get("FL_PATCH", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return
    if value not in ("", "1", "true", "yes", "on"):
        # Carry on (enabled) but say so at once: a typo here should not go unnoticed.
        import warnings

        warnings.warn(
            f"FL_PATCH={os.environ['FL_PATCH']!r} is not a boolean; accepted: 1, 0, true, false, yes, no, on, off"
            " (fl_patch stays enabled)", RuntimeWarning, stacklevel=2)
    try:
        import fl_patch._bootstrap as bootstrap
    except ImportError:
        # Used from a checkout without installing: the package sits beside this directory.
        sys.path.append(os.path.dirname(_here))
        import fl_patch._bootstrap as bootstrap
    bootstrap.activate("sitecustomize")


def _run_next_sitecustomize():
    # Take our directory off sys.path so that `import sitecustomize` finds the next one down the path.
    index = sys.path.index(_here) if _here in sys.path else None
    if index is None:
        return
    del sys.path[index]
    # Keep this module alive and findable under its own name while the next one takes "sitecustomize".
    ours = sys.modules.pop("sitecustomize", None)
    sys.modules["fl_patch_sitecustomize"] = ours
    try:
        import sitecustomize  # noqa: F401  (the user's or the distribution's, if any)
    except ImportError as exc:
        if exc.name != "sitecustomize":
            raise
        sys.modules["sitecustomize"] = ours
    finally:
        # Put the directory back so that child processes and introspection see the path unchanged.
        sys.path.insert(index, _here)


_here = os.path.dirname(os.path.abspath(__file__))
if "fl_patch_sitecustomize" not in sys.modules:  # run once per process, however often imported
    _start_fl_patch()
    _run_next_sitecustomize()
