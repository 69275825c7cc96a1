"""Performance routing: which calls a patched place sends to FlagGems on this device, read from its profile.

Correct numbers are the kernels' business (``unsupported_*`` refuses what a kernel can't compute exactly); this
module is only about speed. A device profile (:mod:`fl_patch.device.profiles`, measured by ``fl-patch tune``) says per
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
time a forward, benchmarks/results/prefill_gap.md and profile_compile.md); so does the prior of a device with no
profile. A compile that starts before the profile was looked up looks it up then, for the
accelerator already in use (a compile-start callback), else it keeps the originals.

The device is only known once a call brings a tensor on it, so the profile is looked up then, once per process
(:func:`router`'s first device call), never at start-up: that keeps the device untouched until the user's code
uses it, and under ``torchrun`` each rank finds the profile of its own device. ``FL_PATCH_PROFILE=off``: no
routing at all, every call on FlagGems.

A device with no measured profile is never made slower or wrong by fl_patch:

- Until a key is measured its calls take the *prior* (:func:`prior`), the path that can't lose: native in the
  launch-bound regime (FlagGems' host cost can't hide there), and FlagGems in the device-bound regime only from
  the device-bound threshold of a profile *borrowed* from another device of the same vendor, type and
  architecture (:func:`fl_patch.device.profiles.find`), where its device time is known to win; native under compile.
- :mod:`fl_patch.device.calibration` measures the program's own calls, per key, size bucket and regime, and routes
  each key by what it learned (the thresholds of an entry, as a profile's, within the measured size range; a call
  outside it is measured). The first calls of a calibrating process mix the two paths, each within the form's
  tolerance of the other.
- :mod:`fl_patch.device.verification` compares FlagGems' first result per key and dtype with the native path's; a
  mismatch keeps the key native (:data:`~fl_patch.kernels.gems.NOT_VERIFIED`), lifted or not.

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

from fl_patch.device import calibration, devices, profiles, verification
from fl_patch.kernels.gems import NOT_MEASURED, NOT_VERIFIED, PROFILE_NATIVE, SMALL_INPUT

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
        self.calibrate = True  # whether keys without a measured decision are calibrated (see _measuring)


_routing = _Routing()

# What a compiled call gets when the profile was not looked up before tracing (no accelerator in use yet).
NOT_LOOKED_UP_UNDER_COMPILE = "torch.compile"


_compiles_watched = False
Entry = tuple  # (threshold, reason, busy_threshold, compiled_threshold, compiled_reason, low, high): see entry()
EVERY_SIZE = (0, NATIVE)  # the measured range of a decision that holds at every size (a profile's)
NONE_MEASURED = (NATIVE, -1)  # the measured range of a key still to be calibrated: every size outside it


def entry(threshold: int, reason: str, busy_threshold: int = NATIVE, compiled: tuple[int, str] | None = None,
          measured: tuple[int, int] = EVERY_SIZE) -> Entry:
    """One routing key's decision as the router reads it, a plain tuple (cheap, and dynamo traces it):
    calls with at least `threshold` elements go to FlagGems; below it, calls with at least `busy_threshold` go to
    FlagGems while the device is busy; the others go native for `reason`. Under torch.compile calls with at least
    `compiled`'s threshold go to FlagGems, the others native for its reason (default: `threshold` and `reason`).
    Eager calls whose size is outside `measured` (low, high) are calibrated (:mod:`fl_patch.device.calibration`)."""
    compiled_threshold, compiled_reason = compiled or (threshold, reason)
    return threshold, reason, busy_threshold, compiled_threshold, compiled_reason, measured[0], measured[1]


def configure(settings, registry) -> list[str]:
    """Start afresh for `settings` (called by every apply): forget the profile looked up and the decisions.

    An explicit FL_PATCH_PROFILE file is read now (no device needed), so that a broken one is said at once: the
    returned list holds the message (the file, what is wrong, what is accepted and done instead) for the caller to
    say; in strict mode ProfileError is raised instead.
    """
    include = set(settings.include)
    calibration.reset()
    verification.reset()
    with _routing.lock:
        _routing.setting, _routing.strict, _routing.kernels = settings.profile, settings.strict, settings.kernels
        _routing.lifted_families = frozenset(
            t.family for t in registry.targets.values() if t.family in include or t.name in include)
        _routing.explicit_targets = frozenset(t.name for t in registry.targets.values() if t.explicit_choice)
        _routing.lookup, _routing.device = None, None
        _routing.said.clear()
        _routing.calibrate = settings.calibrate and settings.profile is None and settings.kernels == "gems"
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
                    "them, or 'off'; ignored: no device profile is used, calls keep the native path, and nothing "
                    "is calibrated while FL_PATCH_PROFILE is set"]
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
        if (elements < decided[5] or elements > decided[6]) and _measuring(key, tensor):
            return None  # the kernel's watch runs this call on one side or the other, timed
        if elements >= decided[0] or (elements >= decided[2] and _busy(tensor.device)):
            return None
        return decided[1]

    return route


def _measuring(key: str, tensor) -> bool:
    """Whether this call of `key`, outside its measured range, is handed to calibration (module docstring);
    False where calibration must not run now: then it routes by the prior."""
    device = tensor.device
    if not _routing.calibrate or _grad_mode() or _deterministic() or devices.capturing(device):
        return False
    regime = calibration.DEVICE_BOUND if _busy(device) else calibration.LAUNCH_BOUND
    calibration.ask(key, tensor.numel(), regime)
    return True


def _grad_mode() -> bool:
    """Whether grad mode is on. A call's path must then depend on nothing but its size and what was decided before:
    gradient checkpointing runs the forward again in the backward and requires the same ops to save the same
    tensors, so neither the device's business (:func:`_busy`) nor calibration's turn may choose it."""
    return sys.modules["torch"].is_grad_enabled()


def _decide(key: str, lifted: bool, device) -> Entry:
    """The entry of `key` for rows lifted or not, looking the profile up if needed."""
    decided = _entry(resolve(device), key, lifted)
    _watch_compiles()
    with _routing.lock:
        _routing.tables[lifted][key] = decided
    return decided


def _entry(lookup: profiles.Lookup, key: str, lifted: bool) -> Entry:
    """The entry of `key` (rows lifted or not) from the lookup, the checks and what calibration learned."""
    if verification.failed(key) is not None:
        return entry(NATIVE, NOT_VERIFIED)  # wrong numbers: native, lifted or not, compiled or not
    profile = lookup.profile
    if lookup.off:
        return entry(0, SMALL_INPUT)  # FL_PATCH_PROFILE=off: FlagGems at every size
    if profile is None or (profile.calibrated and key not in profile.forms):
        if lifted:
            return entry(0, SMALL_INPUT)  # named by the user: FlagGems at every size
        measured = NONE_MEASURED if key in calibration.calibrated_keys() else EVERY_SIZE
        return prior(lookup.borrowed, key, measured)
    decision = profile.decision(key)
    measured = EVERY_SIZE
    if profile.calibrated and key in calibration.calibrated_keys():
        learned = calibration.state(key)
        measured = learned.measured_range() or NONE_MEASURED
        # decided again from its points (learned here, else the file's): a file of an older rule routes by today's
        if not learned.points:  # not calibrating (FL_PATCH_PROFILE names this file, ...): a detached state
            learned = calibration.KeyState(key)
            learned.add(calibration.points_of(profile.data).get(key, []))
        if learned.points:
            decision = profiles.decision_from(learned.decision(), f"calibrated decision of {key}")
    return _from_decision(decision, lifted, measured)


def _from_decision(decision: profiles.Decision, lifted: bool, measured: tuple[int, int] = EVERY_SIZE) -> Entry:
    compiled = _compiled(decision.compiled, lifted)
    if decision.route == "native":
        if lifted:
            return entry(0, SMALL_INPUT, compiled=compiled)
        threshold, reason = NATIVE, PROFILE_NATIVE
    else:
        threshold, reason = decision.min_elements, SMALL_INPUT
    return entry(threshold, reason, _busy_threshold(decision), compiled, measured)


def _busy_threshold(decision: profiles.Decision | None) -> int:
    """The element count from which a call goes to FlagGems while the device is busy: `decision`'s device-bound
    threshold where it routes there, else never (NATIVE)."""
    bound = decision.device_bound if decision is not None else None
    return bound.min_elements if bound is not None and bound.route == "gems" else NATIVE


def prior(borrowed: profiles.Profile | None, key: str, measured: tuple[int, int] = EVERY_SIZE) -> Entry:
    """What a key nobody measured on this device gets: native in the launch-bound regime and under compile;
    FlagGems while the device is busy only from the device-bound threshold of a `borrowed` profile (same vendor,
    type and architecture: where FlagGems' device time is known to win)."""
    busy_threshold = _busy_threshold(borrowed.decision(key) if borrowed is not None else None)
    return entry(NATIVE, NOT_MEASURED, busy_threshold, (NATIVE, NOT_MEASURED), measured)


def _learned(key: str, decision: dict) -> None:
    """Calibration's callback: install `key`'s new decision for rows that are not lifted."""
    parsed = profiles.decision_from(decision, f"calibrated decision of {key}")
    measured = calibration.state(key).measured_range() or NONE_MEASURED
    with _routing.lock:
        if verification.failed(key) is None:
            _routing.tables[False][key] = _from_decision(parsed, False, measured)


def _keep_native(key: str, why: str) -> None:
    """Verification's callback: `key` returned wrong numbers on this device; native from now on, lifted or not."""
    with _routing.lock:
        for table in _routing.tables.values():
            table[key] = entry(NATIVE, NOT_VERIFIED)


def _compiled(decision: profiles.Decision | None, lifted: bool) -> tuple[int, str]:
    """(threshold, reason) under torch.compile from the profile's compiled decision: none measured keeps the
    originals for inductor, as a native one does; a lifted row runs FlagGems where the decision is native (a
    measured size threshold still holds)."""
    if decision is not None and decision.route == "gems":
        return decision.min_elements, SMALL_INPUT
    return (0, SMALL_INPUT) if lifted else (NATIVE, PROFILE_NATIVE)


def _busy(device) -> bool:
    """Whether `device`'s current stream still has work queued (so that a call's host cost hides behind it).
    False when it can't be told (no stream query for this device type, a CUDA graph being captured, an error),
    with torch's deterministic algorithms on, and while grad mode is on: then a call's path depends on its size
    alone, not on timing. In training that matters beyond speed: gradient checkpointing runs a layer's forward
    again in backward and requires the recomputation to save the same tensors as the first run, so both must
    take the same path (the device-bound regime is measured without grad, as inference runs)."""
    if _deterministic() or _grad_mode():
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
        lookup = resolve(device)
        entries = {lifted: {key: _entry(lookup, key, lifted) for key in keys} for lifted in (False, True)}
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
    info = devices.identify(device)
    lookup = profiles.find(info, _routing.setting)
    with _routing.lock:
        if _routing.lookup is not None:
            return _routing.lookup
        _routing.lookup, _routing.device = lookup, info
        _say(lookup, info)
    _start_learning(lookup, info)
    return lookup


def _start_learning(lookup: profiles.Lookup, info) -> None:
    """Start verification (always, with the gems kernels) and calibration (where allowed and no measured profile
    was found) for this process's device."""
    if _routing.kernels != "gems":
        return
    versions, device = verification.stack(), info.as_dict()
    name = profiles.file_name(device, versions["flag_gems"])
    verification.start(profiles.cache_dir() / "checks" / name, versions, info.label(), _keep_native)
    profile = lookup.profile
    if _routing.calibrate and (profile is None or profile.calibrated):
        known = calibration.points_of(profile.data) if profile is not None else {}
        launch = profiles.launch_now()
        path = profiles.calibrated_dir() / profiles.calibrated_file_name(device, versions["flag_gems"], launch)
        calibration.start(path, device, versions, known, _learned, launch)


def _say(lookup: profiles.Lookup, info) -> None:
    """Log, once, what the lookup found: broken files (an error in strict mode), or that there is no profile."""
    problems = [problem for problem in lookup.problems if problem not in _routing.said]
    if problems and _routing.strict:
        raise profiles.ProfileError("; ".join(problems))
    for problem in problems:
        log.warning("fl_patch: %s; passed over", problem)
    if lookup.profile is None and not lookup.off:
        log.info("fl_patch: %s", no_profile_message(info, lookup.borrowed))


def no_profile_message(info, borrowed: profiles.Profile | None = None) -> str:
    prior_words = "native until measured"
    if borrowed is not None:
        prior_words += (f" (FlagGems while the device is busy where {borrowed.device.get('name')}'s profile, "
                        "borrowed, measured it faster)")
    learning = ("calibrating on this program's calls" if _routing.calibrate
                else "not calibrating (FL_PATCH_CALIBRATE=0, FL_PATCH_PROFILE set or not the gems kernels)")
    return (f"no profile for {info.label()}: {learning}, {prior_words}; `fl-patch tune` measures this device "
            "in full and writes one")


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
           "lifted_families": lifted, "calibrating": _routing.calibrate, "calibration": calibration.describe(),
           "verification": verification.describe()}
    if lookup.borrowed is not None:
        out["borrowed"] = {"path": lookup.borrowed.path, "made_on": lookup.borrowed.device}
    profile = lookup.profile
    if profile is None:
        return {**out, "state": "none", "summary": f"profile: {no_profile_message(info, lookup.borrowed)}"}
    installed = {"torch": installed_version("torch"), "flag_gems": installed_version("flag-gems")}
    stale = profile.stale_reasons(installed)
    made_on = profile.device.get("name")
    where = f"{profile.path} ({profile.source})"
    summary = f"profile: {where}, made on {made_on} {profile.date[:10]}" + (
        f"; stale: {'; '.join(stale)}" if stale else "")
    if not profile.matches(info):
        summary += f"; this device is {info.name}"
    if profile.launch != profiles.launch_now():
        summary += "; " + LAUNCH_WORDS[profile.launch]
    return {**out, "state": "stale" if stale else "in force", "summary": summary, "path": profile.path,
            "source": profile.source, "made_on": profile.device, "versions": profile.versions, "stale": stale,
            "families": _families(profile, lifted)}


