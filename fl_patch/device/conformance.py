"""``fl-patch check``: do fl_patch's kernels give the originals' numbers on this device, and does revert restore?

What runs (``fl_patch.device.kernel_cases``): every form of every selected family (``--families``), each shape
variant at each size of the grid (launch-bound to large: 2**12 to 2**23 elements of the deciding tensor on
a device, 2**8 to 2**14 on the CPU) in each dtype the provider takes (gems: bfloat16, float16; reference:
float32, bfloat16). Linear runs at two sizes, and on a device in bfloat16 only: FlagGems' GEMM autotunes per
token count (2.6 s each on an H200) and first per dtype (35 s). Per case, on the same inputs:

- the provider's kernel (``<provider><suffix>``), only where ``unsupported<suffix>(provider, ...)`` returns
  None; a reason is recorded as ``not taken: <reason>`` and does not fail the run (the patched call would
  run the original there);
- fl_patch's ``native<suffix>`` path where the form has one (what small calls run instead of FlagGems);
- each against the original (HF's class or function, torch's builtin; fl_patch's copy of HF's body only
  where transformers can't be imported, and the target's ``original`` says so).

Judgement (:data:`TOLERANCE_RULE`, written into the JSON): the original also runs on fp32 copies of the
inputs ("exact", cast to the case's dtype, as FlagGems' own tests and tests/gpu do). A kernel's error is
``max |kernel - exact|``; it passes when that is at most ``max(rtol[dtype] * max |exact|, 2 x the
original's own error max |original - exact|, atol)``, with rtol bfloat16 0.016 and float16 1e-3 (FlagGems'
own) and float32 1e-5 (two summation orders of one fp32 result), atol 1e-3 / 1e-4 / 1e-5 (a floor for results
that are zero in exact arithmetic: inputs are of order 1); output dtype and shape must be the
original's, and a NaN or Inf where the exact result is finite fails. Where the path claims a backward
(``unsupported`` returns None for inputs that require grad), the gradients of a fixed random projection of
the output with respect to every input and weight are judged by the same rule against the original's.

Revert identity: every family is applied with the same provider (transformers' model modules used here,
and LightX2V's ops where importable, imported first), the ledger's (owner, key, original) entries copied,
fl_patch reverted, and each attribute or key checked to be the identical original object again (or absent
again). ``--global`` adds :mod:`fl_patch.global_check`.

Output: a line per form as it finishes and one per family, a summary, and with ``--json PATH`` every case
(family, target, form, shape, dtype, max error, tolerance, verdict, gradient error where checked) under a
header (device, versions, date, provider, the rule, counts), rewritten after every form. Exit status 1 when
any case fails, 0 when none does, 2 for bad arguments, a ``--json`` path that can't be written (said before
anything runs) or a provider that can't run here, 130 when interrupted (Ctrl-C): the cases so far are counted and
written, marked ``"interrupted": true``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import torch

import fl_patch
from fl_patch import output_path
from fl_patch.device import devices, kernel_cases
from fl_patch.device.kernel_cases import Form, Inputs, Named, Variant
from fl_patch.versions import stack_versions

SCHEMA = 1
KIND = "fl_patch.check"
RTOL = {torch.bfloat16: 0.016, torch.float16: 1e-3, torch.float32: 1e-5}
ORIGINAL_FACTOR = 2.0
# An absolute floor, for results that are zero in exact arithmetic and rounding noise in practice (attention
# over one key: the gradients of q and k); the inputs are of order 1.
ATOL = {torch.bfloat16: 1e-3, torch.float16: 1e-4, torch.float32: 1e-5}
TOLERANCE_RULE = (
    "exact = the original on fp32 copies of the inputs, cast to the case's dtype; max_error = max |kernel - exact|; "
    "original_error = max |original - exact|; pass when max_error <= tolerance = max(rtol[dtype] * max |exact|, "
    f"{ORIGINAL_FACTOR:g} * original_error, atol[dtype]), the output has the original's dtype and shape, and has no "
    "NaN/Inf where exact is finite; gradients (of sum(output * a fixed random fp32 tensor)) with respect to every "
    "input and weight are judged by the same rule against the original's"
)
DEVICE_SIZES = (1 << 12, 1 << 16, 1 << 20, 1 << 23)
CPU_SIZES = (1 << 8, 1 << 10, 1 << 12, 1 << 14)
DTYPES = {"gems": (torch.bfloat16, torch.float16), "reference": (torch.float32, torch.bfloat16)}
PROVIDERS = tuple(DTYPES)
INTERRUPTED = 130  # the exit status after Ctrl-C, as a shell gives (128 + SIGINT)


class UsageError(Exception):
    """A bad argument or a setting that can't run here: printed as one line, exit status 2."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="fl-patch check", description="Do fl_patch's kernels give the originals' "
                                     "numbers on this device, and does revert restore every original?")
    parser.add_argument("--quick", action="store_true", help="the reference kernels on the CPU (CI: seconds)")
    parser.add_argument("--kernels", choices=PROVIDERS, default=None,
                        help="kernel provider (default gems; --quick: reference)")
    parser.add_argument("--families", default="", help="comma list of families or keys (rms_norm, rope.hf, ...)")
    parser.add_argument("--global", dest="global_override", action="store_true",
                        help="also check FlagGems' aten-wide override on a small model (needs a device)")
    parser.add_argument("--device", default=None, help="torch device (default: the first accelerator found)")
    parser.add_argument("--json", type=Path, default=None, help="write every case to this JSON file")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the check; exit status as in the module docstring."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    fl_patch.revert()  # compare against the originals, even under the bootstrap
    try:
        provider, device, forms = _setting(args)
    except UsageError as exc:
        print(f"fl-patch check: {exc}", file=sys.stderr)
        return 2
    with kernel_cases.cpu_threads(device):
        return Check(provider, device, forms, args.json).run(args.global_override)


