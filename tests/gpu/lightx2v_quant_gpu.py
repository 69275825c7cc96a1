"""LightX2V's quantised linear on FlagGems, on a GPU: flagos-fp8 / flagos-int8 against LightX2V's own fp8-triton /
int8-triton and the bf16 Default, per GEMM of a Wan2.1 block, then a Wan2.1 DiT step end to end; JSON results.

    python tests/gpu/lightx2v_quant_gpu.py --lightx2v-src .lightx2v --out-dir OUT    # OUT/lightx2v-quant.json
    python tests/gpu/lightx2v_quant_gpu.py --dry-run --out-dir /tmp/q                # CPU: stand-in, torch reference

Not a pytest module: it needs a LightX2V export (``tests/gpu/export_lightx2v.sh``), never committed here. The
LightX2V modules are imported as ``lightx2v_gpu.py`` does (bare packages instead of the heavy ``__init__``
modules; packages they import but these paths don't use stubbed when missing, and listed). fl_patch is applied
before any LightX2V import with ``PLATFORM=flagos`` and only its ``flagos*`` rows (and the platform row): the
native keys stay LightX2V's own code, the ``flagos*`` keys are fl_patch's (FlagGems, or the torch reference
with ``--dry-run``). The JSON is rewritten after every case, so a run cut short still leaves what it measured;
a time budget (``--budget``) skips what would not fit and says so.

1. ``upstream_facts``: LightX2V's int8 / fp8 activation quantisers and GEMMs (its Triton kernels) against the
   stand-in's torch versions of them, and how the int8 one rounds.
2. ``gemm``: per distinct GEMM of a Wan2.1 1.3B and 14B block at ``--tokens`` video tokens (480p, 81 frames:
   32760), each scheme built from the registry and loaded from the same weights (quantised as LightX2V's
   converter does): the error against ``Default`` (and an fp32 product) on random and on structured inputs,
   milliseconds per call, the activation quantiser alone, the torch reference of the flagos keys, and the
   fallbacks counted.
3. ``e2e``: LightX2V's ``WanModel`` (1.3B config, ``--blocks`` blocks) from random checkpoints written in the
   layout it loads, one denoising step with its ``WanScheduler``, for the native keys, ``fp8-triton``,
   ``int8-triton``, the ``flagos*`` keys (bf16), ``flagos-fp8`` and ``flagos-int8``: the noise prediction's and
   the stepped latents' difference from the native run, milliseconds per DiT forward, fallbacks.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import importlib.util
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests"), str(REPO / "tests" / "gpu")]

import lightx2v_gpu as base  # noqa: E402  (the op-module import machinery and report helpers)
import lightx2v_wan as wan  # noqa: E402

RESULT_NAME = "lightx2v-quant.json"
STUBBABLE = ("loguru", "gguf", "einops", "imageio", "imageio_ffmpeg", "torchvision.transforms.functional", "PIL.Image",
             "tqdm")
OPS = "lightx2v.common.ops"
MODULES = [f"{OPS}.{name}" for name in ("attn.torch_sdpa", "norm.rms_norm_weight", "norm.layer_norm_weight",
                                        "rope.torch_rope", "mm.mm_weight", "conv.conv3d", "tensor.tensor")]
MODULES += ["lightx2v.models.networks.wan.model", "lightx2v.models.schedulers.wan.scheduler"]
SCHEMES = ("Default", "fp8-triton", "flagos-fp8", "int8-triton", "flagos-int8")
QUANT = {"fp8-triton": "fp8", "flagos-fp8": "fp8", "int8-triton": "int8", "flagos-int8": "int8"}
PEER = {"flagos-fp8": "fp8-triton", "flagos-int8": "int8-triton"}
ACCURACY_ROWS = 4096  # per-token quantisation is row by row: the error on 4096 rows is the error on all
E2E_VARIANTS = [  # name, keys, checkpoint
    ("native", wan.NATIVE_KEYS, None),
    ("fp8-triton", dict(wan.NATIVE_KEYS, dit_quant_scheme="fp8-triton"), "fp8"),
    ("int8-triton", dict(wan.NATIVE_KEYS, dit_quant_scheme="int8-triton"), "int8"),
    ("flagos", wan.FLAGOS_KEYS, None),
    ("flagos-fp8", dict(wan.FLAGOS_KEYS, dit_quant_scheme="flagos-fp8"), "fp8"),
    ("flagos-int8", dict(wan.FLAGOS_KEYS, dit_quant_scheme="flagos-int8"), "int8"),
]


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lightx2v-src", type=Path, help="a LightX2V export or checkout (holding lightx2v/)")
    parser.add_argument("--out-dir", required=True, type=Path, help=f"where {RESULT_NAME} goes")
    parser.add_argument("--dry-run", action="store_true", help="CPU check: the stand-in, torch reference kernels")
    parser.add_argument("--kernels", choices=("gems", "reference"), help="default: gems (reference in --dry-run)")
    parser.add_argument("--tokens", type=int, help="video tokens per GEMM (default 32760; 64 in --dry-run)")
    parser.add_argument("--models", help="Wan2.1 sizes for the GEMMs (default 1.3B,14B; tiny in --dry-run)")
    parser.add_argument("--blocks", type=int, help="DiT blocks end to end (default 4; 2 in --dry-run)")
    parser.add_argument("--latent", help="latent F,H,W end to end (default 21,60,104: 480p 81 frames)")
    parser.add_argument("--reps", type=int, help="calls per timing loop (default 10; 2 in --dry-run)")
    parser.add_argument("--budget", type=float, default=180.0, help="seconds; later cases are skipped past it")
    parser.add_argument("--sections", default="facts,gemm,e2e", help="comma list of facts, gemm, e2e")
    args = parser.parse_args(argv)
    if args.lightx2v_src is None:
        if not args.dry_run:
            parser.error("--lightx2v-src is required (or --dry-run for the stand-in)")
        args.lightx2v_src = base.STANDIN
    args.lightx2v_src = args.lightx2v_src.resolve()
    dry = args.dry_run
    args.kernels = args.kernels or ("reference" if dry else "gems")
    args.tokens = args.tokens or (64 if dry else 32760)
    args.models = (args.models or ("tiny" if dry else "1.3B,14B")).split(",")
    args.e2e_model = "tiny" if dry else "1.3B"
    args.blocks = args.blocks or (2 if dry else 4)
    args.latent = [int(v) for v in (args.latent or ("3,8,6" if dry else "21,60,104")).split(",")]
    args.reps = args.reps or (2 if dry else 10)
    args.sections = set(args.sections.split(","))
    return args


class Run:
    """The results, the clock and the torch module; ``write()`` rewrites the JSON."""

    def __init__(self, args, torch, fl_patch):
        self.args, self.torch, self.fl_patch = args, torch, fl_patch
        self.start = time.perf_counter()
        self.path = args.out_dir / RESULT_NAME
        self.data = {"complete": False}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def over_budget(self) -> bool:
        return self.elapsed() > self.args.budget

    def log(self, message):
        print(f"[{self.elapsed():6.1f}s] {message}", flush=True)

    def write(self):
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        self.args.out_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        temporary.replace(self.path)
        self.path.with_suffix(".md").write_text(markdown(self.data))

    def sync(self):
        if self.torch.cuda.is_available():
            self.torch.cuda.synchronize()

    def ms(self, call, reps=None, loops=3) -> float:
        """Milliseconds per call: the median of `loops` loops of `reps` calls, after two warm-up calls."""
        reps = reps or self.args.reps
        call()
        call()
        samples = []
        for _ in range(loops):
            self.sync()
            start = time.perf_counter()
            for _ in range(reps):
                call()
            self.sync()
            samples.append((time.perf_counter() - start) / reps)
        return round(statistics.median(samples) * 1e3, 4)

    def fallbacks_during(self, call):
        before = base.fallback_counts(self.fl_patch)
        result = call()
        return result, base.new_fallbacks(before, base.fallback_counts(self.fl_patch))


def relative(torch, a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def max_abs(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# 1. Upstream facts: LightX2V's Triton quantisers and GEMMs against the stand-in's torch versions


def upstream_facts(run, modules) -> dict:
    torch = run.torch
    kernels = importlib.import_module(f"{OPS}.mm.triton_kernels")
    spec = importlib.util.spec_from_file_location(
        "standin_triton_kernels", base.STANDIN / "lightx2v" / "common" / "ops" / "mm" / "triton_kernels.py")
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    device = modules["device"]
    gen = torch.Generator(device=device).manual_seed(11)
    x = (torch.randn(512, 1536, generator=gen, device=device) * 2).to(torch.bfloat16)
    facts = {}
    q, s = kernels.int8_quantize_triton(x)
    q_twin, s_twin = twin.int8_quantize_triton(x)
    exact = x.float() * (127.0 / x.float().abs().amax(dim=-1, keepdim=True))
    rounded = exact.round().to(torch.int8)
    facts["int8_quantize_triton"] = {
        "equals_stand_in": bool(torch.equal(q, q_twin)), "scale_max_abs_diff": max_abs(s, s_twin),
        "scale_dtype": str(s.dtype), "equals_truncation": bool(torch.equal(q, exact.trunc().to(torch.int8))),
        "equals_round_half_even": bool(torch.equal(q, rounded)),
        "fraction_differing_from_rounding": (q != rounded).float().mean().item()}
    q8, s8 = kernels.fp8_quantize_triton(x)
    q8_twin, s8_twin = twin.fp8_quantize_triton(x)
    facts["fp8_quantize_triton"] = {
        "equals_stand_in": bool(torch.equal(q8.float(), q8_twin.float()) and torch.equal(s8, s8_twin)),
        "scale_dtype": str(s8.dtype),
        "fraction_differing_from_stand_in": (q8.float() != q8_twin.float()).float().mean().item()}
    w = (torch.randn(1024, 1536, generator=gen, device=device) / 40).to(torch.bfloat16)
    bias = torch.randn(1024, device=device, generator=gen) * 0.02
    for form, quantize, gemm in (("fp8", kernels.fp8_quantize_triton, "fp8_gemm_bias_triton"),
                                 ("int8", kernels.int8_quantize_triton, "int8_gemm_bias_triton")):
        qw, sw = wan.per_channel(w, form)
        qx, sx = quantize(x)
        out = getattr(kernels, gemm)(qx, qw, bias, sx, sw.to(torch.bfloat16), output_dtype=torch.bfloat16)
        ref = getattr(twin, gemm)(qx, qw, bias, sx, sw.to(torch.bfloat16), output_dtype=torch.bfloat16)
        facts[gemm] = {"relative_diff_to_stand_in": relative(torch, out, ref), "max_abs_diff": max_abs(out, ref)}
    return facts


# ---------------------------------------------------------------------------------------------------------
# 2. Per GEMM


def structured(torch, rows, k, n, device, seed):
    """Weights and activations shaped like a trained DiT's: per-row weight magnitudes spread over two decades,
    4 input channels with large weights and activations, tokens of very different norms."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(n, k, generator=gen, device=device) / k**0.5
    weight *= torch.exp(torch.randn(n, 1, generator=gen, device=device))
    outliers = torch.randperm(k, generator=gen, device=device)[:4]
    weight[:, outliers] *= 8
    x = torch.randn(rows, k, generator=gen, device=device) * torch.exp(torch.randn(rows, 1, generator=gen,
                                                                                   device=device))
    x[:, outliers] *= 20
    return weight.to(torch.bfloat16), x.to(torch.bfloat16)


