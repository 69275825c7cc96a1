"""fl_patch's zero-code bootstrap: put this directory on PYTHONPATH (``fl-patch run`` does it for you).

Keep this file tiny: it runs at every Python start-up of the process and of its children. Its only jobs
are to start fl_patch's deferred activation (the real work lives in ``fl_patch._bootstrap``) and to run
the ``sitecustomize`` it hides, so that a user's or a distribution's own one still works.
"""

import os
import sys


def _start_fl_patch():
    if os.environ.get("FL_PATCH", "1").strip().lower() in ("0", "false", "no", "off"):
        return
    # Any other value activates; one fl_patch can't read is warned about once, when activation happens.
    try:
        import fl_patch._bootstrap as bootstrap
    except ImportError as exc:
        if not (exc.name or "").startswith("fl_patch"):
            raise
        bootstrap = _import_from_checkout()
    bootstrap.activate("sitecustomize")


def _import_from_checkout():
    # Used from a checkout without installing: import the package beside this directory by its path. Putting the
    # checkout's root on sys.path instead would make its tests/, examples/ and benchmarks/ importable everywhere.
    import importlib.util

    package = os.path.join(os.path.dirname(_here), "fl_patch")
    spec = importlib.util.spec_from_file_location(
        "fl_patch", os.path.join(package, "__init__.py"), submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fl_patch"] = module
    spec.loader.exec_module(module)
    import fl_patch._bootstrap as bootstrap

    return bootstrap


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