def _setting(args) -> tuple[str, torch.device, list[Form]]:
    if args.quick and args.kernels == "gems":
        raise UsageError("--quick runs the reference kernels on the CPU; leave out --kernels gems")
    provider = "reference" if args.quick else args.kernels or "gems"
    try:
        forms = kernel_cases.select(args.families)
        device = torch.device("cpu") if args.quick else kernel_cases.pick_device(args.device, provider == "reference")
        if args.json is not None:
            output_path.check(args.json, "--json")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if provider == "gems":
        from fl_patch.kernels import gems

        try:
            gems.load()
        except gems.GemsUnavailable as exc:
            raise UsageError(f"FlagGems can't be used here: {exc}") from None
    return provider, device, forms


class Check:
    """One run: the cases so far, the header, and the JSON file rewritten as cases come in."""

    def __init__(self, provider: str, device: torch.device, forms: list[Form], json_path: Path | None):
        self.provider, self.device, self.forms, self.json_path = provider, device, forms, json_path
        self.dtypes = DTYPES[provider]
        self.cases: list[dict] = []
        self.sections: dict = {}
        self.interrupted = False
        self.started = time.monotonic()
        self.header = {
            "schema": SCHEMA, "kind": KIND,
            "device": devices.identify(device).as_dict(),
            "versions": stack_versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "provider": provider,
            "dtypes": [dtype_name(d) for d in self.dtypes],
            "tolerance": {"rule": TOLERANCE_RULE, "rtol": {dtype_name(d): r for d, r in RTOL.items()},
                          "original_factor": ORIGINAL_FACTOR, "atol": {dtype_name(d): a for d, a in ATOL.items()}},
        }

    def run(self, global_override: bool) -> int:
        """Run every case and print the summary; the exit status (module docstring)."""
        device_info = devices.identify(self.device)
        print(f"fl-patch check: {device_info.label()}, provider {self.provider}, "
              f"{', '.join(dtype_name(d) for d in self.dtypes)}", flush=True)
        print(f"  rule: {TOLERANCE_RULE}", flush=True)
        print(f"  {'key':<22} {'cases':>5} {'pass':>5} {'fail':>5} {'not taken':>9}  {'worst err/tol':>13}  seconds")
        try:
            self._run_cases(global_override)
        except KeyboardInterrupt:
            self.interrupted = True
        self.write()
        if self.provider == "gems" and self.device.type != "cpu" and not self.interrupted:
            from fl_patch.device import verification

            certified = verification.certify(self.header["device"], self.cases)
            if certified is not None:
                print(f"fl-patch check: verdicts per form and dtype kept for first-use verification in {certified}")
        counts = self.counts()
        print(f"fl-patch check: {'interrupted after ' if self.interrupted else ''}{counts['cases']} cases, "
              f"{counts['pass']} pass, {counts['fail']} fail, {counts['not taken']} not taken "
              f"({time.monotonic() - self.started:.1f} s)" + (f"; wrote {self.json_path}" if self.json_path else ""),
              file=sys.stderr if self.interrupted else sys.stdout, flush=True)
        if self.interrupted:
            return INTERRUPTED
        return 1 if counts["fail"] else 0

    def _run_cases(self, global_override: bool) -> None:
        for family in dict.fromkeys(form.family for form in self.forms):
            family_start, before = time.monotonic(), len(self.cases)
            for form in (f for f in self.forms if f.family == family):
                form_start, form_before = time.monotonic(), len(self.cases)
                for variant in form.variants:
                    for elements in kernel_cases.grid(variant, self._sizes(form)):
                        for dtype in self._dtypes(form):
                            self._add(run_case(form, variant, self.provider, elements, dtype, self.device))
                self._line(form.key, self.cases[form_before:], time.monotonic() - form_start)
                self.write()
            self._line(f"[{family}]", self.cases[before:], time.monotonic() - family_start)
        began, before = time.monotonic(), len(self.cases)
        self._add(revert_identity(self.provider, sorted({form.family for form in self.forms})))
        self._line("[revert identity]", self.cases[before:], time.monotonic() - began)
        if global_override:
            from fl_patch import global_check

            section = global_check.run(self.device)
            self.sections["global"] = section
            self._add(section.pop("cases"))
            print(global_check.summary(section), flush=True)

    def _dtypes(self, form: Form) -> tuple[torch.dtype, ...]:
        if form.dtypes is not None:
            return form.dtypes
        if self.device.type == "cpu" or form.device_dtypes is None:
            return self.dtypes
        return tuple(dtype for dtype in self.dtypes if dtype in form.device_dtypes)

    def _sizes(self, form: Form) -> tuple[int, ...]:
        if self.device.type == "cpu":
            return form.sizes.get("cpu", CPU_SIZES)
        return form.sizes.get("check", DEVICE_SIZES)

    def _add(self, cases: list[dict]) -> None:
        for case in cases:
            self.cases.append(case)
            if case["verdict"].startswith("fail"):
                print(f"  FAIL {case['target']} [{case.get('shape', '')}] {case.get('dtype', '')}: "
                      f"{case['verdict']}", flush=True)

    def _line(self, label: str, cases: list[dict], seconds: float) -> None:
        counts = _counts(cases)
        pairs = (("max_error", "tolerance"), ("grad_error", "grad_tolerance"))
        ratios = [c[error] / c[tolerance] for c in cases for error, tolerance in pairs
                  if c.get(tolerance) and c.get(error) is not None]
        worst = f"{max(ratios):.2f}" if ratios else "-"
        print(f"  {label:<22} {counts['cases']:>5} {counts['pass']:>5} {counts['fail']:>5} {counts['not taken']:>9}  "
              f"{worst:>13}  {seconds:.1f}", flush=True)

    def counts(self) -> dict:
        return _counts(self.cases)

    def write(self) -> None:
        if self.json_path is None:
            return
        data = {**self.header, "counts": self.counts(), "elapsed_s": round(time.monotonic() - self.started, 1),
                **({"interrupted": True} if self.interrupted else {}), **self.sections, "cases": self.cases}
        output_path.write_json(data, self.json_path)


