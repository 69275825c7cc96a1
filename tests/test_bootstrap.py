"""The zero-code bootstrap and `import fl_patch`, each in a fresh interpreter."""

import json
import os
import sys
import textwrap

import pytest

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


def test_bad_master_switch_warns_once_naming_the_bootstrap_and_carries_on():
    result = run_python(f"import json, torch; print(json.dumps({PATCHED}))", env={"FL_PATCH": "maybe", **REFERENCE})
    assert last_json(result) is True
    assert result.stderr.count("FL_PATCH='maybe' is not a boolean; accepted: 1, 0, true") == 1
    assert result.stderr.startswith("fl_patch (sitecustomize): FL_PATCH='maybe'")
    # no second message from `import fl_patch`, no file name and source line of a warnings.warn
    assert "(import fl_patch)" not in result.stderr and "_bootstrap.py" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_bad_master_switch_is_an_error_in_strict_mode():
    strict = run_python("import torch", env={"FL_PATCH": "maybe", "FL_PATCH_STRICT": "1", **REFERENCE})
    assert strict.returncode != 0 and "FL_PATCH='maybe' is not a boolean" in strict.stderr


def test_a_bad_value_is_ignored_and_said_while_the_rest_of_the_settings_work():
    env = {"FL_PATCH_DIST": "xyz", "FL_PATCH_INCLUDE": "rms_norm,linear,rms_nrom", "FL_PATCH_EXCLUDE": "linear",
           **REFERENCE}
    code = "import json, torch, fl_patch; print(json.dumps({r['target']: r['state'] for r in fl_patch.report()}))"
    result = run_python(code, env=env)
    states = last_json(result)
    assert states["torch.rms_norm"] == "patched" and states["torch.linear"] == "excluded"
    assert states["torch.distributed.flagcx"] == "excluded"  # not included
    assert "FL_PATCH_DIST='xyz' is not accepted; accepted: auto, flagcx, native; ignored:" in result.stderr
    assert "unknown name 'rms_nrom'. Closest: 'rms_norm'" in result.stderr and "Ignored." in result.stderr
    assert "'linear' is both included" in result.stderr and "exclude wins" in result.stderr
    assert "did not activate" not in result.stderr


def test_bad_exclude_name_leaves_fl_patch_off_with_one_message_and_raises_in_strict_mode():
    env = {"FL_PATCH_EXCLUDE": "rms_nrom", **REFERENCE}
    result = run_python(f"import json, torch; print(json.dumps({PATCHED}))", env=env)
    assert last_json(result) is False
    assert result.stderr.startswith("fl_patch (sitecustomize): did not activate (bad setting): FL_PATCH_EXCLUDE")
    assert "unknown name 'rms_nrom'. Closest: 'rms_norm'" in result.stderr
    strict = run_python("import torch", env={**env, "FL_PATCH_STRICT": "1"})
    assert strict.returncode != 0 and "unknown name 'rms_nrom'" in strict.stderr


def test_a_gems_unused_typo_is_said_when_torch_is_imported_even_with_the_override_off():
    env = {"FL_PATCH_GEMS_UNUSED": "softmax,notanop", **REFERENCE}
    result = run_python("import torch", env=env)
    assert result.returncode == 0 and "'notanop' is neither a FlagGems function nor an aten op" in result.stderr
    strict = run_python("import torch", env={**env, "FL_PATCH_STRICT": "1"})
    assert strict.returncode != 0 and "'notanop' is neither" in strict.stderr
    assert run_python("import torch", env={"FL_PATCH_GEMS_UNUSED": "softmax,mean_dim", **REFERENCE}).stderr == ""


def test_report_at_exit_goes_to_stderr_from_rank_zero_only():
    env = {"FL_PATCH_REPORT": "1", **REFERENCE}
    rank0 = run_python("import json, torch; print(json.dumps({'ok': 1}))", env=env)
    assert json.loads(rank0.stdout) == {"ok": 1}  # piped output stays the program's own
    assert "fl_patch report" in rank0.stderr and "torch.nn.functional.rms_norm" in rank0.stderr
    rank1 = run_python("import torch", env={**env, "RANK": "1"})
    assert rank1.returncode == 0 and "fl_patch report" not in rank1.stderr + rank1.stdout


def test_the_bootstrap_used_from_a_checkout_adds_only_the_package(tmp_path):
    """An interpreter where fl_patch is not installed (the venv's base Python): the bootstrap imports the package
    from the checkout by its path, and the checkout's tests/ and benchmarks/ do not become importable."""
    import subprocess

    base_python = getattr(sys, "_base_executable", None)
    if not base_python or base_python == sys.executable:
        pytest.skip("no base interpreter without fl_patch installed")
    code = ("import importlib.util, json, sys; import fl_patch, fl_patch._bootstrap as b; print(json.dumps(["
            "fl_patch.__file__, b.installed(), importlib.util.find_spec('tests') is None,"
            f" {str(REPO)!r} in sys.path]))")
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(REPO / "sitecustomize")}
    result = subprocess.run([base_python, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    package_file, waiting, no_tests, root_on_path = json.loads(result.stdout)
    assert package_file == str(REPO / "fl_patch" / "__init__.py") and waiting
    assert no_tests and not root_on_path


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


DROPOUT_TWICE = ("import torch, torch.nn.functional as F; q = torch.randn(1, 2, 4, 8)\n"
                 "for _ in range(2): F.scaled_dot_product_attention(q, q, q, dropout_p=0.5)")
FALLBACK = "fl_patch: torch.nn.functional.scaled_dot_product_attention falls back to the original (dropout)"


def test_log_level_info_and_debug_show_on_stderr():
    quiet = run_python(DROPOUT_TWICE, env=REFERENCE)
    assert quiet.returncode == 0 and quiet.stderr == ""
    info = run_python(DROPOUT_TWICE, env={"FL_PATCH_LOG_LEVEL": "INFO", **REFERENCE})
    lines = info.stderr.splitlines()
    assert lines[0].startswith("fl_patch (sitecustomize): active, kernels=reference; ")
    assert lines.count(FALLBACK) == 1 and "patched:" not in info.stderr  # the first fallback per reason, once
    debug = run_python(DROPOUT_TWICE, env={"FL_PATCH_LOG_LEVEL": "debug", **REFERENCE})
    assert ("fl_patch: torch.rms_norm patched: torch.nn.functional.rms_norm (torch reference)"
            in debug.stderr.splitlines())
    assert debug.stderr.count(FALLBACK) == 1


def test_log_records_show_once_through_the_application_s_own_logging():
    code = "import logging; logging.basicConfig(format='app: %(name)s: %(message)s')\n" + DROPOUT_TWICE
    result = run_python(code, env={"FL_PATCH_LOG_LEVEL": "INFO", **REFERENCE})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines().count(f"app: fl_patch: {FALLBACK}") == 1
    assert all(line.startswith("app: ") for line in result.stderr.splitlines()), result.stderr


def test_an_activation_that_fails_leaves_fl_patch_inactive(tmp_path):
    broken = tmp_path / "wrapt"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('wrapt is broken here')\n")
    code = f"import json, fl_patch; print(json.dumps([{PATCHED}, fl_patch.is_active(), fl_patch.report()]))"
    result = run_python(code, env=REFERENCE, extra_path=[tmp_path])
    assert last_json(result) == [False, False, []]
    assert result.stderr.startswith("fl_patch (sitecustomize): did not activate (error ImportError): wrapt is broken")
