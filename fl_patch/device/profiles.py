"""Device profiles: what ``fl-patch tune`` measured on one device, kept as JSON data, read by the routing.

A profile says, per kernel family (and optionally per form of it), whether calls on that device go to FlagGems
(``"route": "gems"``, at or above ``min_elements`` elements of the call's deciding tensor, 0 = every size) or
stay on the native path (``"route": "native"``), with a ``why`` for people and the measurements it came from.
That decision holds when nothing else keeps the device busy (launch-bound); an optional ``device_bound`` decision
of the same shape holds while the host is ahead of the device, and an optional ``compiled`` one under
torch.compile, where the other side is inductor's code for the native path (see :mod:`fl_patch.device.routing`).
Nothing in a profile is executed: it is parsed as JSON and checked field by field.

Where profiles come from, first match wins: ``FL_PATCH_PROFILE`` (a file, a folder of profiles, or ``off``: no
performance routing at all), then the user's cache (``$XDG_CACHE_HOME/fl_patch/profiles``, ``~/.cache`` when
unset; ``fl-patch tune`` writes there), then the profiles shipped in this package (``fl_patch/profiles/``), then
the profile calibrated on this device's own calls (``<cache>/calibrated/``, :mod:`fl_patch.device.calibration`). A
file or folder named by ``FL_PATCH_PROFILE`` is used whatever device it was made on (the status says so when it
differs); in the cache and the package only a profile of this device's vendor and name counts. A profile made with
other torch or flag_gems versions is used and flagged as stale. ``launch`` says how FlagGems was called while it
was measured: ``"fast"`` (the fast launch path, :mod:`fl_patch.kernels.fast_launch`) or ``"public"`` (FlagGems' own
functions; a profile without the field). A measured file of the other way than this process calls FlagGems is
still used (the status says so: FlagGems' host cost differs, and with it the launch-bound thresholds), one of the
same way preferred; a calibrated one counts only for its own way (each way has its file). Where none is found, the
measured profile of another device of the same vendor, type and architecture (capability) is *borrowed* for the
prior of :func:`fl_patch.device.routing.prior`: its device-bound decisions only (device time is a fact of the
architecture; host cost is not).

The format (``schema`` 1)::

    {"schema": 1, "kind": "fl_patch.profile",
     "device": {"vendor": "nvidia", "name": "NVIDIA H200", "type": "cuda", "capability": "9.0"},
     "versions": {"fl_patch": "0.1.0", "torch": "2.11.0+cu130", "triton": "3.6.0", "flag_gems": "5.0.2"},
     "date": "2026-12-03T10:00:00+00:00", "launch": "fast",
     "families": {"rms_norm": {"route": "gems", "min_elements": 4194304, "why": "...",
                               "device_bound": {"route": "gems", "min_elements": 1048576, "why": "..."},
                               "compiled": {"route": "native", "min_elements": 0, "why": "..."},
                               "forms": {"gemma": {"route": "gems", "min_elements": 0, "why": "..."}},
                               "measurements": [...]},
                  "linear": {"route": "native", "why": "..."}}}
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from fl_patch import output_path
from fl_patch.errors import FlPatchError

SCHEMA = 1
KIND = "fl_patch.profile"
ROUTES = ("gems", "native")
OFF = "off"
FAST, PUBLIC = "fast", "public"  # how FlagGems was called while a profile was measured (its "launch" field)
LAUNCHES = (FAST, PUBLIC)

# family -> its forms: the routing keys "<family>.<form>" a profile speaks of (each a form of fl_patch.kernels).
FAMILY_FORMS = {
    "attention": ("sdpa", "varlen"),
    "rms_norm": ("hf", "gemma", "fp32", "gated", "torch"),
    "rope": ("hf", "interleaved"),
    "linear": ("linear", "in_out"),
    "swiglu": ("swiglu",),
    "layer_norm": ("layer_norm",),
    "cross_entropy": ("loss",),
}
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "profiles"  # fl_patch/profiles/: package data


class ProfileError(FlPatchError):
    """A profile file that can't be used; the message names the file and what is wrong with it."""


