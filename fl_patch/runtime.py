"""The runtime: apply() and revert(), and the context every factory patches through.

One process-wide state, guarded by one re-entrant lock: the settings in force, the registry, the selected
rows, the ledger of changes and the report records. ``apply`` selects rows and asks :mod:`fl_patch.hooks`
to call :func:`_on_import` for each row's module; that runs the row's factory once per (row, module).
``revert`` undoes the ledger newest first and stops the hooks from doing anything until the next apply.

Factories run outside the lock. A factory may import modules, and a thread importing one of those holds
that module's import lock while its own import hook waits for ours: holding ours across a factory would
deadlock the two threads. So work is claimed under the lock with the current *generation* (every apply and
revert starts a new one), each change a factory makes takes the lock and is refused once the generation
has moved on, and a factory's report records are kept only if it hasn't.
"""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

from fl_patch import failures, hooks, ledger, reporting, table
from fl_patch.device import routing
from fl_patch import settings as settings_mod
from fl_patch.errors import PatchError, SettingsError

log = logging.getLogger("fl_patch")

PROVIDER_NAMES = {"gems": "flag_gems", "reference": "torch reference"}


class Skip(Exception):
    """Raised by a factory when its row can't apply here; the message is the reason."""


EXPLICIT_SOURCE = "fl_patch.apply()"


class _State:
    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.active = False
        self.settings: settings_mod.Settings | None = None
        self.registry: table.Registry | None = None
        self.selected: list[table.Target] = []
        self.excluded: list[table.Target] = []
        self.ledger = ledger.Ledger()
        self.records: list[reporting.Record] = []
        self.done: set[tuple[str, str]] = set()  # (row name, module name) already handled
        self.generation = 0  # bumped by apply and revert; a factory's changes count only in its own
        self.atexit_registered = False
        self.kernel_errors: set[tuple[str, str]] = set()  # (place, exception type) already logged
        self.source = EXPLICIT_SOURCE  # the activation path of the last apply, which messages name
        self.say = True  # whether setting problems are logged (fl-patch status prints them itself)
        self.problems: list[str] = []  # the setting problems of the last apply (the rule in fl_patch.settings)


_state = _State()


class PatchContext:
    """What a factory gets besides the module: the settings, the kernel provider, and the only sanctioned
    ways to change things (each recorded in the ledger and the report)."""

    def __init__(self, target: table.Target, module: Any, settings: settings_mod.Settings, provider: str | None,
                 generation: int = 0):
        self.target = target
        self.module = module
        self.settings = settings
        self.provider = provider  # "gems" | "reference" | None for rows that need no kernel
        self.records: list[reporting.Record] = []
        self.generation = generation

    def record(self, where: str, variant: str | None = None) -> reporting.Record:
        """A new report record for one place this row changes (or skips). Pass it to setattr/setitem/skip."""
        rec = reporting.Record(
            family=self.target.family,
            target=self.target.name,
            where=where,
            variant=variant or self.target.variant,
            provider=PROVIDER_NAMES.get(self.provider, "original"),
        )
        self.records.append(rec)
        return rec

    def setattr(self, rec: reporting.Record, owner: Any, name: str, replacement: Any) -> None:
        """Set ``owner.name = replacement`` through the ledger and mark `rec` patched."""
        with _state.lock:
            self._still_current()
            _state.ledger.setattr(owner, name, replacement)
        rec.state = "patched"

    def setitem(self, rec: reporting.Record, mapping: Any, key: Any, replacement: Any) -> None:
        """Set ``mapping[key] = replacement`` through the ledger and mark `rec` patched."""
        with _state.lock:
            self._still_current()
            _state.ledger.setitem(mapping, key, replacement)
        rec.state = "patched"

    def on_revert(self, rec: reporting.Record, undo: Callable[[], None]) -> None:
        """Record a change made by other means (`undo` reverses it) and mark `rec` patched.

        If fl_patch was reverted or re-applied while this factory ran, `undo` runs at once and Skip is raised."""
        with _state.lock:
            if _state.generation == self.generation:
                _state.ledger.on_revert(undo, rec.where)
                rec.state = "patched"
                return
        undo()
        self._still_current()

    def bad_setting(self, message: str) -> None:
        """Say a setting this row can't use (see :func:`bad_setting`); raise PatchError instead in strict mode."""
        if self.settings.strict:
            raise PatchError(message)
        bad_setting(message)

    def skip(self, rec: reporting.Record, reason: str) -> None:
        """Mark `rec` skipped: this place stays original, for `reason`."""
        rec.state, rec.reason, rec.provider = "skipped", reason, "original"

    def _still_current(self) -> None:
        if _state.generation != self.generation:
            raise Skip("fl_patch was reverted or re-applied while this row was patching")


