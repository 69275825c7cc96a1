"""FlagGems' aten-wide override (``FL_PATCH_GEMS_GLOBAL=1``), in a Library fl_patch owns and destroys.

``flag_gems.enable(lib=..., unused=...)`` registers a FlagGems kernel for ~400 aten ops at the device's
dispatch key. FlagGems has no ``disable()``, so fl_patch passes its own ``torch.library.Library("aten",
"IMPL")`` and revert destroys it: every op dispatches to torch's kernel again.

The exclude list (``FL_PATCH_GEMS_UNUSED`` / ``gems_unused``, alias ``LIGHTX2V_FL_GEMS_UNUSED``) takes
FlagGems function names (``layer_norm``, ``true_divide``) or aten op names (``native_layer_norm``,
``aten::div.Tensor``, ``layer_norm.default``, or ``div`` for every overload), mapped to FlagGems' function
names; an unknown name is an error naming the closest valid one (FlagGems itself ignores unknown names).
Not given: :data:`DEFAULT_UNUSED`; ``default`` inside a list stands for it (``default,softmax``), and
``none`` excludes nothing.

A second registration of an op/key from Python is refused by torch 2.11 (FlagGems only logs "Skipped
registering operator") and overrides the first in torch 2.13. The Library fl_patch passes notes, per op,
whether another Python Library already had a kernel there (an earlier ``flag_gems.enable()``); either case
is reported with a warning, and is an error in strict mode. ``import flag_gems`` happens in the factory,
only when the override is on.
"""

from __future__ import annotations

import difflib
import logging

from fl_patch.errors import PatchError, UnknownNameError
from fl_patch.runtime import Skip
from fl_patch.table import Target

log = logging.getLogger("fl_patch")

# FlagGems' own Philox RNG: the same seed gives other numbers than torch's generators (weights initialised,
# dropout masks and sampling would all change).
RNG_FUNCTIONS = (
    "bernoulli_", "dropout", "exponential_", "multinomial", "normal_", "normal_float_tensor",
    "normal_tensor_float", "normal_tensor_tensor", "rand", "rand_like", "randn", "randn_like", "randperm",
    "uniform_",
)
# Measured by benchmarks/gems_bisect.py on an H200 (torch 2.11, triton 3.6, flag_gems 5.0.2, 2026-11-22;
# benchmarks/results/gems_bisect.json) on ~1B Llama- and Qwen3-style bf16 forwards: `mul` alone gives NaN
# logits (the NaN of the whole-model override); every other name here ran slower than torch's kernel.
MEASURED_UNSAFE: tuple[str, ...] = (
    "add", "arange", "cat", "celu", "celu_", "copy_", "embedding", "mean_dim", "mm", "mul", "neg",
    "pow_tensor_scalar", "rsqrt", "silu", "sin", "to_copy",
)
DEFAULT_UNUSED = RNG_FUNCTIONS + MEASURED_UNSAFE

DEFAULT_TOKEN = "default"  # in a list: fl_patch's default list
NONE_TOKEN = "none"  # in a list: nothing (FL_PATCH_GEMS_UNUSED=none registers every FlagGems kernel)
SETTING = "FL_PATCH_GEMS_UNUSED / gems_unused"

TARGETS = [
    Target(
        name="flag_gems.enable",
        family="gems_global",
        module="torch",
        attribute="aten ops at the device dispatch key, in a torch.library.Library fl_patch owns",
        factory="fl_patch.integrations.gems_global:enable_globally",
        requires=("torch>=2.4",),
        description="FlagGems' aten-wide override (FL_PATCH_GEMS_GLOBAL=1), minus FL_PATCH_GEMS_UNUSED",
    ),
]


