"""Performance routing: which calls a patched place sends to FlagGems on this device, read from its profile.

Correct numbers are the kernels' business (``unsupported_*`` refuses what a kernel can't compute exactly); this
module is only about speed. A device profile (:mod:`fl_patch.profiles`, measured by ``fl-patch tune``) says per
routing key (``"rms_norm.hf"``, ``"attention.sdpa"``, ...) whether calls go to FlagGems (at or above a number of
elements of the call's deciding tensor) or stay on the native path. A call routed away is counted under
:data:`~fl_patch.kernels.gems.SMALL_INPUT` (below the size) or :data:`~fl_patch.kernels.gems.PROFILE_NATIVE` (the
family is native on this device); RMSNorm forms then run torch's fused op, the others the original.

Two regimes (``fl-patch tune`` measures both). The profile's decision for a key holds when nothing else keeps the
device busy (launch-bound: FlagGems' host cost counts in full); its ``device_bound`` decision, measured with the
host ahead of the device, holds while the device is still busy with earlier work when the call comes (its
stream not drained: the host cost hides behind that work, as in a large prefill). So a call at or above the
launch-bound threshold goes to FlagGems; one below it but at or above the device-bound threshold goes to FlagGems
only if the device's current stream has work queued (one stream query, asked only of calls in that range, never
while a CUDA graph is captured); the rest go native. Under torch.compile the routing is decided while tracing,
once per graph, by size alone, with the profile's ``compiled`` decision: measured by ``fl-patch tune --compiled``
as FlagGems' custom op against inductor's code for the same native path. A profile without one keeps the
originals under compile (inductor compiles them: on the H200, 2026-12-03, inductor's rope and silu * mul beat
FlagGems' by 1.8x and 1.6x at Llama prefill 4x2048, and a FlagGems rope in a 1x128 graph cost 2.5 ms of host
time a forward, benchmarks/results/prefill_gap.md and profile_compile.md); with no profile at all, FlagGems runs
there as it does eagerly. A compile that starts before the profile was looked up looks it up then, for the
accelerator already in use (a compile-start callback), else it keeps the originals.

The device is only known once a call brings a tensor on it, so the profile is looked up then, once per process
(:func:`router`'s first device call), never at start-up: that keeps the device untouched until the user's code
uses it, and under ``torchrun`` each rank finds the profile of its own device. No profile for the device: every
call goes to FlagGems (the report and ``fl-patch status`` say that none was found). ``FL_PATCH_PROFILE=off``:
no routing at all.

What beats the profile: a family or target named in ``FL_PATCH_INCLUDE`` / ``include``, and rows the user's own
code or config names (``attn_implementation="flagos"``, LightX2V's ``flagos_*`` keys), are *lifted*: a family
the profile keeps native runs FlagGems at every size for them (a measured size threshold still holds).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Callable

from fl_patch import profiles
from fl_patch.kernels.gems import PROFILE_NATIVE, SMALL_INPUT

log = logging.getLogger("fl_patch")

NATIVE = sys.maxsize  # the element threshold of a family kept native: no call reaches it


class _Routing:
    """The process-wide routing state, guarded by `lock`; :func:`configure` resets it."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.setting: str | None = None  # FL_PATCH_PROFILE
        self.kernels = "gems"
        self.strict = False
        self.lifted_families: frozenset[str] = frozenset()
        self.explicit_targets: frozenset[str] = frozenset()
        self.lookup: profiles.Lookup | None = None
        self.device = None  # devices.DeviceInfo once resolved
        self.tables: dict[bool, dict[str, Entry]] = {False: {}, True: {}}  # lifted -> key -> entry
        self.probes: dict[str, Callable] = {}  # device type -> busy(device)
        self.said: set[str] = set()  # problems already logged (a broken FL_PATCH_PROFILE file, at configure)


_routing = _Routing()

# What a compiled call gets when the profile was not looked up before tracing (no accelerator in use yet).
NOT_LOOKED_UP_UNDER_COMPILE = "torch.compile"


