"""Self-calibration: on a device without a measured profile, learn from the program's own calls which of them
FlagGems runs faster than the native path, route by that, and keep it in the user cache for the next process.

Who calibrates: a routing key (``rms_norm.hf``, ``rope.hf``, ...) whose device has no profile from
``fl-patch tune`` (cached or shipped), or whose calibrated profile has not yet seen calls of this size. Not with
``FL_PATCH_PROFILE`` set (the user chose the routing), ``FL_PATCH_CALIBRATE=0``, torch's deterministic
algorithms on, while a CUDA graph is captured or torch.compile traces: then calls take the *prior*
(:func:`fl_patch.device.routing.prior`), the path that can't lose.

How: calls are grouped in cells by key, size bucket (the deciding tensor's element count, in powers of two)
and regime (launch-bound: the device's stream idle when the call starts; device-bound: work still queued, as
:mod:`fl_patch.device.routing` tells them apart). In a cell still being measured the router hands the call to the
kernel's watch (:func:`fl_patch.replacements.kernel_pair`), which runs it on FlagGems or on the form's native
path in turn (:data:`NATIVES`), both giving the same result within the form's tolerance (FlagGems' was verified
first, :mod:`fl_patch.device.verification`). It times the call without synchronising the stream: host time by clock
around the call, device time by a pair of events read once they are done (a later call polls them). The first
calls of each side are not timed (JIT compilation, caches). With :data:`SAMPLES` timings a side, the cell becomes
a point (median times, their spread as the noise) and the key's decision is :func:`fl_patch.device.tuning.decide` over
its points of each regime, the rule ``fl-patch tune`` uses: FlagGems from the smallest size where it is faster
beyond noise and stays within noise at every larger measured size, else native. A call's cost is its host time
or its device time, whichever is longer, in the launch-bound regime, and its device time in the device-bound one.

Calls whose size lies within the measured range then route by the decision's thresholds at the cost of any
profile (:func:`fl_patch.device.routing.router`); a size outside it is measured when it comes. Only the keys of
:func:`calibrated_keys` are calibrated; the others keep the prior until ``fl-patch tune`` measures them
(:data:`NOT_CALIBRATED` says why for each).

Persistence: each new point is merged into ``<cache>/calibrated/<device file>.json`` (a profile marked
``"calibrated"``, with every point and how many timed calls each side rests on) under an exclusive file lock,
written to a temporary file and renamed into place, so concurrent processes and ranks neither corrupt nor lose
each other's points. A profile from ``fl-patch tune`` wins over a calibrated one
(:func:`fl_patch.device.profiles.find`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fl_patch.device import profiles

log = logging.getLogger("fl_patch")

SAMPLES = 6  # timed calls a side before a cell becomes a point
WARMUP = {"gems": 2, "native": 1}  # first calls a side in a cell that are run but not timed
NOISE_FLOOR = 0.03  # as fl-patch tune's: differences under 3% are never read as a win
LAUNCH_BOUND, DEVICE_BOUND = "launch_bound", "device_bound"
CALIBRATED = "calibrated"  # a calibrated profile's marker field, and its source name
FOLDER = "calibrated"  # its folder under the user's profile cache


def _natives() -> dict[str, Callable]:
    """Routing key -> the native path with the kernel's signature: what a call routed away from FlagGems runs
    (torch's own ops, never fl_patch's replacements: ``torch.rms_norm``, not ``F.rms_norm``)."""
    import torch

    from fl_patch.kernels import rms_norm, rope, swiglu

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return torch._C._nn.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                                          scale=scale, enable_gqa=enable_gqa)

    def linear_in_out(x, weight_t, bias=None):
        return torch.matmul(x, weight_t) if bias is None else torch.addmm(bias, x, weight_t)

    return {
        "rms_norm.hf": rms_norm.native_hf,
        "rms_norm.gemma": rms_norm.reference_gemma,  # HF's GemmaRMSNorm body: what the original runs
        "rms_norm.fp32": rms_norm.native_fp32,
        "rms_norm.gated": rms_norm.native_gated,
        "rms_norm.torch": torch.rms_norm,
        "rope.hf": rope.reference_hf,  # HF's apply_rotary_pos_emb body
        "rope.interleaved": rope.reference_interleaved,
        "swiglu.swiglu": swiglu.native,
        "layer_norm.layer_norm": torch.layer_norm,
        "linear.linear": torch._C._nn.linear,
        "linear.in_out": linear_in_out,
        "attention.sdpa": sdpa,
    }


_natives_cache: dict[str, Callable] | None = None


def _native_table() -> dict[str, Callable]:
    global _natives_cache
    if _natives_cache is None:
        _natives_cache = _natives()
    return _natives_cache


def native(key: str) -> Callable | None:
    """The native path of routing key `key` with its kernel's signature, or None where there is none."""
    return _native_table().get(key)


