"""Settings: explicit arguments > ``FL_PATCH_*`` environment variables > defaults, as one frozen object.

The seed plugin's ``LIGHTX2V_FL_*`` variables are accepted as aliases; an ``FL_PATCH_*`` variable wins
over its alias when both are set. Every bad value raises :class:`SettingsError` naming the variable (or
argument), the value and what is accepted. Include/exclude *names* are checked later, against the patch
table (see :func:`fl_patch.table.Registry.check_names`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

from fl_patch.errors import SettingsError

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")
KERNEL_PROVIDERS = ("gems", "reference")
DIST_MODES = ("auto", "flagcx", "native")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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


def parse_bool(name: str, value: str) -> bool:
    """Read a boolean setting; raise SettingsError naming the variable for anything else."""
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    accepted = ", ".join(w for pair in zip(TRUE_WORDS, FALSE_WORDS, strict=True) for w in pair)
    raise SettingsError(f"{name}={value!r} is not a boolean; accepted: {accepted}")


def parse_choice(name: str, value: str, choices: tuple[str, ...]) -> str:
    """Read one of `choices` (case-insensitive); raise SettingsError listing them otherwise."""
    word = value.strip()
    for choice in choices:
        if word.lower() == choice.lower():
            return choice
    raise SettingsError(f"{name}={value!r} is not accepted; accepted: {', '.join(choices)}")


def parse_list(name: str, value: str | Iterable[str]) -> tuple[str, ...]:
    """Read a comma list (or an iterable of names) into a tuple of stripped, non-empty names."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = []
    for item in items:
        if not isinstance(item, str):
            raise SettingsError(f"{name}: {item!r} is not a name; give strings such as 'attention'")
        if item.strip():
            names.append(item.strip())
    return tuple(names)


def _env_value(env: Mapping[str, str], name: str) -> str | None:
    """The value of `name`, or of its LIGHTX2V_FL_* alias translated to this variable's meaning."""
    if name in env:
        return env[name]
    alias = ALIASES.get(name)
    if alias and alias[0] in env:
        return alias[1](env[alias[0]])
    return None


def load(env: Mapping[str, str] | None = None, **explicit) -> Settings:
    """Build Settings from explicit keyword arguments, then `env` (default os.environ), then defaults.

    Explicit arguments that are None count as not given. Unknown keywords raise SettingsError listing the
    accepted ones.
    """
    env = os.environ if env is None else env
    fields = {f for f in Settings.__dataclass_fields__ if f != "kernels_explicit"}
    unknown = set(explicit) - fields
    if unknown:
        raise SettingsError(f"unknown setting(s) {sorted(unknown)}; accepted: {', '.join(sorted(fields))}")
    given = {k: v for k, v in explicit.items() if v is not None}

    def pick(key: str, var: str, parse):
        if key in given:
            value = given[key]
            return parse(key, value) if isinstance(value, str) else value
        raw = _env_value(env, var)
        return None if raw is None or raw.strip() == "" else parse(var, raw)

    values = {
        "enabled": pick("enabled", "FL_PATCH", parse_bool),
        "auto": pick("auto", "FL_PATCH_AUTO", parse_bool),
        "include": pick("include", "FL_PATCH_INCLUDE", parse_list),
        "exclude": pick("exclude", "FL_PATCH_EXCLUDE", parse_list),
        "kernels": pick("kernels", "FL_PATCH_KERNELS", lambda n, v: parse_choice(n, v, KERNEL_PROVIDERS)),
        "gems_global": pick("gems_global", "FL_PATCH_GEMS_GLOBAL", parse_bool),
        "gems_unused": pick("gems_unused", "FL_PATCH_GEMS_UNUSED", parse_list),
        "dist": pick("dist", "FL_PATCH_DIST", lambda n, v: parse_choice(n, v, DIST_MODES)),
        "strict": pick("strict", "FL_PATCH_STRICT", parse_bool),
        "log_level": pick("log_level", "FL_PATCH_LOG_LEVEL", lambda n, v: parse_choice(n, v.upper(), LOG_LEVELS)),
        "report_at_exit": pick("report_at_exit", "FL_PATCH_REPORT", parse_bool),
    }
    for key in ("include", "exclude", "gems_unused"):
        if key in given and values[key] is not None:
            values[key] = parse_list(key, values[key])
    for key in ("enabled", "auto", "gems_global", "strict", "report_at_exit"):
        if values[key] is not None and not isinstance(values[key], bool):
            raise SettingsError(f"{key}={values[key]!r} is not a boolean; pass True or False")
    settings = Settings(**{k: v for k, v in values.items() if v is not None})
    return replace(settings, kernels_explicit=values["kernels"] is not None)


def strict_from_env(env: Mapping[str, str] | None = None) -> bool:
    """FL_PATCH_STRICT read on its own (False when unset or unreadable), for code that runs before load()."""
    env = os.environ if env is None else env
    try:
        return parse_bool("FL_PATCH_STRICT", env.get("FL_PATCH_STRICT", "0"))
    except SettingsError:
        return False