_compiles_watched = False
Entry = tuple  # (threshold, reason, busy_threshold, compiled_threshold, compiled_reason): see entry()


def entry(threshold: int, reason: str, busy_threshold: int = NATIVE, compiled: tuple[int, str] | None = None) -> Entry:
    """One routing key's decision as the router reads it, a plain tuple (cheap, and dynamo traces it):
    calls with at least `threshold` elements go to FlagGems; below it, calls with at least `busy_threshold` go to
    FlagGems while the device is busy; the others go native for `reason`. Under torch.compile calls with at least
    `compiled`'s threshold go to FlagGems, the others native for its reason (default: `threshold` and `reason`)."""
    compiled_threshold, compiled_reason = compiled or (threshold, reason)
    return threshold, reason, busy_threshold, compiled_threshold, compiled_reason


def configure(settings, registry) -> list[str]:
    """Start afresh for `settings` (called by every apply): forget the profile looked up and the decisions.

    An explicit FL_PATCH_PROFILE file is read now (no device needed), so that a broken one is said at once: the
    returned list holds the message (the file, what is wrong, what is accepted and done instead) for the caller to
    say; in strict mode ProfileError is raised instead.
    """
    include = set(settings.include)
    with _routing.lock:
        _routing.setting, _routing.strict, _routing.kernels = settings.profile, settings.strict, settings.kernels
        _routing.lifted_families = frozenset(
            t.family for t in registry.targets.values() if t.family in include or t.name in include)
        _routing.explicit_targets = frozenset(t.name for t in registry.targets.values() if t.explicit_choice)
        _routing.lookup, _routing.device = None, None
        _routing.said.clear()
        for table in _routing.tables.values():
            table.clear()  # in place: routers hold these dicts
    if _compiles_watched:
        _watch_compiles()
    setting = settings.profile
    if settings.kernels == "gems" and setting not in (None, profiles.OFF) and not os.path.isdir(setting):
        try:
            profiles.read(setting, "FL_PATCH_PROFILE")
        except profiles.ProfileError as exc:
            if settings.strict:
                raise
            with _routing.lock:
                _routing.said.add(str(exc))
            return [f"FL_PATCH_PROFILE: {exc}; accepted: a profile file (`fl-patch tune` writes one), a folder of "
                    "them, or 'off'; ignored: no device profile is used, every family runs FlagGems at every size"]
    return []


def is_lifted(target: str, family: str) -> bool:
    """Whether the row `target` of `family` is lifted over the profile (see the module docstring)."""
    return target in _routing.explicit_targets or family in _routing.lifted_families


def router(key: str, lifted: bool) -> Callable:
    """``route(tensor)`` for routing key `key`: the reason a call whose deciding tensor is `tensor` goes the
    native way, or None to let the kernel's own check decide. Cheap: a device check, a dict lookup and a
    comparison (plus a stream query for calls between the two thresholds); the first device call looks the
    profile up."""
    import torch

    from fl_patch.kernels import gems

    is_compiling = torch.compiler.is_compiling
    table = _routing.tables[lifted]
    _watch_compiles()

    def route(tensor) -> str | None:
        if gems.device_reason(tensor) is not None:
            return None  # the kernel's check says why (cpu tensor, meta tensor)
        decided = table.get(key)
        if is_compiling():
            if decided is None:
                return NOT_LOOKED_UP_UNDER_COMPILE
            return decided[4] if tensor.numel() < decided[3] else None
        if decided is None:
            decided = _decide(key, lifted, tensor.device)
        elements = tensor.numel()
        if elements >= decided[0] or (elements >= decided[2] and _busy(tensor.device)):
            return None
        return decided[1]

    return route


def _decide(key: str, lifted: bool, device) -> Entry:
    """The entry of `key` for rows lifted or not, looking the profile up if needed."""
    decided = _entry(resolve(device).profile, key, lifted)
    _watch_compiles()
    with _routing.lock:
        _routing.tables[lifted][key] = decided
    return decided


