"""Settings: explicit arguments > ``FL_PATCH_*`` environment variables > defaults, as one frozen object.

Every setting is a row of :data:`OPTIONS`: its keyword, its variable, what kind of value it takes, and what a
start-up value fl_patch can't read becomes instead. The seed plugin's ``LIGHTX2V_FL_*`` variables are accepted
as aliases; an ``FL_PATCH_*`` variable wins over its alias when both are set.

Two ways to read them:

- :func:`load` (``apply()``, ``fl-patch status``): every bad value, explicit or from the environment, raises
  :class:`SettingsError` naming the argument or variable, the value and what is accepted.
- :func:`load_at_startup` (automatic activation): a bad environment value is replaced by the option's safe
  value and described in the returned messages, so one typo doesn't switch fl_patch off; with
  ``FL_PATCH_STRICT=1`` it raises instead.

Include/exclude *names* are checked later, against the patch table (``fl_patch.table.Registry.check_names``),
the FL_PATCH_PROFILE file when applying (``fl_patch.device.routing.configure``), FL_PATCH_GEMS_UNUSED names when
torch is imported (``fl_patch.integrations.gems_global``).

One rule for every setting fl_patch can't use, wherever it is found: one message that names the setting and its
value, what is wrong, what is accepted and what fl_patch does instead (``ignored: ...``; an unknown exclude name
can't be ignored safely, so fl_patch stays off). Automatic activation logs it once as a warning naming the
activation path (``fl_patch (sitecustomize): ...``, ``fl_patch (import fl_patch): ...``; ``fl_patch.apply()``:
``fl_patch (fl_patch.apply()): ...``) and carries on; ``fl-patch status`` prints it as ``fl-patch status: ...`` on
stderr, shows the rest, and exits 2; with ``FL_PATCH_STRICT=1`` it is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

from fl_patch.errors import SettingsError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
BOOL_WORDS = ", ".join(w for pair in zip(TRUE_WORDS, FALSE_WORDS, strict=True) for w in pair)
KERNEL_PROVIDERS = ("gems", "reference")
DIST_MODES = ("auto", "flagcx", "native")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
PROFILE_OFF = "off"


@dataclass(frozen=True)
class Settings:
    """What fl_patch does in this process. Build it with :func:`load`; never mutate it."""

    enabled: bool = True  # FL_PATCH: automatic activation (bootstrap and `import fl_patch`)
    auto: bool = True  # FL_PATCH_AUTO: `import fl_patch` applies
    include: tuple[str, ...] = ()  # empty = every target
    exclude: tuple[str, ...] = ()
    kernels: str = "gems"
    kernels_explicit: bool = field(default=False, compare=False)
    gems_global: bool = False
    gems_unused: tuple[str, ...] | None = None  # None = fl_patch's measured default list
    dist: str = "auto"
    strict: bool = False
    log_level: str = "WARNING"
    report_at_exit: bool = False
    profile: str | None = None  # FL_PATCH_PROFILE: None = look it up, "off", or a file / folder path
    calibrate: bool = True  # FL_PATCH_CALIBRATE: learn a device without a measured profile from its own calls
    fast_launch: bool = True  # FL_PATCH_FAST_LAUNCH: FlagGems' hot kernels launched directly once bound (bitwise
    # equal to FlagGems' own calls: tests/gpu/fast_launch_gpu.py; docs/fast-launch.md)


@dataclass(frozen=True)
class Option:
    """One setting. kind: ``bool``, ``choice`` (one of `choices`), ``list`` (comma list of names) or ``path``.
    if_bad: what a start-up value that can't be read becomes, and `if_bad_words` says so in the message."""

    key: str
    variable: str
    kind: str
    choices: tuple[str, ...] = ()
    if_bad: object = None
    if_bad_words: str = ""


