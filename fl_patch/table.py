"""The patch table: every target fl_patch knows, as frozen data rows.

A row says which op family it belongs to, which module's import triggers it (an exact module name, or a
pattern such as ``transformers.models.*.modeling_*``), what it changes (for people), what it needs, and the
``"module:function"`` path of its factory. The factory is imported only when the module is, and is called as
``factory(module, ctx)`` with a :class:`fl_patch.runtime.PatchContext`; it makes its changes through ``ctx``
so that each one is recorded and can be reverted.

Vendors add rows through the ``fl_patch.patches`` entry-point group: each entry point loads to an iterable
of :class:`Target` rows (or a callable returning one). A row whose name is already taken is an error.
"""

from __future__ import annotations

import difflib
import importlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from fl_patch.errors import DuplicateTargetError, UnknownNameError

log = logging.getLogger("fl_patch")

ENTRY_POINT_GROUP = "fl_patch.patches"

# The op families. A family name in include/exclude selects every row of that family.
FAMILIES = (
    "attention", "rms_norm", "rope", "linear", "swiglu", "layer_norm", "cross_entropy", "gems_global", "distributed",
    "platform",
)

FAMILY_WIDTH = max(len(family) for family in FAMILIES)  # the family column of fl_patch's tables

# Families that need a kernel provider (FlagGems or the torch reference); the others change other things.
KERNEL_FAMILIES = ("attention", "rms_norm", "rope", "linear", "swiglu", "layer_norm", "cross_entropy")


@dataclass(frozen=True)
class Target:
    """One row of the patch table.

    name: unique, dotted, e.g. ``"torch.rms_norm"``; usable in include/exclude lists.
    family: one of FAMILIES.
    module: the module whose import triggers the row; ``*`` matches one dotted component. Rows for
        ``torch.*`` code hook ``"torch"`` itself, since hooks on its submodules fire while torch is importing.
    attribute: what the row changes, for the report (``"nn.functional.rms_norm, nn.RMSNorm.forward"``).
    factory: ``"package.module:function"``, called as ``factory(module, ctx)``.
    variant: which form of the op the row handles (``"default"``, ``"gemma"``, ...).
    requires: distribution requirements such as ``"transformers>=5.0"``; unmet -> the row is skipped.
    runs_without_kernels: for kernel families, run the factory with ``ctx.provider = None`` when no kernel
        provider can be used (instead of skipping the row); the factory must then install torch-only
        behaviour (e.g. registry keys that other code names and must find).
    explicit_choice: the row installs something the user's own code or config must name to use
        (``attn_implementation="flagos"``, a ``flagos_*`` key); the device profile never keeps its family native
        (``fl_patch.device.routing``).
    kernel_free: the row belongs to a kernel family (include/exclude select it with the family) but runs no
        provider's kernel: no provider is resolved (``ctx.provider`` is None).
    description: one line for ``fl-patch status``.
    """

    name: str
    family: str
    module: str
    attribute: str
    factory: str
    variant: str = "default"
    requires: tuple[str, ...] = ()
    runs_without_kernels: bool = False
    explicit_choice: bool = False
    kernel_free: bool = False
    opt_in: bool = False
    description: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"target {self.name!r}: unknown family {self.family!r}; valid: {', '.join(FAMILIES)}")
        if ":" not in self.factory:
            raise ValueError(f"target {self.name!r}: factory {self.factory!r} must be 'package.module:function'")

    @property
    def is_pattern(self) -> bool:
        return "*" in self.module

    def load_factory(self) -> Callable:
        """Import and return the factory function."""
        module_name, _, attr = self.factory.partition(":")
        return getattr(importlib.import_module(module_name), attr)