def build_op(reg, scheme, weight, bias):
    """`scheme`'s op, built as Wan builds it and loaded from `weight` (quantised per channel as LightX2V's
    converter does; the scale in bf16, as Wan's loader casts it)."""
    torch = sys.modules["torch"]
    prefix = "blocks.0.ffn.0"
    tensors = {f"{prefix}.weight": weight, f"{prefix}.bias": bias}
    if scheme in QUANT:
        q, scale = wan.per_channel(weight, QUANT[scheme])
        tensors = {f"{prefix}.weight": q, f"{prefix}.weight_scale": scale.to(torch.bfloat16), f"{prefix}.bias": bias}
    op = reg.MM_WEIGHT_REGISTER[scheme](f"{prefix}.weight", f"{prefix}.bias", False, False, False, None,
                                        lora_prefix="blocks", lora_path="")
    op.load(tensors)
    op.to_cuda()
    return op


def act_quantisers(modules, kernels_name):
    from fl_patch.kernels import gems, quant_linear

    kernels = importlib.import_module(kernels_name)
    fp8 = quant_linear.quantize_fp8
    if modules["kernels"] == "gems":
        flag_gems = gems.load()

        def fp8(x):
            return flag_gems.per_token_group_quant_fp8(x, x.shape[-1], dtype=quant_linear.FP8)

    return {"fp8-triton": kernels.fp8_quantize_triton, "int8-triton": kernels.int8_quantize_triton,
            "flagos-fp8": fp8, "flagos-int8": quant_linear.quantize_int8}