def _resolve_provider(target: table.Target, s: settings_mod.Settings) -> str:
    """The kernel provider for a kernel row, or raise Skip saying why none can be used."""
    if s.kernels == "reference":
        return "reference"
    from fl_patch.kernels import gems

    reason = gems.installed()
    if reason is not None:
        if s.kernels_explicit and s.strict:
            raise PatchError(f"FL_PATCH_KERNELS=gems but FlagGems can't be used: {reason}")
        raise Skip(f"FlagGems unavailable: {reason}")
    return "gems"


def _unmet_requirement(target: table.Target) -> str | None:
    """The first of the row's requirements that the installed distributions don't meet, or None."""
    from fl_patch import versions

    for requirement in target.requires:
        problem = versions.check(requirement)
        if problem:
            return problem
    return None


def _run_row(target: table.Target, module: Any, s: settings_mod.Settings, generation: int) -> None:
    """Run one row's factory on one module (without the lock), recording the outcome; raise only in strict
    mode. `s` and `generation` are those in force when the work was claimed."""
    where = getattr(module, "__name__", str(module))
    ctx: PatchContext | None = None
    records: list[reporting.Record] = []
    try:
        problem = _unmet_requirement(target)
        if problem:
            raise Skip(problem)
        provider, no_provider = None, ""
        if target.family in table.KERNEL_FAMILIES and not target.kernel_free:
            try:
                provider = _resolve_provider(target, s)
            except Skip as why:
                if not target.runs_without_kernels:
                    raise
                no_provider = str(why)
        ctx = PatchContext(target, module, s, provider, generation)
        target.load_factory()(module, ctx)
        for rec in ctx.records:
            if no_provider and not rec.reason:
                rec.reason = no_provider
        records = ctx.records
    except Skip as why:
        records = (ctx.records if ctx is not None else []) + [
            reporting.Record(target.family, target.name, where, state="skipped", reason=str(why))]
    except Exception as exc:
        reason = f"{type(exc).__name__}: {exc}"
        records = (ctx.records if ctx is not None else []) + [
            reporting.Record(target.family, target.name, where, state="failed", reason=reason)]
        log.warning("fl_patch: patching %s for %s failed: %s", target.name, where, reason)
        if s.strict:
            raise PatchError(f"patching {target.name} for {where} failed: {reason}") from exc
    finally:
        with _state.lock:
            if _state.generation == generation:
                _state.records.extend(records)
        for rec in records:
            log.debug("fl_patch: %s %s: %s (%s)%s", target.name, rec.state, rec.where, rec.provider,
                      f": {rec.reason}" if rec.reason else "")


def _on_import(module: Any) -> None:
    """Hook callback: run every selected row whose module pattern matches this module, once each."""
    name = module.__name__
    with _state.lock:  # claim the work; do it after releasing the lock (see the module docstring)
        if not _state.active:
            return
        settings, generation = _state.settings, _state.generation
        patterns, rows = [], []
        for target in _state.selected:
            if target.is_pattern and hooks.top_package(target.module) == name:
                patterns.append(target)
            if hooks.matches(name, target.module) and (target.name, name) not in _state.done:
                _state.done.add((target.name, name))
                rows.append(target)
    for target in patterns:
        _watch_pattern(target)
    for target in rows:
        _run_row(target, module, settings, generation)