# Routing keys calibration leaves to the prior, and why: measuring them on live calls would cost the program more
# than a few percent of its first seconds, or there is no native path with the kernel's signature to time against.
NOT_CALIBRATED = {
    "linear.linear": "FlagGems' GEMM autotunes per token count (2.6 s a new count on an H200): measuring it on the "
                     "program's calls would cost seconds per new size",
    "linear.in_out": "as linear.linear",
    "attention.sdpa": "FlagGems' attention lost to torch's at every measured size on the H200, and a new sequence "
                      "length may compile or tune anew: left to `fl-patch tune`",
    "attention.varlen": "no native path with the kernel's signature (LightX2V's varlen calls)",
    "cross_entropy.loss": "the native loss takes num_items_in_batch in transformers' own code, not the kernel's",
}


def calibrated_keys() -> tuple[str, ...]:
    """The routing keys calibration measures: those with a native path, less :data:`NOT_CALIBRATED` (the others
    keep the prior)."""
    return tuple(key for key in _native_table() if key not in NOT_CALIBRATED)


def bucket_of(elements: int) -> int:
    """The size bucket of a call: ``elements.bit_length()``, so bucket b holds [2**(b-1), 2**b)."""
    return elements.bit_length()


def bucket_range(bucket: int) -> tuple[int, int]:
    """(smallest, largest) element count of `bucket`."""
    return (0, 0) if bucket == 0 else (1 << (bucket - 1), (1 << bucket) - 1)


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """Times one call: host seconds by `clock`, device seconds by a pair of events read once done. `events(device)`
    gives a fresh (start, end) pair with ``record()``, ``query()`` and ``elapsed_time()`` (ms), or None where the
    device type has no timing events (then host time alone). Defaults: :data:`CLOCK` and :data:`EVENTS` (tests
    put stand-ins there)."""

    def __init__(self, clock: Callable[[], float] | None = None, events: Callable | None = None):
        self.clock = clock or CLOCK
        self.events = events or EVENTS

    def start(self, device):
        pair = self.events(device)
        if pair is not None:
            try:
                pair[0].record()
            except Exception:  # a device type whose events can't be recorded: host time alone
                pair = None
        return pair, self.clock()

    def stop(self, started) -> Sample:
        pair, began = started
        host = self.clock() - began
        if pair is not None:
            pair[1].record()
        return Sample(host, pair)


def _torch_events(device):
    import torch

    if device.type == "cpu":
        return None  # the host clock is the device's
    try:
        return (torch.Event(device=device, enable_timing=True), torch.Event(device=device, enable_timing=True))
    except Exception:  # a device type without timing events: host time alone
        return None


CLOCK: Callable[[], float] = time.perf_counter
EVENTS: Callable = _torch_events


@dataclass
class Sample:
    """One timed call: host seconds, and its events until they are read (then `device`, seconds)."""

    host: float
    events: tuple | None
    device: float | None = None

    def ready(self) -> bool:
        """Whether the device time is known (or will never be): reads the events once they are done."""
        if self.events is None:
            return True
        try:
            if not self.events[1].query():
                return False
            self.device = self.events[0].elapsed_time(self.events[1]) / 1000.0
        except Exception:  # events of a device type that can't time: host time alone
            self.device = None
        self.events = None
        return True

    def cost(self, regime: str) -> float:
        """Seconds this call cost the program (module docstring)."""
        if self.device is None:
            return self.host
        return self.device if regime == DEVICE_BOUND else max(self.host, self.device)


# ----------------------------------------------------------------------------------------------- cells


