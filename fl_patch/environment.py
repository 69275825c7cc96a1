"""What ``fl-patch status`` shows about the machine: versions, FlagGems / FlagCX availability, device,
and module-level references bound before fl_patch patched them (those calls stay on the original)."""

from __future__ import annotations

import dataclasses
import importlib.util
import platform
import sys
import types

from fl_patch.versions import installed_version

PACKAGES = ("torch", "transformers", "wrapt", "flag_gems", "flagcx", "lightx2v", "triton")


def describe() -> dict[str, str]:
    """Versions and availability, without importing flag_gems (it initialises the device)."""
    info = {"python": platform.python_version()}
    for name in PACKAGES:
        dist = {"flag_gems": "flag-gems"}.get(name, name)
        version = installed_version(dist)
        if version is None and importlib.util.find_spec(name) is not None:
            version = "importable (no distribution metadata)"
        info[name] = version or "not installed"
    info["device"] = _device()
    return info


def _device() -> str:
    """The accelerator torch sees, or why none."""
    if importlib.util.find_spec("torch") is None:
        return "unknown (torch not installed)"
    import torch

    if torch.cuda.is_available():
        vendor = "amd (hip)" if getattr(torch.version, "hip", None) else "nvidia (cuda)"
        return f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, {vendor}"
    for kind in ("npu", "mlu", "musa", "xpu"):
        backend = getattr(torch, kind, None)
        if backend is not None and backend.is_available():
            return f"{kind} x{backend.device_count()}"
    return "cpu only (FlagGems kernels need an accelerator)"


def import_targets() -> None:
    """Import the libraries fl_patch patches that are installed, so status shows their real state."""
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is not None:
            __import__(name)


def settings_dict(settings) -> dict:
    """The settings as a plain dict (for printing)."""
    return dataclasses.asdict(settings)


def early_bindings() -> list[str]:
    """Modules that hold, as a global, an original function fl_patch has since replaced on a module:
    their calls bypass the patch (``from torch.nn.functional import linear`` before activation)."""
    from fl_patch import runtime

    found = []
    for owner, name, original in runtime.patched_module_attributes():
        own_package = owner.__name__.split(".")[0]
        for module_name, module in list(sys.modules.items()):
            # The owner's own package and fl_patch hold such references on purpose; look at users' code.
            if not isinstance(module, types.ModuleType) or module_name.split(".")[0] in (own_package, "fl_patch"):
                continue
            for attr, value in list(vars(module).items()):
                if value is original:
                    found.append(f"{module_name}.{attr} still refers to the original {owner.__name__}.{name} "
                                 "(bound before fl_patch patched it; its calls are not patched)")
    return found
