"""fl_patch under torch.compile on a GPU: tiny HF Llama and Qwen3 in bf16, FlagGems calls as fl_patch:: custom ops.

    python tests/gpu/compile_gpu.py --out-dir tests/gpu/results/compile        # GPU: cuda, inductor, flag_gems
    python tests/gpu/compile_gpu.py --dry-run --out-dir /tmp/compile           # CPU check of this script

Not a pytest module (no ``test_`` prefix). Per model it checks, with ``FL_PATCH_PROFILE=off`` (every call on
FlagGems: the sizes are far below any profile's thresholds) and every kernel family included:

- no graph break: ``torch._dynamo.explain`` of the patched model, and which ``torch.ops.fl_patch`` ops its graph
  holds (the FlagGems calls);
- logits: ``torch.compile(fullgraph=True, backend="inductor")`` of the patched model against eager HF and eager
  fl_patch, relative to the largest |logit| (bf16 tolerance ``LOGITS``);
- gradients: a compiled training step (rms_norm and silu_and_mul run their custom ops' FlagGems backward; the
  other families need grad and run the original) against eager HF's (tolerance ``GRADS``);
- the two ops with backward on their own, compiled, against torch autograd in fp32 (tolerance ``OP_GRADS``);
- revert: the patched places hold their originals again.

Writes compile_gpu.json and compile_gpu.md to --out-dir after every check (a run cut short keeps what it got),
prints progress, and exits after --timeout seconds in all (default 900) with the stacks of every thread, so it
never hangs. ``--dry-run``: CPU, the fake flag_gems (tests/fake_flag_gems) on CPU tensors, backend aot_eager.
Exit status 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import datetime
import faulthandler
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FAMILIES = ["rms_norm", "rope", "attention", "swiglu", "linear"]
SIZES = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, pad_token_id=0)
BATCH, SEQ = 2, 64
LOGITS = 0.02  # relative to max |logit|: a few bf16 ulps (1/128) over two layers
GRADS = 0.05  # bf16 gradients: the forward's roundings and the backward's own
OP_GRADS = 0.02  # one bf16 op's gradients against fp32 autograd


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", required=True, type=Path)
    parser.add_argument("--dry-run", action="store_true", help="CPU, the fake flag_gems, backend aot_eager")
    parser.add_argument("--models", default="llama,qwen3")
    parser.add_argument("--backend", help="torch.compile backend (default: inductor; aot_eager in --dry-run)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds in all before it exits (default 900)")
    args = parser.parse_args(argv)
    args.backend = args.backend or ("aot_eager" if args.dry_run else "inductor")
    args.models = [m for m in args.models.split(",") if m]
    return args


def say(message: str) -> None:
    print(f"[compile_gpu {time.strftime('%H:%M:%S')}] {message}", flush=True)


def relative_diff(actual, expected) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max().clamp(min=1))


class Results:
    """Every check's outcome, written to JSON and markdown after each one."""

    def __init__(self, out_dir: Path, environment: dict):
        self.out_dir, self.environment, self.checks = out_dir, environment, []
        out_dir.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, passed: bool, **details) -> None:
        self.checks.append({"check": name, "passed": bool(passed), **details})
        say(f"{'PASS' if passed else 'FAIL'} {name} {json.dumps(details, default=str)[:300]}")
        self.write()

    def write(self) -> None:
        data = {"environment": self.environment, "passed": all(c["passed"] for c in self.checks),
                "checks": self.checks}
        (self.out_dir / "compile_gpu.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        lines = ["# fl_patch under torch.compile", "",
                 ", ".join(f"{k} {v}" for k, v in self.environment.items()), "",
                 "| check | passed | details |", "| --- | --- | --- |"]
        for check in self.checks:
            details = {k: v for k, v in check.items() if k not in ("check", "passed")}
            lines.append(f"| {check['check']} | {'yes' if check['passed'] else '**no**'} | "
                         f"{json.dumps(details, default=str)[:400]} |")
        (self.out_dir / "compile_gpu.md").write_text("\n".join(lines) + "\n")


