"""FL_PATCH_REPORT=1 in a job of two ranks on two (stand-in) chips: each rank routes by its own device's profile,
and rank 0 prints one table of the ranks grouped by vendor / device / profile."""

import json
import socket
import textwrap

import pytest

from conftest import FAKE_GEMS_DIR, REPO, run_python
from fl_patch import ranks

DEVICES = [{"vendor": "nvidia", "type": "cuda", "name": "NVIDIA H200"},
           {"vendor": "ascend", "type": "npu", "name": "Ascend 910B"}]


def profile(name, vendor, families):
    return {"schema": 1, "device": {"vendor": vendor, "name": name}, "versions": {}, "date": "2026-12-03",
            "families": families}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(tmp_path, ending):
    """Two ranks of tests/ranks_worker.py under torchrun on 127.0.0.1, the bootstrap and the fake flag_gems on
    the path, the user cache holding a profile for one of the two devices only."""
    cache = tmp_path / "cache" / "fl_patch" / "profiles"
    cache.mkdir(parents=True)
    (cache / "h200.json").write_text(json.dumps(profile("NVIDIA H200", "nvidia", {
        "linear": {"route": "native", "why": "cuBLAS faster"},
        "rms_norm": {"route": "gems", "min_elements": 1 << 22, "why": "faster from 2**22"}})))
    (cache / "other.json").write_text(json.dumps(profile("Another chip", "ascend", {})))
    code = textwrap.dedent(
        f"""
        import runpy, sys
        sys.argv = ["torchrun", "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
                    "--master-port={free_port()}", {str(REPO / "tests" / "ranks_worker.py")!r}, {ending!r}]
        runpy.run_module("torch.distributed.run", run_name="__main__")
        """
    )
    env = {"OMP_NUM_THREADS": "1", "FL_PATCH_REPORT": "1", "FL_PATCH_KERNELS": "gems",
           "XDG_CACHE_HOME": str(tmp_path / "cache"), "STAND_IN_DEVICES": json.dumps(DEVICES)}
    result = run_python(code, env=env, extra_path=[FAKE_GEMS_DIR], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stderr


@pytest.mark.parametrize("ending", ["exit", "destroy"])
def test_rank_zero_prints_the_ranks_grouped_by_vendor_device_and_profile(tmp_path, ending):
    stderr = torchrun(tmp_path, ending)
    assert stderr.count("fl_patch ranks: 2 (by vendor / device / profile)") == 1  # rank 0 only
    assert stderr.count("fl_patch report:") == 1  # not the launcher's too (it imports torch, without a RANK)
    [h200] = [line for line in stderr.splitlines() if line.strip().startswith("ranks 0:")]
    [ascend] = [line for line in stderr.splitlines() if line.strip().startswith("ranks 1:")]
    assert "nvidia, NVIDIA H200, profile h200.json (user cache)" in h200
    assert "routes: rms_norm >= 4194304, linear native" in h200
    assert "native by profile: 1" in h200 and "small input: 1" in h200
    assert "ascend, Ascend 910B, profile none found" in ascend
    # no profile for this chip: the prior (native); the worker's calls run in grad mode, which is never measured
    assert "routes: native until measured, calibrating" in ascend
    assert "calls not on FlagGems: native until measured: 2" in ascend


def test_the_table_groups_ranks_and_names_the_missing():
    line = {"vendor": "nvidia", "device": "H200", "profile": "p.json", "routes": "linear native", "on_flag_gems": 5,
            "calls_not_on_flag_gems": {"small input": 2}}
    summaries = [dict(line, rank=0), dict(line, rank=1), dict(line, rank=2, vendor="ascend"),
                 {"rank": 3, "missing": True}, dict(line, rank=4)]
    text = ranks.table(summaries)
    assert "ranks 0-1, 4: nvidia, H200, profile p.json; 5 places on FlagGems" in text
    assert "calls not on FlagGems: small input: 6" in text
    assert "ranks 2: ascend" in text and "ranks 3: no summary within 15 s" in text
