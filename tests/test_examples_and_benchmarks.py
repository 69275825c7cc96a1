"""Every example and benchmark runs as written, in its --quick / CPU form (the GPU figures come from the
device runs committed under benchmarks/results and tests/gpu/results)."""

import importlib.util
import json
import os
import re
import subprocess
import sys

from conftest import REPO, run_python


def run_script(*args, env=None, bootstrap=False, timeout=300):
    """Run a script as `python script args` does: its own folder first on sys.path."""
    code = ("import os, runpy, sys; sys.argv = {!r}; sys.path.insert(0, os.path.dirname(sys.argv[0])); "
            "runpy.run_path(sys.argv[0], run_name='__main__')").format([str(REPO / args[0]), *args[1:]])
    result = run_python(code, env=env, bootstrap=bootstrap, timeout=timeout)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_demo_runs_patched_and_reports():
    out = run_script("examples/demo.py", "--quick").stdout
    assert "fl_patch report:" in out and "patched" in out
    diff = float(out.rsplit("logit difference on real tokens:", 1)[1].split()[0])
    assert diff < 1e-4  # reference kernels in fp32 on CPU


def test_generate_example_unchanged_under_the_bootstrap_and_fl_patch_run():
    env = {"FL_PATCH_KERNELS": "reference", "FL_PATCH_REPORT": "1"}
    plain = run_script("examples/generate.py", env={"FL_PATCH": "0"}, bootstrap=True).stdout
    boot = run_script("examples/generate.py", env=env, bootstrap=True)
    assert plain.splitlines() == boot.stdout.splitlines()  # the same tokens, and the report is not on stdout
    assert "fl_patch report:" in boot.stderr
    launched = subprocess.run(
        [sys.executable, "-m", "fl_patch", "run", "--", sys.executable, str(REPO / "examples/generate.py")],
        env={**os.environ, **env, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr
    assert launched.stdout.splitlines() == plain.splitlines() and "fl_patch report:" in launched.stderr
    excluded = run_script("examples/generate.py", env={**env, "FL_PATCH_EXCLUDE": "attention"}, bootstrap=True)
    assert "excluded" in excluded.stderr and excluded.stdout.splitlines() == plain.splitlines()


def test_explicit_example():
    out = run_script("examples/explicit.py", "--kernels", "reference").stdout
    assert "apply(exclude=['attention'])" in out
    assert "families patched = ['rms_norm']" in out
    assert "after the block: active = False" in out


def test_e2e_benchmark_harness_quick(tmp_path):
    run_script("benchmarks/bench_e2e.py", "--quick", "--out", str(tmp_path), timeout=600)
    results = json.loads((tmp_path / "e2e_quick.json").read_text())
    for model in ("llama", "qwen3"):
        forward = results["models"][model]["forward"]
        assert {"hf_sdpa", "hf_eager", "fl_patch", "fl_patch_all", "fl_patch_all-attention"} <= set(forward)
        for shapes in forward.values():
            for entry in shapes.values():
                assert "error" not in entry, entry
                assert entry["finite"] and entry["max_diff"] < 1e-4
        train = results["models"][model]["train"]
        assert set(train) == {"hf_sdpa", "fl_patch", "fl_patch_flce"}, train  # liger: not in --quick
        for entry in train.values():  # the same first step on the same weights: the same loss
            assert entry["ms"] > 0 and abs(entry["loss"] - train["hf_sdpa"]["loss"]) < 1e-4, train
    assert "| fl_patch |" in (tmp_path / "e2e_quick.md").read_text()
    assert "| fl_patch_flce |" in (tmp_path / "e2e_quick.md").read_text()


def test_train_gpu_script_dry_run_checks_every_variant(tmp_path):
    out = run_script("tests/gpu/train_gpu.py", "--dry-run", "--out-dir", str(tmp_path), timeout=600).stdout
    results = json.loads((tmp_path / "train-gpu.json").read_text())
    for model in ("llama", "qwen3"):
        parts = results["models"][model]
        assert parts["gradients"]["fl_patch_flce"]["logits_none"] and parts["gradients"]["fl_patch_flce"]["pass"]
        assert parts["curves"]["fl_patch"]["pass"] and parts["curves"]["fl_patch_flce"]["pass"]
    for model in ("llama", "gemma3"):  # gradient checkpointing: Llama ends its layers with a linear, Gemma3 an RMSNorm
        checkpointing = results["models"][model]["checkpointing"]
        for mode in ("non_reentrant", "reentrant"):
            assert {variant: e["pass"] for variant, e in checkpointing[mode].items()} == {
                "hf": True, "fl_patch": True, "fl_patch_all": True}, checkpointing[mode]
    assert "checks pass, 0 errors" in out and "| fl_patch_flce |" in (tmp_path / "train-gpu.md").read_text()
    assert "| non_reentrant fl_patch_all |" in (tmp_path / "train-gpu.md").read_text()


def test_e2e_benchmark_rounds_interleave_and_keep_each_round(tmp_path):
    out = run_script("benchmarks/bench_e2e.py", "--quick", "--models", "llama", "--parts", "prefill", "--rounds", "2",
                     "--variants", "fl_patch", "--out", str(tmp_path), timeout=600).stdout
    forward = json.loads((tmp_path / "e2e_quick.json").read_text())["models"]["llama"]["forward"]
    assert set(forward) == {"hf_sdpa", "fl_patch"}
    for shapes in forward.values():
        for entry in shapes.values():
            assert len(entry["rounds_ms"]) == 2
            rounding = 5e-4  # rounds_ms are rounded to 3 decimals, ms is not
            assert min(entry["rounds_ms"]) - rounding <= entry["ms"] <= max(entry["rounds_ms"]) + rounding
    # each shape timed by every variant back to back (--interleave shape, the default), in both rounds
    timed = re.findall(r"^  (hf_sdpa|fl_patch) +(prefill_\w+)=", out, flags=re.M)
    assert timed == [("hf_sdpa", "prefill_2x32"), ("fl_patch", "prefill_2x32"), ("hf_sdpa", "prefill_1x8"),
                     ("fl_patch", "prefill_1x8")] * 2, out


def test_e2e_speedup_is_the_median_of_paired_round_ratios():
    spec = importlib.util.spec_from_file_location("bench_e2e_module", REPO / "benchmarks" / "bench_e2e.py")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        bench = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    # round 1 ran on a slow host for both: paired ratios 2.0, 1.0, 1.0 -> 1.0; medians alone would say 10/5 = 2.0
    hf = {"ms": 10.0, "rounds_ms": [20.0, 10.0, 9.0]}
    patched = {"ms": 5.0, "rounds_ms": [10.0, 10.0, 9.0]}
    assert bench.speedup(hf, patched) == 1.0
    assert bench.speedup({"ms": 10.0}, {"ms": 5.0}) == 2.0  # no rounds: the ratio of the medians


def test_decode_trace_quick_times_every_step_and_names_what_fl_patch_adds(tmp_path):
    run_script("benchmarks/decode_trace.py", "--quick", "--out", str(tmp_path), timeout=600)
    trace = json.loads((tmp_path / "decode_trace.json").read_text())
    assert len(trace["fl_patch_ms"]) == 20 and len(trace["hf_ms"]["before"]) == 50
    assert [span for span, *_ in trace["windows"]] == ["1-10", "11-20"]
    assert len(trace["detail"]["fl_patch"]) == 20 and all(len(row) == 4 for row in trace["detail"]["fl_patch"])
    assert set(trace["checkpoints"]) == {"1", "2", "5", "10", "20"}
    added = trace["added_functions"]
    assert any("fl_patch/kernels/rms_norm.py" in name for name in added), added  # the reference kernels ran
    assert all("fl_patch" in name or "flag_gems" in name or "triton" in name for name in added)
    assert "| fl_patch steps | median ms |" in (tmp_path / "decode_trace.md").read_text()


def test_routing_benchmark_quick_routes_every_call_natively():
    out = run_script("benchmarks/bench_routing.py", "--quick", "--places").stdout
    assert "fl_patch / HF:" in out
    for place in ("F.linear (q_proj)", "LlamaMLP", "LlamaDecoderLayer"):  # --places: unpatched, patched, difference
        assert re.search(re.escape(place) + r".* \d+\.\d\d +\d+\.\d\d +[+-]\d+\.\d\d\n", out), out
    routed = r"'(small input|native by profile)"
    for place in ("LlamaMLP.forward", "apply_rotary_pos_emb", "functional.linear", "AttentionInterface['sdpa']"):
        assert re.search(re.escape(place) + r": \{" + routed + r"': \d+\}", out), out
    assert re.search(r"LlamaRMSNorm.forward: \{" + routed + r" \(torch rms_norm\)': \d+\}", out), out


def test_profile_benchmark_quick_groups_operator_time(tmp_path):
    run_script("benchmarks/profile_e2e.py", "--quick", "--out", str(tmp_path), timeout=600)
    profiles = json.loads((tmp_path / "profile_quick.json").read_text())["profiles"]
    [(key, variants)] = profiles.items()
    assert key == "llama prefill 2x32" and set(variants) == {"hf_sdpa", "fl_patch"}
    for entry in variants.values():
        assert entry["busy_ms"] > 0 and entry["by_category_ms"]["matmul"] > 0, entry
    assert "| matmul |" in (tmp_path / "profile_quick.md").read_text()


def test_ops_benchmark_quick(tmp_path):
    out = run_script("benchmarks/bench_ops.py", "--quick", "--out", str(tmp_path), timeout=600).stdout
    results = json.loads((tmp_path / "bench_ops_quick.json").read_text())
    assert results["provider"] == "reference" and results["ops"], out
    table = (tmp_path / "bench_ops_quick.md").read_text()
    for op in ("rms_norm", "rope", "sdpa", "swiglu", "layer_norm"):
        assert f"| {op} |" in table, table


def test_startup_benchmark_quick():
    out = run_script("benchmarks/bench_startup.py", "--quick").stdout
    assert "bootstrap overhead on `python -c pass`" in out


def test_distributed_example_switches_to_flagcx_under_fl_patch_run():
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fl_patch", "run", "--", sys.executable, "-m", "torch.distributed.run",
               "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
               str(REPO / "examples/distributed_allreduce.py")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests/flagcx_standin"), str(REPO)])}
    env = {k: v for k, v in env.items() if not k.startswith("FL_PATCH")}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert lines == ["rank 0/2: backend cpu:flagcx, all_reduce sum 3",
                     "rank 1/2: backend cpu:flagcx, all_reduce sum 3"], result.stdout


def test_host_cost_benchmark_dry_run_times_every_variant(tmp_path):
    run_script("benchmarks/bench_host_cost.py", "--dry-run", "--out", str(tmp_path), "--batches", "1", "--calls", "3",
               "--warmup", "4")
    report = json.loads((tmp_path / "host_cost_dry.json").read_text())
    rows = {(row["op"], row["variant"]): row for row in report["rows"]}
    assert all("error" not in row and row["host_us"] > 0 for row in rows.values()), rows
    for op in ("rms_norm", "silu_and_mul", "rope", "layer_norm"):
        assert rows[(op, "fast launch")]["fast_calls_while_timed"] > 0, op  # bound during the warm-up
        assert rows[(op, next(v for o, v in rows if o == op and v.endswith("no fast")))]["fast_calls_while_timed"] == 0
    assert {target["op"] for target in report["targets"]} == {"rms_norm", "silu_and_mul", "rope", "layer_norm"}
    assert "| 1 | rope | fast launch |" in (tmp_path / "host_cost_dry.md").read_text()


def test_fast_launch_gpu_script_dry_run_passes_every_case(tmp_path):
    out = run_script("tests/gpu/fast_launch_gpu.py", "--dry-run", str(tmp_path / "fast_launch.json")).stdout
    report = json.loads((tmp_path / "fast_launch.json").read_text())
    summary = report["summary"]
    assert summary["ran"] == summary["cases"] == summary["passed"] and summary["errors"] == 0, out
    unbound = [row for row in report["cases"] if not row["bound"]]
    assert [row["form"] for row in unbound] == ["transposed x (FlagGems copies it)"] * 2  # bf16, fp32
    assert "torch work in the call: aten.clone" in (tmp_path / "fast_launch.md").read_text()


def test_a_script_run_from_examples_or_benchmarks_finds_no_stand_in_for_a_patched_package():
    """`python examples/demo.py` puts examples/ first on sys.path: a folder there named like a package fl_patch patches
    (examples/lightx2v was one) is imported as that package, a namespace package with none of its code."""
    from fl_patch import _bootstrap

    missing = sorted(name for name in _bootstrap.WATCHED_PACKAGES if importlib.util.find_spec(name) is None)
    assert "lightx2v" in missing  # not installed here: what the check is about
    code = ("import importlib.util, json, sys; sys.path.insert(0, sys.argv[1]); "
            f"print(json.dumps([n for n in {missing!r} if importlib.util.find_spec(n) is not None]))")
    for folder in ("examples", "benchmarks", "tests/gpu"):
        found = subprocess.run([sys.executable, "-c", code, str(REPO / folder)], capture_output=True, text=True,
                               timeout=60)
        assert json.loads(found.stdout) == [], (folder, found.stderr)


def test_demo_with_gems_kernels_on_a_cpu_machine_says_what_it_needs():
    result = subprocess.run([sys.executable, str(REPO / "examples/demo.py"), "--kernels", "gems"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (
        "demo.py: error: --kernels gems runs FlagGems' kernels, which need a GPU and FlagGems (no CUDA GPU here); "
        "--kernels reference runs fl_patch's torch kernels on the same patched paths, on the CPU")
