"""``fl-patch tune``: at which sizes FlagGems beats the native path on this device, written as a device profile.

What is timed (``fl_patch.device.kernel_cases``): for every form of the selected families (``--families``), its
tuned variants at 2**12, 2**14, ..., 2**26 elements of the deciding tensor (the routing unit; capped per
variant, linear at 4 sizes since FlagGems' GEMM autotunes per token count), in bfloat16: FlagGems' kernel
(``gems<suffix>``, called directly, no routing) and the native path fl_patch runs instead (torch's fused
rms_norm for HF / fp32 / gated RMSNorm, else the original it replaces). Each is warmed up (its first call is
timed on its own: FlagGems autotunes and compiles at a new shape, seconds), then timed ``repeats`` times,
the two alternating: a loop of ``n`` back-to-back calls (``n`` so that a loop lasts about 3 ms) between two
device events with no synchronisation inside, so that a call whose host work outlasts its kernel shows its
host cost, and the same loop on the host clock (until the last call returns, before synchronising). Per
repeat the time per call is ``max(device, host)``; a point's time is the median over repeats and its noise
``max(3%, (max - min) / median)`` of either side. Devices whose torch module has no events (the CPU) use the
wall time of the loop, synchronised.

Two regimes, because a call costs what it costs the slower of host and device. *Launch-bound* (the times
above): nothing else keeps the device busy, as in a decode step, so FlagGems' host time (50-200 us a call on
an H200 in 5.0.2) counts in full. *Device-bound*: the host runs ahead of the device, as in a large prefill
whose GEMMs keep the queue full, so only device time counts. Each repeat also times the loop behind a
*blocker* (square matmuls enqueued first, lasting 1.5x the loop's host time): the loop's events then measure
device time alone. That the host really was ahead is checked (the event after the blocker has not completed
when the host has enqueued the loop; else a longer blocker, three tries); a point without it has no
device-bound time. Devices without events have no device-bound times.

Decision rule (:func:`decide`), per form, over its measured points sorted by elements: N is the smallest
measured size at which FlagGems is faster by more than noise (gems x (1 + noise) < native, at a point of that
size: variants of one size may differ in row width) and at every measured point from N on FlagGems <= native x
(1 + noise). A win within noise does not
count: it gains nothing that can be told from chance (on the H200 a rope "win" of 7% within 16% noise sent
launch-bound decode calls to FlagGems; benchmarks/results/e2e_profile_qwen3_run1.md). N at the smallest
measured size: ``route: gems, min_elements: 0``; another N: ``route: gems, min_elements: N`` (calls with fewer
elements go native); no N: ``route: native``. So the patched call is
never slower than native by more than noise at a measured size. The family's own entry, which applies to its
forms not listed, is the most conservative of its measured forms (native if one is, else the largest N).

The same rule over the device-bound times, from the *device-bound floor* on (the smallest size from which the
native path's own device time outlasts its host time at every larger size: below it the work around a call is
too short to keep the device's queue deep, :func:`device_bound_floor`), gives each form (and family) a
``device_bound`` decision. The routing (:mod:`fl_patch.device.routing`) uses it for a call below the launch-bound
threshold only while the device is still busy with earlier work (its queue not drained, so the host cost hides
behind it); under torch.compile only the ``compiled`` decision counts (``--compiled``, below).

``--compiled`` adds a third regime, torch.compile (default mode): at 2**14, 2**18, 2**22 and 2**26 elements (as
capped per variant) both sides are compiled, each alone (``torch.compile(fullgraph=True, dynamic=False)`` after
``torch._dynamo.reset()``): FlagGems' kernel as fl_patch's custom op against inductor's code for the native path,
timed as above (launch-bound). The same rule gives each form (and family) a ``compiled`` decision, which is all the
routing uses under torch.compile; a profile without one keeps the originals there. An op compiled alone gives
inductor less to fuse than a whole model does (the residual add, the casts around it), so the decision leans
towards FlagGems, if anything. Each size compiles twice (seconds each): the default budget doubles.

``--budget-s``: no new form starts after it; the forms left are listed as not measured. A family with no measured
form (left out by ``--families``, or by the budget) is written as native, the path that can't lose
(:data:`NOT_TUNED`): a profile's absent family would run FlagGems at every size, and a profile of ``--families
rms_norm,rope,swiglu`` once sent every linear and attention call of a decode step to FlagGems (2.5x slower, H100,
2026-12-07). The profile (``fl_patch.device.profiles`` format, with every measurement) is rewritten after each
form: ``--out PATH``, by default the user's cache
(``profiles.cache_dir()``, named by ``profiles.file_name``); ``--quick`` (the reference kernels on the CPU,
seconds: it checks the harness) writes to a new temporary folder unless ``--out`` is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import fl_patch
from fl_patch import output_path
from fl_patch.device import devices, kernel_cases, profiles
from fl_patch.device.kernel_cases import Form, size_label
from fl_patch.table import FAMILY_WIDTH
from fl_patch.versions import stack_versions

DEVICE_SIZES = tuple(1 << exponent for exponent in range(12, 27, 2))
CPU_SIZES = (1 << 8, 1 << 10, 1 << 12)
COMPILED_SIZES = {"device": (1 << 14, 1 << 18, 1 << 22, 1 << 26), "cpu": (1 << 8, 1 << 12)}
COMPILED = "compiled"  # the regime of a point timed under torch.compile (its "regime" field)
DTYPE = torch.bfloat16
NOISE_FLOOR = 0.03
LOOP_S = {"device": 0.003, "cpu": 0.0005}
REPEATS = {"device": 5, "cpu": 3}
MIN_CALLS, MAX_CALLS = 3, 200
# Of the 3 minutes an H200 run may take: start-up (15 s) and the form running when the budget ends fit in the
# rest. On a fresh H200 the two regimes took 148 s for 12 forms, 71 s of it FlagGems' GEMM autotuning (linear).
BUDGET_S = 150.0
NOT_TUNED = ("not measured by this tune (--families or --budget-s): native, the path that can't lose; "
             "`fl-patch tune` without --families measures it")
RULE = ("per form over its measured points sorted by elements: N = the smallest measured size where FlagGems is "
        "faster by more than noise (gems x (1 + noise) < native) at a point of that size and gems <= native x "
        "(1 + noise) at every measured point from N on; N at the smallest size -> "
        "route gems, min_elements 0; else route gems, min_elements N; no such N -> route native. Time per call = "
        "max(device-event time, host time) of a loop of back-to-back calls, median of the repeats; noise = max(3%, "
        "(max - min) / median of either side). A family's own entry is the most conservative of its forms. "
        "device_bound: the same rule over device time with the host ahead (the loop enqueued behind a blocker), "
        "at sizes from the device-bound floor on (native device-bound time > native host time at it and every "
        "larger size). compiled (fl-patch tune --compiled): the launch-bound rule over both sides compiled alone "
        "(FlagGems' custom op against inductor's code for the native path).")
BLOCKER_SIDE = 2048  # the blocker's square matmul: about 25 us on an H200, long enough that few are enqueued
BLOCKER_MARGIN = 1.5  # the blocker lasts this many times the loop's host time
BLOCKER_TRIES = 3  # each try doubles the blocker
INTERRUPTED = 130  # the exit status after Ctrl-C, as a shell gives (128 + SIGINT)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-patch tune", description="Time FlagGems against the native path per "
                                     "kernel form and size on this device; write the device profile.")
    parser.add_argument("--quick", action="store_true", help="the reference kernels on the CPU: checks the harness")
    parser.add_argument("--out", type=Path, default=None, help="profile file (default: the user's profile cache)")
    parser.add_argument("--families", default="", help="comma list of families or keys (rms_norm, rope.hf, ...)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"start no new form after this many seconds (default {BUDGET_S:g}, twice that with "
                             "--compiled)")
    parser.add_argument("--compiled", action="store_true",
                        help="also time both sides under torch.compile: the decision the routing uses there")
    parser.add_argument("--device", default=None, help="torch device (default: the first accelerator found)")
    parser.add_argument("--redecide", type=Path, default=None, metavar="PROFILE",
                        help="measure nothing: decide again from PROFILE's measurements by this fl_patch's rule, "
                             "written to --out (default: PROFILE itself)")
    args = parser.parse_args(argv)
    if args.budget_s is None:
        args.budget_s = BUDGET_S * (2 if args.compiled else 1)
    if args.budget_s <= 0:
        parser.error(f"--budget-s {args.budget_s:g}: give a number of seconds above 0")
    return args


def launch_way(provider: str) -> str:
    """How `provider`'s kernels are called while measured (the profile's ``launch``): FlagGems' host cost is part of
    every launch-bound decision, so a profile says whether it was timed on the fast path or the public call."""
    return profiles.launch_now() if provider == "gems" else profiles.PUBLIC


def main(argv: list[str] | None = None) -> int:
    """Measure, decide and write the profile; 0 when written, 2 for bad arguments, an output path that can't be
    written (said before measuring) or no usable FlagGems, 130 when interrupted (Ctrl-C: the forms measured so far
    stay in the profile written after each of them)."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.redecide is not None:
        return redecide(args.redecide, args.out or args.redecide)
    fl_patch.revert()  # time the originals, even under the bootstrap
    try:
        forms = kernel_cases.select(args.families)
        device = torch.device("cpu") if args.quick else kernel_cases.pick_device(args.device, cpu_allowed=False)
        provider = "reference" if args.quick else "gems"
        info, found = devices.identify(device), stack_versions()
        name = profiles.file_name(info.as_dict(), found["flag_gems"])
        if args.out is not None:
            output_path.check(args.out, "--out")
        elif not args.quick:
            output_path.check(profiles.cache_dir() / name, "the profile cache's file")
        if provider == "gems":
            _load_gems()
    except ValueError as exc:
        print(f"fl-patch tune: {exc}", file=sys.stderr)
        return 2
    # --quick checks the harness: without --out its profile goes to a temporary folder, removed at the end.
    temporary = Path(tempfile.mkdtemp(prefix="fl_patch_tune_")) if args.quick and args.out is None else None
    out = args.out or (temporary or profiles.cache_dir()) / name
    how = f"{provider} ({launch_way(provider)} launch)" if provider == "gems" else provider
    print(f"fl-patch tune: {info.label()}, {how} against native, {dtype_name()}, budget {args.budget_s:g} s; "
          f"profile: {out}" + (" (temporary: --out PATH keeps it)" if temporary else ""), flush=True)
    print("  per form: its decision, then native time / gems time per size (above 1: FlagGems faster), launch-bound"
          "/device-bound where the device times both", flush=True)
    try:
        with kernel_cases.cpu_threads(device):
            tuner = Tuner(device, provider, forms, args.budget_s, out, {"device": info.as_dict(), "versions": found},
                          compiled=args.compiled)
            finished = tuner.run()
        if temporary is not None and finished:
            profiles.read(out, "tune --quick")  # what the harness must get right: a profile that parses
            print(f"fl-patch tune: {out} parses; removed with its temporary folder")
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)
    return 0 if finished else INTERRUPTED


