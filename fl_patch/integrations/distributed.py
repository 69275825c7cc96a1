"""FlagCX as torch.distributed's default backend (``FL_PATCH_DIST=auto|flagcx|native``).

``import flagcx`` registers the backend with ``Backend.register_backend("flagcx", ..., devices=(...))``
but does not make it the default. This row does, for the device types FlagCX registered itself for
(``Backend.backend_capability["flagcx"]``; ``cuda`` in a real build), in two ways:

- ``Backend.default_device_backend_map[device] = "flagcx"``: reaches every caller that lets torch pick the
  backend, even through an ``init_process_group`` bound before fl_patch ran;
- ``init_process_group`` and ``new_group`` (on ``torch.distributed``, ``distributed_c10d`` and the
  ``torch.distributed.*`` modules that imported them, such as ``device_mesh``) are wrapped so that
  ``backend=None`` or ``"nccl"`` becomes ``"cpu:gloo,<device>:flagcx"`` (CPU collectives stay on gloo),
  and NCCL-only ``pg_options`` are dropped. Any other explicit backend is left alone; ``new_group`` with no
  backend inherits the default group's, as in torch.

Revert restores the map entries and the functions. FlagCX's own registration (and what its import
changes) stays: a module can't be un-imported, and a registered but non-default backend changes nothing.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import sys

from fl_patch.errors import PatchError
from fl_patch.replacements import like
from fl_patch.runtime import Skip
from fl_patch.table import Target

log = logging.getLogger("fl_patch")

BACKEND = "flagcx"
SWITCHED = ("nccl",)  # backends that become FlagCX when asked for by name

TARGETS = [
    Target(
        name="torch.distributed.flagcx",
        family="distributed",
        module="torch",
        attribute="Backend.default_device_backend_map, init_process_group / new_group (backend None or nccl)",
        factory="fl_patch.integrations.distributed:patch_default_backend",
        requires=("torch>=2.4",),
        description="FlagCX as the default torch.distributed backend for its device types",
    ),
    Target(
        name="torch.distributed.report_ranks",
        family="distributed",
        module="torch",
        attribute="destroy_process_group (FL_PATCH_REPORT=1)",
        factory="fl_patch.integrations.distributed:patch_report_exchange",
        requires=("torch>=2.4",),
        description="FL_PATCH_REPORT=1: the ranks' summaries are exchanged before the default group is destroyed",
    ),
]


def patch_default_backend(torch_module, ctx) -> None:
    """Make FlagCX the default backend for the device types it registered, or say why not.

    ``native``: skipped. ``auto``: skipped when flagcx can't be imported. ``flagcx``: a missing or broken
    FlagCX fails the row (a warning; an error in strict mode).
    """
    mode = ctx.settings.dist
    if mode == "native":
        raise Skip("FL_PATCH_DIST=native")
    distributed = importlib.import_module("torch.distributed")  # imported by torch today; lazily, maybe later
    if not distributed.is_available():
        raise Skip("torch.distributed is not available in this torch build")
    problem = _load_flagcx(distributed.Backend)
    if problem is not None:
        if mode == "flagcx":
            raise PatchError(f"FL_PATCH_DIST=flagcx but FlagCX can't be used: {problem}")
        raise Skip(problem)

    c10d = distributed.distributed_c10d
    devices = list(distributed.Backend.backend_capability[BACKEND])
    spec = backend_string(devices)
    for device in devices:
        rec = ctx.record(f"torch.distributed.Backend.default_device_backend_map[{device!r}]")
        ctx.setitem(rec, distributed.Backend.default_device_backend_map, device, BACKEND)

    for name, inherit_none in (("init_process_group", False), ("new_group", True)):
        original = getattr(c10d, name)
        rec = ctx.record(f"torch.distributed.{name}")
        replacement = like(_switching(original, spec, devices, inherit_none, name), original)
        for owner in _holders(distributed, name, original):
            ctx.setattr(rec, owner, name, replacement)


def _holders(distributed, name: str, original) -> list:
    """torch.distributed and its submodules that hold `original` as `name` (``device_mesh`` imported
    ``init_process_group`` and ``new_group`` from distributed_c10d when torch was imported)."""
    holders = [distributed]
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith("torch.distributed.") and module is not None:
            holders.append(module)
    return [module for module in holders if vars(module).get(name) is original]


def _load_flagcx(backend_class) -> str | None:
    """Import flagcx (which registers the backend); None on success, else why it can't be used."""
    try:
        if importlib.util.find_spec("flagcx") is None:
            return "flagcx is not installed"
        importlib.import_module("flagcx")
    except Exception as exc:  # a broken third-party install means "can't be used", not a crash
        return f"import flagcx failed: {type(exc).__name__}: {exc}"
    if not backend_class.backend_capability.get(BACKEND):
        return "flagcx was imported but registered no torch.distributed backend named 'flagcx'"
    return None


