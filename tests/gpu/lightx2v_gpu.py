"""LightX2V's ops, unpatched and then on FlagGems through fl_patch, compared on a GPU; results as JSON.

    python tests/gpu/lightx2v_gpu.py --lightx2v-src /path/to/LightX2V --out tests/gpu/results/lightx2v.json
    python tests/gpu/lightx2v_gpu.py --dry-run --out /tmp/lightx2v.json   # CPU, the stand-in, torch reference

Not a pytest module (no ``test_`` prefix): it needs a LightX2V checkout, which is never committed here.

Only the op modules are imported. ``lightx2v/__init__.py`` (every model and the pipeline, ~25 heavy packages),
``lightx2v/common/ops/__init__.py`` and ``.../attn/__init__.py`` (every attention variant) are replaced by bare
packages pointing at the same directories; ``lightx2v_platform.set_ai_device`` is imported first, as upstream
does, so the op modules see the device. Packages the op modules import at top level but do not use on these
paths (loguru, gguf, safetensors) are stubbed when missing and listed in the JSON.

Each op is built as the Wan model builds it, in bf16, run unpatched (the reference), then
``fl_patch.apply(kernels="gems")`` patches the classes in place and the same objects run again. Where an
original can't run here (flash-attn, flashinfer or SageAttention not installed) the reference is the torch op
with the same math, and the JSON says so. The ``flagos_*`` keys are built after apply and compared with the
op they stand for. Every kernel call's fallbacks are read from fl_patch's report (none expected for these bf16
inputs); one float32 call checks that a fallback is counted.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.machinery
import json
import logging
import os
import platform
import subprocess
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STANDIN = REPO / "tests" / "lightx2v_standin"
BARE_PACKAGES = ("lightx2v", "lightx2v.common.ops", "lightx2v.common.ops.attn")
STUBBABLE = ("loguru", "gguf", "safetensors")
OPS = "lightx2v.common.ops"
OP_MODULES = {
    "flash_attn": f"{OPS}.attn.flash_attn",
    "sage_attn": f"{OPS}.attn.sage_attn",
    "torch_sdpa": f"{OPS}.attn.torch_sdpa",
    "rms_norm": f"{OPS}.norm.rms_norm_weight",
    "layer_norm": f"{OPS}.norm.layer_norm_weight",
    "flashinfer_rope": f"{OPS}.rope.flashinfer_rope",
    "torch_rope": f"{OPS}.rope.torch_rope",
    "mm": f"{OPS}.mm.mm_weight",
}
TOLERANCE = {"atol": 2e-2, "rtol": 1.6e-2}  # bf16: about two roundings of values of magnitude ~1


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lightx2v-src", type=Path, help="a LightX2V checkout (the directory holding lightx2v/)")
    parser.add_argument("--out", required=True, help="where to write the JSON results")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU check of this script: the stand-in, PLATFORM=cpu, torch reference kernels")
    parser.add_argument("--kernels", choices=("gems", "reference"), help="default: gems (reference in --dry-run)")
    parser.add_argument("--platform", help="LightX2V PLATFORM (default: cuda; cpu in --dry-run)")
    parser.add_argument("--tokens", type=int, help="sequence length (default: 4096; 64 in --dry-run)")
    parser.add_argument("--time", action="store_true", help="also time each op (median of 10, after a warm-up)")
    args = parser.parse_args(argv)
    if args.lightx2v_src is None:
        if not args.dry_run:
            parser.error("--lightx2v-src is required (or --dry-run for the stand-in)")
        args.lightx2v_src = STANDIN
    args.lightx2v_src = args.lightx2v_src.resolve()
    args.kernels = args.kernels or ("reference" if args.dry_run else "gems")
    args.platform = args.platform or ("cpu" if args.dry_run else "cuda")
    args.tokens = args.tokens or (64 if args.dry_run else 4096)
    return args


# ---------------------------------------------------------------------------------------------------------
# Importing the op modules only


class _Anything:
    """What a stubbed package hands out for any attribute: itself, callable, usable as a dict key."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __call__(self, *args, **kwargs):
        return self


