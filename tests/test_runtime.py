"""The core machinery on synthetic targets: lazy hooks, the ledger, exact revert, idempotence, failures."""

import sys
import textwrap
import threading
import types

import pytest

import fl_patch
from fl_patch import ledger, runtime, settings
from fl_patch.errors import DuplicateTargetError, PatchError, SettingsError, UnknownNameError
from fl_patch.table import Registry, Target

CALLS = []  # (module name) per factory run


def original_op(x):
    return x + 1


def patch_op(module, ctx):
    """Factory for the synthetic rows: replaces module.op and module.Thing.forward."""
    CALLS.append(module.__name__)
    rec = ctx.record(f"{module.__name__}.op")
    ctx.setattr(rec, module, "op", lambda x: x * 100)
    rec = ctx.record(f"{module.__name__}.Thing.forward")
    ctx.setattr(rec, module.Thing, "forward", lambda self, x: "patched")


def failing_factory(module, ctx):
    raise RuntimeError("kernel exploded")


def skipping_factory(module, ctx):
    raise runtime.Skip("nothing to do here")


SOURCE = textwrap.dedent(
    """
    def op(x):
        return x + 1

    class Base:
        def forward(self, x):
            return "base"

    class Thing(Base):
        pass
    """
)


def row(name="fake.op", module="fakelib.ops", factory="test_runtime:patch_op", family="linear"):
    return Target(name=name, family=family, module=module, attribute="op", factory=factory)


@pytest.fixture
def fakelib(tmp_path, monkeypatch):
    """A package `fakelib` on disk with modules ops, other and models/{a,b}/modeling_x; none imported."""
    pkg = tmp_path / "fakelib"
    (pkg / "models" / "a").mkdir(parents=True)
    (pkg / "models" / "b").mkdir(parents=True)
    for init in (pkg, pkg / "models", pkg / "models" / "a", pkg / "models" / "b"):
        (init / "__init__.py").write_text("")
    for path in (pkg / "ops.py", pkg / "other.py", pkg / "models/a/modeling_a.py", pkg / "models/b/modeling_b.py"):
        path.write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    CALLS.clear()
    yield pkg
    fl_patch.revert()
    for name in [n for n in sys.modules if n == "fakelib" or n.startswith("fakelib.")]:
        del sys.modules[name]


def apply_rows(*rows, **kwargs):
    runtime.apply(settings.load(env={}, kernels="reference", **kwargs), extra_targets=rows)


def state_of(where):
    return [r["state"] for r in fl_patch.report() if r["where"] == where]


def test_module_imported_after_apply_is_patched_on_import(fakelib):
    apply_rows(row())
    assert "fakelib.ops" not in sys.modules
    assert state_of("fakelib.ops") == ["waiting"]
    import fakelib.ops

    assert fakelib.ops.op(2) == 200
    assert fakelib.ops.Thing().forward(1) == "patched"
    assert state_of("fakelib.ops.op") == ["patched"]


def test_module_imported_before_apply_is_patched_at_once(fakelib):
    import fakelib.ops

    apply_rows(row())
    assert fakelib.ops.op(2) == 200


def test_revert_restores_identical_objects_and_cycles_work(fakelib):
    import fakelib.ops

    original_op, base_forward = fakelib.ops.op, fakelib.ops.Base.forward
    for _ in range(3):
        apply_rows(row())
        assert fakelib.ops.op is not original_op
        fl_patch.revert()
        assert fakelib.ops.op is original_op
        # Thing inherited forward: revert must delete ours, not copy Base's into Thing.
        assert "forward" not in vars(fakelib.ops.Thing)
        assert fakelib.ops.Thing.forward is base_forward
    assert state_of("fakelib.ops.op") == ["reverted"]


def test_apply_twice_patches_once(fakelib):
    import fakelib.ops  # noqa: F401  (imported before apply)

    apply_rows(row(), include=("fake.op",))
    runtime.apply(runtime.current_settings())
    assert CALLS == ["fakelib.ops"]
    assert len(runtime._state.ledger) == 2


def test_reapply_with_other_settings_reverts_first(fakelib):
    import fakelib.ops

    original = fakelib.ops.op
    apply_rows(row())
    apply_rows(row(), exclude=("fake.op",))
    assert fakelib.ops.op is original
    assert state_of("fakelib.ops") == ["excluded"]


def test_exclude_by_family_and_by_name(fakelib):
    import fakelib.ops
    import fakelib.other

    rows = (row(), row(name="fake.other", module="fakelib.other", family="rope"))
    apply_rows(*rows, exclude=("rope",))
    assert fakelib.ops.op(1) == 100 and fakelib.other.op(1) == 2
    apply_rows(*rows, exclude=("fake.op",))
    assert fakelib.ops.op(1) == 2 and fakelib.other.op(1) == 100
    apply_rows(*rows, include=("fake.op",))
    assert fakelib.ops.op(1) == 100 and fakelib.other.op(1) == 2