def _counts(cases: list[dict]) -> dict:
    counts = {"cases": len(cases), "pass": 0, "fail": 0, "not taken": 0, "skipped": 0}
    for case in cases:
        word = case["verdict"].split(":", 1)[0]
        counts[word] = counts.get(word, 0) + 1
    return counts


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ------------------------------------------------------------------------------------------------- cases


def run_case(form: Form, variant: Variant, provider: str, elements: int, dtype: torch.dtype,
             device: torch.device) -> list[dict]:
    """The entries of one case: the provider's kernel and, where the form has one, its native path."""
    torch.manual_seed(elements)
    inputs = variant.build(elements, dtype, device)
    original = form.original()
    base = {"family": form.family, "form": form.form, "variant": variant.name, "shape": inputs.shape,
            "elements": inputs.deciding.numel(), "dtype": dtype_name(dtype), "original": original.name}
    judge = Judge(original, inputs, dtype)
    rows = [(form.kernel(provider), True)]
    native = form.native_kernel()
    if native is not None:
        rows.append((native, False))
    entries = []
    for kernel, routed in rows:
        entry = {**base, "target": kernel.name}
        with torch.no_grad():
            reason = form.unsupported(provider, inputs) if routed else None
        if reason is not None:
            entry["verdict"] = f"not taken: {reason}"
        else:
            entry.update(judge.forward(kernel))
            if entry["verdict"] == "pass":
                entry.update(judge.backward(kernel, form, provider if routed else None))
        entries.append(entry)
    return entries


