"""The report of a job's ranks (``FL_PATCH_REPORT=1`` under torchrun): one table, printed by rank 0, of the ranks
grouped by vendor / device / profile, so that a job across two chip types (FlagScale's heterogeneous training,
FlagCX between the chips) shows which rows ran where.

Each rank puts a short summary of its own report in the default process group's store; rank 0 waits for the
others' (at most :data:`WAIT_SECONDS`, counting who is missing) and prints the table. The store, not a
collective: a rank that crashed or exited early can't make the others hang in a collective at exit, and no rank
but rank 0 waits. This happens at exit, or just before the default group is destroyed (the
``torch.distributed.report_ranks`` row wraps ``destroy_process_group``), whichever comes first; with no default
group at all, rank 0's table has its own line only.
"""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta

KEY = "fl_patch/report/rank{}"
WAIT_SECONDS = 15.0

_gathered: list | None = None  # the summaries once exchanged (rank 0), so that exit does not exchange again


def summary(rank: int) -> dict:
    """This rank's line: its device, its profile, how many places run on FlagGems, and its routed calls."""
    from fl_patch import runtime
    from fl_patch.device import routing

    profile = routing.describe()
    device = profile.get("device") or {}
    records = runtime.records()
    calls = _summed(record["fallbacks"] for record in records)
    return {
        "rank": rank,
        "vendor": device.get("vendor") or "-",
        "device": device.get("name") or "not seen yet",
        "profile": _profile_name(profile),
        "routes": _routes(profile),
        "on_flag_gems": sum(1 for r in records if r["state"] == "patched" and r["provider"] == "flag_gems"),
        "calls_not_on_flag_gems": calls,
    }


def _profile_name(profile: dict) -> str:
    if "path" in profile:
        name = profile["path"].replace("\\", "/").rsplit("/", 1)[-1]
        return f"{name} ({profile['source']}{', stale' if profile.get('stale') else ''})"
    return {"none": "none found", "off": "off"}.get(profile["state"], profile["state"])


def _routes(profile: dict) -> str:
    if profile.get("state") == "none":
        return "native until measured" + (", calibrating" if profile.get("calibrating") else "")
    words = []
    for family, entry in profile.get("families", {}).items():
        if entry["route"] == "native":
            words.append(f"{family} native")
        elif entry["min_elements"]:
            words.append(f"{family} >= {entry['min_elements']}")
    return ", ".join(words) or "every family on FlagGems"


def exchange_now() -> None:
    """Exchange the summaries over the default group's store if there is one (rank 0 keeps them). Never raises:
    a failure leaves rank 0 with its own line."""
    global _gathered
    if _gathered is not None:
        return
    distributed = sys.modules.get("torch.distributed")
    try:
        if distributed is None or not distributed.is_available() or not distributed.is_initialized():
            return
        from torch.distributed import distributed_c10d

        rank, world = distributed.get_rank(), distributed.get_world_size()
        store = distributed_c10d._get_default_store()
        store.set(KEY.format(rank), json.dumps(summary(rank)))
        if rank == 0:
            deadline = time.monotonic() + WAIT_SECONDS
            _gathered = [_read(store, other, deadline) for other in range(world)]
        else:
            _gathered = []
    except Exception as exc:  # the report must never break the user's exit
        _gathered = [dict(summary(0), note=f"ranks not gathered: {type(exc).__name__}: {exc}")]


def _read(store, rank: int, deadline: float) -> dict:
    try:
        store.wait([KEY.format(rank)], timedelta(seconds=max(0.1, deadline - time.monotonic())))
        return json.loads(store.get(KEY.format(rank)))
    except Exception:  # not there within the wait: that rank ended early or never reached its exit
        return {"rank": rank, "missing": True}


def table(summaries: list[dict]) -> str:
    """The ranks grouped by (vendor, device, profile), one line per group."""
    groups: dict[tuple, list[dict]] = {}
    missing = [s["rank"] for s in summaries if s.get("missing")]
    for entry in summaries:
        if not entry.get("missing"):
            groups.setdefault((entry["vendor"], entry["device"], entry["profile"]), []).append(entry)
    lines = [f"fl_patch ranks: {len(summaries)} (by vendor / device / profile)"]
    for (vendor, device, profile), members in groups.items():
        calls = _summed(member["calls_not_on_flag_gems"] for member in members)
        called = ", ".join(f"{reason}: {n}" for reason, n in sorted(calls.items())) or "none"
        ranks = _spans([m["rank"] for m in members])
        lines.append(f"  ranks {ranks}: {vendor}, {device}, profile {profile}; {members[0]['on_flag_gems']} places on"
                     f" FlagGems; routes: {members[0]['routes']}; calls not on FlagGems: {called}")
        lines.extend(f"    rank {m['rank']}: {m['note']}" for m in members if m.get("note"))
    if missing:
        lines.append(f"  ranks {_spans(missing)}: no summary within {WAIT_SECONDS:.0f} s (ended early?)")
    return "\n".join(lines)


def _summed(counts) -> dict[str, int]:
    """Per reason, the sum of several {reason: count} dicts."""
    total: dict[str, int] = {}
    for one in counts:
        for reason, count in one.items():
            total[reason] = total.get(reason, 0) + count
    return total


def _spans(ranks: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2, 5"``."""
    ranks, spans = sorted(ranks), []
    for rank in ranks:
        if spans and rank == spans[-1][1] + 1:
            spans[-1][1] = rank
        else:
            spans.append([rank, rank])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def is_launcher() -> bool:
    """Whether this process is torch's elastic launcher (``torchrun``, ``python -m torch.distributed.run``,
    ``elastic_launch``) rather than one of its ranks: it imported the launcher's module, and has no
    TORCHELASTIC_RUN_ID, which the launcher sets for each rank it starts (never in its own environment). It
    imports torch, so the bootstrap activates there too, but it runs none of the job's calls."""
    return "torch.distributed.launcher.api" in sys.modules and "TORCHELASTIC_RUN_ID" not in os.environ


def report_text() -> str | None:
    """What this process prints at exit: rank 0 its report and the ranks' table (or its own line when there is no
    group); other ranks nothing (their summary went into the store); torchrun's launcher nothing (its ranks
    report)."""
    from fl_patch import reporting, runtime

    if is_launcher():
        return None
    exchange_now()
    if not reporting.is_rank_zero():
        return None
    text = runtime.report_text()
    if _gathered:
        return text + "\n" + table(_gathered)
    if os.environ.get("WORLD_SIZE", "1") not in ("", "1"):  # a job of several ranks, but no group left to ask
        return text + "\n" + table([dict(summary(0), note="no default process group at exit: this rank only")])
    return text