def test_unknown_names_list_the_valid_ones_and_the_closest():
    with pytest.raises(UnknownNameError) as error:
        fl_patch.apply(exclude=["rms_nrom"])
    message = str(error.value)
    # the closest names first, then the families, then where the rest are listed (not 30 names run together)
    assert message.startswith("FL_PATCH_EXCLUDE / exclude: unknown name 'rms_nrom'. Closest: 'rms_norm'")
    families = message.index("a family (attention, rms_norm, rope, linear")
    assert message.index("Closest") < families < message.index("`fl-patch status` lists")
    assert "torch.linear" not in message
    assert not fl_patch.is_active()


def test_failing_factory_keeps_the_import_working_and_is_reported(fakelib, caplog):
    apply_rows(row(factory="test_runtime:failing_factory"))
    import fakelib.ops

    assert fakelib.ops.op(1) == 2
    [record] = [r for r in fl_patch.report() if r["target"] == "fake.op"]
    assert record["state"] == "failed" and "kernel exploded" in record["reason"]
    assert "kernel exploded" in caplog.text


def test_strict_mode_raises_on_a_failing_factory(fakelib):
    apply_rows(row(factory="test_runtime:failing_factory"), strict=True)
    with pytest.raises(PatchError, match="kernel exploded"):
        import fakelib.ops  # noqa: F401


def test_skip_is_reported_with_its_reason(fakelib):
    import fakelib.ops  # noqa: F401

    apply_rows(row(factory="test_runtime:skipping_factory"))
    [record] = [r for r in fl_patch.report() if r["target"] == "fake.op"]
    assert (record["state"], record["reason"]) == ("skipped", "nothing to do here")


def test_unmet_requirement_skips_the_row(fakelib):
    import fakelib.ops

    needy = Target(name="fake.op", family="linear", module="fakelib.ops", attribute="op",
                   factory="test_runtime:patch_op", requires=("torch>=99.0",))
    apply_rows(needy)
    assert fakelib.ops.op(1) == 2
    [record] = [r for r in fl_patch.report() if r["target"] == "fake.op"]
    assert record["state"] == "skipped" and "needs torch>=99.0" in record["reason"]


def test_pattern_rows_hook_each_module_without_importing_it(fakelib):
    import fakelib  # noqa: F401  (the top package is imported; its modeling modules are not)

    apply_rows(row(module="fakelib.models.*.modeling_*"))
    assert "fakelib.models.a.modeling_a" not in sys.modules
    from fakelib.models.b import modeling_b

    assert modeling_b.op(1) == 100
    assert CALLS == ["fakelib.models.b.modeling_b"]
    from fakelib.models.a import modeling_a

    assert modeling_a.op(1) == 100