def gemm_case(run, modules, model, label, m, k, n) -> dict:
    """One GEMM shape: accuracy on `ACCURACY_ROWS` rows of random and structured inputs, then speed at M rows. A
    scheme that fails is recorded in ``errors`` and the others go on."""
    torch, reg, device = run.torch, modules["registry"], modules["device"]
    from fl_patch.kernels import quant_linear

    case = {"model": model, "gemm": label, "M": m, "K": k, "N": n, "accuracy": {}, "ms": {}, "act_quant_ms": {},
            "reference_ms": {}, "fallbacks": {}, "errors": {}}

    def attempt(what, call):
        try:
            result, found = run.fallbacks_during(call)
        except Exception as exc:  # the scheme's kernel can't run here: say so, measure the others
            case["errors"][what] = f"{type(exc).__name__}: {exc}"
            return None
        case["fallbacks"].update({f"{what}: {where}": count for where, count in found.items()})
        return result

    gen = torch.Generator(device=device).manual_seed(m + 7 * k + 13 * n)
    bias = (torch.randn(n, generator=gen, device=device) * 0.02).to(torch.bfloat16)
    rows = min(m, ACCURACY_ROWS)
    for kind in ("random", "structured"):
        if kind == "random":
            weight = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(torch.bfloat16)
            x = torch.randn(rows, k, generator=gen, device=device).to(torch.bfloat16)
        else:
            weight, x = structured(torch, rows, k, n, device, seed=n + k)
        exact = x.float() @ weight.float().t() + bias.float()
        outputs = {}
        for scheme in SCHEMES:
            out = attempt(f"{scheme} {kind}",
                          lambda scheme=scheme, w=weight, x=x: build_op(reg, scheme, w, bias).apply(x))
            if out is not None:
                outputs[scheme] = out
        default = outputs.get("Default")
        case["accuracy"][kind] = {scheme: {"rel_err_vs_default": relative(torch, out, default) if default is not None
                                           else None, "rel_err_vs_fp32": relative(torch, out, exact),
                                           "max_abs_err_vs_default": max_abs(out, default) if default is not None
                                           else None}
                                  for scheme, out in outputs.items()}
        del outputs, exact
    weight = (torch.randn(n, k, generator=gen, device=device) / k**0.5).to(torch.bfloat16)
    x = torch.randn(m, k, generator=gen, device=device).to(torch.bfloat16)
    ops = {}
    for scheme in SCHEMES:
        op = attempt(f"{scheme} build", lambda scheme=scheme: build_op(reg, scheme, weight, bias))
        if op is not None:
            ms = attempt(f"{scheme} timed", lambda op=op: run.ms(lambda: op.apply(x)))
            if ms is not None:
                case["ms"][scheme], ops[scheme] = ms, op
    for scheme, quantise in act_quantisers(modules, f"{OPS}.mm.triton_kernels").items():
        ms = attempt(f"{scheme} act quant", lambda quantise=quantise: run.ms(lambda: quantise(x)))
        if ms is not None:
            case["act_quant_ms"][scheme] = ms
    if m <= 4096 or label == "ffn.0":  # the dequantised fp32 product is slow and memory-hungry at full size
        for scheme in ("flagos-fp8", "flagos-int8"):
            if scheme in ops:
                op, reference = ops[scheme], getattr(quant_linear, f"reference_{QUANT[scheme]}")
                case["reference_ms"][scheme] = run.ms(
                    lambda op=op, reference=reference: reference(x, op.weight, op.weight_scale, op.bias,
                                                                 op.infer_dtype),
                    reps=max(1, run.args.reps // 5), loops=1)
    ms = case["ms"]
    case["speedup_vs_lightx2v"] = {key: round(ms[peer] / ms[key], 3) for key, peer in PEER.items()
                                   if key in ms and peer in ms}
    case["speedup_vs_default"] = {key: round(ms["Default"] / ms[key], 3) for key in QUANT
                                  if key in ms and "Default" in ms}
    case["within_lightx2v_error"] = all(
        key in acc and PEER[key] in acc and acc[key]["rel_err_vs_default"] is not None
        and acc[key]["rel_err_vs_default"] <= acc[PEER[key]]["rel_err_vs_default"] * 1.05
        for acc in case["accuracy"].values() for key in PEER)
    return case


# ---------------------------------------------------------------------------------------------------------
# 3. End to end: WanModel, one denoising step


def write_checkpoints(run, modules, directory: Path) -> dict:
    from safetensors.torch import save_file

    torch, device = run.torch, modules["device"]
    tensors = wan.checkpoint(run.args.e2e_model, num_layers=run.args.blocks, seed=3, device=device)
    paths = {}
    for quantize in (None, "fp8", "int8"):
        ckpt = wan.quantized(tensors, quantize) if quantize else tensors
        path = directory / (quantize or "bf16")
        path.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous().cpu() for name, t in ckpt.items()}, str(path / "model.safetensors"))
        paths[quantize] = path
    del tensors
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return paths


