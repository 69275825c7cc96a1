"""``fl-patch check --global``: FlagGems' aten-wide override on a small model, and what this device would add
to its exclude list.

1. A small Llama built from a config (no download; bfloat16 on the device, random weights, fixed seed) runs
   natively: the logits of an fp32 copy are the reference, the bfloat16 logits' relative L2 error against them
   is the noise floor, and a dispatch mode records the aten ops the forward calls.
2. The override as fl_patch applies it (``apply(gems_global=True)``, the default exclude list
   ``fl_patch.integrations.gems_global.DEFAULT_UNUSED``, nothing else patched): its logits must be finite and
   within ``max(2 x noise floor, noise floor + 1e-4)`` of the reference (benchmarks/gems_bisect.py's limit).
3. If they are not, the FlagGems functions that stay enabled and that the forward calls are bisected, each run
   registering exactly one group into a Library of fl_patch's (destroyed after), until the time budget (60 s)
   is spent: functions wrong alone, and groups wrong only together, are what this device would add to the
   list. Speed is not judged here (benchmarks/gems_bisect.py measures which ops run slower than torch's).

Where FlagGems can't run (a CPU, FlagGems not importable) or transformers is missing, the section says why and
its case is ``skipped``, which does not fail the check.
"""

from __future__ import annotations

import copy
import math
import time
from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fl_patch

MODEL = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=512)
BATCH, SEQUENCE = 2, 64
BUDGET_S = 60.0
TARGET = "flag_gems.enable (fl_patch's default exclude list)"


