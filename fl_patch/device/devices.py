"""Which accelerator this process runs on: the vendor, by FlagGems' own ``vendor_name`` values, and the device.

Two questions, asked at different times:

- :func:`vendor_hint` may be asked at any time, on the start-up path too: it reads the environment variables
  FlagGems reads (``GEMS_VENDOR`` ...), the vendor modules already imported (``torch_npu`` adds ``torch.npu``,
  ...) and how torch was built (``torch.version.hip`` / ``cuda``). It imports nothing, runs no vendor tool and
  never touches a device, so before the user's script has imported its vendor's torch extension it may not
  know yet.
- :func:`identify` is asked once a kernel is about to run on a tensor of that device, which the user's process
  has therefore set up already: it reads the device's name and capability through torch's module for that
  device type (``torch.cuda``, ``torch.npu``, ``torch.mlu``, ...), and settles the vendor of CUDA-compatible
  chips (MetaX, Kunlunxin, T-Head, ...) by the device's name where the build alone can't tell.

Every vendor is a row of :data:`VENDORS` (data, not code): what it is called, the device type its tensors
have, and the signs FlagGems itself looks for (``flag_gems/runtime/backend/device_finder.py``).
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import asdict, dataclass

# FlagGems' environment variables naming the vendor, in the order it reads them.
VENDOR_VARIABLES = ("GEMS_VENDOR", "FLAGGEMS_VENDOR", "GEMS_BACKEND", "FLAGGEMS_BACKEND")


@dataclass(frozen=True)
class Vendor:
    """One FlagOS vendor.

    name: FlagGems' ``vendor_name``. device_type: the torch device type of its tensors. torch_attribute: the
    attribute its torch extension adds to ``torch`` (or ``torch_npu``), FlagGems' own quick check. modules: its
    torch extension modules (seen in ``sys.modules``, never imported here). name_words: lower-case words of
    its device names, for CUDA-compatible chips that only the name tells apart. environment: a variable
    whose presence names it (FlagGems reads ``PPU_SDK`` for T-Head).
    """

    name: str
    device_type: str
    torch_attribute: str | None = None
    modules: tuple[str, ...] = ()
    name_words: tuple[str, ...] = ()
    environment: str | None = None


VENDORS = (
    Vendor("nvidia", "cuda", name_words=("nvidia", "tesla", "geforce", "quadro")),
    Vendor("amd", "cuda", name_words=("amd", "instinct", "radeon")),
    Vendor("hygon", "cuda", torch_attribute="__hcu_version__", name_words=("hygon", "dcu")),
    Vendor("metax", "cuda", name_words=("metax", "mxc")),
    Vendor("iluvatar", "cuda", torch_attribute="corex", name_words=("iluvatar",)),
    Vendor("kunlunxin", "cuda", name_words=("kunlun", "p800", "r200")),
    Vendor("thead", "cuda", name_words=("ppu",), environment="PPU_SDK"),
    Vendor("mthreads", "musa", torch_attribute="musa", modules=("torch_musa",), name_words=("mthreads", "mtt")),
    Vendor("cambricon", "mlu", torch_attribute="mlu", modules=("torch_mlu",), name_words=("mlu",)),
    Vendor("ascend", "npu", torch_attribute="npu", modules=("torch_npu",), name_words=("ascend",)),
    Vendor("enflame", "gcu", torch_attribute="gcu", modules=("torch_gcu",)),
    Vendor("sunrise", "ptpu", torch_attribute="ptpu"),
    Vendor("tsingmicro", "txda", torch_attribute="txda", modules=("torch_txda",)),
    Vendor("aipu", "aipu"),
)
BY_NAME = {vendor.name: vendor for vendor in VENDORS}


@dataclass(frozen=True)
class DeviceInfo:
    """The device a kernel runs on. vendor: a VENDORS name, or None when nothing tells. capability: e.g.
    ``"9.0"`` where the device type reports one."""

    vendor: str | None
    type: str
    name: str
    index: int = 0
    capability: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def label(self) -> str:
        """``"NVIDIA H200 (nvidia, cuda:0, capability 9.0)"``."""
        details = [self.vendor or "unknown vendor", f"{self.type}:{self.index}"]
        if self.capability:
            details.append(f"capability {self.capability}")
        return f"{self.name} ({', '.join(details)})"


def vendor_hint(env=None) -> str | None:
    """The vendor as far as it can be told without touching a device or importing anything (None: not yet).

    Order: FlagGems' variables (``GEMS_VENDOR`` ..., only a known name counts), a vendor's marker variable, a
    vendor torch extension already imported (its module in ``sys.modules`` or its attribute on torch), then
    torch's build: ROCm is ``amd``, CUDA ``nvidia`` (CUDA-compatible chips are told apart by :func:`identify`).
    """
    env = os.environ if env is None else env
    for variable in VENDOR_VARIABLES:
        value = env.get(variable, "").strip().lower()
        if value in BY_NAME:
            return value
    for vendor in VENDORS:
        if vendor.environment and vendor.environment in env:
            return vendor.name
    torch = sys.modules.get("torch")
    holders = [module for module in (torch, sys.modules.get("torch_npu")) if module is not None]
    for vendor in VENDORS:
        if any(name in sys.modules for name in vendor.modules):
            return vendor.name
        if vendor.torch_attribute and any(hasattr(module, vendor.torch_attribute) for module in holders):
            return vendor.name
    version = getattr(torch, "version", None)
    if getattr(version, "hip", None):
        return "amd"
    if getattr(version, "cuda", None):
        return "nvidia"
    return None


def identify(device) -> DeviceInfo:
    """The device `device` (a ``torch.device``, or anything with ``type`` and ``index``) is, read through torch's
    module for its type. Call it only once a kernel is about to run there: it may initialise that module."""
    torch = sys.modules["torch"]
    kind = device.type
    index = device.index if device.index is not None else _current_index(torch, kind)
    module = getattr(torch, kind, None)
    name = _call(module, "get_device_name", index) or kind
    capability = _call(module, "get_device_capability", index)
    if isinstance(capability, tuple):
        capability = ".".join(str(part) for part in capability)
    return DeviceInfo(vendor=_vendor_of(kind, str(name)), type=kind, name=str(name), index=index,
                      capability=capability if isinstance(capability, str) else None)


def _vendor_of(device_type: str, name: str) -> str | None:
    """The vendor of a device of this type and name: the hint when it fits the device type, else the only vendor
    of that type, else the vendor whose name words the device name holds, else FlagGems' own answer if it is
    loaded."""
    hint = vendor_hint()
    candidates = [vendor for vendor in VENDORS if vendor.device_type == device_type]
    words = set(re.findall(r"[a-z0-9]+", name.lower()))
    by_name = [vendor.name for vendor in candidates if words & set(vendor.name_words)]
    if hint is not None and BY_NAME[hint].device_type == device_type:
        # torch's CUDA build says "nvidia" for every CUDA-compatible chip: a device name of another vendor wins.
        return by_name[0] if hint == "nvidia" and by_name and "nvidia" not in by_name else hint
    if len(candidates) == 1:
        return candidates[0].name
    if by_name:
        return by_name[0]
    loaded = getattr(sys.modules.get("flag_gems"), "vendor_name", None)
    return loaded if loaded in BY_NAME else None


def device_module(torch_module, vendor: str | None = None):
    """torch's module for the vendor's device type (``torch.cuda``, ``torch.npu``, ...), or None when that
    vendor's extension has not added it (yet)."""
    vendor = vendor or vendor_hint()
    kind = BY_NAME[vendor].device_type if vendor in BY_NAME else "cuda"
    return getattr(torch_module, kind, None)


def capturing(device) -> bool:
    """Whether `device`'s current stream is capturing a graph (CUDA graphs, or a vendor's through the same
    ``torch.<type>.is_current_stream_capturing``); a module that can't answer counts as capturing, so that nothing
    which reads the device (a timing, a comparison) runs into a capture."""
    query = getattr(getattr(sys.modules["torch"], device.type, None), "is_current_stream_capturing", None)
    if query is None:
        return False  # no such query: this device type captures no graphs
    try:
        return bool(query())
    except Exception:  # a vendor module that can't answer
        return True


def _current_index(torch, kind: str) -> int:
    index = _call(getattr(torch, kind, None), "current_device")
    return index if isinstance(index, int) else 0


def _call(module, function: str, *args):
    """``module.function(*args)``, or None when the module lacks it or it fails (no such device query)."""
    method = getattr(module, function, None)
    if method is None:
        return None
    try:
        return method(*args)
    except Exception:  # a device type whose module can't answer this: the caller has a default
        return None