class _Logger:
    """loguru's ``logger`` on the standard logging module."""

    def __getattr__(self, name):
        return getattr(logging.getLogger("lightx2v"), name, lambda *args, **kwargs: None)


def _stub_attribute(name):
    if name.startswith("__"):  # __path__, __file__, ...: a stub is a plain module, not a package
        raise AttributeError(name)
    return _Anything()


def stub_missing(names) -> list[str]:
    """Put a stub in sys.modules for each of `names` that can't be imported; return those stubbed. A dotted
    name (``torchvision.transforms.functional``) is stubbed with each missing parent, each set as an attribute
    of its parent so that ``import a.b.c as m`` finds it."""
    stubbed = []
    for name in names:
        try:
            importlib.import_module(name)
            continue
        except ImportError:
            pass
        parent, _, child = name.rpartition(".")
        if parent and parent not in sys.modules:
            stubbed += stub_missing([parent])
        module = types.ModuleType(name)
        module.__getattr__ = _stub_attribute
        module.logger = _Logger()
        sys.modules[name] = module
        if parent:
            setattr(sys.modules[parent], child, module)
        stubbed.append(name)
    return stubbed


def bare_packages(src: Path) -> None:
    """Replace the heavy package ``__init__`` modules by empty packages over the same directories."""
    for name in BARE_PACKAGES:
        parent, _, child = name.rpartition(".")
        if parent and parent not in sys.modules:
            importlib.import_module(parent)
        directory = src.joinpath(*name.split("."))
        module = types.ModuleType(name)
        module.__path__ = [str(directory)]
        module.__package__ = name
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__spec__.submodule_search_locations = [str(directory)]
        sys.modules[name] = module
        if parent:
            setattr(sys.modules[parent], child, module)


def import_op_modules():
    modules, errors = {}, {}
    for short, name in OP_MODULES.items():
        try:
            modules[short] = importlib.import_module(name)
        except Exception as exc:  # report and go on with the other ops
            errors[name] = f"{type(exc).__name__}: {exc}"
    modules["registry"] = importlib.import_module("lightx2v.utils.registry_factory")
    return modules, errors


# ---------------------------------------------------------------------------------------------------------
# The ops, as the Wan model builds and calls them


def wan_style(cls, *names):
    return cls(*names, False, False, False, None, lora_prefix="diffusion_model.blocks", lora_path="")


def loaded(op, tensors):
    op.load(dict(tensors))
    op.to_cuda()
    return op