class Judge:
    """The original's results on one case's inputs (in the case's dtype, and "exact" on fp32 copies), forward
    and gradients, each computed when first needed; and the verdicts of kernels against them."""

    def __init__(self, original: Named, inputs: Inputs, dtype: torch.dtype):
        self.original, self.inputs, self.dtype = original, inputs, dtype
        self._outputs = self._grads = None

    def forward(self, kernel: Named) -> dict:
        if self._outputs is None:
            with torch.no_grad():
                self._outputs = (tensors(self.original.function(*self.inputs.args)),
                                 tensors(self.original.function(*self.inputs.in_fp32().args)))
        try:
            with torch.no_grad():
                actual = tensors(kernel.function(*self.inputs.args))
        except Exception as exc:  # a kernel that raises is a failed case, not a failed run
            return {"verdict": f"fail: {_exception(exc)}"}
        labels = ["output"] if len(actual) == 1 else [f"output {i}" for i in range(len(actual))]
        return judged(actual, *self._outputs, self.dtype, labels)

    def backward(self, kernel: Named, form: Form, provider: str | None) -> dict:
        """Gradients against the original's where the path claims a backward: `unsupported` takes inputs that
        require grad (`provider` None: a native path, plain torch, always does)."""
        if not self.inputs.grads:
            return {}
        leaves = self.inputs.requiring_grad()
        with torch.enable_grad():
            reason = form.unsupported(provider, leaves) if provider is not None else None
        if reason is not None:
            return {"grad": f"not claimed ({reason}): the original runs when gradients are needed"}
        if self._grads is None:
            self._grads = (self._gradients(self.original, leaves),
                           self._gradients(self.original, self.inputs.in_fp32().requiring_grad()))
        try:
            actual = self._gradients(kernel, leaves)
        except Exception as exc:  # as in forward
            return {"grad": "checked", "verdict": f"fail: backward: {_exception(exc)}"}
        labels = [f"gradient of argument {position}" for position in self.inputs.grads]
        verdict = judged(actual, *self._grads, self.dtype, labels)
        return {"grad": "checked", "grad_error": verdict["max_error"], "grad_original_error": verdict["original_error"],
                "grad_tolerance": verdict["tolerance"], "verdict": verdict["verdict"]}

    def _gradients(self, function: Named, leaves: Inputs) -> list[torch.Tensor | None]:
        """d sum(output * cotangent) / d each tensor at `leaves.grads`, with a fixed fp32 cotangent per output."""
        with torch.enable_grad():
            outputs = tensors(function.function(*leaves.args))
            generator = torch.Generator().manual_seed(1234)
            cotangents = [torch.randn(out.shape, generator=generator).to(out.device) for out in outputs]
            loss = sum((out.float() * cot).sum() for out, cot in zip(outputs, cotangents, strict=True))
            return list(torch.autograd.grad(loss, leaves.grad_tensors(), allow_unused=True))


def tensors(result) -> tuple:
    return tuple(result) if isinstance(result, (tuple, list)) else (result,)