def _watch_pattern(target: table.Target) -> None:
    """Hook every module the pattern row matches (found on disk, none imported here)."""
    for module_name in hooks.expand(target.module):
        hooks.watch(module_name, _on_import)


def apply(settings: settings_mod.Settings | None = None, extra_targets: tuple[table.Target, ...] = (),
          lenient: bool = False, source: str = EXPLICIT_SOURCE, said: tuple[str, ...] = (), say: bool = True
          ) -> list[str]:
    """Patch according to `settings` (default: from the environment).

    Modules already imported are patched now; the others when they are imported. Calling apply again
    with equal settings does nothing; with different settings it reverts first, then applies the new ones.
    Raises SettingsError for bad settings, unknown include/exclude names, or an include name that the exclude
    list removes entirely. With `lenient` (automatic activation) unknown include names and such clashes are
    dropped instead (exclude wins), and the returned list says what was ignored; an unknown exclude name still
    raises (patching what was meant to be excluded could change the user's results). Whatever else raises while
    applying (the hooks can't be set, or in strict mode a row fails on a module already imported) undoes every
    change this apply made before it propagates: fl_patch is then not active, and the report is empty.

    Settings it can't use are said by :func:`bad_setting` (the rule in :mod:`fl_patch.settings`), naming `source`,
    the activation path; `said` adds the ones found before (values that could not be read); `say` False keeps
    them out of the log (``fl-patch status`` prints them). The returned list holds those said while applying,
    including by rows run on modules already imported.
    """
    from fl_patch.kernels import gems

    s = settings if settings is not None else settings_mod.load()
    with _state.lock:
        if _state.active and s == _state.settings and not extra_targets:
            return []
        registry = table.build_registry(extra_targets)
        include, problems = _checked_names(registry, s, lenient)
        if _state.active:
            revert()
        _state.source, _state.say, _state.problems = source, say, []
        _show_log(s.log_level)
        problems += routing.configure(s, registry)
        gems.configure_fast_launch(s.fast_launch)
        _state.settings, _state.registry = s, registry
        _state.selected, _state.excluded = registry.select(include, s.exclude)
        _state.records, _state.done = [], set()
        _state.active = True
        _state.generation += 1
        if s.report_at_exit and not _state.atexit_registered:
            atexit.register(_print_report_at_exit)
            _state.atexit_registered = True
        watched = []
        for target in _state.selected:
            name = hooks.top_package(target.module) if target.is_pattern else target.module
            if name not in watched:
                watched.append(name)
    for message in (*said, *problems):
        bad_setting(message)
    try:
        for name in watched:  # modules already imported are patched now, by this thread, outside the lock
            hooks.watch(name, _on_import)
    except BaseException:
        with _state.lock:  # all or nothing: what was patched is undone, and nothing is selected or active
            revert()
            _state.selected, _state.excluded, _state.records = [], [], []
        raise
    with _state.lock:
        return list(_state.problems)


def bad_setting(message: str) -> None:
    """Say a setting fl_patch can't use, once per apply: `message` names the setting, what is accepted and what is
    done instead (the rule in :mod:`fl_patch.settings`). Logged as a warning naming the activation path
    (``fl_patch (sitecustomize): ...``), and kept for ``fl-patch status``."""
    with _state.lock:
        if message in _state.problems:
            return
        _state.problems.append(message)
        source, say = _state.source, _state.say
    if say:
        log.warning("fl_patch (%s): %s", source, message)


class _StderrWhenUnhandled(logging.Handler):
    """Writes fl_patch's log records to stderr (as it is when the record comes) when no other handler on the way to
    the root logger takes them: where the application configured logging, its handlers show fl_patch's records,
    once; where it didn't, Python would show warnings only (its last-resort handler), and FL_PATCH_LOG_LEVEL=INFO
    or DEBUG would show nothing."""

    def emit(self, record: logging.LogRecord) -> None:
        if self._taken_elsewhere(record):
            return
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def _taken_elsewhere(self, record: logging.LogRecord) -> bool:
        logger: logging.Logger | None = log
        while logger is not None:
            if any(handler is not self and record.levelno >= handler.level for handler in logger.handlers):
                return True
            logger = logger.parent if logger.propagate else None
        return False