class OpRecorder(TorchDispatchMode):
    """Counts the aten ops a forward calls, including those inside CompositeImplicit decompositions
    (``linear`` -> ``mm``), which is where FlagGems registers most kernels."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.name()
        self.calls[name.split("::")[-1].removesuffix(".default")] += 1
        if torch._C._dispatch_has_kernel_for_dispatch_key(name, "CompositeImplicitAutograd"):
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        return func(*args, **kwargs)


def run(device: torch.device, budget_s: float = BUDGET_S, flag_gems=None) -> dict:
    """The ``global`` section of the check's JSON, with its ``cases`` (one, for the default list). `flag_gems`:
    the module to bisect with (default: FlagGems, loaded here; tests pass a stand-in with CPU kernels)."""
    shape = f"llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}, tokens {BATCH}x{SEQUENCE}"
    case = {"family": "gems_global", "form": "aten", "target": TARGET, "shape": shape, "dtype": "bfloat16"}
    if flag_gems is None:
        flag_gems, reason = _flag_gems(device)
        if reason is not None:
            case["verdict"] = f"skipped: {reason}"
            return {"verdict": case["verdict"], "cases": [case]}
    try:
        model = Model(device)
    except ImportError as exc:
        case["verdict"] = f"skipped: transformers can't be imported ({exc})"
        return {"verdict": case["verdict"], "cases": [case]}
    section = {"model": shape, "noise_floor": model.noise_floor, "limit": model.limit, "budget_s": budget_s}
    fl_patch.apply(include=["gems_global"], exclude=(), gems_global=True, gems_unused=["default"], strict=False)
    try:
        records = [r for r in fl_patch.report() if r["family"] == "gems_global"]
        quality = model.judge()
    finally:
        fl_patch.revert()
    section["override"] = [{k: r[k] for k in ("where", "state", "reason")} for r in records]
    section["default_list"] = quality
    case.update(max_error=quality["err"] if math.isfinite(quality["err"]) else None, tolerance=model.limit)
    if not any(r["state"] == "patched" for r in records):
        problems = "; ".join(r["reason"] for r in records if r["reason"]) or "no record"
        case["verdict"] = f"fail: the override did not apply ({problems})"
    elif quality["verdict"] == "ok":
        case["verdict"] = "pass"
        section.update(would_add=[], bisection="not needed: the default list gives right logits")
    else:
        case["verdict"] = f"fail: {quality['verdict']} logits with the default list"
        section.update(bisect_override(model, flag_gems, time.monotonic() + budget_s))
    section["verdict"] = case["verdict"]
    section["cases"] = [case]
    return section


def _flag_gems(device: torch.device):
    """(flag_gems, None), or (None, why it can't run here)."""
    if device.type == "cpu":
        return None, "FlagGems' kernels need an accelerator; this run is on the CPU"
    from fl_patch.kernels import gems

    try:
        return gems.load(), None
    except gems.GemsUnavailable as exc:
        return None, f"FlagGems can't be used: {exc}"


class Model:
    """The small Llama, its inputs, the fp32 reference logits and the bfloat16 noise floor."""

    def __init__(self, device: torch.device):
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        self.model = LlamaForCausalLM(LlamaConfig(**MODEL)).to(device, torch.bfloat16).eval()
        generator = torch.Generator().manual_seed(1234)
        self.inputs = torch.randint(0, MODEL["vocab_size"], (BATCH, SEQUENCE), generator=generator).to(device)
        with torch.inference_mode():
            self.reference = copy.deepcopy(self.model).float()(self.inputs).logits.float()
        self.recorder = OpRecorder()
        with self.recorder:
            native = self.forward()
        self.noise_floor = self.quality(native)["err"]
        self.limit = max(2 * self.noise_floor, self.noise_floor + 1e-4)

    def forward(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.inputs).logits

    def quality(self, logits: torch.Tensor) -> dict:
        logits = logits.float()
        finite = bool(torch.isfinite(logits).all())
        err = float((logits - self.reference).norm() / self.reference.norm()) if finite else math.inf
        return {"finite": finite, "err": err}

    def judge(self) -> dict:
        """The forward's logits judged: verdict ``ok``, ``nan`` or ``error`` (or ``crash`` when it raised)."""
        try:
            logits = self.forward().float().clone()
        except Exception as exc:  # a FlagGems kernel that raises is a finding, not the end of the check
            return {"verdict": "crash", "finite": False, "err": math.inf, "error": f"{type(exc).__name__}: {exc}"[:300]}
        result = self.quality(logits)
        result["verdict"] = "nan" if not result["finite"] else "error" if result["err"] > self.limit else "ok"
        return result


def bisect_override(model: Model, flag_gems, deadline: float) -> dict:
    """Which enabled FlagGems functions the forward calls make its logits wrong: ``would_add`` (wrong alone),
    ``together`` (groups wrong only together) and the ``runs`` made; ``complete`` False when the budget ran
    out first."""
    from fl_patch.integrations import gems_global

    table = gems_global.function_table(flag_gems)
    functions = sorted(set(table.values()))
    default = set(gems_global.resolve_unused(None, table))
    called = {function for key, function in table.items() if key in model.recorder.calls}
    candidates = sorted(called - default)
    runs: list[dict] = []

    def judge(group: list[str]) -> str:
        if time.monotonic() > deadline:
            return "not-run"
        lib = gems_global.recording_library(torch)
        try:
            flag_gems.enable(lib=lib, unused=sorted(set(functions) - set(group)))
            result = model.judge()
        finally:
            lib.release()
        runs.append({"enabled": group, **result})
        return result["verdict"]

    found: dict[str, str] = {}
    complete = narrow(candidates, judge, found)
    return {"candidates": candidates, "would_add": sorted(k for k in found if not k.startswith("together: ")),
            "together": sorted(k for k in found if k.startswith("together: ")), "runs": runs, "complete": complete}


def narrow(group: list[str], judge: Callable[[list[str]], str], found: dict[str, str]) -> bool:
    """Bisect `group` by halves: each function wrong alone goes into `found` with its verdict; a group that
    is wrong while both halves are right goes in as ``together: a, b, ...``. `judge(group)` gives ``ok``,
    ``not-run`` (budget spent) or a bad verdict. Returns False when some run was not made."""
    if not group:
        return True
    verdict = judge(group)
    if verdict in ("ok", "not-run"):
        return verdict == "ok"
    if len(group) == 1:
        found[group[0]] = verdict
        return True
    before = len(found)
    half = len(group) // 2
    complete = narrow(group[:half], judge, found) & narrow(group[half:], judge, found)
    if complete and len(found) == before:
        found["together: " + ", ".join(group)] = verdict
    return complete


def summary(section: dict) -> str:
    """Two lines for the terminal."""
    if section["verdict"].startswith("skipped"):
        return f"  [gems_global] {section['verdict']}"
    line = (f"  [gems_global] {section['verdict']}: logits relative error {section['default_list']['err']:.3g} "
            f"(limit {section['limit']:.3g}, bfloat16 noise floor {section['noise_floor']:.3g})")
    if "would_add" in section:
        adds = ", ".join(section["would_add"] + section.get("together", [])) or "nothing"
        state = "" if section.get("complete", True) else " (budget spent before the bisection finished)"
        line += f"\n  [gems_global] this device would add to the exclude list: {adds}{state}"
    return line
