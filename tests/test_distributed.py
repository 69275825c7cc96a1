"""FlagCX as the default torch.distributed backend, with a gloo-backed stand-in package named flagcx."""

import json
import logging
import socket
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.distributed.device_mesh as device_mesh
import torch.distributed.distributed_c10d as c10d

import fl_patch
from conftest import run_python
from fl_patch.errors import PatchError
from fl_patch.integrations import distributed as integration

STANDIN = Path(__file__).resolve().parent / "flagcx_standin"
WORKER = Path(__file__).resolve().parent / "dist_worker.py"
ROW = "torch.distributed.flagcx"


@pytest.fixture
def flagcx_standin(monkeypatch):
    """The stand-in on sys.path (importing it registers "flagcx" for "cpu" in this process, for good)."""
    monkeypatch.syspath_prepend(str(STANDIN))
    yield


@pytest.fixture
def no_flagcx(monkeypatch):
    """No flagcx anywhere: not importable, not imported."""
    monkeypatch.delitem(sys.modules, "flagcx", raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(STANDIN)])


def originals():
    return {
        "dist.init_process_group": dist.init_process_group,
        "c10d.init_process_group": c10d.init_process_group,
        "dist.new_group": dist.new_group,
        "c10d.new_group": c10d.new_group,
        "device_mesh.init_process_group": device_mesh.init_process_group,  # bound at its import
        "device_mesh.new_group": device_mesh.new_group,
        "map": dict(dist.Backend.default_device_backend_map),
    }


def row_records():
    return [r for r in fl_patch.report() if r["target"] == ROW]


def test_auto_makes_flagcx_default_and_revert_restores_identical_objects(flagcx_standin):
    before = originals()
    for _ in range(2):
        fl_patch.apply(include=["distributed"])
        assert dist.Backend.default_device_backend_map["cpu"] == "flagcx"
        assert dist.init_process_group is c10d.init_process_group is not before["dist.init_process_group"]
        assert dist.new_group is c10d.new_group is not before["dist.new_group"]
        assert device_mesh.init_process_group is dist.init_process_group and device_mesh.new_group is dist.new_group
        assert dist.init_process_group.__wrapped__ is before["c10d.init_process_group"]
        assert {r["state"] for r in row_records()} == {"patched"}
        fl_patch.revert()
        after = originals()
        assert all(after[key] is before[key] for key in before if key != "map")
        assert after["map"] == before["map"]


def test_single_rank_group_runs_on_flagcx_and_gloo_stays_gloo(flagcx_standin, tmp_path):
    fl_patch.apply(include=["distributed"])
    import flagcx

    created = len(flagcx.CREATED)
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group(store=store, rank=0, world_size=1)
    try:
        assert dist.get_backend() == "cpu:flagcx"
        nccl_group = dist.new_group(backend="nccl")
        assert dist.get_backend(nccl_group) == "cpu:flagcx"
        gloo_group = dist.new_group(backend="gloo")
        assert dist.get_backend(gloo_group) == "gloo"
        assert dist.get_backend(dist.new_group()) == "cpu:flagcx"  # no backend: the default group's
        assert len(flagcx.CREATED) == created + 3
    finally:
        dist.destroy_process_group()


def recorder(calls):
    """Stand-ins for init_process_group / new_group with torch 2.13's signatures, recording their arguments."""

    def init_process_group(backend=None, init_method=None, timeout=None, world_size=-1, rank=-1, store=None,
                           group_name="", pg_options=None, device_id=None, _ranks=None):
        calls.append(("init", backend, pg_options, world_size))

    def new_group(ranks=None, timeout=None, backend=None, pg_options=None, use_local_synchronization=False,
                  group_desc=None, device_id=None, sort_ranks=True):
        calls.append(("new_group", backend, pg_options, ranks))

    return init_process_group, new_group


def test_pg_options_dropped_when_switched_and_explicit_backends_untouched(flagcx_standin, monkeypatch):
    calls = []
    init, new_group = recorder(calls)
    for owner in (dist, c10d):
        monkeypatch.setattr(owner, "init_process_group", init)
        monkeypatch.setattr(owner, "new_group", new_group)
    fl_patch.apply(include=["distributed"])
    options = object()  # e.g. a ProcessGroupNCCL.Options
    dist.init_process_group(pg_options=options, world_size=2)
    dist.init_process_group("nccl", None, None, 2, 0, None, "", options)
    dist.init_process_group(backend="gloo", pg_options=options)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl")
    dist.new_group([0, 1], backend="NCCL", pg_options=options)
    dist.new_group([0, 1], pg_options=options)  # no default group: stays as it is
    assert calls == [
        ("init", "cpu:flagcx", None, 2),
        ("init", "cpu:flagcx", None, 2),
        ("init", "gloo", options, -1),
        ("init", "cpu:gloo,cuda:nccl", None, -1),  # the stand-in declares "cpu" only: nothing to switch
        ("new_group", "cpu:flagcx", None, [0, 1]),
        ("new_group", None, options, [0, 1]),
    ]
    fl_patch.revert()
    assert dist.init_process_group is init and c10d.new_group is new_group