LAUNCH_WORDS = {  # a profile measured the other way than this process calls FlagGems
    profiles.PUBLIC: "measured through FlagGems' own functions, called here on the fast launch path (cheaper where "
                     "launch-bound: `fl-patch tune` measures it again)",
    profiles.FAST: "measured on the fast launch path, which is off here (FlagGems' own functions cost more host "
                   "time where launch-bound)"}


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


def learning_lines(info: dict | None = None) -> list[str]:
    """What this device learned, for people (``fl-patch status``, the report): per routing key its calibrated
    decision and how many timed calls it rests on, the sizes still being measured, and every key kept native
    because FlagGems' result differed. `info`: :func:`describe`'s (looked up now when None)."""
    info = describe() if info is None else info
    lines = []
    for key, learned in info.get("calibration", {}).get("keys", {}).items():
        decision = learned.get("decision")
        if decision is not None:
            measured = decision["measured"]
            words = profiles.route_words(decision["route"], decision["min_elements"], decision.get("device_bound"))
            lines.append(f"calibrated {key}: {words} (from {learned['timed_calls']} timed calls, "
                         f"{measured['min_elements']}..{measured['max_elements']} elements)")
        for cell in learned.get("measuring", []):
            lines.append(f"measuring {key}: {cell}")
    for key, checked in info.get("verification", {}).items():
        if "failed" in checked:
            lines.append(f"kept native {key}: {checked['failed']}")
    return lines