def enable_globally(torch_module, ctx) -> None:
    """Run ``flag_gems.enable`` into a Library of ours (destroyed on revert) and report what it owns.

    With the override off, the exclude list is still checked against aten's op names, so that a typo is said when
    torch is imported (a warning, an error in strict mode); with it on, FlagGems' own table checks every name."""
    if not ctx.settings.gems_global:
        problem = unused_names_problem(ctx.settings.gems_unused, torch_module)
        if problem:
            ctx.bad_setting(f"{problem}; ignored: FL_PATCH_GEMS_GLOBAL is off, so the list is not used")
        raise Skip("FL_PATCH_GEMS_GLOBAL is off" + (f"; {problem}" if problem else ""))
    from fl_patch.kernels import gems

    _select_local_device(torch_module)
    try:
        flag_gems = gems.load()
    except gems.GemsUnavailable as exc:
        raise PatchError(f"FL_PATCH_GEMS_GLOBAL=1 but FlagGems can't be used: {exc}") from None
    table = function_table(flag_gems)
    try:
        unused = resolve_unused(ctx.settings.gems_unused, table)
    except UnknownNameError as exc:
        message = (f"{exc}; the aten-wide override is not enabled: an op the list meant to keep off FlagGems would"
                   " run on it")
        ctx.bad_setting(message)
        raise Skip(message) from None

    lib = recording_library(torch_module)
    try:
        flag_gems.enable(lib=lib, unused=list(unused))
    except BaseException:
        lib.release()
        raise
    conflict = _conflict_message(lib)
    if conflict and ctx.settings.strict:
        lib.release()
        raise PatchError(conflict)
    if conflict:
        log.warning("fl_patch: %s", conflict)
    key = lib.dispatch_key_used()
    rec = ctx.record(f"aten::* at {key} (flag_gems.enable)")
    if lib.owned:
        ctx.on_revert(rec, lib.release)
        rec.provider = "flag_gems"
        rec.reason = (f"FlagGems owns {len(lib.owned)} aten ops: {', '.join(sorted(lib.owned))}; "
                      f"unused: {', '.join(unused) or 'none'}" + _notes(lib))
    else:
        lib.release()
        ctx.skip(rec, "FlagGems registered no op" + _notes(lib))
    if lib.already_taken:
        ctx.skip(ctx.record(f"aten::* at {key}, ops another Library registered first"),
                 f"not registered, torch refused a second Python kernel: {', '.join(sorted(lib.already_taken))}")


def _select_local_device(torch_module) -> None:
    """Under torchrun (LOCAL_RANK set), make this rank's device current before FlagGems is imported: its import
    initialises the current device, and this runs when torch finishes importing, before the user's script
    calls ``torch.cuda.set_device`` (or its vendor's); without this every rank would put a context on device 0."""
    import os

    from fl_patch.device import devices

    local_rank = os.environ.get("LOCAL_RANK")
    module = devices.device_module(torch_module)
    if local_rank is None or not local_rank.isdigit() or module is None or not module.is_available():
        return
    module.set_device(int(local_rank) % module.device_count())


def function_table(flag_gems) -> dict[str, str]:
    """FlagGems' aten op names (``div.Tensor``) -> its function names (``true_divide``)."""
    return {entry[0]: getattr(entry[1], "__name__", str(entry[1])) for entry in flag_gems._FULL_CONFIG}


def resolve_unused(names, table: dict[str, str]) -> tuple[str, ...]:
    """The FlagGems function names to pass as ``unused`` for the setting `names` (None: DEFAULT_UNUSED).

    Each name is a function name, an aten op name (``aten::`` prefix and ``.default`` allowed; no overload
    means every overload), ``default`` or ``none``. Raises UnknownNameError naming the closest valid name.
    """
    functions = set(table.values())
    defaults = [name for name in DEFAULT_UNUSED if name in functions]
    if names is None:
        return tuple(defaults)
    resolved: list[str] = []
    for name in names:
        if name != NONE_TOKEN:
            resolved.extend(defaults if name == DEFAULT_TOKEN else _functions_for(name, table, functions))
    return tuple(dict.fromkeys(resolved))


# FlagGems 5.0.2 functions not named after the aten op they override (the others are: ``mean_dim`` for
# ``mean.dim``, ``to_copy`` for ``_to_copy``, ``vector_norm`` for ``linalg_vector_norm``).
NOT_NAMED_AFTER_ATEN = ("group_mm", "scaled_softmax_backward", "scaled_softmax_forward")


def unused_names_problem(names, torch_module) -> str | None:
    """Without FlagGems: what is wrong with the first name of the exclude list that can't be a FlagGems function
    or an aten op name, or None. A name can be one when it is an aten op (any overload), is named after one
    (the op's name, with or without its leading underscore or ``linalg_``, then ``_`` and anything), or is one
    of NOT_NAMED_AFTER_ATEN. FlagGems' own table, read once it loads, is the exact check."""
    if not names:
        return None
    ops = {name.split("::", 1)[1].split(".")[0] for name in torch_module._C._dispatch_get_all_op_names()
           if name.startswith("aten::")}
    ops |= {op.lstrip("_") for op in ops} | {op.removeprefix("linalg_") for op in ops}
    for name in names:
        op = name.removeprefix("aten::").removesuffix(".default").split(".")[0]
        if name in (DEFAULT_TOKEN, NONE_TOKEN, *NOT_NAMED_AFTER_ATEN) or op in ops:
            continue
        if not any(op.startswith(known + "_") for known in ops):
            return _unknown_message(name, op, sorted(ops))
    return None


