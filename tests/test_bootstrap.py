"""The zero-code bootstrap and `import fl_patch`, each in a fresh interpreter."""

import json
import sys
import textwrap

from conftest import REPO, run_python

PATCHED = "hasattr(__import__('torch').nn.functional.rms_norm, '__wrapped__')"
REFERENCE = {"FL_PATCH_KERNELS": "reference"}


def last_json(result):
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_zero_code_changes_patch_torch():
    result = run_python(f"import json, torch; print(json.dumps({PATCHED}))", env=REFERENCE)
    assert last_json(result) is True


def test_fl_patch_0_does_nothing():
    code = f"import json, sys, torch; print(json.dumps([{PATCHED}, 'fl_patch' in sys.modules]))"
    assert last_json(run_python(code, env={"FL_PATCH": "0", **REFERENCE})) == [False, False]


def test_bootstrap_alone_imports_nothing_heavy_until_a_target_is_imported():
    code = textwrap.dedent(
        """
        import json, sys
        heavy = ("wrapt", "torch", "transformers", "flag_gems", "fl_patch.runtime", "fl_patch.table")
        before = [m for m in heavy if m in sys.modules]
        import torch
        after = [m for m in heavy if m in sys.modules]
        print(json.dumps([before, after]))
        """
    )
    before, after = last_json(run_python(code, env=REFERENCE))
    assert before == []
    assert {"wrapt", "torch", "fl_patch.runtime"} <= set(after)


def test_import_fl_patch_imports_no_heavy_package():
    code = textwrap.dedent(
        """
        import json, sys, fl_patch
        print(json.dumps([m for m in ("torch", "transformers", "flag_gems", "wrapt", "lightx2v") if m in sys.modules]))
        """
    )
    assert last_json(run_python(code, bootstrap=False)) == []


def test_import_fl_patch_patches_modules_imported_before_and_after():
    before = f"import json, torch, fl_patch; print(json.dumps({PATCHED}))"
    after = f"import json, fl_patch, torch; print(json.dumps({PATCHED}))"
    assert last_json(run_python(before, env=REFERENCE, bootstrap=False)) is True
    assert last_json(run_python(after, env=REFERENCE, bootstrap=False)) is True
    off = f"import json, fl_patch, torch; print(json.dumps({PATCHED}))"
    assert last_json(run_python(off, env={"FL_PATCH_AUTO": "0", **REFERENCE}, bootstrap=False)) is False


def test_bootstrap_import_and_apply_patch_once():
    code = textwrap.dedent(
        """
        import json, torch, fl_patch
        fl_patch.apply(kernels="reference")
        rms_norm = torch.nn.functional.rms_norm
        patched = [r for r in fl_patch.report() if r["target"] == "torch.rms_norm" and r["state"] == "patched"]
        print(json.dumps([len(patched), hasattr(rms_norm.__wrapped__, "__wrapped__")]))
        """
    )
    assert last_json(run_python(code, env=REFERENCE)) == [1, False]


def test_a_user_sitecustomize_further_down_the_path_still_runs(tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = 'yes'\n")
    code = f"import json, os, torch; print(json.dumps([os.environ.get('USER_SITECUSTOMIZE_RAN'), {PATCHED}]))"
    assert last_json(run_python(code, env=REFERENCE, extra_path=[tmp_path])) == ["yes", True]


def test_child_processes_are_patched(tmp_path):
    script = tmp_path / "spawn_child.py"
    script.write_text(textwrap.dedent(
        f"""
        import json, multiprocessing as mp

        def child(queue):
            import torch
            queue.put({PATCHED})

        if __name__ == "__main__":
            ctx = mp.get_context("spawn")
            queue = ctx.Queue()
            process = ctx.Process(target=child, args=(queue,))
            process.start()
            print(json.dumps(queue.get(timeout=120)))
            process.join()
        """
    ))
    result = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')", env=REFERENCE)
    assert last_json(result) is True


def test_fl_patch_run_sets_the_bootstrap_for_the_command():
    code = textwrap.dedent(
        f"""
        import subprocess, sys
        child = "import json, torch; print(json.dumps({PATCHED}))"
        sys.exit(subprocess.call([sys.executable, "-m", "fl_patch", "run", "--", sys.executable, "-c", child]))
        """
    )
    assert last_json(run_python(code, env=REFERENCE, bootstrap=False)) is True


def test_bad_master_switch_warns_and_carries_on():
    result = run_python(f"import json, torch; print(json.dumps({PATCHED}))", env={"FL_PATCH": "maybe", **REFERENCE})
    assert last_json(result) is True
    assert "FL_PATCH='maybe' is not a boolean; accepted: 1, 0, true" in result.stderr


def test_bad_exclude_name_warns_in_the_bootstrap_and_raises_in_strict_mode():
    env = {"FL_PATCH_EXCLUDE": "rms_nrom", **REFERENCE}
    result = run_python(f"import json, torch; print(json.dumps({PATCHED}))", env=env)
    assert last_json(result) is False
    assert "unknown name 'rms_nrom'; did you mean 'rms_norm'?" in result.stderr
    strict = run_python("import torch", env={**env, "FL_PATCH_STRICT": "1"})
    assert strict.returncode != 0 and "did you mean 'rms_norm'" in strict.stderr


def test_report_at_exit_is_printed_by_rank_zero_only():
    env = {"FL_PATCH_REPORT": "1", **REFERENCE}
    rank0 = run_python("import torch", env=env)
    assert rank0.returncode == 0 and "fl_patch report" in rank0.stdout
    assert "torch.nn.functional.rms_norm" in rank0.stdout
    rank1 = run_python("import torch", env={**env, "RANK": "1"})
    assert rank1.returncode == 0 and "fl_patch report" not in rank1.stdout


def test_status_command_lists_targets_and_environment():
    result = run_python("import fl_patch.cli as c, sys; sys.exit(c.main(['status', '--json']))",
                        env=REFERENCE, bootstrap=False)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["environment"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert status["settings"]["kernels"] == "reference"
    states = {r["target"]: r["state"] for r in status["targets"] if r["family"] == "rms_norm"}
    assert states["torch.rms_norm"] == "patched"


def test_bootstrap_dir_is_found_from_a_checkout():
    from fl_patch.cli import bootstrap_dir

    assert bootstrap_dir() == str(REPO / "sitecustomize")
