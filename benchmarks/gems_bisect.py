"""Which FlagGems aten overrides break or slow down a transformer forward: the data behind DEFAULT_UNUSED.

For each model (Llama-style and Qwen3-style from a config: 16 layers, hidden 2048, 16 heads / 8 KV heads,
MLP 8192, vocab 32000, bf16, random init with a fixed seed), in one process:

1. native: logits of an fp32 copy of the bf16 weights (the reference), bf16 logits and their relative L2
   error against it (the bf16 noise floor), the forward time (measured three times: the spread is the noise);
2. the aten ops the forward calls (a TorchDispatchMode that also walks CompositeImplicit decompositions),
   mapped to FlagGems function names: the *candidates*; every other non-RNG function forms the *rest* group;
3. each candidate alone (``flag_gems.enable(unused=<every other function>)``), then the rest group, bisected
   by halves if it misbehaves: verdict ``nan`` (non-finite logits), ``error`` (error > --err-factor x the
   noise floor), ``slow`` (forward slower than native by more than max(3 x noise, --slow-frac x native)),
   ``crash`` (exception), else ``ok`` (a slow timing is taken again to confirm it; errors are computed with
   torch's kernels, after the run's Library is gone); a CUDA error ends the sweep (the context is unusable);
4. checks: everything FlagGems has minus RNG (what FL_PATCH_GEMS_GLOBAL=1 with an RNG-only list gives), and
   minus the recommended list; if the latter is still wrong, its enabled set is bisected for interactions.

Every run registers into a fresh Library of fl_patch's (``recording_library``) and destroys it after. The
recommended ``DEFAULT_UNUSED`` is fl_patch's RNG list plus every function judged nan/error/slow/crash in any
model. No run starts after --budget-s (default 300; the first model, which pays for compiling and
autotuning, gets 1.5 shares of it): results so far are kept, the rest marked ``not-run``. Findings are
written after every model.

    python benchmarks/gems_bisect.py --out benchmarks/results          # GPU (H100: about 4-6 minutes)
    python benchmarks/gems_bisect.py --quick --out /tmp/bisect          # CPU, seconds: tiny model and a
                                                                        # stand-in flag_gems (harness check)

Writes gems_bisect.json to --out; prints a table per model and the recommended list as Python.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch
from model_configs import model_config  # benchmarks/, on sys.path as the script's folder

from fl_patch.global_check import OpRecorder

BAD_VERDICTS = ("nan", "error", "slow", "crash")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU, tiny model, stand-in flag_gems (seconds)")
    parser.add_argument("--models", default="llama,qwen3")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--err-factor", type=float, default=2.0, help="error limit, in units of the bf16 noise floor")
    parser.add_argument("--slow-frac", type=float, default=0.01, help="slow limit, as a fraction of native time")
    parser.add_argument("--budget-s", type=float, default=300.0, help="stop starting new runs after this")
    parser.add_argument("--out", type=Path, default=None, help="folder for gems_bisect.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.seq, args.reps = 2, 16, 3
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    return args


class Study:
    """One model: native figures, then FlagGems configurations, each judged against native."""

    def __init__(self, args, flag_gems, device: str, deadline: float):
        from fl_patch.integrations import gems_global

        self.args, self.flag_gems, self.device, self.deadline = args, flag_gems, device, deadline
        self.gems_global = gems_global
        self.table = gems_global.function_table(flag_gems)
        self.functions = sorted(set(self.table.values()))
        self.rng = [f for f in gems_global.RNG_FUNCTIONS if f in self.functions]
        self.poisoned = False  # a CUDA error happened: later runs would only report it again
        self.log: list[dict] = []

    def build(self, name: str) -> None:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        with torch.device(self.device):
            self.model = AutoModelForCausalLM.from_config(model_config(name, self.args.quick),
                                                          dtype=torch.bfloat16).eval()
        generator = torch.Generator(device="cpu").manual_seed(1234)
        vocab = self.model.config.vocab_size
        self.inputs = torch.randint(0, vocab, (self.args.batch, self.args.seq), generator=generator).to(self.device)
        reference = copy.deepcopy(self.model).float()
        with torch.inference_mode():
            self.reference = reference(self.inputs).logits.float()
        del reference

    def forward(self) -> torch.Tensor:
        with torch.inference_mode():
            return self.model(self.inputs).logits

    def time_ms(self) -> float:
        """Median forward time on CUDA (events); on CPU the minimum, which other processes can't inflate."""
        for _ in range(self.args.warmup):
            self.forward()
        times = []
        for _ in range(self.args.reps):
            if self.device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.forward()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                begin = time.perf_counter()
                self.forward()
                times.append((time.perf_counter() - begin) * 1000)
        return statistics.median(times) if self.device == "cuda" else min(times)

    def quality(self, logits: torch.Tensor) -> dict:
        logits = logits.float()
        finite = bool(torch.isfinite(logits).all())
        diff = (logits - self.reference).nan_to_num(nan=math.inf)
        return {
            "finite": finite,
            "err": float(diff.norm() / self.reference.norm()) if finite else math.inf,
            "max_abs_diff": float(diff.abs().max()),
            "top1_agreement": float((logits.argmax(-1) == self.reference.argmax(-1)).float().mean()),
        }

    def native(self) -> dict:
        recorder = OpRecorder()
        with recorder:
            logits = self.forward()
        self.time_ms()  # first calls pay for lazy initialisation
        times = [self.time_ms() for _ in range(3)]
        self.native_ms = statistics.median(times)
        self.noise_ms = max(times) - min(times)
        result = {"ms": self.native_ms, "noise_ms": self.noise_ms, "ops_called": dict(recorder.calls.most_common())}
        result.update(self.quality(logits))
        self.native_err = result["err"]
        self.err_limit = max(self.args.err_factor * self.native_err, self.native_err + 1e-4)
        self.slow_limit = max(3 * self.noise_ms, self.args.slow_frac * self.native_ms)
        result.update(err_limit=self.err_limit, slow_limit_ms=self.slow_limit)
        called = set(recorder.calls)
        self.candidates = sorted({f for key, f in self.table.items() if key in called} - set(self.rng))
        self.rest = sorted(set(self.functions) - set(self.candidates) - set(self.rng))
        return result

    def run(self, enabled, label: str) -> dict:
        """Forward with exactly the FlagGems functions `enabled` registered, judged against native."""
        enabled = sorted(enabled)
        result = {"label": label, "enabled": enabled if len(enabled) <= 12 else f"{len(enabled)} functions"}
        if self.poisoned or time.monotonic() > self.deadline:
            result["verdict"] = "not-run"
            result["why"] = "CUDA context unusable after a crash" if self.poisoned else "time budget spent"
            return result
        lib = self.gems_global.recording_library(torch)
        try:
            self.flag_gems.enable(lib=lib, unused=sorted(set(self.functions) - set(enabled)))
            result["registered"] = len(lib.owned)
            if lib.failed:
                result["refused"] = lib.failed
            logits = self.forward()
            result["ms"] = self.time_ms()
            if result["ms"] - self.native_ms > self.slow_limit:  # confirm: a timing can be hit by something else
                result["ms"] = min(result["ms"], self.time_ms())
        except Exception as exc:  # one bad kernel must not end the study
            result.update(verdict="crash", error=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
            if "CUDA" in str(exc) or type(exc).__name__ == "AcceleratorError":
                self.poisoned = True
        finally:
            lib.release()
        if "verdict" not in result:
            result.update(self.quality(logits))  # with torch's kernels again: FlagGems' must not judge itself
            result["delta_ms"] = result["ms"] - self.native_ms
            result["verdict"] = self.verdict(result)
        self.log.append({k: v for k, v in result.items() if k != "enabled"} | {"size": len(enabled)})
        return result

    def verdict(self, result: dict) -> str:
        if not result["finite"]:
            return "nan"
        if result["err"] > self.err_limit:
            return "error"
        if result["delta_ms"] > self.slow_limit:
            return "slow"
        return "ok"

    def bisect(self, group: list[str], label: str, found: dict) -> None:
        """Narrow a misbehaving group down to the functions that misbehave alone (into `found`); a group
        that does while neither half does is recorded as an interaction."""
        result = self.run(group, label)
        if result["verdict"] in ("ok", "not-run"):
            return
        if len(group) == 1:
            found[group[0]] = result
            return
        before = len(found)
        half = len(group) // 2
        self.bisect(group[:half], label + ".a", found)
        self.bisect(group[half:], label + ".b", found)
        if len(found) == before and not self.poisoned:
            found[f"interaction: {', '.join(group) if len(group) <= 12 else label}"] = result

    def study(self, name: str) -> dict:
        self.build(name)
        out = {"native": self.native()}
        out["candidates"] = {f: self.run([f], f) for f in self.candidates}
        rest_found: dict = {}
        self.bisect(self.rest, "rest", rest_found)
        out["rest"] = {"size": len(self.rest), "found": rest_found}
        flagged = sorted(f for f, r in {**out["candidates"], **rest_found}.items()
                         if r["verdict"] in BAD_VERDICTS and not f.startswith("interaction"))
        out["flagged"] = flagged
        recommended = set(self.functions) - set(self.rng) - set(flagged)
        out["check_all_but_rng"] = self.run(set(self.functions) - set(self.rng), "all but RNG")
        check = self.run(recommended, "all but recommended")
        out["check_recommended"] = check
        if check["verdict"] in ("nan", "error", "crash"):
            interactions: dict = {}
            self.bisect(sorted(recommended & set(self.candidates)), "recommended", interactions)
            out["recommended_interactions"] = interactions
        out["log"] = self.log
        del self.model, self.reference
        if self.device == "cuda":
            torch.cuda.empty_cache()
        return out


def cpu_standin_flag_gems() -> types.ModuleType:
    """A flag_gems with FlagGems' layout whose kernels are CPU Python functions with known faults:
    rsqrt gives NaN, cos is 50% off, mm is right but 10 ms slower per call; silu and add are right; acos and
    exp are right and not called by the model; rand / uniform_ / dropout stand for the RNG functions."""
    fake = types.ModuleType("flag_gems (CPU stand-in)")

    def mm(a, b):
        time.sleep(0.01)
        return (a.unsqueeze(-1) * b.unsqueeze(0)).sum(1)

    def rsqrt(x):
        return x * math.nan

    def cos(x):
        return torch.sin(x + math.pi / 2) * 1.5

    def silu(x):
        return x * torch.sigmoid(x)

    def add(x, y, *, alpha=1):
        return torch.sub(x, y, alpha=-alpha)

    def acos(x):
        return math.pi / 2 - torch.asin(x)

    def exp(x):
        return torch.pow(math.e, x)

    def never_called(name):
        def function(*args, **kwargs):
            raise AssertionError(f"{name}: an RNG function must stay excluded")
        function.__name__ = name
        return function

    fake._FULL_CONFIG = (
        ("mm", mm), ("rsqrt", rsqrt), ("cos", cos), ("silu", silu), ("add.Tensor", add), ("acos", acos),
        ("exp", exp), ("rand", never_called("rand")), ("uniform_", never_called("uniform_")),
        ("native_dropout", never_called("dropout")),
    )

    def enable(lib=None, unused=None, registrar=None, record=False, once=False, path=None):
        for key, function, *_ in fake._FULL_CONFIG:
            if function.__name__ not in (unused or ()):
                lib.impl(key, function, "CPU")

    fake.enable = enable
    fake.__version__ = "cpu-standin"
    return fake


def summary(findings: dict) -> str:
    lines = []
    for name, study in findings["models"].items():
        native = study.get("native", {})
        if "error" in study:
            lines.append(f"{name}: study failed: {study['error']}")
            continue
        lines.append(f"{name}: native {native['ms']:.2f} ms (noise {native['noise_ms']:.2f}), bf16 err "
                     f"{native['err']:.2e}, limits err {native['err_limit']:.2e} / +{native['slow_limit_ms']:.2f} ms")
        rows = list(study["candidates"].items()) + list(study["rest"]["found"].items())
        rows += [("[all but RNG]", study["check_all_but_rng"]), ("[all but recommended]", study["check_recommended"])]
        for function, r in rows:
            detail = r.get("error") or r.get("why") or (
                f"err {r['err']:.2e}  {r['ms']:.2f} ms ({r['delta_ms']:+.2f})" if "ms" in r else "")
            lines.append(f"  {function:<32} {r['verdict']:<8} {detail}")
    lines.append("recommended DEFAULT_UNUSED (RNG + measured):")
    lines.append(f"MEASURED_UNSAFE = {tuple(findings['measured_unsafe'])!r}")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    start = time.monotonic()
    import fl_patch

    fl_patch.revert()  # measure FlagGems against plain torch, even when run under the bootstrap
    if args.quick:
        torch.set_num_threads(1)  # tiny ops: threads only add contention (and noise) on a shared CPU
        device, flag_gems = "cpu", cpu_standin_flag_gems()
        print("gems_bisect --quick: CPU, tiny models, a stand-in flag_gems (checks the harness, not FlagGems)")
    else:
        if not torch.cuda.is_available():
            print("gems_bisect: no CUDA device; the bisection runs FlagGems kernels and needs one "
                  "(--quick checks the harness on CPU)")
            return 2
        from fl_patch.kernels import gems

        device, flag_gems = "cuda", gems.load()
    findings = {
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "flag_gems": getattr(flag_gems, "__version__", "?"),
                        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                        "quick": args.quick},
        "settings": {k: (v if not isinstance(v, Path) else str(v)) for k, v in vars(args).items()},
        "rng_functions": [],
        "models": {},
    }
    # The first model pays for compiling and autotuning the kernels: it gets a share and a half.
    shares = [1.5] + [1.0] * (len(args.models) - 1)
    for index, name in enumerate(args.models):
        remaining = args.budget_s - (time.monotonic() - start)
        deadline = time.monotonic() + remaining * shares[index] / sum(shares[index:])
        study = Study(args, flag_gems, device, deadline)
        findings["rng_functions"] = study.rng
        try:
            findings["models"][name] = study.study(name)
        except Exception as exc:  # keep the other model's findings
            findings["models"][name] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
        finish(findings, args, start)
    print(summary(findings))
    if args.out:
        print(f"wrote {args.out / 'gems_bisect.json'}")
    return 0


def finish(findings: dict, args, start: float) -> None:
    """Derive the recommended list from the studies so far and write the JSON."""
    from fl_patch.integrations import gems_global

    measured = sorted({f for study in findings["models"].values() for f in study.get("flagged", ())}
                      - set(gems_global.RNG_FUNCTIONS))
    findings["measured_unsafe"] = measured
    findings["recommended_default_unused"] = list(findings["rng_functions"]) + measured
    findings["elapsed_s"] = round(time.monotonic() - start, 1)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gems_bisect.json").write_text(json.dumps(findings, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
