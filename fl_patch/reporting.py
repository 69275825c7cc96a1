"""The report: one record per place fl_patch patched, skipped, excluded, failed or is still waiting for.

A :class:`Record` is also the fallback counter of its patch: replacements call ``record.fallback(reason)``
when they hand a call to the original, and the first fallback per (record, reason) is logged once.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import dataclass, field

log = logging.getLogger("fl_patch")

STATES = ("patched", "fallback", "excluded", "skipped", "failed", "waiting", "reverted")


@dataclass
class Record:
    """What happened at one place.

    family / target: the table row. where: the patched object (``module.Class.forward``), or the row's
    module for rows with no concrete place yet. provider: ``flag_gems``, ``torch reference`` or
    ``original``. state: one of STATES. reason: why skipped / excluded / failed. fallbacks: calls handed
    to the original, per reason.
    """

    family: str
    target: str
    where: str
    provider: str = "original"
    state: str = "waiting"
    reason: str = ""
    variant: str = "default"
    fallbacks: dict[str, int] = field(default_factory=dict)

    def fallback(self, reason: str) -> None:
        """Count one call handed to the original; log the first one for each reason. Inside a graph being
        compiled it does nothing (a counter there would be replayed by every compiled call).

        No lock: this runs on every launch-bound call, where a lock cost 1.4% of a decode step
        (benchmarks/bench_routing.py). Threads calling the same patched place at once may lose an increment,
        so counts are exact for one thread and a lower bound otherwise."""
        torch = sys.modules.get("torch")
        if torch is not None and torch.compiler.is_compiling():
            return
        fallbacks = self.fallbacks
        count = fallbacks.get(reason, 0)
        fallbacks[reason] = count + 1
        if count == 0:
            log.info("fl_patch: %s falls back to the original (%s)", self.where, reason)

    def as_dict(self) -> dict:
        """A plain, JSON-ready copy."""
        return {
            "family": self.family,
            "target": self.target,
            "where": self.where,
            "variant": self.variant,
            "provider": self.provider,
            "state": self.state,
            "reason": self.reason,
            "fallbacks": dict(self.fallbacks),
        }


def summary(records: list[dict]) -> dict[str, int]:
    """Counts of records per state."""
    counts: dict[str, int] = {}
    for record in records:
        counts[record["state"]] = counts.get(record["state"], 0) + 1
    return counts


def format_table(records: list[dict], notes: tuple[str, ...] = ()) -> str:
    """A readable text table of records (family, state, provider, target name, place, detail), sorted by family,
    after a summary line and `notes` (one line each, such as the device profile in force). Rows waiting for a
    library that is not installed are folded into one line."""
    missing: dict[str, int] = {}  # library not installed -> rows waiting for it
    shown = []
    for record in records:
        package = record["where"].split(".", 1)[0]
        if record["state"] == "waiting" and _not_installed(package):
            missing[package] = missing.get(package, 0) + 1
        else:
            shown.append(record)
    counts = summary(records)
    head = ("fl_patch report: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) if counts else
            "fl_patch report: nothing recorded")
    lines = [head + _hint(records), *(f"  {note}" for note in notes)]
    width = max([len(r["target"]) for r in shown] + [6])
    family_width = max([len(r["family"]) for r in shown] + [6])
    for record in sorted(shown, key=lambda r: (r["family"], r["target"], r["where"])):
        detail = record["reason"]
        if record["fallbacks"]:
            calls = ", ".join(f"{reason}: {n}" for reason, n in sorted(record["fallbacks"].items()))
            detail = (detail + "; " if detail else "") + f"fallbacks {calls}"
        lines.append(
            f"  {record['family']:<{family_width}} {record['state']:<8} {record['provider']:<15}"
            f" {record['target']:<{width}} {record['where']}" + (f"  ({detail})" if detail else "")
        )
    if missing:
        lines.append(f"  {sum(missing.values())} more rows wait for {', '.join(sorted(missing))}, not installed"
                     " (`fl-patch status --json` lists them)")
    return "\n".join(lines)


def _not_installed(package: str) -> bool:
    try:
        return package not in sys.modules and importlib.util.find_spec(package) is None
    except (ImportError, ValueError):
        return True


def _hint(records: list[dict]) -> str:
    """What the summary line adds when kernel rows were skipped because FlagGems can't be used here."""
    prefix = "FlagGems unavailable: "
    why = [r["reason"][len(prefix):] for r in records if r["state"] == "skipped" and r["reason"].startswith(prefix)]
    if not why:
        return ""
    return (f"; FlagGems is unavailable ({why[0]}), so kernel rows stay original: FL_PATCH_KERNELS=reference runs"
            " fl_patch's torch kernels on the same patched paths")


def is_rank_zero() -> bool:
    """Whether this process should print once-per-job output (RANK/LOCAL_RANK unset or 0)."""
    for var in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(var)
        if value not in (None, "", "0"):
            return False
    return True