@dataclass(frozen=True)
class Decision:
    """How calls of one routing key go: ``route`` "gems" (at or above ``min_elements``) or "native", measured with
    nothing else keeping the device busy (launch-bound); ``device_bound``: the decision measured with the host
    ahead of the device, where the profile has one; ``compiled``: the decision measured under torch.compile, FlagGems'
    custom op against inductor's code for the native path (``fl-patch tune --compiled``), where it has one
    (:mod:`fl_patch.device.tuning`)."""

    route: str
    min_elements: int = 0
    why: str = ""
    device_bound: Decision | None = None
    compiled: Decision | None = None


@dataclass
class Profile:
    """A parsed profile. ``source``: where it was found (``FL_PATCH_PROFILE``, ``user cache``, ``shipped``)."""

    path: str
    source: str
    device: dict
    versions: dict
    date: str
    families: dict[str, Decision]
    forms: dict[str, Decision]  # "<family>.<form>" -> its own decision, where the profile gives one
    data: dict = field(repr=False, default_factory=dict)

    def decision(self, key: str) -> Decision:
        """The decision for routing key ``family.form``: the form's own, else the family's."""
        if key in self.forms:
            return self.forms[key]
        return self.family_decision(key.split(".", 1)[0])

    def family_decision(self, family: str) -> Decision:
        """The family's own decision, or gems everywhere when the profile did not measure it."""
        return self.families.get(family, Decision("gems", 0, "not measured in this profile"))

    @property
    def launch(self) -> str:
        """How FlagGems was called while this profile was measured: FAST or PUBLIC (older files: PUBLIC)."""
        return self.data.get("launch", PUBLIC)

    @property
    def calibrated(self) -> bool:
        """Whether this profile was calibrated on a program's own calls (not measured by ``fl-patch tune``)."""
        return "calibrated" in self.data

    def matches(self, device) -> bool:
        """Whether this profile was made on a device of this vendor and name."""
        vendor = self.device.get("vendor")
        same_vendor = vendor is None or device.vendor is None or vendor == device.vendor
        return same_vendor and _same_name(self.device.get("name", ""), device.name)

    def stale_reasons(self, installed: dict[str, str | None]) -> list[str]:
        """Why the profile may no longer describe this install: torch or flag_gems of another release."""
        from fl_patch.versions import release

        reasons = []
        for name in ("torch", "flag_gems"):
            made, have = self.versions.get(name), installed.get(name)
            if made and have and release(made) != release(have):
                reasons.append(f"made with {name} {made}, this process has {have}")
        return reasons


def _same_name(a: str, b: str) -> bool:
    return " ".join(a.lower().split()) == " ".join(b.lower().split())


def route_words(route: str, min_elements: int, device_bound: dict | None = None, compiled: dict | None = None,
                compiled_shown: bool = False) -> str:
    """A decision in a few words: ``native``, ``gems`` or ``gems >= N``, then ``; device-bound ...`` where the
    `device_bound` decision (a dict with route and min_elements) differs, then ``; compiled ...`` where there is a
    `compiled` decision (or, with `compiled_shown`, that there is none: the originals under torch.compile)."""
    words = "native" if route == "native" else f"gems >= {min_elements}" if min_elements else "gems"
    if device_bound is not None:
        bound = (device_bound["route"], device_bound.get("min_elements", 0))
        if bound != (route, min_elements):
            words += f"; device-bound {route_words(*bound)}"
    if compiled is not None:
        words += f"; compiled {route_words(compiled['route'], compiled.get('min_elements', 0))}"
    elif compiled_shown:
        words += "; compiled: originals (not measured: fl-patch tune --compiled)"
    return words


def as_dict(decision: Decision) -> dict:
    """A decision as JSON-ready data: route, min_elements, why, and device_bound where it has one."""
    out = {"route": decision.route, "min_elements": decision.min_elements, "why": decision.why}
    if decision.device_bound is not None:
        out["device_bound"] = as_dict(decision.device_bound)
    if decision.compiled is not None:
        out["compiled"] = as_dict(decision.compiled)
    return out


def cache_dir(env=None) -> Path:
    """The user's profile folder: ``$XDG_CACHE_HOME/fl_patch/profiles``, ``~/.cache/fl_patch/profiles`` if unset."""
    env = os.environ if env is None else env
    base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fl_patch" / "profiles"