@dataclass
class Cell:
    """Calls of one key in one size bucket and regime while they are measured."""

    bucket: int
    regime: str
    runs: dict[str, int] = field(default_factory=lambda: {"gems": 0, "native": 0})
    samples: dict[str, list] = field(default_factory=lambda: {"gems": [], "native": []})

    def next_side(self) -> str:
        """The side the next call runs on: the one with fewer runs (gems first)."""
        return "gems" if self.runs["gems"] <= self.runs["native"] else "native"

    def timed(self, side: str) -> bool:
        """Whether the next call on `side` is timed (past its warm-up)."""
        return self.runs[side] >= WARMUP[side]

    def point(self) -> dict | None:
        """The measured point once both sides have SAMPLES read timings, else None."""
        costs = {}
        for side, samples in self.samples.items():
            read = [s.cost(self.regime) for s in samples if s.events is None]
            if len(read) < SAMPLES:
                return None
            costs[side] = read
        gems_us, native_us = (statistics.median(costs[s]) * 1e6 for s in ("gems", "native"))
        return {"elements": bucket_range(self.bucket)[0] or 1, "bucket": self.bucket, "regime": self.regime,
                "gems_us": round(gems_us, 2), "native_us": round(native_us, 2),
                "noise": round(max(NOISE_FLOOR, _spread(costs["gems"]), _spread(costs["native"])), 4),
                "samples": {side: len(costs[side]) for side in costs}}


def _spread(values: list[float]) -> float:
    """The interquartile range relative to the median (0 for fewer than 4 values)."""
    if len(values) < 4:
        return 0.0
    q1, _, q3 = statistics.quantiles(values, n=4)
    middle = statistics.median(values)
    return (q3 - q1) / middle if middle > 0 else 0.0


@dataclass
class KeyState:
    """What calibration knows of one routing key in this process: points (measured here or read from the
    calibrated profile), cells still being measured, the sample the router asked the watch to take."""

    key: str
    points: dict[tuple[int, str], dict] = field(default_factory=dict)  # (bucket, regime) -> point
    cells: dict[tuple[int, str], Cell] = field(default_factory=dict)
    pending: list[tuple[Cell, str, Sample]] = field(default_factory=list)
    sample: tuple[int, str, int] | None = None  # (bucket, regime, elements) of the call the router let through
    calls: int = 0  # calls measured in this process (timed or warm-up)

    def add(self, points: list[dict]) -> None:
        """Take `points` (a calibrated profile's, see :func:`points_of`) as measured."""
        for point in points:
            self.points[(point["bucket"], point["regime"])] = point

    def measured_range(self) -> tuple[int, int] | None:
        """(smallest, largest) element count of the buckets with a point, or None."""
        if not self.points:
            return None
        buckets = [bucket for bucket, _ in self.points]
        return bucket_range(min(buckets))[0], bucket_range(max(buckets))[1]

    def decision(self) -> dict:
        """The key's decision from its points (module docstring), with ``measured``: range and timed calls."""
        from fl_patch.device.tuning import decide

        launch = [p for (_, regime), p in self.points.items() if regime == LAUNCH_BOUND]
        bound = [p for (_, regime), p in self.points.items() if regime == DEVICE_BOUND]
        decided = _not_below(decide(launch), launch) if launch else {
            "route": "native", "min_elements": 0, "why": "no launch-bound call measured yet: native (the prior)"}
        if bound:
            decided["device_bound"] = _not_below(decide(bound), bound)
        low, high = self.measured_range()
        decided["why"] = "calibrated on this program's calls: " + decided["why"]
        decided["measured"] = {
            "min_elements": low, "max_elements": high,
            "timed_calls": sum(_weight(p) for p in self.points.values())}
        return decided


def _not_below(decision: dict, points: list[dict]) -> dict:
    """`decision` (tune's rule over one regime's `points`) with FlagGems never routed below the smallest size
    measured in that regime. ``fl-patch tune`` measures from the smallest size that matters, so its "FlagGems at
    every size" stands; calibration measures the sizes the program happened to call in that regime, so the sizes
    below are unknown, not won. (An H100 process calibrated its device-bound cells at prefill only, 2**24 elements
    and up, and sent every decode RMSNorm, rope and SwiGLU call that found the stream busy to FlagGems' 60-130 µs
    call, 2026-12-07.)"""
    smallest = min(point["elements"] for point in points)
    if decision["route"] == "gems" and decision["min_elements"] < smallest:
        decision["min_elements"] = smallest
        decision["why"] += f"; not below {smallest} elements, the smallest size measured in this regime"
    return decision