def backend_string(devices: list[str]) -> str:
    """The backend string that puts FlagCX on `devices` and keeps gloo for CPU tensors:
    ``"cpu:gloo,cuda:flagcx"`` (``"cpu:flagcx"`` when FlagCX declares CPU itself)."""
    pairs = {"cpu": "gloo"}
    pairs.update(dict.fromkeys(devices, BACKEND))
    return ",".join(f"{device}:{backend}" for device, backend in pairs.items())


def switch_backend(backend, spec: str, devices: list[str]):
    """The backend to use instead of `backend`, or None when it stays as it is.

    None and ``"nccl"`` become `spec`; a ``"device:backend,..."`` string has its ``nccl`` entries on
    FlagCX's devices replaced by ``flagcx``; anything else is an explicit choice and stays.
    """
    if backend is None:
        return spec
    text = str(backend).lower()
    if text in SWITCHED:
        return spec
    if ":" not in text:
        return None
    pairs = [part.split(":", 1) for part in text.split(",")]
    if not all(len(pair) == 2 for pair in pairs):
        return None  # malformed: let torch report it
    changed = [(device, BACKEND if name in SWITCHED and device in devices else name) for device, name in pairs]
    if changed == [tuple(pair) for pair in pairs]:
        return None
    return ",".join(f"{device}:{name}" for device, name in changed)


def _default_group_uses_flagcx(c10d) -> bool:
    """Whether the default process group exists and runs on FlagCX for some device."""
    try:
        return c10d.is_initialized() and BACKEND in str(c10d.get_backend())
    except Exception:  # no default group, or one this rank is not in
        return False


def _switching(original, spec: str, devices: list[str], inherit_none: bool, name: str):
    """A wrapper of `original` (init_process_group / new_group) that switches its backend argument.

    The signature differs between torch releases, so the call is bound with the original's signature (this
    runs once per group, not per op, so the cost does not matter). With ``inherit_none`` (new_group), no
    backend means "the default group's": it stays None, and its pg_options are dropped when that is FlagCX.
    """
    import torch.distributed.distributed_c10d as c10d

    signature = inspect.signature(original)

    def switched(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        arguments = bound.arguments
        backend = arguments.get("backend")
        if backend is None and inherit_none:
            replacement, switch = None, _default_group_uses_flagcx(c10d)
        else:
            replacement = switch_backend(backend, spec, devices)
            switch = replacement is not None
        if not switch:
            return original(*args, **kwargs)
        if replacement is not None:
            arguments["backend"] = replacement
            log.info("fl_patch: %s backend %r -> %r", name, backend, replacement)
        if arguments.get("pg_options") is not None:
            log.info("fl_patch: %s drops pg_options %s (meant for %s, not FlagCX)",
                     name, type(arguments["pg_options"]).__name__, backend or "the native default")
            arguments["pg_options"] = None
        return original(*bound.args, **bound.kwargs)

    return switched


def patch_report_exchange(torch_module, ctx) -> None:
    """With FL_PATCH_REPORT=1, wrap ``destroy_process_group`` so that destroying the default group first exchanges
    the ranks' report summaries over its store (``fl_patch.ranks``), which exit could no longer do."""
    if not ctx.settings.report_at_exit:
        raise Skip("FL_PATCH_REPORT is off")
    distributed = importlib.import_module("torch.distributed")
    if not distributed.is_available():
        raise Skip("torch.distributed is not available in this torch build")
    from fl_patch import ranks

    original = distributed.distributed_c10d.destroy_process_group

    def destroy_process_group(group=None):
        if group is None:
            ranks.exchange_now()
        return original(group)

    rec = ctx.record("torch.distributed.destroy_process_group")
    replacement = like(destroy_process_group, original)
    for owner in _holders(distributed, "destroy_process_group", original):
        ctx.setattr(rec, owner, "destroy_process_group", replacement)
