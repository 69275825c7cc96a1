"""Performance routing: which calls a patched place sends to FlagGems on this device, read from its profile.

Correct numbers are the kernels' business (``unsupported_*`` refuses what a kernel can't compute exactly); this
module is only about speed. A device profile (:mod:`fl_patch.profiles`, measured by ``fl-patch tune``) says per
routing key (``"rms_norm.hf"``, ``"attention.sdpa"``, ...) whether calls go to FlagGems (at or above a number of
elements of the call's deciding tensor) or stay on the native path. A call routed away is counted under
:data:`~fl_patch.kernels.gems.SMALL_INPUT` (below the size) or :data:`~fl_patch.kernels.gems.PROFILE_NATIVE` (the
family is native on this device); RMSNorm forms then run torch's fused op, the others the original.

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
        self.tables: dict[bool, dict[str, tuple[int, str]]] = {False: {}, True: {}}  # lifted -> key -> entry
        self.said: set[str] = set()  # problems already logged (a broken FL_PATCH_PROFILE file, at configure)


_routing = _Routing()


def configure(settings, registry) -> None:
    """Start afresh for `settings` (called by every apply): forget the profile looked up and the decisions.

    An explicit FL_PATCH_PROFILE file is read now (no device needed), so that a broken one is said at once: a
    warning naming the file and what is wrong, an error in strict mode.
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
    setting = settings.profile
    if settings.kernels == "gems" and setting not in (None, profiles.OFF) and not os.path.isdir(setting):
        try:
            profiles.read(setting, "FL_PATCH_PROFILE")
        except profiles.ProfileError as exc:
            if settings.strict:
                raise
            log.warning("fl_patch: %s; FL_PATCH_PROFILE ignored: no performance routing from it", exc)
            with _routing.lock:
                _routing.said.add(str(exc))


def is_lifted(target: str, family: str) -> bool:
    """Whether the row `target` of `family` is lifted over the profile (see the module docstring)."""
    return target in _routing.explicit_targets or family in _routing.lifted_families


def router(key: str, lifted: bool) -> Callable:
    """``route(tensor)`` for routing key `key`: the reason a call whose deciding tensor is `tensor` goes the
    native way, or None to let the kernel's own check decide. Cheap: a compile check, a device check, a dict
    lookup and a comparison; the first device call looks the profile up."""
    import torch

    from fl_patch.kernels import gems

    is_compiling = torch.compiler.is_compiling
    table = _routing.tables[lifted]

    def route(tensor) -> str | None:
        if is_compiling() or gems.device_reason(tensor) is not None:
            return None  # the kernel's check says why (torch.compile, cpu tensor, meta tensor)
        entry = table.get(key)
        if entry is None:
            entry = _decide(key, lifted, tensor.device)
        return entry[1] if tensor.numel() < entry[0] else None

    return route


def _decide(key: str, lifted: bool, device) -> tuple[int, str]:
    """The (element threshold, reason) of `key` for rows lifted or not, looking the profile up if needed."""
    lookup = resolve(device)
    profile = lookup.profile
    decision = profile.decision(key) if profile is not None else profiles.Decision("gems", 0)
    if decision.route == "native":
        entry = (0, SMALL_INPUT) if lifted else (NATIVE, PROFILE_NATIVE)
    else:
        entry = (decision.min_elements, SMALL_INPUT)
    with _routing.lock:
        _routing.tables[lifted][key] = entry
    return entry


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
        decision = profile.family_decision(family)
        entry = {"route": decision.route, "min_elements": decision.min_elements, "why": decision.why}
        own = {form: vars(profile.forms[f"{family}.{form}"]) for form in forms if f"{family}.{form}" in profile.forms}
        if own:
            entry["forms"] = own
        if family in lifted:
            entry["lifted"] = "named in FL_PATCH_INCLUDE / include: FlagGems at every size the profile allows"
        out[family] = entry
    return out


def summary_line() -> str:
    """One line for the report: the profile in force, or why there is none."""
    return describe()["summary"]