# ------------------------------------------------------------------------------------------------ state


class _Calibration:
    """Process-wide calibration state, guarded by `lock`; :func:`reset` starts afresh (each apply)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, KeyState] = {}
        self.timer = Timer()
        self.path: Path | None = None  # the calibrated profile file of this process's device
        self.device: dict | None = None
        self.versions: dict = {}
        self.launch = profiles.PUBLIC  # how FlagGems is called while measured (profiles.LAUNCHES)
        self.on_decision: Callable[[str, dict], None] | None = None  # the router's: install a new decision


_cal = _Calibration()


def reset(timer: Timer | None = None) -> None:
    """Forget what every key learned (fl_patch.device.routing.configure calls it on each apply). In place: each key's
    state is one object for the process's life (replacements hold it)."""
    with _cal.lock:
        for keyed in _cal.keys.values():
            keyed.points.clear()
            keyed.cells.clear()
            keyed.pending.clear()
            keyed.sample, keyed.calls = None, 0
        _cal.timer = timer or Timer()
        _cal.path = _cal.device = _cal.on_decision = None


def start(path: Path, device: dict, versions: dict, points: dict[str, list[dict]],
          on_decision: Callable[[str, dict], None], launch: str = profiles.PUBLIC) -> None:
    """Begin calibrating for the device `device` (its info as a dict): points already known per key (from its
    calibrated profile), the file to merge new ones into, the router's callback for a new decision, and how
    FlagGems is called (`launch`, recorded in the file)."""
    with _cal.lock:
        _cal.path, _cal.device, _cal.versions, _cal.on_decision = path, device, versions, on_decision
        _cal.launch = launch
        for key, known in points.items():
            _cal.keys.setdefault(key, KeyState(key)).add(known)


def state(key: str) -> KeyState:
    with _cal.lock:
        return _cal.keys.setdefault(key, KeyState(key))


def ask(key: str, elements: int, regime: str) -> None:
    """The router lets a call of `key` through to the kernel's watch to be measured."""
    state(key).sample = (bucket_of(elements), regime, elements)


def measure(key: str, kernel: Callable, native_path: Callable, args: tuple, kwargs: dict):
    """The watch's part: run this call on the side whose turn it is (timed past warm-up) and return its result;
    a call the router did not ask for runs on `kernel`."""
    keyed = state(key)
    asked, keyed.sample = keyed.sample, None
    if asked is None or asked[2] != args[0].numel():
        return kernel(*args, **kwargs)
    bucket, regime, _ = asked
    with _cal.lock:
        if (bucket, regime) in keyed.points:  # measured meanwhile (another thread): nothing to add
            cell = None
        else:
            cell = keyed.cells.setdefault((bucket, regime), Cell(bucket, regime))
            side = cell.next_side()
            timed = cell.timed(side)
            cell.runs[side] += 1
            keyed.calls += 1
    if cell is None:
        return kernel(*args, **kwargs)
    function = kernel if side == "gems" else native_path
    if not timed:
        return function(*args, **kwargs)
    started = _cal.timer.start(args[0].device)
    out = function(*args, **kwargs)
    sample = _cal.timer.stop(started)
    with _cal.lock:
        cell.samples[side].append(sample)
        keyed.pending.append((cell, side, sample))
    collect(keyed)
    return out


def collect(keyed: KeyState) -> None:
    """Read the samples whose events are done; make each complete cell a point, and a new decision of it."""
    with _cal.lock:
        keyed.pending = [entry for entry in keyed.pending if not entry[2].ready()]
        finished = {where: point for where, cell in keyed.cells.items() if (point := cell.point()) is not None}
        for where, point in finished.items():
            keyed.points[where] = point
            del keyed.cells[where]
        decision = keyed.decision() if finished else None
        callback = _cal.on_decision
    if decision is None:
        return
    if callback is not None:
        callback(keyed.key, decision)
    save()


# ------------------------------------------------------------------------------------------ persistence