OPTIONS = (
    Option("enabled", "FL_PATCH", "bool", if_bad=True, if_bad_words="fl_patch stays enabled"),
    Option("auto", "FL_PATCH_AUTO", "bool", if_bad=True, if_bad_words="import fl_patch still applies"),
    Option("include", "FL_PATCH_INCLUDE", "list"),
    Option("exclude", "FL_PATCH_EXCLUDE", "list"),
    Option("kernels", "FL_PATCH_KERNELS", "choice", KERNEL_PROVIDERS, if_bad="gems",
           if_bad_words="using the default, gems"),
    Option("gems_global", "FL_PATCH_GEMS_GLOBAL", "bool", if_bad=False,
           if_bad_words="the global override stays off"),
    Option("gems_unused", "FL_PATCH_GEMS_UNUSED", "list"),
    Option("dist", "FL_PATCH_DIST", "choice", DIST_MODES, if_bad="native",
           if_bad_words="FlagCX is not made the default backend (as with native)"),
    Option("strict", "FL_PATCH_STRICT", "bool", if_bad=False, if_bad_words="not strict"),
    Option("log_level", "FL_PATCH_LOG_LEVEL", "choice", LOG_LEVELS, if_bad="WARNING", if_bad_words="using WARNING"),
    Option("report_at_exit", "FL_PATCH_REPORT", "bool", if_bad=False, if_bad_words="no report at exit"),
    Option("profile", "FL_PATCH_PROFILE", "path"),
    Option("calibrate", "FL_PATCH_CALIBRATE", "bool", if_bad=True, if_bad_words="calibration stays on"),
    Option("fast_launch", "FL_PATCH_FAST_LAUNCH", "bool", if_bad=True,
           if_bad_words="the fast launch path stays on, its default"),
)
BY_KEY = {option.key: option for option in OPTIONS}

# variable -> (its alias, how to read the alias's value into the variable's meaning)
ALIASES = {
    "FL_PATCH_AUTO": ("LIGHTX2V_FL_AUTO_REGISTER", lambda v: v),
    "FL_PATCH_GEMS_GLOBAL": ("LIGHTX2V_FL_GLOBAL_GEMS", lambda v: v),
    "FL_PATCH_GEMS_UNUSED": ("LIGHTX2V_FL_GEMS_UNUSED", lambda v: v),
    # DISABLE_FLAGCX=1 means native; 0 means "not disabled", i.e. auto.
    "FL_PATCH_DIST": (
        "LIGHTX2V_FL_DISABLE_FLAGCX",
        lambda v: "native" if parse_bool("LIGHTX2V_FL_DISABLE_FLAGCX", v) else "auto",
    ),
}


def parse_bool(name: str, value: str) -> bool:
    """Read a boolean setting; raise SettingsError naming the variable for anything else."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name}={value!r} is not a boolean; accepted: {BOOL_WORDS}")


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Read one of `choices` (case-insensitive); raise SettingsError listing them otherwise."""
    word = value.strip()
    for choice in choices:
        if word.lower() == choice.lower():
            return choice
    raise SettingsError(f"{name}={value!r} is not accepted; accepted: {', '.join(choices)}")


def parse_list(name: str, value) -> tuple[str, ...]:
    """Read a comma list, or a list / tuple / set of names, into a tuple of stripped, non-empty names."""
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        raise SettingsError(f"{name}={value!r} is not a list of names; give a list of strings or a comma string"
                            " such as 'attention,rope'")
    names = []
    for item in items:
        if not isinstance(item, str):
            raise SettingsError(f"{name}: {item!r} is not a name; give strings such as 'attention'")
        if item.strip():
            names.append(item.strip())
    return tuple(names)


def parse_path(name: str, value) -> str | None:
    """``off``, or a path (``~`` expanded); an empty value is None (not set)."""
    if not isinstance(value, (str, os.PathLike)):
        raise SettingsError(f"{name}={value!r} is not accepted; accepted: a file or folder path, or 'off'")
    text = os.fspath(value).strip()
    if not text:
        return None
    return PROFILE_OFF if text.lower() == PROFILE_OFF else os.path.expanduser(text)