def test_two_threads_importing_a_target_at_once_patch_once(fakelib):
    apply_rows(row())
    barrier = threading.Barrier(2)

    def importer():
        barrier.wait()
        import fakelib.ops  # noqa: F401

    threads = [threading.Thread(target=importer) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert CALLS == ["fakelib.ops"]


def test_patched_context_manager_restores_previous_state(fakelib):
    import fakelib.ops

    original = fakelib.ops.op
    runtime.apply(settings.load(env={}, kernels="reference"), extra_targets=(row(),))
    with fl_patch.patched(exclude=["linear"]):
        assert fakelib.ops.op is original
    assert fl_patch.is_active()


def test_duplicate_rows_are_refused():
    registry = Registry()
    registry.register(row())
    with pytest.raises(DuplicateTargetError):
        registry.register(row())


def test_rows_are_validated():
    with pytest.raises(ValueError, match="unknown family 'norms'"):
        row(family="norms")
    with pytest.raises(ValueError, match="must be 'package.module:function'"):
        row(factory="nocolon")


def test_ledger_restores_items_and_runs_callbacks():
    book = ledger.Ledger()
    mapping = {"a": 1}
    undone = []
    book.setitem(mapping, "a", 2)
    book.setitem(mapping, "b", 3)
    book.on_revert(lambda: undone.append(True))
    module = types.ModuleType("m")
    module.f = original_op
    book.setattr(module, "f", len)
    book.setattr(module, "f", abs)
    assert book.revert() == []
    assert mapping == {"a": 1} and undone == [True] and module.f is original_op and len(book) == 0


def test_every_builtin_row_is_reached_by_the_start_up_trigger():
    from fl_patch import _bootstrap, hooks
    from fl_patch.table import builtin_targets

    rows = builtin_targets()
    assert rows
    for target in rows:
        assert hooks.top_package(target.module) in _bootstrap.WATCHED_PACKAGES, target.name


DEADLOCK_SCRIPT = textwrap.dedent(
    """
    import sys, threading
    import steps
    from fl_patch import runtime, settings
    from fl_patch.table import Target

    rows = tuple(Target(name=f"deadlock.{m}", family="linear", module=m, attribute="value",
                        factory=f"steps:patch_{m}") for m in ("mod_a", "mod_y"))
    runtime.apply(settings.load(env={}, kernels="reference"), extra_targets=rows)
    importer = threading.Thread(target=lambda: __import__("mod_y"), daemon=True)
    importer.start()
    assert steps.y_started.wait(10)
    import mod_a  # its factory imports mod_y, which the other thread is importing
    importer.join(10)
    print("values", mod_a.value, sys.modules["mod_y"].value)
    """
)
DEADLOCK_STEPS = textwrap.dedent(
    """
    import threading
    y_started, y_may_finish = threading.Event(), threading.Event()

    def patch_mod_a(module, ctx):
        y_may_finish.set()
        import mod_y  # noqa: F401  (waits for the other thread's import of mod_y, its hook included)
        ctx.setattr(ctx.record("mod_a.value"), module, "value", 2)

    def patch_mod_y(module, ctx):
        ctx.setattr(ctx.record("mod_y.value"), module, "value", 2)
    """
)


def test_a_factory_importing_a_module_another_thread_is_importing_does_not_deadlock(tmp_path):
    """Thread B imports mod_y and holds its import lock until mod_y's hook has run; the main thread's hook
    for mod_a runs a factory that imports mod_y. Holding fl_patch's lock across that factory would leave
    B's hook waiting for it forever (seen before factories ran outside the lock)."""
    from conftest import run_python

    (tmp_path / "steps.py").write_text(DEADLOCK_STEPS)
    (tmp_path / "mod_a.py").write_text("value = 1\n")
    (tmp_path / "mod_y.py").write_text("import steps\nsteps.y_started.set()\nsteps.y_may_finish.wait(10)\nvalue = 1\n")
    result = run_python(DEADLOCK_SCRIPT, env={"FL_PATCH_AUTO": "0"}, bootstrap=False, extra_path=(tmp_path,),
                        timeout=60)
    assert "values 2 2" in result.stdout, result.stdout + result.stderr


def test_changes_of_a_factory_that_outlives_its_apply_are_refused(fakelib):
    """A factory still running when fl_patch is reverted (another thread) must not leave a change behind."""
    started, reverted = threading.Event(), threading.Event()
    results = []

    def slow_factory(module, ctx):
        started.set()
        reverted.wait(10)
        try:
            ctx.setattr(ctx.record("fakelib.ops.op"), module, "op", lambda x: 0)
        except runtime.Skip as why:
            results.append(str(why))
            raise

    sys.modules[__name__].slow_factory = slow_factory
    apply_rows(row(factory="test_runtime:slow_factory"))
    importer = threading.Thread(target=lambda: __import__("fakelib.ops"))
    importer.start()
    assert started.wait(10)
    fl_patch.revert()
    reverted.set()
    importer.join(10)
    import fakelib.ops

    assert fakelib.ops.op(1) == 2
    assert results == ["fl_patch was reverted or re-applied while this row was patching"]
    assert not [r for r in fl_patch.report() if r["where"] == "fakelib.ops.op"]


def test_a_name_both_included_and_excluded_is_refused():
    with pytest.raises(SettingsError, match="'rms_norm' is both included .* and excluded"):
        fl_patch.apply(include=["rms_norm"], exclude=["rms_norm"], kernels="reference")
    with pytest.raises(SettingsError, match="'torch.rms_norm' is both included .* and excluded"):
        fl_patch.apply(include=["torch.rms_norm", "rope"], exclude=["rms_norm"], kernels="reference")
    assert not fl_patch.is_active()
    fl_patch.apply(include=["rms_norm"], exclude=["torch.rms_norm"], kernels="reference")  # a part of it: fine
    assert fl_patch.is_active()


def test_at_startup_a_clash_and_an_unknown_include_name_are_dropped_and_said():
    import torch  # noqa: F401  (the torch rows patch at once)

    s = settings.load(env={}, include="rms_norm,linear,rms_nrom", exclude="rms_norm", kernels="reference")
    problems = runtime.apply(s, lenient=True)
    assert problems[0].startswith("FL_PATCH_INCLUDE / include: unknown name 'rms_nrom'. Closest: 'rms_norm'")
    assert problems[0].endswith("Ignored.")
    assert problems[1] == ("'rms_norm' is both included (FL_PATCH_INCLUDE / include) and excluded (FL_PATCH_EXCLUDE"
                           " / exclude), which selects none of it: exclude wins, it is not patched")
    states = {r["target"]: r["state"] for r in fl_patch.report()}
    assert states["torch.linear"] == "patched" and states["torch.rms_norm"] == "excluded"


def test_at_startup_an_include_list_with_no_known_name_patches_nothing():
    with pytest.raises(SettingsError, match="no name is known"):
        runtime.apply(settings.load(env={}, include="rms_nrom"), lenient=True)
    assert not fl_patch.is_active()