def profile_data(device: dict, versions: dict, keys: dict[str, dict], launch: str = profiles.PUBLIC) -> dict:
    """A calibrated profile: per family the decisions of its calibrated forms (``forms``), each with its points
    under the top-level ``calibrated`` field. The family's own decision is native: a form not listed is still
    being measured, and routes by the prior, never by the family's line."""
    families: dict[str, dict] = {}
    calibrated: dict[str, dict] = {}
    for key, entry in sorted(keys.items()):
        family, form = key.split(".", 1)
        families.setdefault(family, {"route": "native", "min_elements": 0,
                                     "why": "calibrated form by form; a form not listed is still being measured",
                                     "forms": {}})
        families[family]["forms"][form] = entry["decision"]
        calibrated[key] = {"points": entry["points"]}
    return {"schema": profiles.SCHEMA, "kind": profiles.KIND, CALIBRATED: calibrated, "device": device,
            "versions": versions, "date": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
            "launch": launch, "families": families}


def points_of(data: dict) -> dict[str, list[dict]]:
    """The points per key of a calibrated profile's data ({} when it has none or they are malformed)."""
    out = {}
    for key, entry in (data.get(CALIBRATED) or {}).items():
        points = entry.get("points") if isinstance(entry, dict) else None
        if isinstance(points, list) and all(_is_point(p) for p in points):
            out[key] = points
    return out


def _is_point(point) -> bool:
    return (isinstance(point, dict) and isinstance(point.get("bucket"), int)
            and point.get("regime") in (LAUNCH_BOUND, DEVICE_BOUND)
            and all(isinstance(point.get(k), (int, float)) for k in ("elements", "gems_us", "native_us", "noise"))
            and isinstance(point.get("samples"), dict))


def save() -> Path | None:
    """Merge this process's points into the device's calibrated profile (module docstring). Never raises: a
    cache that can't be written only costs the next process its head start (said once, in the log)."""
    with _cal.lock:
        path, device, versions, launch = _cal.path, _cal.device, dict(_cal.versions), _cal.launch
        mine = {key: list(s.points.values()) for key, s in _cal.keys.items() if s.points}
    if path is None or not mine:
        return None
    try:
        merge(path, device, versions, mine, launch)
    except OSError as exc:
        log.warning("fl_patch: can't write the calibrated profile %s (%s); the next process calibrates again",
                    path, exc.strerror or exc)
        with _cal.lock:
            _cal.path = None
        return None
    return path


def merge(path: Path, device: dict, versions: dict, mine: dict[str, list[dict]],
          launch: str = profiles.PUBLIC) -> dict:
    """Under an exclusive lock on ``<path>.lock``: read `path`'s points, add `mine` (of a (bucket, regime) both
    have, the point resting on more timed calls wins), recompute each key's decision, write atomically."""
    from fl_patch import output_path

    path.parent.mkdir(parents=True, exist_ok=True)
    with output_path.locked(path):
        theirs = {}
        with contextlib.suppress(OSError, ValueError):
            theirs = points_of(json.loads(path.read_text(encoding="utf-8")))
        keys = {}
        for key in sorted(set(theirs) | set(mine)):
            merged = KeyState(key)
            for point in theirs.get(key, []) + mine.get(key, []):
                where = (point["bucket"], point["regime"])
                if where not in merged.points or _weight(point) > _weight(merged.points[where]):
                    merged.points[where] = point
            keys[key] = {"decision": merged.decision(), "points": sorted(merged.points.values(),
                                                                      key=lambda p: (p["regime"], p["bucket"]))}
        data = profile_data(device, versions, keys, launch)
        output_path.write_json(data, path)
    return data


def _weight(point: dict) -> int:
    return sum(point["samples"].values())


# ------------------------------------------------------------------------------------------------ status


def describe() -> dict:
    """Per key: what was learned (points, decision), from how many timed calls, and what is still measured."""
    with _cal.lock:
        out = {}
        for key, keyed in sorted(_cal.keys.items()):
            if not keyed.points and not keyed.cells:
                continue
            entry = {"points": len(keyed.points), "timed_calls": sum(_weight(p) for p in keyed.points.values()),
                     "measuring": [f"{bucket_range(c.bucket)[0]}+ elements, {c.regime.replace('_', '-')}: "
                                   f"{c.runs['gems']}+{c.runs['native']} calls" for c in keyed.cells.values()]}
            if keyed.points:
                entry["decision"] = keyed.decision()
            out[key] = entry
        return {"path": str(_cal.path) if _cal.path else None, "keys": out}