def _parse(option: Option, name: str, value):
    """`value` (a string from the environment, or an explicit argument of any type) read as `option`."""
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return parse_bool(name, value)
        raise SettingsError(f"{name}={value!r} is not a boolean; pass True or False")
    if option.kind == "choice":
        if isinstance(value, str):
            return parse_choice(name, value.upper() if option.key == "log_level" else value, option.choices)
        raise SettingsError(f"{name}={value!r} is not accepted; accepted: {', '.join(option.choices)}")
    if option.kind == "list":
        return parse_list(name, value)
    return parse_path(name, value)


def _env_value(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable actually set, its value read in `name`'s meaning), or None when neither is set."""
    if name in env:
        return name, env[name]
    alias = ALIASES.get(name)
    if alias and alias[0] in env:
        return alias[0], alias[1](env[alias[0]])
    return None


def _build(env: Mapping[str, str], explicit: dict, problems: list[str] | None) -> Settings:
    """Settings from `explicit` (None = not given), then `env`, then defaults. A bad explicit value always raises;
    a bad environment value raises when `problems` is None, else is replaced by its option's safe value and
    described in `problems`."""
    unknown = set(explicit) - set(BY_KEY)
    if unknown:
        raise SettingsError(f"unknown setting(s) {sorted(unknown)}; accepted: {', '.join(sorted(BY_KEY))}")
    values = {}
    for option in OPTIONS:
        given = explicit.get(option.key)
        if given is not None:
            values[option.key] = _parse(option, option.key, given)
            continue
        try:
            found = _env_value(env, option.variable)
            if found is None or found[1].strip() == "":
                continue
            values[option.key] = _parse(option, found[0], found[1])
        except SettingsError as exc:
            if problems is None:
                raise
            problems.append(f"{exc}; ignored: {option.if_bad_words}")
            if option.if_bad is not None:
                values[option.key] = option.if_bad
    settings = Settings(**{key: value for key, value in values.items() if value is not None})
    return replace(settings, kernels_explicit="kernels" in values)


def load(env: Mapping[str, str] | None = None, **explicit) -> Settings:
    """Build Settings from explicit keyword arguments, then `env` (default os.environ), then defaults.

    Explicit arguments that are None count as not given. Any bad value, and any unknown keyword, raises
    SettingsError naming it and what is accepted.
    """
    return _build(os.environ if env is None else env, explicit, None)


def load_lenient(env: Mapping[str, str] | None = None) -> tuple[Settings, list[str]]:
    """Settings from the environment, and a message for every value that was replaced by its safe value."""
    problems: list[str] = []
    settings = _build(os.environ if env is None else env, {}, problems)
    return settings, problems


def from_environment(key: str, env: Mapping[str, str] | None = None) -> tuple[object, str | None]:
    """One setting read from the environment alone, as :func:`load_lenient` reads it: its value (the default where
    unset), and the message when the value set was bad and its option's safe value was taken instead (else None).
    For code that needs one setting before or without an apply."""
    option = BY_KEY[key]
    found = _env_value(os.environ if env is None else env, option.variable)
    if found is None or found[1].strip() == "":
        return getattr(Settings(), key), None
    try:
        return _parse(option, found[0], found[1]), None
    except SettingsError as exc:
        return option.if_bad, f"{exc}; ignored: {option.if_bad_words}"


def load_at_startup(env: Mapping[str, str] | None = None) -> tuple[Settings, list[str]]:
    """Settings from the environment for automatic activation: :func:`load_lenient`, except that with
    FL_PATCH_STRICT=1 a bad value raises SettingsError."""
    env = os.environ if env is None else env
    if strict_from_env(env):
        return load(env), []
    return load_lenient(env)


def strict_from_env(env: Mapping[str, str] | None = None) -> bool:
    """FL_PATCH_STRICT read on its own (False when unset or unreadable), for code that runs before load()."""
    env = os.environ if env is None else env
    try:
        return parse_bool("FL_PATCH_STRICT", env.get("FL_PATCH_STRICT", "0"))
    except SettingsError:
        return False
