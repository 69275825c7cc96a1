"""First-use verification: before FlagGems' result for a routing key is trusted on a device and dtype, one of the
program's own calls runs on both FlagGems and the native path and the two are compared with ``fl-patch check``'s
tolerances (:func:`fl_patch.device.conformance.judged`: against an fp32 run of the native path, allowing the larger of
a relative tolerance of the dtype and twice the native path's own error).

- Pass: the key is trusted for that dtype; FlagGems' result is returned, and later calls of that dtype pay nothing.
- Mismatch (or FlagGems raising NaN/Inf where the exact result is finite): the call returns the native result, the
  key stays native on this device (in this process and, through the checks cache, in the next ones), one
  warning names the key, the shapes and the error against the tolerance, and ``fl-patch status`` and the report
  show it. A FlagGems that returns wrong numbers never reaches the user's tensors.

What skips it: a pass recorded in the checks cache (``<cache>/checks/<device file>.json``) for the same
torch and flag_gems releases: by an earlier process's verification, or by ``fl-patch check`` on this device
(:func:`certify`; a form it fails stays native there too).

Where it can't run, it does not guess: while a CUDA graph is captured (a comparison reads the device) an
unverified call runs the native path; under torch.compile the kernel is traced as it is (verify in eager first,
e.g. with one eager forward or ``fl-patch check``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fl_patch")

PASS = "pass"


class KeyChecks:
    """One routing key's verification state: the dtypes verified (a set read on every kernel call: keep it the
    same object) and, once a mismatch was seen, why it stays native."""

    def __init__(self, key: str):
        self.key = key
        self.verified: set = set()
        self.failed: str | None = None
        self.results: dict[str, dict] = {}  # dtype name -> verdict and figures


class _Verification:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: dict[str, KeyChecks] = {}
        self.path: Path | None = None
        self.versions: dict = {}
        self.device_label = "this device"
        self.on_failure: Callable[[str, str], None] | None = None  # the router's: keep the key native


_ver = _Verification()


def checks(key: str) -> KeyChecks:
    """The state of `key` (one object per key for the process's life: replacements hold its `verified` set)."""
    with _ver.lock:
        return _ver.keys.setdefault(key, KeyChecks(key))


def reset() -> None:
    """Forget every verdict (each apply): in place, since replacements hold the sets."""
    with _ver.lock:
        for state in _ver.keys.values():
            state.verified.clear()
            state.failed = None
            state.results.clear()
        _ver.path, _ver.versions, _ver.on_failure = None, {}, None


def start(path: Path | None, versions: dict, device_label: str, on_failure: Callable[[str, str], None]) -> None:
    """Begin for this process's device: read the checks cache at `path` (passes of the same releases skip a
    key's verification; failures keep it native) and keep `on_failure` for new mismatches."""
    recorded = _read(path, versions) if path is not None else {}
    with _ver.lock:
        _ver.path, _ver.versions, _ver.device_label, _ver.on_failure = path, versions, device_label, on_failure
    for key, by_dtype in recorded.items():
        state = checks(key)
        for dtype_name, result in by_dtype.items():
            state.results[dtype_name] = result
            if result.get("verdict") == PASS:
                state.verified.add(_dtype(dtype_name))
            elif state.failed is None:
                state.failed = _failure_words(key, dtype_name, result)


def failed(key: str) -> str | None:
    """Why `key` stays native on this device, or None."""
    state = _ver.keys.get(key)
    return state.failed if state is not None else None


def first_call(key: str, kernel: Callable, native_path: Callable, args: tuple, kwargs: dict):
    """Verify `key` on this call (module docstring) and return the result to hand back: FlagGems' on a pass, the
    native path's otherwise."""
    import torch

    from fl_patch.device import conformance, devices

    state = checks(key)
    deciding = args[0]
    dtype = deciding.dtype
    if state.failed is not None:
        return native_path(*args, **kwargs)
    if devices.capturing(deciding.device):
        return native_path(*args, **kwargs)
    if dtype not in conformance.RTOL:
        state.verified.add(dtype)  # no tolerance for this dtype: the gems paths don't take it (their own check)
        return kernel(*args, **kwargs)
    with torch.no_grad():
        expected = conformance.tensors(native_path(*args, **kwargs))
        exact = conformance.tensors(native_path(*_in_fp32(args), **_in_fp32_map(kwargs)))
    actual = kernel(*args, **kwargs)
    outputs = conformance.tensors(actual)
    labels = ["output"] if len(outputs) == 1 else [f"output {i}" for i in range(len(outputs))]
    result = conformance.judged([o.detach() for o in outputs], expected, exact, dtype, labels)
    result["shape"] = ", ".join(f"{tuple(a.shape)}" for a in args if isinstance(a, torch.Tensor))
    name = conformance.dtype_name(dtype)
    with _ver.lock:
        state.results[name] = result
    if result["verdict"] == PASS:
        state.verified.add(dtype)
        _record(key, name, result)
        return actual
    words = _failure_words(key, name, result)
    first = state.failed is None
    state.failed = words
    _record(key, name, result)
    if first:
        log.warning("fl_patch: %s; it runs the native path on %s from now on (this process and the next ones: "
                    "the checks cache). `fl-patch check` shows every form.", words, _ver.device_label)
        callback = _ver.on_failure
        if callback is not None:
            callback(key, words)
    return native_path(*args, **kwargs)


def _failure_words(key: str, dtype_name: str, result: dict) -> str:
    figures = ""
    if "max_error" in result and "tolerance" in result:
        figures = f" (error {result['max_error']:.3g} > tolerance {result['tolerance']:.3g})"
    verdict = result.get("verdict", "fail").removeprefix("fail: ")
    return (f"FlagGems' {key} differs from the native path in {dtype_name} on shapes {result.get('shape', '?')}: "
            f"{verdict}{figures if 'tolerance' not in verdict else ''}")


def _in_fp32(args: tuple) -> tuple:
    import torch

    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _in_fp32_map(kwargs: dict) -> dict:
    return dict(zip(kwargs, _in_fp32(tuple(kwargs.values())), strict=True))


def _dtype(name: str):
    import torch

    return getattr(torch, name, None)


def describe() -> dict:
    """Per key: dtypes verified, and why it stays native where a mismatch was seen."""
    with _ver.lock:
        return {key: {"results": dict(state.results), **({"failed": state.failed} if state.failed else {})}
                for key, state in sorted(_ver.keys.items()) if state.results or state.failed}


# ------------------------------------------------------------------------------------------ persistence


def _same_releases(made, versions: dict) -> bool:
    """Whether verdicts made with `made` versions hold for `versions`: the same torch and flag_gems releases."""
    from fl_patch.versions import release

    if not isinstance(made, dict):
        return False
    return all(release(str(made.get(name))) == release(str(versions.get(name))) for name in ("torch", "flag_gems"))


def _read(path: Path, versions: dict) -> dict[str, dict]:
    """Recorded verdicts of the same torch and flag_gems releases ({} when none, or unreadable)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("checks"), dict):
        return {}
    if not _same_releases(data.get("versions"), versions):
        return {}
    return {key: by_dtype for key, by_dtype in data["checks"].items() if isinstance(by_dtype, dict)}


def stack() -> dict:
    """The versions a verdict holds for: torch's and flag_gems' (another release of either is checked anew)."""
    from fl_patch.versions import stack_versions

    return {name: version for name, version in stack_versions().items() if name in ("torch", "flag_gems")}


def certify(device: dict, cases: list[dict]) -> Path | None:
    """``fl-patch check``'s verdicts of the FlagGems kernels on a device, per routing key and dtype, into that
    device's checks cache: a key and dtype whose every case passed is certified (first-use verification skips
    it), one with a failed case stays native there. Returns the file written, or None."""
    from fl_patch.device import profiles

    verdicts: dict[tuple[str, str], dict] = {}
    for case in cases:
        if ".gems" not in case.get("target", "") or "dtype" not in case or case["verdict"].startswith("not taken"):
            continue
        where = (f"{case['family']}.{case['form']}", case["dtype"])
        if where not in verdicts or not case["verdict"].startswith("pass"):
            verdicts[where] = {"verdict": PASS if case["verdict"].startswith("pass") else case["verdict"],
                               "shape": case.get("shape", ""), "by": "fl-patch check",
                               **{k: case[k] for k in ("max_error", "tolerance") if k in case}}
    versions = stack()
    path = profiles.cache_dir() / "checks" / profiles.file_name(device, versions.get("flag_gems"))
    for (key, dtype_name), result in sorted(verdicts.items()):
        _record(key, dtype_name, result, path, versions)
    return path if verdicts else None


def _record(key: str, dtype_name: str, result: dict, path: Path | None = None, versions: dict | None = None) -> None:
    """Merge one verdict into the checks cache (atomically, under its file lock): this process's
    file unless `path` and `versions` are given. Never raises."""
    from fl_patch import output_path

    if path is None:
        with _ver.lock:
            path, versions = _ver.path, dict(_ver.versions)
    if path is None:
        return
    kept = {k: v for k, v in result.items()
            if k in ("verdict", "max_error", "tolerance", "original_error", "shape", "by")}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with output_path.locked(path):
            data = {}
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or not _same_releases(data.get("versions"), versions):
                data = {"kind": "fl_patch.checks", "versions": versions, "checks": {}}
            data.setdefault("checks", {}).setdefault(key, {})[dtype_name] = kept
            output_path.write_json(data, path)
    except OSError as exc:
        log.warning("fl_patch: can't write the checks cache %s (%s)", path, exc.strerror or exc)
        with _ver.lock:
            _ver.path = None