def _exception(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


def judged(actual, expected, exact, dtype: torch.dtype, labels: list[str]) -> dict:
    """The verdict of tensors `actual` against the original's `expected` and `exact` (see TOLERANCE_RULE), with
    the figures of the worst tensor (largest error over tolerance)."""
    worst = {"max_error": 0.0, "original_error": 0.0, "tolerance": ATOL[dtype]}
    worst_label = labels[0]
    for label, a, e, x in zip(labels, actual, expected, exact, strict=True):
        if a is None or e is None:
            if a is not e:
                return {**worst, "verdict": f"fail: {label}: " + ("none, the original has one" if a is None else
                                                                  "the original has none")}
            continue
        if a.shape != e.shape or a.dtype != e.dtype:
            return {**worst, "verdict": f"fail: {label} is {dtype_name(a.dtype)} {tuple(a.shape)}, the original's "
                    f"{dtype_name(e.dtype)} {tuple(e.shape)}"}
        x = x.to(e.dtype).float()
        finite = torch.isfinite(x)
        if bool((~torch.isfinite(a) & finite).any()):
            return {**worst, "verdict": f"fail: {label} has NaN/Inf where the exact result is finite"}
        error = _max_abs(torch.where(finite, a.float() - x, 0.0))
        original_error = _max_abs(torch.where(finite, e.float() - x, 0.0))
        tolerance = max(RTOL[dtype] * _max_abs(torch.where(finite, x, 0.0)), ORIGINAL_FACTOR * original_error,
                        ATOL[dtype])
        if error / tolerance >= worst["max_error"] / worst["tolerance"]:
            worst, worst_label = {"max_error": error, "original_error": original_error, "tolerance": tolerance}, label
    if worst["max_error"] > worst["tolerance"]:
        return {**worst, "verdict": f"fail: {worst_label} error {worst['max_error']:.3g} > tolerance "
                f"{worst['tolerance']:.3g}"}
    return {**worst, "verdict": "pass"}


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


# ------------------------------------------------------------------------------------------ revert identity

# Modules imported before the identity check, where installed: the places the rows of these families patch.
IDENTITY_IMPORTS = (
    "transformers", "transformers.models.llama.modeling_llama", "transformers.models.gemma.modeling_gemma",
    "transformers.models.gemma4.modeling_gemma4", "transformers.models.qwen3_next.modeling_qwen3_next",
    "lightx2v.common.ops",
)


def revert_identity(provider: str, families: list[str]) -> list[dict]:
    """Apply `families` with `provider`, copy the ledger, revert, and check that every attribute and key it
    changed holds its identical original object again (or is absent again): one case per place."""
    from fl_patch import ledger, runtime

    for name in IDENTITY_IMPORTS:
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            with contextlib.suppress(Exception):  # an optional module that doesn't import has nothing to check
                importlib.import_module(name)
    fl_patch.apply(include=families, exclude=(), kernels=provider, strict=False)
    with runtime._state.lock:
        entries = [(e.kind, e.owner, e.key, e.original) for e in runtime._state.ledger.entries]
    errors = fl_patch.revert()
    cases, seen = [], set()
    for kind, owner, key, original in entries:
        if kind == "callback":
            continue
        place = (kind, id(owner), key)
        if place in seen:  # patched twice: revert restores the first original
            continue
        seen.add(place)
        now = _current(kind, owner, key)
        if now is original:
            verdict = "pass"
        elif original is ledger._MISSING:
            verdict = f"fail: present after revert (absent before): {_describe(now)}"
        elif now is ledger._MISSING:
            verdict = f"fail: absent after revert, was {_describe(original)}"
        else:
            verdict = f"fail: {_describe(now)} after revert, was {_describe(original)}"
        cases.append({"family": "revert", "form": kind, "target": _place(kind, owner, key), "provider": provider,
                      "verdict": verdict})
    callbacks = sum(1 for kind, *_ in entries if kind == "callback")
    cases += [{"family": "revert", "form": "error", "target": "fl_patch.revert()", "verdict": f"fail: {_exception(e)}"}
              for e in errors]
    if callbacks:
        cases.append({"family": "revert", "form": "callback", "target": f"{callbacks} undo callbacks",
                      "verdict": "pass", "note": "run by revert; not comparable by identity"})
    return cases


def _current(kind: str, owner, key):
    """What the place holds now, read as the ledger reads originals (``_MISSING``: nothing there)."""
    from fl_patch import ledger

    if kind == "attr":
        own = vars(owner) if hasattr(owner, "__dict__") else {}
        return own.get(key, ledger._MISSING)
    return owner[key] if key in owner else ledger._MISSING


def _place(kind: str, owner, key) -> str:
    if kind == "attr":
        name = getattr(owner, "__qualname__", None) or getattr(owner, "__name__", None) or type(owner).__name__
        module = getattr(owner, "__module__", None)
        prefix = f"{module}.{name}" if module and isinstance(owner, type) else name
        return f"{prefix}.{key}"
    return f"{type(owner).__name__}[{_describe(key)}]"


def _describe(value) -> str:
    name = getattr(value, "__qualname__", None) or getattr(value, "__name__", None)
    module = getattr(value, "__module__", None)
    if name:
        return f"{module}.{name}" if module else name
    return repr(value)[:80]