def _unknown_message(name: str, op: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(op, valid, n=1, cutoff=0.75)  # 'notanop' is not a typo of 'tan' (0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return (f"{SETTING}: {name!r} is neither a FlagGems function nor an aten op FlagGems overrides{hint}; accepted:"
            " FlagGems function names ('layer_norm', 'true_divide'), aten op names ('native_layer_norm',"
            f" 'div.Tensor', 'div'), {DEFAULT_TOKEN!r} for fl_patch's default list, or {NONE_TOKEN!r}")


def _functions_for(name: str, table: dict[str, str], functions: set[str]) -> list[str]:
    op = name.removeprefix("aten::").removesuffix(".default")
    if op in functions:
        return [op]
    if op in table:
        return [table[op]]
    overloads = [function for key, function in table.items() if key.split(".")[0] == op]
    if overloads:
        return list(dict.fromkeys(overloads))
    raise UnknownNameError(_unknown_message(name, op, sorted(functions | set(table))))


def recording_library(torch_module):
    """A ``torch.library.Library("aten", "IMPL")`` that notes, for each op FlagGems registers into it,
    whether it now owns it (``owned``), took it over from another Python Library (``taken_over``), was
    refused because another one holds it (``already_taken``), or failed otherwise (``failed``).
    ``release()`` destroys it."""
    library = torch_module.library

    class RecordingLibrary(library.Library):
        def __init__(self):
            super().__init__("aten", "IMPL")
            self.owned, self.taken_over, self.already_taken, self.failed = [], [], [], {}
            self.keys_used, self.taken_over_keys = set(), set()

        def impl(self, op_name, fn, dispatch_key="", **kwargs):
            name = (op_name if isinstance(op_name, str) else op_name.name()).split("::")[-1]
            key = dispatch_key or self.dispatch_key
            self.keys_used.add(key)
            existing = getattr(library, "_impls", None)
            held = existing is not None and f"{self.ns}/{name}/{key}" in existing
            try:
                super().impl(op_name, fn, dispatch_key, **kwargs)
            except Exception as exc:
                if held or (existing is None and "already" in str(exc)):
                    self.already_taken.append(name)
                else:
                    self.failed[name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:120]}"
                raise
            self.owned.append(name)
            if held:
                self.taken_over.append(name)
                self.taken_over_keys.add(f"{self.ns}/{name}/{key}")

        def release(self):
            """Destroy this Library (idempotent), keeping torch's registry of Python kernels (``_impls``)
            right: ``_destroy`` drops the op/keys we took over although the other Library still holds them
            (put back), and the Library's finalizer would drop ours again at garbage collection, by then
            perhaps registered by someone else (emptied)."""
            self._destroy()
            self._op_impls.clear()
            existing = getattr(library, "_impls", None)
            if existing is not None:
                existing.update(self.taken_over_keys)

        def dispatch_key_used(self) -> str:
            return ", ".join(sorted(self.keys_used)) or "no key"

    return RecordingLibrary()


def _notes(lib) -> str:
    """What the main record adds about ops taken over from another Library or refused by torch."""
    notes = ""
    if lib.taken_over:
        notes += f"; taken over from another Library until revert: {', '.join(sorted(lib.taken_over))}"
    if lib.failed:
        listed = ", ".join(f"{name} ({why})" for name, why in sorted(lib.failed.items()))
        notes += f"; torch refused {len(lib.failed)}: {listed}"
    return notes


def _conflict_message(lib) -> str:
    """A warning when another Python Library held some of the ops (an earlier flag_gems.enable()), or ""."""
    parts = []
    if lib.already_taken:
        parts.append(f"{len(lib.already_taken)} ops already had a Python kernel from another Library and were NOT"
                     f" registered (torch refuses a second one): {', '.join(sorted(lib.already_taken))}")
    if lib.taken_over:
        parts.append(f"{len(lib.taken_over)} ops had a Python kernel from another Library, now overridden by"
                     f" fl_patch's until revert: {', '.join(sorted(lib.taken_over))}")
    if not parts:
        return ""
    return ("flag_gems.enable() ran before fl_patch's global override (FL_PATCH_GEMS_GLOBAL=1)? "
            + "; ".join(parts) + ". Use one of the two.")