class Ops:
    """The inputs and ops of one run. A case is a dict: op (its name), call (a no-argument callable), and
    optionally reference (the name of the case whose unpatched output it is compared with) and note."""

    def __init__(self, torch, modules, device, dry_run: bool, tokens: int):
        self.torch, self.modules, self.reg, self.device = torch, modules, modules["registry"], device
        shape = (4, 64, 256, 512, 32) if dry_run else (12, 128, 1536, 8960, 512)
        heads, head_dim, self.hidden, self.ffn, context = shape
        torch.manual_seed(0)
        self.q, self.k, self.v = (self.randn(tokens, heads, head_dim) for _ in range(3))
        self.k_ctx, self.v_ctx = (self.randn(context, heads, head_dim) for _ in range(2))
        self.x = self.randn(tokens, self.hidden)
        inv_freq = 1.0 / torch.pow(10000, torch.arange(0, head_dim, 2, device=device).float() / head_dim)
        angles = torch.outer(torch.arange(tokens, device=device).float(), inv_freq)
        self.cache = torch.polar(torch.ones_like(angles), angles).unsqueeze(1)  # Wan's complex [S, 1, D/2]
        self.rms_weight = self.randn(self.hidden)
        self.ln_tensors = (self.randn(self.hidden), self.randn(self.hidden))
        self.mm_tensors = ((torch.randn(self.ffn, self.hidden, device=device) / self.hidden**0.5).to(torch.bfloat16),
                           self.randn(self.ffn))

    def randn(self, *shape):
        return self.torch.randn(*shape, device=self.device).to(self.torch.bfloat16)

    def attention(self, key, context=False):
        torch = self.torch
        op = self.reg.ATTN_WEIGHT_REGISTER[key]()
        q, k, v = (self.q, self.k_ctx, self.v_ctx) if context else (self.q, self.k, self.v)
        cu_q = torch.tensor([0, q.shape[0]], dtype=torch.int32)
        cu_k = torch.tensor([0, k.shape[0]], dtype=torch.int32)
        return lambda: op.apply(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, max_seqlen_q=q.shape[0],
                                max_seqlen_kv=k.shape[0], model_cls="wan2.1")

    def rms_norm(self, key):
        name = "blocks.0.self_attn.norm_q.weight"
        op = loaded(wan_style(self.reg.RMS_WEIGHT_REGISTER[key], name), {name: self.rms_weight})
        return lambda: op.apply(self.x)

    def layer_norm(self, key, affine=False):
        if affine:
            names = ("blocks.0.norm3.weight", "blocks.0.norm3.bias")
            tensors = dict(zip(names, self.ln_tensors, strict=True))
            op = loaded(wan_style(self.reg.LN_WEIGHT_REGISTER[key], *names), tensors)
        else:
            op = self.reg.LN_WEIGHT_REGISTER[key]()
            op.load({})
        return lambda: op.apply(self.x)

    def rope(self, key):
        op = self.reg.ROPE_REGISTER[key](layout="interleaved", compute_dtype=self.torch.float32)
        prepared = op.prepare_freqs(self.cache, rotary_dim=self.q.shape[-1])
        positions = op.prepare_positions(prepared)
        extra = {} if positions is None else {"positions": positions}
        return lambda: op.apply(self.q.clone(), self.k.clone(), prepared, **extra)  # flashinfer rotates in place

    def linear(self, key):
        names = ("blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias")
        op = loaded(wan_style(self.reg.MM_WEIGHT_REGISTER[key], *names), dict(zip(names, self.mm_tensors, strict=True)))
        return lambda: op.apply(self.x)

    def existing_cases(self) -> list[dict]:
        modules, cases = self.modules, []
        if "torch_sdpa" in modules:
            cases += [{"op": "attention torch_sdpa", "call": self.attention("torch_sdpa")},
                      {"op": "attention torch_sdpa cross", "call": self.attention("torch_sdpa", context=True)}]
        attention_keys = (("flash_attn", "flash_attn2", "flash_attn_func_v2"), ("sage_attn", "sage_attn2", ""))
        for short, key, kernel in attention_keys:
            if short not in modules:
                continue
            for suffix, context in (("", False), (" cross", True)):
                case = {"op": f"attention {key}{suffix}", "call": self.attention(key, context)}
                if not (kernel and getattr(modules[short], kernel, None) is not None):
                    case.update(reference=f"attention torch_sdpa{suffix}",
                                note="own kernel not installed" if kernel else "SageAttention quantises: "
                                "compared with exact attention")
                cases.append(case)
        if "rms_norm" in modules:
            for key in ("sgl-kernel", "torch"):
                case = {"op": f"rms_norm {key}", "call": self.rms_norm(key)}
                if key == "sgl-kernel" and getattr(modules["rms_norm"], "sgl_kernel", True) is None:
                    case["note"] = "sgl_kernel not installed: the original is upstream's bf16 fallback math"
                cases.append(case)
        if "layer_norm" in modules:
            cases += [{"op": "layer_norm torch", "call": self.layer_norm("torch")},
                      {"op": "layer_norm torch affine", "call": self.layer_norm("torch", affine=True)}]
        if "torch_rope" in modules:
            cases.append({"op": "rope torch_complex_rope", "call": self.rope("torch_complex_rope")})
        if "flashinfer_rope" in modules:
            case = {"op": "rope flashinfer_rope", "call": self.rope("flashinfer_rope")}
            if not self.reg.ROPE_REGISTER["flashinfer_rope"].is_available():
                case.update(reference="rope torch_complex_rope", note="flashinfer not installed")
            cases.append(case)
        if "mm" in modules:
            cases.append({"op": "linear Default", "call": self.linear("Default")})
        return cases

    def flagos_cases(self) -> list[dict]:
        """The seed plugin's keys (present once patched), each compared with the op it stands for."""
        wanted = [("ATTN_WEIGHT_REGISTER", "flagos_flash_attn", "attention torch_sdpa", self.attention),
                  ("RMS_WEIGHT_REGISTER", "flagos_rms_norm", "rms_norm torch", self.rms_norm),
                  ("LN_WEIGHT_REGISTER", "flagos_layer_norm", "layer_norm torch", self.layer_norm),
                  ("ROPE_REGISTER", "flagos_rope", "rope torch_complex_rope", self.rope),
                  ("MM_WEIGHT_REGISTER", "flagos", "linear Default", self.linear)]
        return [{"op": f"{reference.split()[0]} {key}", "reference": reference, "call": build(key)}
                for registry, key, reference, build in wanted if key in getattr(self.reg, registry)]

    def float32_call(self):
        """An RMSNorm call in float32: FlagGems takes fp16/bf16 only, so this one must be a counted fallback."""
        call = self.rms_norm("torch")
        x = self.x
        self.x = x.float()
        try:
            return call()
        finally:
            self.x = x