def _load_gems() -> None:
    from fl_patch.kernels import gems

    try:
        gems.load()
    except gems.GemsUnavailable as exc:
        raise ValueError(f"FlagGems can't be used here: {exc}") from None


def dtype_name(dtype: torch.dtype = DTYPE) -> str:
    return str(dtype).removeprefix("torch.")


def redecide(source: Path, out: Path) -> int:
    """Decide every family of the profile `source` again from its recorded measurements (the rule may have
    changed since it was measured) and write it to `out`; 2 with a message when `source` can't be used."""
    try:
        output_path.check(out, "--out" if out != source else "--redecide")
        profiles.read(source, "--redecide")
        data = json.loads(source.read_text(encoding="utf-8"))
    except (profiles.ProfileError, ValueError) as exc:
        print(f"fl-patch tune: {exc}", file=sys.stderr)
        return 2
    for family, entry in data["families"].items():
        measured = [dict(p, gems_us=math.inf if p["gems_us"] is None else p["gems_us"])
                    for p in entry.get("measurements", []) if "gems_us" in p]
        forms = {form: decide_all([p for p in measured if p["form"] == form])
                 for form in dict.fromkeys(p["form"] for p in measured if p.get("regime") != COMPILED)}
        if forms:
            entry.update(family_decision(forms), forms=forms)
            decided = ", ".join(f"{form} {_route(decision)}" for form, decision in forms.items())
            print(f"  {family:<{FAMILY_WIDTH}} {_route(entry):<22} ({decided})")
    data["rule"] = RULE
    profiles.write(data, out)
    print(f"fl-patch tune: decided again from {source}'s measurements; wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------------ timing


class Clock:
    """Synchronisation and device events through torch's module for the device type (``torch.cuda``,
    ``torch.npu``, ``torch.mlu``, ...); without events, wall time around a synchronised loop."""

    def __init__(self, device: torch.device):
        backend = None if device.type == "cpu" else getattr(torch, device.type, None)
        self.device = device
        self._synchronize = getattr(backend, "synchronize", None)
        self._event = getattr(backend, "Event", None)
        self._blocker: tuple | None = None  # (a, b, out, seconds per matmul) once calibrated

    @property
    def has_device_bound(self) -> bool:
        """Whether this device can time the device-bound regime (events that can be queried)."""
        return self._event is not None and hasattr(self._event, "query")

    def synchronize(self) -> None:
        if self._synchronize is not None:
            self._synchronize()

    def loop(self, function, calls: int) -> tuple[float, float]:
        """(device, host) seconds per call over `calls` back-to-back calls, no synchronisation inside."""
        self.synchronize()
        start = end = None
        if self._event is not None:
            start, end = self._event(enable_timing=True), self._event(enable_timing=True)
            start.record()
        began = time.perf_counter()
        for _ in range(calls):
            function()
        host = time.perf_counter() - began
        if end is None:
            self.synchronize()
            device = time.perf_counter() - began
        else:
            end.record()
            end.synchronize()
            device = start.elapsed_time(end) / 1000
        return device / calls, host / calls

    def device_bound_loop(self, function, calls: int, host_s: float) -> float | None:
        """Device seconds per call of `calls` back-to-back calls enqueued behind a blocker (so that the device
        runs them back to back, whatever their host cost), or None if the host could not be got ahead of the
        device (three tries, each with a blocker twice as long) or the device has no queryable events.
        `host_s`: the host seconds a call takes (from :meth:`loop`)."""
        if not self.has_device_bound:
            return None
        blocked_s = BLOCKER_MARGIN * host_s * calls
        for _ in range(BLOCKER_TRIES):
            self.synchronize()
            start, end = self._event(enable_timing=True), self._event(enable_timing=True)
            self._block(blocked_s)
            start.record()
            for _ in range(calls):
                function()
            ahead = not start.query()  # the device has not reached the loop yet: all of it was enqueued ahead
            end.record()
            end.synchronize()
            if ahead:
                return start.elapsed_time(end) / 1000 / calls
            blocked_s *= 2
        return None

    def _block(self, seconds: float) -> None:
        """Enqueue square matmuls lasting about `seconds` on the device (calibrated on the first call)."""
        if self._blocker is None:
            a = torch.randn(BLOCKER_SIDE, BLOCKER_SIDE, device=self.device, dtype=DTYPE)
            b, out = torch.randn_like(a), torch.empty_like(a)
            torch.mm(a, b, out=out)
            per_matmul, _ = self.loop(lambda: torch.mm(a, b, out=out), 20)
            self._blocker = (a, b, out, max(per_matmul, 1e-6))
        a, b, out, per_matmul = self._blocker
        for _ in range(max(1, math.ceil(seconds / per_matmul))):
            torch.mm(a, b, out=out)


@dataclass
class Side:
    """One function's timings at one point, in microseconds per call."""

    first_call_ms: float
    device_us: list[float]
    host_us: list[float]
    device_bound_us: list[float]  # device time with the host ahead; empty when the device can't measure it

    @property
    def per_call(self) -> list[float]:
        return [max(d, h) for d, h in zip(self.device_us, self.host_us, strict=True)]

    @property
    def us(self) -> float:
        return statistics.median(self.per_call)

    @property
    def spread(self) -> float:
        return _spread(self.per_call)

    @property
    def device_bound(self) -> float | None:
        """Median device-bound time, if every repeat measured one."""
        if not self.device_bound_us or len(self.device_bound_us) != len(self.device_us):
            return None
        return statistics.median(self.device_bound_us)

    @property
    def device_bound_spread(self) -> float:
        return _spread(self.device_bound_us)

    def as_dict(self) -> dict:
        out = {"us": round(self.us, 2), "device_us": round(statistics.median(self.device_us), 2),
               "host_us": round(statistics.median(self.host_us), 2), "spread": round(self.spread, 4),
               "first_call_ms": round(self.first_call_ms, 2)}
        if self.device_bound is not None:
            out.update(device_bound_us=round(self.device_bound, 2),
                       device_bound_spread=round(self.device_bound_spread, 4))
        return out


def _spread(values: list[float]) -> float:
    median = statistics.median(values)
    return (max(values) - min(values)) / median if median > 0 else 0.0


def time_pair(clock: Clock, functions: dict, repeats: int, loop_s: float) -> dict[str, Side]:
    """Warm up and time each function of `functions` (name -> zero-argument callable), alternating them."""
    calls, sides = {}, {}
    for name, function in functions.items():
        clock.synchronize()
        began = time.perf_counter()
        function()
        clock.synchronize()
        first_ms = (time.perf_counter() - began) * 1000
        function()
        estimate = max(clock.loop(function, MIN_CALLS))
        calls[name] = int(min(MAX_CALLS, max(MIN_CALLS, loop_s / max(estimate, 1e-9))))
        sides[name] = Side(first_ms, [], [], [])
    names = list(functions)
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else reversed(names):
            device, host = clock.loop(functions[name], calls[name])
            sides[name].device_us.append(device * 1e6)
            sides[name].host_us.append(host * 1e6)
            bound = clock.device_bound_loop(functions[name], calls[name], host)
            if bound is not None:
                sides[name].device_bound_us.append(bound * 1e6)
    return sides


# ---------------------------------------------------------------------------------------------- decision


def decide(points: list[dict]) -> dict:
    """The decision for one form from its points (each with ``elements``, ``gems_us``, ``native_us``,
    ``noise``), by the rule of the module docstring: ``{"route", "min_elements", "why"}``."""
    if not points:
        raise ValueError("decide() needs at least one measured point")
    ordered = sorted(points, key=lambda p: p["elements"])
    smallest, largest = size_label(ordered[0]["elements"]), size_label(ordered[-1]["elements"])

    def within(point: dict) -> bool:
        return point["gems_us"] <= point["native_us"] * (1 + point["noise"])

    def wins(point: dict) -> bool:  # faster by more than the noise: a win the measurement can tell from chance
        return point["gems_us"] * (1 + point["noise"]) < point["native_us"]

    for point in ordered:
        above = [p for p in ordered if p["elements"] >= point["elements"]]
        same = [p for p in above if p["elements"] == point["elements"]]
        if any(wins(p) for p in same) and all(within(p) for p in above):
            threshold = point["elements"]
            break
    else:
        slower = list(dict.fromkeys(size_label(p["elements"]) for p in ordered if not within(p)))
        detail = (f"slower than native beyond noise at {', '.join(slower)}" if slower
                  else "never faster than native by more than noise")
        return {"route": "native", "min_elements": 0,
                "why": f"no measured size from which FlagGems is faster beyond noise and stays within noise of "
                       f"native at every larger one ({detail}; measured {smallest}..{largest} elements)"}
    rest = f"within noise of native or faster at every larger measured size up to {largest}"
    if threshold == ordered[0]["elements"]:
        return {"route": "gems", "min_elements": 0,
                "why": f"FlagGems is faster beyond noise at the smallest measured size ({smallest} elements), {rest}"}
    return {"route": "gems", "min_elements": threshold,
            "why": f"native below {threshold} elements; from {size_label(threshold)} on FlagGems is faster beyond "
                   f"noise, {rest}"}


def decide_regimes(points: list[dict]) -> dict:
    """:func:`decide` over the launch-bound times, with ``device_bound``: the same over the device-bound times of
    the points that have them (absent if none has), from the device-bound floor on (:func:`device_bound_floor`)."""
    decision = decide(points)
    bound = [{**p, "gems_us": p["gems_device_bound_us"], "native_us": p["native_device_bound_us"],
              "noise": p["device_bound_noise"]} for p in points if p.get("gems_device_bound_us") is not None]
    if not bound:
        return decision
    floor = device_bound_floor(points)
    if floor is None:
        decision["device_bound"] = {"route": "native", "min_elements": 0,
                                    "why": "the native path is launch-bound at every measured size (its device time "
                                           "under its host time): no size where the device stays ahead of the host"}
        return decision
    above = [p for p in bound if p["elements"] >= floor]
    decision["device_bound"] = decide(above)
    if decision["device_bound"]["route"] == "gems" and decision["device_bound"]["min_elements"] < floor:
        decision["device_bound"]["min_elements"] = floor
        decision["device_bound"]["why"] += (f"; from the device-bound floor {size_label(floor)} on, where the "
                                            "native path's own device time outlasts its host time")
    return decision


def decide_all(points: list[dict]) -> dict:
    """:func:`decide_regimes` over the eager points, with ``compiled``: :func:`decide` over the compiled ones where
    there are any (``regime`` "compiled")."""
    decision = decide_regimes([p for p in points if p.get("regime") != COMPILED])
    compiled = [p for p in points if p.get("regime") == COMPILED]
    if compiled:
        decision["compiled"] = decide(compiled)
        decision["compiled"]["why"] = "under torch.compile, FlagGems' op against inductor's code: " + (
            decision["compiled"]["why"])
    return decision


def device_bound_floor(points: list[dict]) -> int | None:
    """The smallest measured size from which the native path is device-bound on its own (its device-bound time, the
    device alone, above its host time per call) at every larger measured size, or None.

    Below it a call's own work is shorter than launching it, and so is the work around it in a real model (the
    GEMMs of the same tokens): the device's queue is shallow there, and a FlagGems call whose host time is
    50-200 us would drain it (the H200 run of 2026-12-03 lost 15-30% at decode with a bare busy check). At
    and above it the queue is kept full by work of that size, so device time is what a call costs."""
    def native_device_bound(point: dict) -> bool:
        return point["native_device_bound_us"] > point["native"]["host_us"]

    measured = [p for p in points if p.get("native_device_bound_us") is not None and "native" in p]
    for size in sorted({p["elements"] for p in measured}):
        if all(native_device_bound(p) for p in measured if p["elements"] >= size):
            return size
    return None


def family_decision(forms: dict[str, dict]) -> dict:
    """The most conservative of a family's form decisions: native if any is, else the largest threshold (and the
    same of their ``device_bound`` decisions when every form has one). It applies to the family's forms the
    profile doesn't list."""
    decision = _most_conservative(forms)
    for regime in ("device_bound", COMPILED):
        if all(regime in d for d in forms.values()):
            decision[regime] = _most_conservative({form: d[regime] for form, d in forms.items()})
    return decision


def _most_conservative(forms: dict[str, dict]) -> dict:
    natives = [form for form, decision in forms.items() if decision["route"] == "native"]
    if natives:
        return {"route": "native", "min_elements": 0,
                "why": f"the most conservative of its measured forms: native, as {', '.join(natives)}"}
    form, decision = max(forms.items(), key=lambda item: item[1]["min_elements"])
    where = f"from {decision['min_elements']} elements, as {form}" if decision["min_elements"] else "at every size"
    return {"route": "gems", "min_elements": decision["min_elements"],
            "why": f"the most conservative of its measured forms: gems {where}"}


# ------------------------------------------------------------------------------------------------ the run


class Tuner:
    """One run: measures form after form, decides, and rewrites the profile after each."""

    def __init__(self, device: torch.device, provider: str, forms: list[Form], budget_s: float, out: Path,
                 identity: dict, compiled: bool = False):
        self.device, self.provider, self.forms, self.budget_s, self.out = device, provider, forms, budget_s, out
        self.compiled = compiled
        self.mode = "cpu" if device.type == "cpu" else "device"
        self.clock = Clock(device)
        self.identity = identity
        self.started = time.monotonic()
        self.measurements: dict[str, list[dict]] = {}  # key -> points
        self.decisions: dict[str, dict] = {}  # key -> decision
        self.not_measured: list[str] = []
        self.launch = launch_way(provider)

    def run(self) -> bool:
        """Measure every form (the budget allowing), writing the profile after each; True when the run ended, False
        when interrupted (Ctrl-C): the forms measured so far are written, the others listed as not measured."""
        try:
            with torch.no_grad():
                for form in self.forms:
                    if time.monotonic() - self.started > self.budget_s:
                        self.not_measured.append(form.key)
                        continue
                    began = time.monotonic()
                    self.measure(form)
                    self.report_form(form, time.monotonic() - began)
                    self.write()
        except KeyboardInterrupt:
            self.not_measured += [form.key for form in self.forms
                                  if form.key not in self.measurements and form.key not in self.not_measured]
            if self.decisions:
                self.write()
                print(f"fl-patch tune: interrupted; {self.out} holds the {len(self.decisions)} forms measured (not "
                      f"measured: {', '.join(self.not_measured)})", file=sys.stderr)
            else:
                print("fl-patch tune: interrupted before a form was measured; nothing written", file=sys.stderr)
            return False
        if self.not_measured:
            print(f"  budget of {self.budget_s:g} s spent: not measured {', '.join(self.not_measured)} (their families "
                  "take their measured forms' decision; a family with none is absent: FlagGems at every size)")
        self.write()
        self.print_table()
        return True

    def sizes(self, form: Form) -> tuple[int, ...]:
        if self.mode == "cpu":
            return form.sizes.get("cpu", CPU_SIZES)
        return form.sizes.get("tune", DEVICE_SIZES)

    def measure(self, form: Form) -> None:
        points = self.points(form, self.sizes(form))
        if self.compiled:
            points += self.points(form, COMPILED_SIZES[self.mode], compiled=True)
        self.measurements[form.key] = points
        if any("gems_us" in p and p.get("regime") != COMPILED for p in points):
            self.decisions[form.key] = decide_all([p for p in points if "gems_us" in p])
        else:
            self.not_measured.append(form.key)

    def points(self, form: Form, sizes: tuple[int, ...], compiled: bool = False) -> list[dict]:
        """One point per tuned variant and size; `compiled`: both sides compiled alone (``regime`` "compiled")."""
        gems_path, native_path = form.kernel(self.provider), form.native()
        compile_reason = self._compile_reason() if compiled else None
        points = []
        for variant in (v for v in form.variants if v.tune):
            for elements in kernel_cases.grid(variant, sizes):
                torch.manual_seed(elements)
                dtype = form.dtypes[0] if form.dtypes else DTYPE
                inputs = variant.build(elements, dtype, self.device)
                point = {"form": form.form, "variant": variant.name, "shape": inputs.shape,
                         "elements": inputs.deciding.numel(), "dtype": dtype_name(dtype), "gems_path": gems_path.name,
                         "native_path": native_path.name}
                if compiled:
                    point["regime"] = COMPILED
                reason = form.unsupported(self.provider, inputs)
                if reason is not None:
                    point["not_taken"] = reason
                elif compile_reason is not None:
                    point["not_taken"] = compile_reason
                elif compiled:
                    torch._dynamo.reset()  # each size and side its own graph: no recompile limit reached
                    point.update(self._timed(torch.compile(gems_path.function, fullgraph=True, dynamic=False),
                                             torch.compile(native_path.function, fullgraph=True, dynamic=False),
                                             inputs.args))
                else:
                    point.update(self._timed(gems_path.function, native_path.function, inputs.args))
                points.append(point)
                del inputs
        if compiled:
            torch._dynamo.reset()
        return points

    def _compile_reason(self) -> str | None:
        """Why FlagGems' kernels can't be traced as fl_patch's custom ops here, or None. In a model the gems path's
        own check defines the ops while tracing; a kernel compiled alone skips that check, so it is made here."""
        if self.provider != "gems":
            return None
        from fl_patch.kernels import custom_ops

        return custom_ops.define()

    def _timed(self, gems_function, native_function, args: tuple) -> dict:
        functions = {"gems": lambda: gems_function(*args), "native": lambda: native_function(*args)}
        try:
            sides = time_pair(self.clock, functions, REPEATS[self.mode], LOOP_S[self.mode])
        except Exception as exc:  # one side failed at this size: time the other, count the failed one as slowest
            return self._one_failed(functions, exc)
        gems, native = sides["gems"], sides["native"]
        noise = max(NOISE_FLOOR, gems.spread, native.spread)
        point = {"gems": gems.as_dict(), "native": native.as_dict(), "gems_us": gems.us, "native_us": native.us,
                 "noise": round(noise, 4)}
        if gems.device_bound is not None and native.device_bound is not None:
            bound_noise = max(NOISE_FLOOR, gems.device_bound_spread, native.device_bound_spread)
            point.update(gems_device_bound_us=gems.device_bound, native_device_bound_us=native.device_bound,
                         device_bound_noise=round(bound_noise, 4))
        return point

    def _one_failed(self, functions: dict, exc: Exception) -> dict:
        result = {"noise": NOISE_FLOOR}
        for name, function in functions.items():
            try:
                side = time_pair(self.clock, {name: function}, REPEATS[self.mode], LOOP_S[self.mode])[name]
                result[name], result[f"{name}_us"] = side.as_dict(), side.us
            except Exception as side_exc:  # this side is the one that fails
                result[f"{name}_error"] = f"{type(side_exc).__name__}: {str(side_exc).strip()[:200]}"
                result[f"{name}_us"] = math.inf
        result.setdefault("error", f"{type(exc).__name__}: {str(exc).strip()[:200]}")
        return result

    def report_form(self, form: Form, seconds: float) -> None:
        decision = self.decisions.get(form.key)
        verdict = _route(decision) if decision else "not measured (no size taken)"
        print(f"  {form.key:<22} {verdict:<22} {seconds:5.1f} s", flush=True)
        for variant in dict.fromkeys(p["variant"] for p in self.measurements[form.key]):
            for regime, label in ((None, "native/gems "), (COMPILED, "compiled    ")):
                measured = [p for p in self.measurements[form.key]
                            if p["variant"] == variant and p.get("regime") == regime]
                if measured:
                    ratios = ", ".join(f"{size_label(p['elements'])} {_ratio(p)}" for p in measured)
                    print(f"      {label} {variant}: {ratios}", flush=True)
                for failure in dict.fromkeys(_failures(measured)):
                    print(f"        {failure}", flush=True)

    def profile(self) -> dict:
        families = {}
        for family in dict.fromkeys(form.family for form in self.forms):
            keys = [form.key for form in self.forms if form.family == family and form.key in self.decisions]
            if not keys:
                continue
            forms = {key.split(".", 1)[1]: self.decisions[key] for key in keys}
            points = [point for key in keys for point in self.measurements[key]]
            families[family] = {**family_decision(forms), "forms": forms, "measurements": _json_ready(points)}
        for family in dict.fromkeys(form.family for form in kernel_cases.FORMS):
            if family not in families:  # a profile's absent family runs FlagGems everywhere: say native instead
                families[family] = {"route": "native", "min_elements": 0, "why": NOT_TUNED, "forms": {},
                                    "measurements": []}
        return {"schema": profiles.SCHEMA, "kind": profiles.KIND, **self.identity,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "provider": self.provider, "dtype": dtype_name(), "rule": RULE, "launch": self.launch,
                "settings": {"repeats": REPEATS[self.mode], "loop_s": LOOP_S[self.mode], "noise_floor": NOISE_FLOOR,
                             "budget_s": self.budget_s},
                "not_measured": self.not_measured, "elapsed_s": round(time.monotonic() - self.started, 1),
                "families": families}

    def write(self) -> None:
        profiles.write(self.profile(), self.out)

    def print_table(self) -> None:
        data = self.profile()
        print(f"fl-patch tune: {len(self.decisions)} forms measured in {data['elapsed_s']} s; wrote {self.out}")
        for family, entry in data["families"].items():
            forms = ", ".join(f"{form} {_route(decision)}" for form, decision in entry["forms"].items())
            print(f"  {family:<{FAMILY_WIDTH}} {_route(entry):<22} ({forms or 'not measured by this tune'})")


def _route(decision: dict) -> str:
    return profiles.route_words(decision["route"], decision["min_elements"], decision.get("device_bound"),
                                decision.get(COMPILED))


def _ratio(point: dict) -> str:
    if "not_taken" in point:
        return f"not taken ({point['not_taken']})"
    gems_us, native_us = point["gems_us"], point["native_us"]
    for side, us in (("gems", gems_us), ("native", native_us)):
        if math.isinf(us):
            return f"{side} failed"
    text = f"{native_us / gems_us:.2f}"
    if point.get("gems_device_bound_us"):
        text += f"/{point['native_device_bound_us'] / point['gems_device_bound_us']:.2f}"
    return text


def _failures(points: list[dict]) -> list[str]:
    """``<side> failed: <the error's first line>`` for each side that raised at one of `points`."""
    return [f"{side} failed: {point[f'{side}_error'].splitlines()[0]}" for point in points
            for side in ("gems", "native") if f"{side}_error" in point]


def _json_ready(points: list[dict]) -> list[dict]:
    """Points with floats rounded and infinities (a failed side) as null."""
    ready = []
    for point in points:
        ready.append({k: (None if isinstance(v, float) and math.isinf(v) else round(v, 4) if isinstance(v, float)
                          else v) for k, v in point.items()})
    return ready
