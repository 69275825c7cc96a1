"""fl_patch: run unchanged PyTorch, transformers and LightX2V code on FlagGems kernels and FlagCX.

``import fl_patch`` activates from the environment (unless ``FL_PATCH=0`` or ``FL_PATCH_AUTO=0``); the
``sitecustomize`` bootstrap does the same with zero code changes. Both are deferred at almost no cost
until a package fl_patch patches is imported. ``apply()``, ``revert()`` and ``patched()`` give explicit
control; explicit arguments override the environment. ``report()`` says what was swapped.

This module imports nothing heavy: the machinery loads when it is needed.
"""

import os as _os

from fl_patch import _bootstrap

__version__ = "0.1.0"
__all__ = ["__version__", "apply", "is_active", "patched", "report", "revert"]


def apply(
    include=None,
    exclude=None,
    *,
    kernels=None,
    gems_global=None,
    gems_unused=None,
    dist=None,
    strict=None,
    profile=None,
    fast_launch=None,
):
    """Patch now (modules already imported) and on import (the rest).

    include / exclude: op families (``attention``, ``rms_norm``, ``rope``, ``linear``, ``swiglu``,
    ``layer_norm``, ``cross_entropy``, ``gems_global``, ``distributed``, ``platform``) or target names; a list or a
    comma string. An opt-in row (``transformers.fused_linear_cross_entropy``) runs only when its name is included,
    and naming it adds it to the other rows rather than narrowing them.
    kernels: ``"gems"`` or ``"reference"``. profile: the device profile to route by (a file or folder path, or
    ``"off"``; see fl_patch.device.profiles). fast_launch: FlagGems' hot functions launched directly once a call
    signature is bound (fl_patch.kernels.fast_launch; default True, bitwise equal to FlagGems' own calls).
    Arguments left None come from ``FL_PATCH_*`` variables, then defaults.
    Applying again with different settings reverts first. Raises SettingsError (a ValueError) naming the bad
    value and what is accepted.
    """
    from fl_patch import runtime, settings

    chosen = settings.load(
        include=include, exclude=exclude, kernels=kernels, gems_global=gems_global,
        gems_unused=gems_unused, dist=dist, strict=strict, profile=profile, fast_launch=fast_launch,
    )
    _bootstrap.uninstall()
    runtime.apply(chosen)


def revert():
    """Undo every change fl_patch made; each touched attribute is its original object again.

    Also stops a pending automatic activation. Returns the list of undo errors (normally empty).
    """
    _bootstrap.uninstall()
    from fl_patch import runtime

    return runtime.revert()


def report():
    """One dict per place: family, target, where, variant, provider, state, reason, fallbacks."""
    from fl_patch import runtime

    return runtime.records()


def is_active():
    """Whether patches are applied (or waiting for their modules) in this process."""
    from fl_patch import runtime

    return runtime.is_active()


class patched:
    """Context manager: apply with these arguments inside the block, restore the previous state after.

    ``with fl_patch.patched(exclude=["attention"]): model(x)``. If fl_patch was active before, it is
    re-applied with its previous settings on exit; otherwise everything is reverted.
    """

    def __init__(self, include=None, exclude=None, **kwargs):
        self._arguments = dict(include=include, exclude=exclude, **kwargs)
        self._previous = None

    def __enter__(self):
        from fl_patch import runtime

        self._previous = runtime.current_settings() if runtime.is_active() else None
        apply(**self._arguments)
        return self

    def __exit__(self, *exc_info):
        from fl_patch import runtime

        runtime.revert()
        if self._previous is not None:
            runtime.apply(self._previous)
        return False


def _wants_auto_activation(env):
    """False when FL_PATCH or FL_PATCH_AUTO (or its alias) says off; bad values are reported later."""
    for name in ("FL_PATCH", "FL_PATCH_AUTO" if "FL_PATCH_AUTO" in env else "LIGHTX2V_FL_AUTO_REGISTER"):
        if env.get(name, "").strip().lower() in ("0", "false", "no", "off"):
            return False
    return True


if _wants_auto_activation(_os.environ):
    _bootstrap.activate("import fl_patch")