# ---------------------------------------------------------------------------------------------------------
# Running, comparing, reporting


def synchronize(torch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


def timed(call, torch, repeat=10) -> float:
    """Median seconds of `repeat` calls (after the calls already made, which warmed up)."""
    samples = []
    for _ in range(repeat):
        synchronize(torch)
        start = time.perf_counter()
        call()
        synchronize(torch)
        samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


def fallback_counts(fl_patch) -> dict:
    return {(r["where"], reason): n for r in fl_patch.report() for reason, n in r["fallbacks"].items()}


def new_fallbacks(before: dict, after: dict) -> dict:
    return {f"{where}: {reason}": n - before.get((where, reason), 0)
            for (where, reason), n in after.items() if n != before.get((where, reason), 0)}


def compare(case, output, reference, fallbacks, torch, timing) -> dict:
    output, reference = first_tensor(output), first_tensor(reference)
    diff = (output.float() - reference.float()).abs().max().item() if output.shape == reference.shape else None
    close = diff is not None and output.dtype == reference.dtype and torch.allclose(
        output.float(), reference.float(), **TOLERANCE)
    result = {
        "op": case["op"],
        "reference": case.get("reference", "its own original") + (f" ({case['note']})" if "note" in case else ""),
        "shape": list(output.shape),
        "dtype": str(output.dtype).removeprefix("torch."),
        "max_abs_diff": diff if diff is not None else float("nan"),
        "max_abs_reference": reference.float().abs().max().item(),
        "tolerance": TOLERANCE,
        "fallbacks": fallbacks,
        "pass": bool(close) and not fallbacks,
    }
    if timing is not None and all(t is not None for t in timing):
        result["ms"] = {"original": round(timing[0] * 1e3, 4), "patched": round(timing[1] * 1e3, 4)}
    return result


def device_name(torch, device) -> str:
    if str(device).startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{device} ({platform.processor() or platform.machine()})"


def versions(src: Path) -> dict:
    from fl_patch.versions import installed_version  # fl_patch is imported late on purpose (see main)

    found = {"python": platform.python_version()}
    for name in ("torch", "triton", "flag_gems", "fl_patch"):
        found[name] = installed_version(name) or getattr(sys.modules.get(name), "__version__", None)
    found["lightx2v_commit"] = None  # only for a checkout (the stand-in lives inside this repo's checkout)
    if (src / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True,
                                    timeout=10)
            found["lightx2v_commit"] = commit.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            pass
    found["lightx2v_src"] = str(src)
    return found


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["FL_PATCH_AUTO"] = "0"  # this script decides when to patch (also silences the entry point)
    os.environ["PLATFORM"] = args.platform
    os.environ.setdefault("DTYPE", "BF16")
    sys.path[:0] = [str(REPO), str(args.lightx2v_src)]

    import torch

    stubbed = stub_missing(STUBBABLE)
    bare_packages(args.lightx2v_src)
    importlib.import_module("lightx2v_platform.set_ai_device")
    modules, import_errors = import_op_modules()

    import fl_patch
    from fl_patch.integrations import lightx2v as integration

    device = importlib.import_module("lightx2v_platform.base.global_var").AI_DEVICE
    ops = Ops(torch, modules, device, args.dry_run, args.tokens)
    cases = ops.existing_cases()
    references = {}
    for case in cases:
        if "reference" not in case:  # an op whose own kernel is missing can't run unpatched: it has a stand-in
            references[case["op"]] = (case["call"](), timed(case["call"], torch) if args.time else None)

    # This proves the FlagGems paths: no device profile (a profile may keep calls native, and here a native call of
    # a missing flash_attn/sage op can't run), as tests/gpu does.
    os.environ["FL_PATCH_PROFILE"] = "off"
    fl_patch.apply(kernels=args.kernels, include=[t.name for t in integration.TARGETS])
    results = []
    for case in cases + ops.flagos_cases():
        before = fallback_counts(fl_patch)
        output = case["call"]()
        found = new_fallbacks(before, fallback_counts(fl_patch))
        reference, reference_seconds = references[case.get("reference", case["op"])]
        seconds = timed(case["call"], torch) if args.time else None
        results.append(compare(case, output, reference, found, torch, (reference_seconds, seconds)))
    before = fallback_counts(fl_patch)
    ops.float32_call()
    float32_fallbacks = new_fallbacks(before, fallback_counts(fl_patch))

    records = [r for r in fl_patch.report() if r["target"].startswith("lightx2v")]
    kernel_rows = [r for r in records if r["family"] != "platform" and r["state"] == "patched"]
    expected_provider = "torch reference" if args.kernels == "reference" else "flag_gems"
    providers = sorted({r["provider"] for r in kernel_rows})
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(torch, device),
        "versions": versions(args.lightx2v_src),
        "dry_run": args.dry_run,
        "kernels": args.kernels,
        "provider": providers[0] if len(providers) == 1 else providers,
        "tokens": args.tokens,
        "stubbed_packages": stubbed,
        "import_errors": import_errors,
        "ops": results,
        "float32_fallbacks": float32_fallbacks,
        "records": records,
    }
    report["pass"] = (not import_errors and bool(results) and all(r["pass"] for r in results)
                      and providers == [expected_provider]
                      and (args.kernels == "reference" or bool(float32_fallbacks)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1, default=str) + "\n")
    for r in results:
        print(f"{'ok  ' if r['pass'] else 'FAIL'} {r['op']:<30} max|diff| {r['max_abs_diff']:<10.3g}"
              f" fallbacks {r['fallbacks'] or '-'}  vs {r['reference']}")
    for name, error in import_errors.items():
        print(f"FAIL import {name}: {error}")
    print(f"float32 call: {float32_fallbacks or 'no fallback'}")
    if providers != [expected_provider]:
        reasons = sorted({f"{r['target']}: {r['state']} {r['reason']}" for r in records if r["state"] != "patched"})
        print(f"FAIL kernel rows not all on {expected_provider}: {providers}; " + "; ".join(reasons))
    print(f"provider {report['provider']}; pass: {report['pass']}; written to {args.out}")
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