@dataclass
class Registry:
    """The rows in force: the built-in ones plus any added by vendors. Names are unique."""

    targets: dict[str, Target] = field(default_factory=dict)

    def register(self, target: Target) -> None:
        """Add a row; raise DuplicateTargetError if its name is taken."""
        if target.name in self.targets:
            raise DuplicateTargetError(f"patch target {target.name!r} is already registered")
        self.targets[target.name] = target

    def valid_names(self) -> list[str]:
        """Every name include/exclude accept: the families, then the target names."""
        return list(FAMILIES) + sorted(self.targets)

    def unknown_names(self, names: Iterable[str]) -> list[str]:
        """The names that are neither a family nor a target, in the order given."""
        valid = set(self.valid_names())
        return [name for name in names if name not in valid]

    def unknown_name_message(self, setting: str, name: str) -> str:
        """What is wrong with `name` and what `setting` accepts: the closest names first, then the families,
        then where to see every target name."""
        close = difflib.get_close_matches(name, self.valid_names(), n=3, cutoff=0.5)
        hint = f" Closest: {', '.join(repr(c) for c in close)}." if close else ""
        return (f"{setting}: unknown name {name!r}.{hint} Accepted: a family ({', '.join(FAMILIES)}) or one of"
                f" {len(self.targets)} target names, which `fl-patch status` lists.")

    def check_names(self, setting: str, names: Iterable[str]) -> None:
        """Raise UnknownNameError for the first name that is neither a family nor a target."""
        unknown = self.unknown_names(names)
        if unknown:
            raise UnknownNameError(self.unknown_name_message(setting, unknown[0]))

    def fully_excluded(self, include: Iterable[str], exclude: Iterable[str]) -> list[str]:
        """The include names every row of which the exclude list removes again (so naming them selects nothing)."""
        excluded = set(exclude)
        clashes = []
        for name in include:
            rows = [t for t in self.targets.values() if name in (t.name, t.family)]
            if rows and all({t.name, t.family} & excluded for t in rows):
                clashes.append(name)
        return clashes

    def select(self, include: tuple[str, ...], exclude: tuple[str, ...]) -> tuple[list[Target], list[Target]]:
        """Split rows into (selected, excluded) by include (empty = every row) and exclude lists.

        An opt-in row is selected only when its own name is included (its family's name does not select it);
        opt-in names don't narrow the include list: ``include=["<opt-in row>"]`` is every row plus that one."""
        opt_in = {t.name for t in self.targets.values() if t.opt_in}
        narrowing = set(include) - opt_in
        selected, excluded = [], []
        for target in self.targets.values():
            named = {target.name, target.family}
            if target.opt_in:
                wanted = target.name in include
            else:
                wanted = bool(named & narrowing) if narrowing else True
            if wanted and not named & set(exclude):
                selected.append(target)
            else:
                excluded.append(target)
        return selected, excluded

    @staticmethod
    def why_not_selected(target: Target, include: tuple[str, ...], exclude: tuple[str, ...]) -> str:
        """The report's reason for a row :meth:`select` left out with these lists."""
        if {target.name, target.family} & set(exclude):
            return "excluded by FL_PATCH_EXCLUDE / exclude"
        if target.opt_in:
            return f"opt-in, not selected by default: FL_PATCH_INCLUDE={target.name} selects it"
        return "not named in FL_PATCH_INCLUDE / include"


def builtin_targets() -> list[Target]:
    """The rows fl_patch ships, from each integration module's TARGETS list."""
    from fl_patch.integrations import INTEGRATION_MODULES

    rows: list[Target] = []
    for module_name in INTEGRATION_MODULES:
        rows.extend(importlib.import_module(module_name).TARGETS)
    return rows


def vendor_targets() -> list[Target]:
    """Rows from the ``fl_patch.patches`` entry points. A broken entry point is logged and left out."""
    from importlib.metadata import entry_points

    rows: list[Target] = []
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = entry.load()
            rows.extend(loaded() if callable(loaded) else loaded)
        except Exception as exc:  # a vendor's bug must not stop the others
            log.warning("fl_patch: entry point %s (%s) failed to load: %s", entry.name, entry.value, exc)
    return rows


def build_registry(extra: Iterable[Target] = ()) -> Registry:
    """A Registry holding the built-in rows, the vendor rows and `extra`, refusing duplicates."""
    registry = Registry()
    for target in [*builtin_targets(), *vendor_targets(), *extra]:
        registry.register(target)
    return registry