def test_backend_string_and_switch_rules():
    assert integration.backend_string(["cuda"]) == "cpu:gloo,cuda:flagcx"
    assert integration.backend_string(["cpu"]) == "cpu:flagcx"
    spec = "cpu:gloo,cuda:flagcx"
    assert integration.switch_backend(None, spec, ["cuda"]) == spec
    assert integration.switch_backend("nccl", spec, ["cuda"]) == spec
    assert integration.switch_backend(dist.Backend.NCCL, spec, ["cuda"]) == spec
    for explicit in ("gloo", "mpi", "flagcx", "cpu:gloo,cuda:gloo", "bad:pair:string"):
        assert integration.switch_backend(explicit, spec, ["cuda"]) is None
    assert integration.switch_backend("cpu:gloo,cuda:nccl", spec, ["cuda"]) == spec


def test_native_leaves_torch_alone(flagcx_standin):
    before = originals()
    fl_patch.apply(include=["distributed"], dist="native")
    assert originals() == before
    assert [(r["state"], r["reason"]) for r in row_records()] == [("skipped", "FL_PATCH_DIST=native")]


def test_lightx2v_alias_disables_flagcx(flagcx_standin, monkeypatch):
    monkeypatch.setenv("LIGHTX2V_FL_DISABLE_FLAGCX", "1")
    fl_patch.apply(include=["distributed"])
    assert dist.Backend.default_device_backend_map["cpu"] == "gloo"
    assert row_records()[0]["reason"] == "FL_PATCH_DIST=native"


def test_auto_without_flagcx_is_skipped(no_flagcx):
    before = originals()
    fl_patch.apply(include=["distributed"])
    assert originals() == before
    assert [(r["state"], r["reason"]) for r in row_records()] == [("skipped", "flagcx is not installed")]


def test_flagcx_requested_but_missing_warns_or_raises_in_strict_mode(no_flagcx, caplog):
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        fl_patch.apply(include=["distributed"], dist="flagcx")
    record = row_records()[0]
    assert record["state"] == "failed" and "FL_PATCH_DIST=flagcx but FlagCX can't be used" in record["reason"]
    assert "flagcx is not installed" in caplog.text
    fl_patch.revert()
    with pytest.raises(PatchError, match="FL_PATCH_DIST=flagcx but FlagCX can't be used: flagcx is not installed"):
        fl_patch.apply(include=["distributed"], dist="flagcx", strict=True)


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(out, worker_args, env):
    """Run dist_worker.py on 2 ranks under torchrun with the bootstrap on PYTHONPATH; one dict per rank."""
    out.mkdir()
    argv = ["torchrun", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
            str(WORKER), str(out), *worker_args]
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = {argv!r}
        runpy.run_module("torch.distributed.run", run_name="__main__")
        """
    )
    result = run_python(code, env={"OMP_NUM_THREADS": "1", **env}, extra_path=[STANDIN], timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def test_two_ranks_torchrun_default_is_flagcx_with_zero_code_changes(tmp_path):
    runs = {
        "default": (["default", "nccl"], {}),
        "nccl": (["nccl"], {}),
        "native": (["default"], {"FL_PATCH_DIST": "native"}),
    }
    with ThreadPoolExecutor(len(runs)) as pool:
        futures = {name: pool.submit(torchrun, tmp_path / name, *args) for name, args in runs.items()}
        results = {name: future.result() for name, future in futures.items()}
    for rank in results["default"]:
        assert rank["backend"] == "cpu:flagcx" and rank["sum"] == 3.0
        assert rank["subgroup_backend"] == "cpu:flagcx" and rank["sub_sum"] == 2.0
        assert rank["flagcx_groups"] == 2
    for rank in results["nccl"]:
        assert rank["backend"] == "cpu:flagcx" and rank["sum"] == 3.0 and rank["flagcx_groups"] == 1
    for rank in results["native"]:
        assert "flagcx" not in rank["backend"] and rank["sum"] == 3.0 and rank["flagcx_groups"] == 0