def _entry(profile: profiles.Profile | None, key: str, lifted: bool) -> Entry:
    if profile is None:
        return entry(0, SMALL_INPUT)  # no profile: FlagGems at every size, compiled or not
    decision = profile.decision(key)
    compiled = _compiled(decision.compiled, lifted)
    if decision.route == "native":
        if lifted:
            return entry(0, SMALL_INPUT, compiled=compiled)
        threshold, reason = NATIVE, PROFILE_NATIVE
    else:
        threshold, reason = decision.min_elements, SMALL_INPUT
    bound = decision.device_bound
    busy_threshold = bound.min_elements if bound is not None and bound.route == "gems" else NATIVE
    return entry(threshold, reason, busy_threshold, compiled)


def _compiled(decision: profiles.Decision | None, lifted: bool) -> tuple[int, str]:
    """(threshold, reason) under torch.compile from the profile's compiled decision: none measured keeps the
    originals for inductor, as a native one does; a lifted row runs FlagGems where the decision is native (a
    measured size threshold still holds)."""
    if decision is not None and decision.route == "gems":
        return decision.min_elements, SMALL_INPUT
    return (0, SMALL_INPUT) if lifted else (NATIVE, PROFILE_NATIVE)


def _busy(device) -> bool:
    """Whether `device`'s current stream still has work queued (so that a call's host cost hides behind it).
    False when it can't be told (no stream query for this device type, a CUDA graph being captured, an error)
    and with torch's deterministic algorithms on: then a call's path depends on its size alone, not on timing."""
    if _deterministic():
        return False
    probe = _routing.probes.get(device.type)
    if probe is None:
        probe = _routing.probes.setdefault(device.type, _busy_probe(device.type))
    return probe(device)


def _deterministic() -> bool:
    return sys.modules["torch"].are_deterministic_algorithms_enabled()


def _busy_probe(device_type: str) -> Callable:
    import torch

    backend = getattr(torch, device_type, None)
    current_stream = getattr(backend, "current_stream", None)
    capturing = getattr(backend, "is_current_stream_capturing", None)
    if current_stream is None:
        return lambda device: False

    def busy(device) -> bool:
        try:
            if capturing is not None and capturing():
                return False  # a query would break the capture
            return not current_stream(device).query()
        except Exception:  # a vendor stream that can't answer: treat as idle (the launch-bound decision)
            return False

    return busy


def _watch_compiles() -> None:
    """A compile-start callback that looks the profile up (and fills every routing entry) for the accelerator
    already in use, so that tracing can route by it: registered when torch._dynamo is imported, and again by
    each apply and each first eager call of a key (``torch._dynamo.reset()`` drops every callback)."""
    global _compiles_watched
    if not _compiles_watched:
        _compiles_watched = True
        from fl_patch import hooks

        hooks.watch("torch._dynamo", _register_compile_callback)
    elif "torch._dynamo" in sys.modules:
        _register_compile_callback(sys.modules["torch._dynamo"])


def _register_compile_callback(dynamo) -> None:
    handler = getattr(getattr(dynamo, "callback", None), "callback_handler", None)
    if handler is None:  # a torch without it: compiles before the first eager call keep the originals
        return
    if _resolve_for_compile not in handler.start_callbacks:
        handler.register_start_callback(_resolve_for_compile)


def _resolve_for_compile(*_args) -> None:
    """Compile-start callback: the profile lookup and every entry, for the accelerator in use, if there is one
    and some entry is still missing (dynamo calls it at each frame it compiles). Never raises (a compile must not
    fail for routing)."""
    keys = _all_keys()
    if _routing.kernels != "gems" or all(key in table for table in _routing.tables.values() for key in keys):
        return
    from fl_patch import environment

    try:
        device = environment.first_device(initialized_only=True)
        if device is None:
            return
        profile = resolve(device).profile
        entries = {lifted: {key: _entry(profile, key, lifted) for key in keys} for lifted in (False, True)}
        with _routing.lock:
            for lifted, table in entries.items():
                for key, decided in table.items():
                    _routing.tables[lifted].setdefault(key, decided)
    except Exception as exc:  # routing must never break a compile
        log.warning("fl_patch: no profile routing for this compile: %s: %s", type(exc).__name__, exc)