def e2e_variant(run, modules, name, keys, checkpoint_path) -> dict:
    torch, device = run.torch, modules["device"]
    wan_model = importlib.import_module("lightx2v.models.networks.wan.model")
    scheduler_module = importlib.import_module("lightx2v.models.schedulers.wan.scheduler")
    config = wan.lightx2v_config(run.args.e2e_model, keys, num_layers=run.args.blocks)
    start = time.perf_counter()
    model = wan_model.WanModel(str(checkpoint_path), config, torch.device(device))
    if device == "cpu":
        model.to_cuda()  # the stand-in's CPU weights stay pinned until then
    build_s = time.perf_counter() - start
    scheduler = scheduler_module.WanScheduler(config)
    model.set_scheduler(scheduler)
    latent_shape, text = wan.inputs(run.args.e2e_model, *run.args.latent, seed=3, device=device)
    scheduler.prepare(seed=42, latent_shape=latent_shape)
    scheduler.step_pre(0)
    inputs = {"text_encoder_output": text}
    forward = model.infer
    _, fallbacks = run.fallbacks_during(lambda: forward(inputs))
    noise = scheduler.noise_pred.clone()
    forward_ms = run.ms(lambda: forward(inputs), reps=1, loops=3)
    scheduler.noise_pred = noise
    scheduler.step_post()
    phases = model.transformer_weights.blocks[0].compute_phases
    ops = {"self_attn_1": phases[0].self_attn_1, "rms_norm": phases[0].self_attn_norm_q, "rope": phases[0].rope,
           "layer_norm": phases[1].norm3, "ffn_0": phases[2].ffn_0}
    frames, height, width = run.args.latent
    result = {"variant": name, "keys": keys, "classes": {k: type(op).__name__ for k, op in ops.items()},
              "build_s": round(build_s, 2), "forward_ms": forward_ms, "fallbacks": fallbacks,
              "tokens": frames * height * width // 4}
    return result, noise, scheduler.latents.clone()


# ---------------------------------------------------------------------------------------------------------


def import_lightx2v(args):
    """Apply fl_patch's flagos* rows, then import LightX2V's device setup and the modules this run needs."""
    import torch

    import fl_patch
    from fl_patch.integrations import lightx2v as integration

    stubbed = base.stub_missing(STUBBABLE)
    base.bare_packages(args.lightx2v_src)
    rows = [t.name for t in integration.TARGETS if t.family == "platform" or t.name.rsplit(".", 1)[-1].startswith(
        "flagos")]
    kernels = args.kernels
    fl_patch.apply(kernels=kernels, include=rows)
    importlib.import_module("lightx2v_platform.set_ai_device")
    errors = {}
    for name in MODULES:
        try:
            importlib.import_module(name)
        except Exception as exc:  # report and go on with what imported
            errors[name] = f"{type(exc).__name__}: {exc}"
    global_var = importlib.import_module("lightx2v_platform.base.global_var")
    modules = {"registry": importlib.import_module("lightx2v.utils.registry_factory"), "device": global_var.AI_DEVICE,
               "platform": global_var.PLATFORM, "kernels": kernels}
    return torch, fl_patch, modules, stubbed, errors, rows


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["FL_PATCH_AUTO"] = "0"
    os.environ["PLATFORM"] = "flagos"
    os.environ.setdefault("DTYPE", "BF16")
    sys.path.insert(0, str(args.lightx2v_src))
    torch, fl_patch, modules, stubbed, import_errors, rows = import_lightx2v(args)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny CPU shapes: more threads only add contention (3x slower on 2 cores)
    run = Run(args, torch, fl_patch)
    commit_file = args.lightx2v_src / "COMMIT"
    versions = base.versions(args.lightx2v_src)
    if commit_file.exists():
        versions["lightx2v_commit"] = commit_file.read_text().strip()
    run.data.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": base.device_name(torch, modules["device"]), "versions": versions, "dry_run": args.dry_run,
        "kernels": modules["kernels"], "platform": modules["platform"], "ai_device": modules["device"],
        "fl_patch_rows": rows, "stubbed_packages": stubbed, "import_errors": import_errors,
        "args": {k: (sorted(v) if isinstance(v, set) else v) for k, v in vars(args).items()},
        "upstream_facts": None, "gemm": [], "e2e": {"variants": []}, "skipped": [], "errors": []})
    run.write()
    run.log(f"device {run.data['device']}, PLATFORM={modules['platform']} -> {modules['device']}, kernels "
            f"{modules['kernels']}, stubbed {stubbed or '-'}, import errors {list(import_errors) or '-'}")
    if "facts" in args.sections:
        try:
            run.data["upstream_facts"] = upstream_facts(run, modules)
            run.log(f"upstream facts: {json.dumps(run.data['upstream_facts'])}")
        except Exception as exc:
            run.data["errors"].append({"section": "facts", "error": f"{type(exc).__name__}: {exc}",
                                       "traceback": traceback.format_exc(limit=4)})
        run.write()
    # The first model's GEMMs, the DiT end to end, then the other models' GEMMs: what matters most comes first.
    if "gemm" in args.sections:
        gemms(run, modules, args.models[:1])
    if "e2e" in args.sections:
        e2e(run, modules)
    if "gemm" in args.sections:
        gemms(run, modules, args.models[1:])
    summarise(run)
    run.data["complete"] = True
    run.write()
    run.log(f"pass: {run.data['summary']['pass']}; written to {run.path}")
    return 0 if run.data["summary"]["pass"] else 1


