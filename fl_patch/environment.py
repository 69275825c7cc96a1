"""What ``fl-patch status`` shows about the machine: versions, FlagGems / FlagCX availability, device,
and module-level references bound before fl_patch patched them (those calls stay on the original)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import platform
import sys
import types

from fl_patch.versions import installed_version

PACKAGES = ("torch", "transformers", "wrapt", "flag_gems", "flagcx", "lightx2v", "triton")


def describe() -> dict[str, str]:
    """Versions and availability, without importing flag_gems (it initialises the device): fl_patch's own
    version and where it is imported from first, then Python's and each package's."""
    import fl_patch

    info = {"fl_patch": f"{fl_patch.__version__} ({os.path.dirname(os.path.abspath(fl_patch.__file__))})",
            "python": platform.python_version()}
    for name in PACKAGES:
        dist = {"flag_gems": "flag-gems"}.get(name, name)
        version = installed_version(dist)
        if version is None and importlib.util.find_spec(name) is not None:
            version = "importable (no distribution metadata)"
        info[name] = version or "not installed"
    info["device"] = _device()
    return info


def _device() -> str:
    """The accelerator torch sees (name, count, vendor), or why none. May initialise the device's runtime."""
    if importlib.util.find_spec("torch") is None:
        return "unknown (torch not installed)"
    return describe_device(first_device())


def first_device(initialized_only: bool = False):
    """A ``torch.device`` of the first accelerator type torch reports available (``cuda`` first, then the other
    vendors' types of fl_patch.device.devices.VENDORS, whose installed torch extension is imported first: ``torch_npu``
    adds ``torch.npu``), or None for a CPU-only machine.

    `initialized_only`: the first type torch has already initialised, its current device, importing no vendor
    extension and touching no device (what a compile-start callback may do)."""
    import contextlib
    import importlib

    import torch

    from fl_patch.device import devices

    if not initialized_only:
        for vendor in devices.VENDORS:
            for module in vendor.modules:
                if module not in sys.modules and importlib.util.find_spec(module) is not None:
                    with contextlib.suppress(Exception):  # a broken vendor extension: that device type is absent
                        importlib.import_module(module)
    ready = "is_initialized" if initialized_only else "is_available"
    for kind in dict.fromkeys(vendor.device_type for vendor in devices.VENDORS):
        module = getattr(torch, kind, None)
        try:
            if module is not None and getattr(module, ready)():
                return torch.device(kind, module.current_device())
        except Exception:  # a vendor module that can't answer: not this one
            continue
    return None


def describe_device(device) -> str:
    if device is None:
        return "cpu only (FlagGems kernels need an accelerator)"
    import torch

    from fl_patch.device import devices

    info = devices.identify(device)
    count = getattr(torch, device.type).device_count()
    return f"{info.name} x{count}, {info.vendor or 'unknown vendor'} ({device.type})"


def import_targets() -> None:
    """Import the libraries fl_patch patches that are installed, so status shows their real state."""
    for name in ("torch", "transformers"):
        if importlib.util.find_spec(name) is not None:
            __import__(name)


def settings_dict(settings) -> dict:
    """The settings as a plain dict (for printing): the fields that say what fl_patch does, not its own
    bookkeeping (fields left out of comparison, such as whether FL_PATCH_KERNELS was given)."""
    return {field.name: getattr(settings, field.name) for field in dataclasses.fields(settings) if field.compare}


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