def file_name(device: dict, flag_gems_version: str | None, suffix: str = "") -> str:
    """``nvidia-nvidia-h200-flag_gems-5.0.2.json``: vendor, device name and flag_gems version, slugged (`suffix`
    before ``.json``)."""
    parts = [device.get("vendor") or "unknown", device.get("name") or device.get("type") or "device"]
    stem = "-".join(_slug(part) for part in parts)
    return f"{stem}-flag_gems-{_slug(flag_gems_version or 'none')}{suffix}.json"


def launch_now() -> str:
    """How this process calls FlagGems' hot functions: FAST where the fast launch path is on, else PUBLIC."""
    from fl_patch.kernels import gems

    return FAST if gems.fast_launch_enabled() else PUBLIC


def calibrated_file_name(device: dict, flag_gems_version: str | None, launch: str) -> str:
    """The calibrated profile's file: :func:`file_name`, ``-fast`` before ``.json`` for the fast launch path (what
    one way of calling FlagGems learned says nothing of the other's launch-bound cost)."""
    return file_name(device, flag_gems_version, "-fast" if launch == FAST else "")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", text.lower()).strip("-") or "x"


def read(path: str | os.PathLike, source: str) -> Profile:
    """Parse and check one profile file; ProfileError naming the file and the problem otherwise."""
    path = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ProfileError(f"profile {path}: no such file") from None
    except OSError as exc:
        raise ProfileError(f"profile {path}: can't be read ({exc.strerror or exc})") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ProfileError(f"profile {path}: not JSON ({exc})") from None
    return parse(data, path, source)


def parse(data, path: str, source: str) -> Profile:
    """A Profile from decoded JSON `data`, every field checked; ProfileError naming `path` and the field."""
    def fail(problem: str):
        raise ProfileError(f"profile {path}: {problem}")

    if not isinstance(data, dict):
        fail(f"expected a JSON object, found {type(data).__name__}")
    if data.get("schema") != SCHEMA:
        fail(f"unknown schema {data.get('schema')!r}; this fl_patch reads schema {SCHEMA}")
    device, versions, families = data.get("device"), data.get("versions", {}), data.get("families")
    if not isinstance(device, dict) or not isinstance(device.get("name"), str):
        fail("'device' must be an object with a 'name' string")
    if not isinstance(versions, dict):
        fail("'versions' must be an object")
    if not isinstance(families, dict):
        fail("'families' must be an object mapping family names to decisions")
    if data.get("launch", PUBLIC) not in LAUNCHES:
        fail(f"unknown launch {data.get('launch')!r}; accepted: {', '.join(LAUNCHES)}")
    decisions, forms = {}, {}
    for family, entry in families.items():
        if family not in FAMILY_FORMS:
            fail(f"unknown family {family!r}; accepted: {', '.join(FAMILY_FORMS)}")
        decisions[family] = _decision(entry, f"families.{family}", fail)
        own_forms = entry.get("forms", {})
        if not isinstance(own_forms, dict):
            fail(f"families.{family}.forms must be an object")
        for form, form_entry in own_forms.items():
            if form not in FAMILY_FORMS[family]:
                fail(f"families.{family}.forms: unknown form {form!r}; accepted: {', '.join(FAMILY_FORMS[family])}")
            forms[f"{family}.{form}"] = _decision(form_entry, f"families.{family}.forms.{form}", fail)
    return Profile(path=path, source=source, device=device, versions={k: str(v) for k, v in versions.items()},
                   date=str(data.get("date", "")), families=decisions, forms=forms, data=data)


def decision_from(entry: dict, where: str) -> Decision:
    """A Decision from one decision's JSON-ready data (as :mod:`fl_patch.device.tuning` makes them); ProfileError naming
    `where` otherwise."""
    def fail(problem: str):
        raise ProfileError(problem)

    return _decision(entry, where, fail)


def _decision(entry, where: str, fail, regimes: bool = True) -> Decision:
    if not isinstance(entry, dict):
        fail(f"{where} must be an object")
    route = entry.get("route")
    if route not in ROUTES:
        fail(f"{where}.route is {route!r}; accepted: {', '.join(ROUTES)}")
    minimum = entry.get("min_elements", 0)
    if not isinstance(minimum, int) or isinstance(minimum, bool) or minimum < 0:
        fail(f"{where}.min_elements is {minimum!r}; accepted: an integer >= 0")
    why = entry.get("why", "")
    bound = compiled = None
    if regimes and entry.get("device_bound") is not None:
        bound = _decision(entry["device_bound"], f"{where}.device_bound", fail, regimes=False)
    if regimes and entry.get("compiled") is not None:
        compiled = _decision(entry["compiled"], f"{where}.compiled", fail, regimes=False)
    return Decision(route, minimum if route == "gems" else 0, why if isinstance(why, str) else str(why), bound,
                    compiled)