def _all_keys() -> list[str]:
    return [f"{family}.{form}" for family, forms in profiles.FAMILY_FORMS.items() for form in forms]



def resolve(device) -> profiles.Lookup:
    """This process's profile lookup, made once, for the first device a call ran on (the device it names)."""
    with _routing.lock:
        if _routing.lookup is not None:
            return _routing.lookup
    from fl_patch import devices

    info = devices.identify(device)
    lookup = profiles.find(info, _routing.setting)
    with _routing.lock:
        if _routing.lookup is None:
            _routing.lookup, _routing.device = lookup, info
            _say(lookup, info)
        return _routing.lookup


def _say(lookup: profiles.Lookup, info) -> None:
    """Log, once, what the lookup found: broken files (an error in strict mode), or that there is no profile."""
    problems = [problem for problem in lookup.problems if problem not in _routing.said]
    if problems and _routing.strict:
        raise profiles.ProfileError("; ".join(problems))
    for problem in problems:
        log.warning("fl_patch: %s; passed over", problem)
    if lookup.profile is None and not lookup.off:
        log.info("fl_patch: %s", no_profile_message(info))


def no_profile_message(info) -> str:
    return (f"no profile for {info.label()}: every family runs FlagGems at every size; `fl-patch tune` measures "
            "this device and writes one")


def describe() -> dict:
    """What ``fl-patch status`` and the report show: the profile in force (or why none), where it came from,
    whether it is stale, and per family how and why it routes."""
    from fl_patch.versions import installed_version

    with _routing.lock:
        lookup, info, setting = _routing.lookup, _routing.device, _routing.setting
        lifted = sorted(_routing.lifted_families)
    if _routing.kernels != "gems":
        return {"state": "not used", "summary": f"profile: not used (FL_PATCH_KERNELS={_routing.kernels})"}
    if setting == profiles.OFF:
        return {"state": "off", "summary": "FL_PATCH_PROFILE=off: no performance routing, every call on FlagGems"}
    if lookup is None:
        return {"state": "not looked up yet", "summary": "profile: looked up at the first FlagGems call on a device",
                "setting": setting}
    out = {"device": info.as_dict(), "searched": lookup.searched, "problems": lookup.problems,
           "lifted_families": lifted}
    profile = lookup.profile
    if profile is None:
        return {**out, "state": "none", "summary": f"profile: {no_profile_message(info)}"}
    installed = {"torch": installed_version("torch"), "flag_gems": installed_version("flag-gems")}
    stale = profile.stale_reasons(installed)
    made_on = profile.device.get("name")
    where = f"{profile.path} ({profile.source})"
    summary = f"profile: {where}, made on {made_on} {profile.date[:10]}" + (
        f"; stale: {'; '.join(stale)}" if stale else "")
    if not profile.matches(info):
        summary += f"; this device is {info.name}"
    return {**out, "state": "stale" if stale else "in force", "summary": summary, "path": profile.path,
            "source": profile.source, "made_on": profile.device, "versions": profile.versions, "stale": stale,
            "families": _families(profile, lifted)}


def _families(profile: profiles.Profile, lifted: list[str]) -> dict:
    """Per family: its route, threshold, why, its forms' own decisions, and whether include lifts it."""
    out = {}
    for family, forms in profiles.FAMILY_FORMS.items():
        entry = profiles.as_dict(profile.family_decision(family))
        own = {form: profiles.as_dict(profile.forms[f"{family}.{form}"]) for form in forms
               if f"{family}.{form}" in profile.forms}
        if own:
            entry["forms"] = own
        if family in lifted:
            entry["lifted"] = "named in FL_PATCH_INCLUDE / include: FlagGems at every size the profile allows"
        out[family] = entry
    return out


def summary_line() -> str:
    """One line for the report: the profile in force, or why there is none."""
    return describe()["summary"]