def _show_log(level: str) -> None:
    """Set fl_patch's logger to `level` (FL_PATCH_LOG_LEVEL) and make sure its records reach stderr once."""
    log.setLevel(level)
    if not any(isinstance(handler, _StderrWhenUnhandled) for handler in log.handlers):
        log.addHandler(_StderrWhenUnhandled())


INCLUDE_SETTING = "FL_PATCH_INCLUDE / include"
EXCLUDE_SETTING = "FL_PATCH_EXCLUDE / exclude"


def _checked_names(registry: table.Registry, s: settings_mod.Settings, lenient: bool) -> tuple[tuple, list[str]]:
    """The include list to use and what was ignored of it (see :func:`apply`)."""
    registry.check_names(EXCLUDE_SETTING, s.exclude)
    problems = []
    include = s.include
    unknown = registry.unknown_names(include)
    if unknown and not lenient:
        registry.check_names(INCLUDE_SETTING, unknown)
    for name in unknown:
        problems.append(registry.unknown_name_message(INCLUDE_SETTING, name) + " Ignored.")
    include = tuple(name for name in include if name not in unknown)
    if s.include and not include:
        raise SettingsError(f"{INCLUDE_SETTING}: no name is known ({', '.join(s.include)}); an empty include list "
                            "would patch everything, so nothing is patched")
    for name in registry.fully_excluded(include, s.exclude):
        message = (f"{name!r} is both included ({INCLUDE_SETTING}) and excluded ({EXCLUDE_SETTING}), which selects"
                   " none of it")
        if not lenient:
            raise SettingsError(message + "; name it in one of the two lists")
        problems.append(message + ": exclude wins, it is not patched")
    return include, problems


def revert() -> list[Exception]:
    """Undo every change newest first; afterwards every touched attribute is its original object again.

    Returns the errors of undo steps that failed (all steps are attempted). Idempotent.
    """
    with _state.lock:
        _state.generation += 1
        errors = _state.ledger.revert()
        for record in _state.records:
            if record.state == "patched":
                record.state = "reverted"
        _state.active = False
        _state.done = set()
        for exc in errors:
            log.warning("fl_patch: revert step failed: %s", exc)
        return errors


def is_active() -> bool:
    """Whether an apply succeeded and has not been reverted since (its rows patched, or waiting for their
    modules). False after an activation that failed."""
    return _state.active


def current_settings() -> settings_mod.Settings | None:
    return _state.settings


def records() -> list[dict]:
    """Report records: one per place handled, plus one per selected row whose module has not been
    imported (state ``waiting``) and one per excluded row."""
    with _state.lock:
        out = [r.as_dict() for r in _state.records]
        unusable = _gems_unusable()
        if unusable:
            for record in out:
                if record["provider"] == PROVIDER_NAMES["gems"] and record["state"] == "patched":
                    record["state"], record["reason"] = "fallback", unusable
        handled = {r.target for r in _state.records}
        for target in _state.selected:
            if target.name not in handled:
                out.append(reporting.Record(target.family, target.name, target.module, state="waiting",
                                         reason=f"{target.module} not imported yet").as_dict())
        for target in _state.excluded:
            reason = table.Registry.why_not_selected(target, _state.settings.include, _state.settings.exclude)
            out.append(reporting.Record(target.family, target.name, target.module, state="excluded",
                                        reason=reason).as_dict())
        return out


def unapplied_records(reason: str, extra_targets: tuple[table.Target, ...] = ()) -> list[dict]:
    """One ``skipped`` record per row of the patch table, for showing the rows when nothing could be applied."""
    registry = table.build_registry(extra_targets)
    return [reporting.Record(t.family, t.name, t.module, state="skipped", reason=reason).as_dict()
            for t in registry.targets.values()]