@dataclass
class Lookup:
    """The outcome of looking for this device's profile: the profile (or None), the places searched, and the
    files that were found broken (each a message naming the file)."""

    profile: Profile | None
    searched: list[str]
    problems: list[str]
    setting: str | None  # FL_PATCH_PROFILE as given (None: unset)
    borrowed: Profile | None = None  # with no profile: one of the same vendor, type and architecture

    @property
    def off(self) -> bool:
        return self.setting is not None and self.setting.lower() == OFF


def find(device, setting: str | None, env=None) -> Lookup:
    """This device's profile by the lookup order (module docstring). `setting` is FL_PATCH_PROFILE (None: unset).

    A FL_PATCH_PROFILE file that is broken gives no profile (its problem is listed); broken files in the folders
    searched are listed and passed over.
    """
    if setting is not None and setting.lower() == OFF:
        return Lookup(None, [], [], setting)
    problems: list[str] = []
    if setting is not None:
        chosen = Path(os.path.expanduser(setting))
        if not chosen.is_dir():
            try:
                return Lookup(read(chosen, "FL_PATCH_PROFILE"), [str(chosen)], [], setting)
            except ProfileError as exc:
                return Lookup(None, [str(chosen)], [str(exc)], setting)
        places = [(chosen, "FL_PATCH_PROFILE")]
    else:
        places = [(cache_dir(env), "user cache"), (SHIPPED_DIR, "shipped"), (calibrated_dir(env), "calibrated")]
    for folder, source in places:
        found = _best_in(folder, source, device, problems)
        if found is not None:
            return Lookup(found, [str(p) for p, _ in places], problems, setting)
    borrowed = None if setting is not None else _borrowable(places[:2], device)
    return Lookup(None, [str(p) for p, _ in places], problems, setting, borrowed)


def calibrated_dir(env=None) -> Path:
    """Where calibrated profiles live: ``<cache>/calibrated``."""
    return cache_dir(env) / "calibrated"


def _borrowable(places: list[tuple[Path, str]], device) -> Profile | None:
    """The newest measured profile of another device of this vendor, type and capability, or None."""
    if device.vendor is None or device.capability is None:
        return None
    fitting = []
    for folder, source in places:
        with contextlib.suppress(OSError):
            for path in sorted(folder.glob("*.json")):
                with contextlib.suppress(ProfileError):
                    profile = read(path, source)
                    made = profile.device
                    if (made.get("vendor") == device.vendor and made.get("type") == device.type
                            and str(made.get("capability")) == device.capability):
                        fitting.append(profile)
    return max(fitting, key=lambda p: p.date) if fitting else None


def _best_in(folder: Path, source: str, device, problems: list[str]) -> Profile | None:
    """The profile in `folder` made on this device, preferring this flag_gems release, then this process's way of
    calling FlagGems (:func:`launch_now`), then the newest. A calibrated profile of the other way does not count."""
    from fl_patch.versions import installed_version

    try:
        paths = sorted(folder.glob("*.json"))
    except OSError:
        return None
    fitting = []
    for path in paths:
        try:
            profile = read(path, source)
        except ProfileError as exc:
            problems.append(str(exc))
            continue
        if profile.matches(device):
            fitting.append(profile)
    launch = launch_now()
    fitting = [profile for profile in fitting if not (profile.calibrated and profile.launch != launch)]
    if not fitting:
        return None
    gems_version = installed_version("flag-gems")
    return max(fitting, key=lambda p: (p.versions.get("flag_gems") == gems_version, p.launch == launch, p.date))


def write(data: dict, path: str | os.PathLike) -> Path:
    """Write a profile (checked by :func:`parse` first) as indented JSON; returns the path."""
    path = Path(path)
    parse(data, str(path), "new")
    output_path.write_json(data, path)
    return path