def gemms(run, modules, models):
    for model in models:
        for label, (m, k, n) in wan.gemm_shapes(model, run.args.tokens).items():
            if run.over_budget():
                run.data["skipped"].append(f"gemm {model} {label}: over the {run.args.budget:.0f} s budget")
                continue
            try:
                case = gemm_case(run, modules, model, label, m, k, n)
                run.data["gemm"].append(case)
                run.log(f"gemm {model} {label} {m}x{k}x{n}: ms {case['ms']}; flagos vs LightX2V "
                        f"{case['speedup_vs_lightx2v']}; fallbacks {case['fallbacks'] or '-'}; errors "
                        f"{case['errors'] or '-'}")
            except Exception as exc:
                run.data["errors"].append({"section": f"gemm {model} {label}", "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=6)})
                run.log(f"gemm {model} {label}: {type(exc).__name__}: {exc}")
            run.write()


def e2e(run, modules):
    torch = run.torch
    directory = Path(tempfile.mkdtemp(prefix="fl_patch_wan_"))
    section = run.data["e2e"]
    section.update(model=run.args.e2e_model, blocks=run.args.blocks, latent=run.args.latent)
    try:
        paths = write_checkpoints(run, modules, directory)
        run.log(f"e2e: checkpoints written ({run.args.e2e_model}, {run.args.blocks} blocks)")
        native = None
        for name, keys, quantize in E2E_VARIANTS:
            if run.over_budget():
                run.data["skipped"].append(f"e2e {name}: over the {run.args.budget:.0f} s budget")
                continue
            try:
                result, noise, latents = e2e_variant(run, modules, name, keys, paths[quantize])
            except Exception as exc:
                run.data["errors"].append({"section": f"e2e {name}", "error": f"{type(exc).__name__}: {exc}",
                                           "traceback": traceback.format_exc(limit=6)})
                run.log(f"e2e {name}: {type(exc).__name__}: {exc}")
                run.write()
                continue
            gc.collect()  # the scheduler and the infer classes point at each other: free the model now
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if native is None and name == "native":
                native = (noise, latents)
            if native is not None:
                result.update(noise_rel_diff=relative(torch, noise, native[0]),
                              noise_max_abs_diff=max_abs(noise, native[0]),
                              latents_rel_diff=relative(torch, latents, native[1]),
                              latents_max_abs_diff=max_abs(latents, native[1]))
            result["finite"] = bool(torch.isfinite(noise).all())
            section["variants"].append(result)
            run.log(f"e2e {name}: forward {result['forward_ms']} ms, noise rel diff "
                    f"{result.get('noise_rel_diff', float('nan')):.4g}, fallbacks {result['fallbacks'] or '-'}")
            run.write()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def summarise(run):
    data = run.data
    gems_calls = data["kernels"] == "gems"
    flagos_fallbacks = {k: v for case in data["gemm"] for k, v in case["fallbacks"].items() if k.startswith("flagos")}
    variants = {v["variant"]: v for v in data["e2e"]["variants"]}
    e2e_ok = all(v["finite"] for v in variants.values()) and len(variants) == len(E2E_VARIANTS)
    for name in ("flagos-fp8", "flagos-int8"):
        peer = variants.get(PEER[name])
        if name in variants and peer is not None and "noise_rel_diff" in variants[name]:
            e2e_ok &= variants[name]["noise_rel_diff"] <= peer["noise_rel_diff"] * 1.05 + 1e-3
    data["summary"] = {
        "gemm_cases": len(data["gemm"]),
        "gemm_within_lightx2v_error": all(case["within_lightx2v_error"] for case in data["gemm"]),
        "flagos_gemm_fallbacks": flagos_fallbacks,
        "e2e_variants": list(variants), "e2e_ok": e2e_ok,
        "pass": (not data["errors"] and not data["skipped"] and not data["import_errors"] and bool(data["gemm"])
                 and not any(case["errors"] for case in data["gemm"])
                 and all(case["within_lightx2v_error"] for case in data["gemm"]) and e2e_ok
                 and not (gems_calls and flagos_fallbacks)),
    }


def _figure(value, digits=3):
    return "-" if value is None else f"{value:.{digits}g}"


def markdown(data) -> str:
    """The JSON's figures as tables (written next to it as lightx2v-quant.md)."""
    versions = data.get("versions", {})
    lines = [f"# LightX2V quantised linear: flagos-fp8 / flagos-int8 on FlagGems ({data.get('device')}, "
             f"{data.get('date')})", "",
             f"torch {versions.get('torch')}, triton {versions.get('triton')}, flag_gems {versions.get('flag_gems')}, "
             f"LightX2V {versions.get('lightx2v_commit')}; kernels {data.get('kernels')}; dry run: "
             f"{data.get('dry_run')}; complete: {data.get('complete')}; {data.get('elapsed_s')} s", "",
             "## Per GEMM of a Wan2.1 block: ms per call (speed-up of flagos over LightX2V's Triton scheme)", "",
             "| model | GEMM | M x K x N | " + " | ".join(SCHEMES) + " |", "|" + " --- |" * (3 + len(SCHEMES))]
    for case in data.get("gemm", []):
        cells = []
        for scheme in SCHEMES:
            cell = _figure(case["ms"].get(scheme), 4)
            if scheme in case["speedup_vs_lightx2v"]:
                cell += f" ({case['speedup_vs_lightx2v'][scheme]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {case['model']} | {case['gemm']} | {case['M']} x {case['K']} x {case['N']} | "
                     + " | ".join(cells) + " |")
    quant = [scheme for scheme in SCHEMES if scheme != "Default"]
    lines += ["", "## Relative L2 error against the bf16 Default (random / structured inputs); Default against fp32",
              "", "| model | GEMM | Default vs fp32 | " + " | ".join(quant) + " |", "|" + " --- |" * (3 + len(quant))]
    for case in data.get("gemm", []):
        acc = case["accuracy"]

        def pair(scheme, key="rel_err_vs_default", acc=acc):
            return " / ".join(_figure(acc.get(kind, {}).get(scheme, {}).get(key)) for kind in ("random", "structured"))

        lines.append(f"| {case['model']} | {case['gemm']} | {pair('Default', 'rel_err_vs_fp32')} | "
                     + " | ".join(pair(scheme) for scheme in quant) + " |")
    lines += ["", "## Activation quantiser alone, and the flagos keys' torch reference (ms)", "",
              "| model | GEMM | " + " | ".join(f"{s} quant" for s in quant) + " | flagos-fp8 reference | "
              "flagos-int8 reference |", "|" + " --- |" * (4 + len(quant))]
    for case in data.get("gemm", []):
        lines.append(f"| {case['model']} | {case['gemm']} | "
                     + " | ".join(_figure(case["act_quant_ms"].get(s), 4) for s in quant) + " | "
                     + " | ".join(_figure(case["reference_ms"].get(s), 4) for s in ("flagos-fp8", "flagos-int8"))
                     + " |")
    section = data.get("e2e", {})
    lines += ["", f"## Wan2.1 {section.get('model')} DiT, {section.get('blocks')} blocks, latent "
              f"{section.get('latent')}: one denoising step", "",
              "| variant | ffn_0 class | forward ms | noise_pred rel diff vs native | latents rel diff | fallbacks |",
              "| --- | --- | --- | --- | --- | --- |"]
    for v in section.get("variants", []):
        fallbacks = "; ".join(f"{k.rsplit('.', 1)[-1]}: {n}" for k, n in v["fallbacks"].items()) or "-"
        lines.append(f"| {v['variant']} | {v['classes']['ffn_0']} | {_figure(v['forward_ms'], 4)} | "
                     f"{_figure(v.get('noise_rel_diff'))} | {_figure(v.get('latents_rel_diff'))} | {fallbacks} |")
    for key in ("skipped", "errors"):
        if data.get(key):
            lines += ["", f"{key}: " + "; ".join(str(item if key == "skipped" else f"{item['section']}: "
                                                   f"{item['error']}") for item in data[key])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