def _gems_unusable() -> str:
    """Why FlagGems, once tried, can't be imported ("" while it can, or hasn't been tried)."""
    gems = sys.modules.get("fl_patch.kernels.gems")
    error = getattr(gems, "_load_error", None)
    return f"FlagGems can't be used ({error}): calls run the original" if error else ""


def patched_module_attributes() -> list[tuple[Any, str, Any]]:
    """(module, attribute, original) for every module attribute currently replaced."""
    import types

    with _state.lock:
        return [(e.owner, e.key, e.original) for e in _state.ledger.entries
                if e.kind == "attr" and isinstance(e.owner, types.ModuleType)]


def activate(source: str) -> None:
    """Automatic activation (bootstrap trigger, ``import fl_patch``, the LightX2V plugin): apply from the
    environment unless already active. A setting it can't use is ignored where that is safe (each said once, naming
    `source`); one it can't ignore leaves fl_patch off (said once). Raises only with FL_PATCH_STRICT=1."""
    try:
        s, problems = settings_mod.load_at_startup()
        if not _state.active:  # equal settings already applied by another thread: apply returns at once
            apply(s, lenient=True, source=source, said=tuple(problems))
            log.info("fl_patch (%s): active, kernels=%s; %d rows selected, %d left out; each patches when its module"
                     " is imported", source, s.kernels, len(_state.selected), len(_state.excluded))
    except Exception as exc:
        if settings_mod.strict_from_env():
            raise
        kind = "bad setting" if isinstance(exc, SettingsError) else f"error {type(exc).__name__}"
        log.warning("fl_patch (%s): did not activate (%s): %s", source, kind, exc)


def kernel_failed(rec: reporting.Record, exc: Exception) -> str:
    """`exc` was raised during a call of `rec`'s kernel and caught by the replacement: re-raise it unchanged (the
    same object, nothing counted) if it is not the kernel's failure (:func:`fl_patch.failures.passes_through`:
    out of memory, torch's control flow, hooks); else the reason to count that call under (the caller then runs
    the original). FlagGems that can't be imported turns every record on it into a ``fallback`` one, said once;
    another error is logged once per place and exception type, naming the record's provider. With
    FL_PATCH_STRICT=1 it raises PatchError instead. Under torch.compile the replacement's guard runs at trace time
    and the kernel later, inside the compiled graph: a kernel failing there raises
    ``fl_patch.kernels.custom_ops.CompiledKernelError`` and never gets here."""
    from fl_patch.kernels import gems

    if failures.passes_through(exc):
        raise exc
    if isinstance(exc, gems.GemsUnavailable):
        reason, message, key = gems.UNUSABLE, f"FlagGems can't be used ({exc}): patched calls run the original", ""
    else:
        reason, key = f"kernel error: {type(exc).__name__}", rec.where
        message = f"the {rec.provider} kernel of {rec.where} raised {type(exc).__name__}: {gems.first_line(exc)}"
    with _state.lock:
        first = (key, reason) not in _state.kernel_errors
        _state.kernel_errors.add((key, reason))
    if _state.settings is not None and _state.settings.strict:
        raise PatchError(message) from exc
    if first:
        log.warning("fl_patch: %s; this call and the next ones like it run the original", message)
    return reason


def report_text() -> str:
    """The report as text: the summary, the device profile in force (or why none), what the device learned, what
    the fast launch path did, every record."""
    from fl_patch.kernels import gems

    notes = ()
    if _state.settings is not None and _state.settings.kernels == "gems":
        info = routing.describe()
        notes = (info["summary"], *routing.learning_lines(info), gems.fast_launch_line())
    return reporting.format_table(records(), notes)


def _print_report_at_exit() -> None:
    """FL_PATCH_REPORT=1: rank 0 prints the report, and the table of the job's ranks when there are several."""
    from fl_patch import ranks

    text = ranks.report_text()
    if text:
        print(text, file=sys.stderr)