def environment(args, torch, device) -> dict:
    from fl_patch.versions import installed_version

    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": installed_version("triton"), "flag_gems": installed_version("flag-gems"),
           "transformers": installed_version("transformers"), "backend": args.backend, "dry_run": args.dry_run}
    env["device"] = torch.cuda.get_device_name(0) if device == "cuda" else "cpu (fake flag_gems)"
    return env


def tiny(torch, family: str, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    config_class, model_class = {"llama": (LlamaConfig, LlamaForCausalLM),
                                 "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[family]
    torch.manual_seed(0)
    return model_class(config_class(**SIZES)).to(device, torch.bfloat16)


def places():
    """The patched places' current objects, to check that revert gives the originals back."""
    import torch
    from transformers.models.llama import modeling_llama
    from transformers.models.qwen3 import modeling_qwen3

    return {"LlamaRMSNorm.forward": modeling_llama.LlamaRMSNorm.forward,
            "llama.apply_rotary_pos_emb": modeling_llama.apply_rotary_pos_emb,
            "Qwen3MLP.forward": modeling_qwen3.Qwen3MLP.forward,
            "qwen3.apply_rotary_pos_emb": modeling_qwen3.apply_rotary_pos_emb,
            "F.linear": torch.nn.functional.linear}


def fl_patch_ops(explanation) -> list[str]:
    """The fl_patch:: ops named in the graphs dynamo captured."""
    found = set()
    for graph in explanation.graphs:
        for node in graph.graph.nodes:
            if node.op == "call_function" and str(node.target).startswith("fl_patch."):
                found.add(str(node.target))
    return sorted(found)


def check_model(results, torch, fl_patch, family: str, device: str, backend: str) -> None:
    model = tiny(torch, family, device).eval()
    ids = torch.randint(1, SIZES["vocab_size"], (BATCH, SEQ), device=device, generator=None)
    before = places()
    with torch.no_grad():
        hf = model(ids).logits
    say(f"{family}: eager HF done")
    fl_patch.apply(kernels="gems", include=FAMILIES, profile="off")
    try:
        with torch.no_grad():
            eager = model(ids).logits
            say(f"{family}: eager fl_patch done")
            torch._dynamo.reset()
            explanation = torch._dynamo.explain(model)(ids)
            ops = fl_patch_ops(explanation)
            results.add(f"{family}: no graph break", explanation.graph_break_count == 0 and bool(ops),
                        graph_breaks=explanation.graph_break_count, graphs=explanation.graph_count, ops=ops,
                        break_reasons=[str(r.reason)[:200] for r in explanation.break_reasons])
            torch._dynamo.reset()
            started = time.perf_counter()
            compiled = torch.compile(model, fullgraph=True, backend=backend)(ids).logits
            say(f"{family}: compiled forward in {time.perf_counter() - started:.1f} s")
        diff_hf, diff_eager = relative_diff(compiled, hf), relative_diff(compiled, eager)
        results.add(f"{family}: compiled logits", diff_hf <= LOGITS and diff_eager <= LOGITS
                    and bool(torch.isfinite(compiled).all()), vs_hf=diff_hf, vs_fl_patch_eager=diff_eager,
                    tolerance=LOGITS, eager_fl_patch_vs_hf=relative_diff(eager, hf))
        check_training(results, torch, fl_patch, family, device, backend)
    finally:
        torch._dynamo.reset()
        fl_patch.revert()
    results.add(f"{family}: revert", places() == before)


def check_training(results, torch, fl_patch, family: str, device: str, backend: str) -> None:
    ids = torch.randint(1, SIZES["vocab_size"], (1, SEQ), device=device)

    def grads(model, run):
        model.train()
        run(ids, labels=ids).loss.backward()
        return {name: p.grad for name, p in model.named_parameters() if p.grad is not None}

    with _native(fl_patch):
        reference_model = tiny(torch, family, device)
        expected = grads(reference_model, reference_model)
    model = tiny(torch, family, device)
    with torch.no_grad():
        model(ids)  # eager first, as a user's warm-up would: routing has looked the profile up for this device
    torch._dynamo.reset()
    started = time.perf_counter()
    actual = grads(model, torch.compile(model, fullgraph=True, backend=backend))
    say(f"{family}: compiled training step in {time.perf_counter() - started:.1f} s")
    worst = max((relative_diff(actual[name], grad), name) for name, grad in expected.items())
    results.add(f"{family}: compiled gradients", actual.keys() == expected.keys() and worst[0] <= GRADS,
                worst=worst[0], worst_parameter=worst[1], tolerance=GRADS, parameters=len(expected))


class _native:
    """fl_patch reverted inside, applied again (with the same settings) on exit."""

    def __init__(self, fl_patch):
        self.fl_patch = fl_patch

    def __enter__(self):
        self.fl_patch.revert()

    def __exit__(self, *exc):
        self.fl_patch.apply(kernels="gems", include=FAMILIES, profile="off")


def check_ops_with_backward(results, torch, device: str, backend: str) -> None:
    from fl_patch.kernels import custom_ops

    reason = custom_ops.compile_reason()  # imports flag_gems and defines the ops
    if reason is not None:
        raise RuntimeError(f"the custom ops can't be used here: {reason}")
    ops = custom_ops.namespace
    torch.manual_seed(0)
    x = torch.randn(BATCH * SEQ, 256, device=device)
    w = torch.randn(256, device=device)
    a, b = torch.randn(BATCH * SEQ, 512, device=device), torch.randn(BATCH * SEQ, 512, device=device)

    def fused(x, w, a, b):
        return (ops.rms_norm(x, (256,), w, 1e-6).float().sum() + ops.silu_and_mul(a, b).float().sum()) / x.shape[0]

    def reference(x, w, a, b):
        normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        return (normed.sum() + (torch.nn.functional.silu(a) * b).sum()) / x.shape[0]

    inputs = [t.to(torch.bfloat16).requires_grad_() for t in (x, w, a, b)]
    torch._dynamo.reset()
    compiled = torch.compile(fused, fullgraph=True, backend=backend)
    actual = torch.autograd.grad(compiled(*inputs), inputs)
    fp32 = [t.detach().float().requires_grad_() for t in inputs]
    expected = torch.autograd.grad(reference(*fp32), fp32)
    diffs = {name: relative_diff(g, e) for name, g, e in zip(("x", "weight", "gate", "up"), actual, expected,
                                                              strict=True)}
    results.add("rms_norm + silu_and_mul backward, compiled", max(diffs.values()) <= OP_GRADS, diffs=diffs,
                tolerance=OP_GRADS)


def main(argv=None) -> int:
    args = parse_args(argv)
    faulthandler.dump_traceback_later(args.timeout, exit=True)  # never hang: stacks, then exit
    if args.dry_run:
        sys.path.insert(0, str(REPO / "tests" / "fake_flag_gems"))
    os.environ.setdefault("FL_PATCH_AUTO", "0")
    import torch

    import fl_patch
    from fl_patch.kernels import gems

    device = "cpu" if args.dry_run else "cuda"
    if not args.dry_run and not torch.cuda.is_available():
        say("no GPU here: use --dry-run for the CPU check")
        return 2
    if args.dry_run:
        gems.device_reason = lambda tensor: None  # CPU tensors stand in for a device's (as in the CPU tests)
    fl_patch.revert()
    results = Results(args.out_dir, environment(args, torch, device))
    say(f"{results.environment}")
    for name, check in [("ops with backward", lambda: check_ops_with_backward(results, torch, device, args.backend)),
                        *[(family, lambda family=family: check_model(results, torch, fl_patch, family, device,
                                                                     args.backend)) for family in args.models]]:
        say(f"checking {name}")
        try:
            check()
        except Exception as exc:  # one check's failure must not lose the others
            traceback.print_exc()
            results.add(f"{name}: raised", False, error=f"{type(exc).__name__}: {exc}"[:500])
    passed = all(c["passed"] for c in results.checks)
    say(f"{'all checks passed' if passed else 'SOME CHECKS FAILED'}; results in {args.out_dir}")
    faulthandler.cancel_dump_traceback_later()
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
