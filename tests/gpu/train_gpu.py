"""Training on a GPU: gradients of fl_patch's training paths against HF, and 50-step AdamW loss curves, in bf16.

    python tests/gpu/train_gpu.py --out-dir OUT          # OUT/train-gpu.json and OUT/train-gpu.md; exit 1 on a failure
    python tests/gpu/train_gpu.py --dry-run --out-dir T  # CPU: the torch reference kernels, tiny models, seconds

Not a pytest module. Variants, each on the same weights and data: ``hf`` (unpatched, sdpa), ``fl_patch`` (the
defaults, FlagGems: the loss's cross-entropy among them), ``fl_patch_flce`` (plus the opt-in fused linear +
cross-entropy), and for reference ``hf_eager`` (HF's eager attention: the same math, rounded otherwise) and
``hf_fp32`` (the same weights in fp32: the exact result). ``liger_flce`` (Liger-Kernel with its fused loss) runs
last when liger_kernel is importable, as it can't be reverted.

1. ``gradients``: Llama- and Qwen3-style models (4 layers, hidden 512, vocab 32000: the fused path runs several
   chunks), one forward + backward at 4x512 with a quarter of the labels ignored. Per parameter, a variant passes
   when ``max|grad - exact| <= max(0.016 x max|exact|, 2 x HF bf16's own error)`` (``fl-patch check``'s rule; 0.016
   is the bf16 rtol of FlagGems' tests); the loss within 2 bf16 ulps (2**-7 relative) of HF's. Peak memory too.
2. ``curves``: 50 AdamW steps (lr 1e-3) over 8 fixed batches of 4x256 tokens from a fixed random bigram table (so
   the loss falls). bf16 noise is measured, not assumed: HF sdpa against HF eager, the same computation rounded
   two ways, differ by ``noise = max_t |hf_eager(t) - hf(t)|`` over the curve. A variant passes when ``max_t
   |variant(t) - hf(t)| <= max(3 x noise, 2**-8 x hf(0))`` (the floor: one bf16 ulp of the first loss, so that
   an unusually quiet HF pair does not make the bound zero). ``hf_fp32``'s distance is shown, not judged.

3. ``checkpointing``: Llama-style and Gemma3-style models (Gemma3: RMSNorm ``x * (1 + w)`` on FlagGems, the last
   op of each layer; Llama: a linear), the step of ``gradients`` with gradient checkpointing on, non-reentrant
   (transformers' default: its recomputation stops by raising inside the layer's last op) and reentrant. Judged
   as ``gradients`` against the same exact fp32 step, for ``hf``, ``fl_patch`` and ``fl_patch_all`` (no device
   profile: every call a kernel takes runs FlagGems, RMSNorm's forward and recomputation among them). A variant
   also fails on a kernel error in its report, and ``fl_patch_all`` if an RMSNorm call went to the original.

The JSON is rewritten after every case, so a run cut short keeps what it measured; ``--budget-s`` (default 170)
skips what would not fit and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import fl_patch  # noqa: E402

FUSED_ROW = "transformers.fused_linear_cross_entropy"
BF16_RTOL = 0.016
STEPS, LR = 50, 1e-3


def config(name: str, dry_run: bool):
    sizes = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, vocab_size=512) if dry_run else
             dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=64, vocab_size=32000))
    return CONFIGS[name]()(max_position_embeddings=1024, **sizes)


CONFIGS = {  # name -> a function giving the config class (transformers imported when a model is built)
    "llama": lambda: __import__("transformers").LlamaConfig,
    "qwen3": lambda: __import__("transformers").Qwen3Config,
    "gemma3": lambda: __import__("transformers").Gemma3TextConfig,
}


def build(name: str, dry_run: bool, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config(name, dry_run)).to(device)  # fp32 master copy


def variants(kernels: str, model):
    """(name, context) of the variants that can be reverted, in the order they run."""

    @contextlib.contextmanager
    def eager():
        model.set_attn_implementation("eager")
        try:
            yield
        finally:
            model.set_attn_implementation("sdpa")

    return [("hf", contextlib.nullcontext), ("hf_eager", eager),
            ("fl_patch", lambda: fl_patch.patched(kernels=kernels)),
            ("fl_patch_flce", lambda: fl_patch.patched(kernels=kernels, include=[FUSED_ROW]))]


def liger(name: str, model) -> None:
    from liger_kernel.transformers import apply_liger_kernel_to_llama, apply_liger_kernel_to_qwen3

    patch = {"llama": apply_liger_kernel_to_llama, "qwen3": apply_liger_kernel_to_qwen3}[name]
    patch(rope=True, rms_norm=True, swiglu=True, cross_entropy=False, fused_linear_cross_entropy=True, model=model)


def fallbacks() -> dict:
    """Per patched place with fallbacks: {reason: count} (what did not run on the kernel, and why)."""
    return {r["where"]: r["fallbacks"] for r in fl_patch.report() if r.get("fallbacks")}


def kernel_errors(seen: dict) -> list[str]:
    """The fallbacks of `seen` (as :func:`fallbacks` gives them) that a kernel's failure caused."""
    return [f"{where}: {reason}" for where, reasons in seen.items() for reason in reasons
            if reason.startswith("kernel error") or reason == "flag_gems unusable"]


# ---------------------------------------------------------------------------------------------------------
# 1. gradients


def gradient_batch(vocab: int, dry_run: bool, device: str):
    generator = torch.Generator().manual_seed(3)
    batch, seq = (2, 32) if dry_run else (4, 512)
    ids = torch.randint(0, vocab, (batch, seq), generator=generator)
    labels = ids.clone()
    labels[:, : seq // 4] = -100  # a prompt that is not learned, row 0 included
    return ids.to(device), labels.to(device)


def one_step(model, ids, labels, device):
    model.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.item(), grads, peak, out.logits is None


def judge_gradients(grads, hf, exact) -> dict:
    worst, failed = 0.0, []
    for key, value in exact.items():
        if key not in grads:
            failed.append(f"{key}: no gradient")
            continue
        own = (hf[key] - value).abs().max().item()
        err = (grads[key] - value).abs().max().item()
        bound = max(BF16_RTOL * value.abs().max().item(), 2 * own)
        worst = max(worst, err / bound if bound else float("inf") if err else 0.0)
        if err > bound:
            failed.append(f"{key}: {err:.3g} > {bound:.3g}")
    return {"worst_err_over_bound": round(worst, 3), "failed": failed}


def gradients(name, args, device, kernels, save, out) -> None:
    model = build(name, args.dry_run, device)
    ids, labels = gradient_batch(model.config.vocab_size, args.dry_run, device)
    model.train()
    loss, exact, _, _ = one_step(model, ids, labels, device)
    out["hf_fp32"] = {"loss": loss}
    model.to(torch.bfloat16)
    hf = None
    for variant, context in variants(kernels, model):
        with context():
            loss, grads, peak, no_logits = one_step(model, ids, labels, device)
            seen = fallbacks() if variant.startswith("fl_patch") else {}
        hf = grads if variant == "hf" else hf
        entry = {"loss": loss, "peak_gib": round(peak, 3), "logits_none": no_logits,
                 **judge_gradients(grads, hf, exact)}
        entry["loss_ok"] = abs(loss - out.get("hf", {"loss": loss})["loss"]) <= 2**-7 * abs(loss)
        entry["pass"] = entry["loss_ok"] and not entry["failed"]
        entry["fallbacks"] = seen
        out[variant] = entry
        print(f"  gradients {name} {variant:<14} loss {loss:.4f} worst err/bound {entry['worst_err_over_bound']:.2f} "
              f"peak {peak:.2f} GiB {'pass' if entry['pass'] else 'FAIL'}", flush=True)
        save()


# ---------------------------------------------------------------------------------------------------------
# 2. loss curves


def curve_batches(vocab: int, dry_run: bool, device: str):
    """8 batches of token sequences drawn from a fixed random bigram table over a 1000-token subset."""
    generator = torch.Generator().manual_seed(5)
    batch, seq, used = (2, 32, 64) if dry_run else (4, 256, 1000)
    table = torch.randint(0, used, (used, 4), generator=generator)  # each token has 4 possible successors
    batches = []
    for _ in range(8):
        tokens = [torch.randint(0, used, (batch,), generator=generator)]
        for _ in range(seq - 1):
            pick = torch.randint(0, 4, (batch,), generator=generator)
            tokens.append(table[tokens[-1], pick])
        batches.append(torch.stack(tokens, dim=1).to(device))
    return batches


def curve(model, initial, batches, steps: int) -> list[float]:
    model.load_state_dict(initial)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    losses = []
    for step in range(steps):
        ids = batches[step % len(batches)]
        optimizer.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())
    return [x.item() for x in losses]


def curves(name, args, device, kernels, save, out, started) -> None:
    model = build(name, args.dry_run, device)
    batches = curve_batches(model.config.vocab_size, args.dry_run, device)
    steps = 5 if args.dry_run else STEPS
    exact = {k: v.clone() for k, v in model.state_dict().items()}
    out["hf_fp32"] = {"losses": curve(model, exact, batches, steps)}
    model.load_state_dict(exact)
    model.to(torch.bfloat16)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    for variant, context in variants(kernels, model):
        if time.perf_counter() - started > args.budget_s:
            out[variant] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
            continue
        with context():
            out[variant] = {"losses": curve(model, initial, batches, steps)}
            if variant.startswith("fl_patch"):
                out[variant]["fallbacks"] = fallbacks()
        print(f"  curve {name} {variant:<14} first {out[variant]['losses'][0]:.4f} "
              f"last {out[variant]['losses'][-1]:.4f}", flush=True)
        save()
    out["_model"] = (model, initial)  # kept for liger_flce, which runs last
    judge_curves(out)


def judge_curves(out: dict) -> None:
    hf = out["hf"]["losses"]
    noise = max(abs(a - b) for a, b in zip(out["hf_eager"]["losses"], hf, strict=True))
    bound = max(3 * noise, 2**-8 * abs(hf[0]))
    out["rule"] = {"noise_hf_eager_vs_hf": noise, "bound": bound}
    for variant, entry in out.items():
        if not isinstance(entry, dict) or "losses" not in entry or variant == "hf":
            continue
        diff = max(abs(a - b) for a, b in zip(entry["losses"], hf, strict=True))
        entry["max_diff_vs_hf"] = diff
        if variant not in ("hf_fp32", "hf_eager"):
            entry["pass"] = diff <= bound


# ---------------------------------------------------------------------------------------------------------
# 3. gradient checkpointing

CHECKPOINTING = {"non_reentrant": {"use_reentrant": False}, "reentrant": {"use_reentrant": True}}


def checkpointing(name, args, device, kernels, save, out) -> None:
    model = build(name, args.dry_run, device)
    ids, labels = gradient_batch(model.config.vocab_size, args.dry_run, device)
    model.train()
    loss, exact, _, _ = one_step(model, ids, labels, device)  # checkpointing changes no number in fp32
    out["hf_fp32"] = {"loss": loss}
    model.to(torch.bfloat16)
    norms = {f".{type(m).__qualname__}.forward" for m in model.modules() if "RMSNorm" in type(m).__name__}
    cases = [("hf", contextlib.nullcontext), ("fl_patch", lambda: fl_patch.patched(kernels=kernels)),
             ("fl_patch_all", lambda: fl_patch.patched(kernels=kernels, profile="off"))]
    for mode, kwargs in CHECKPOINTING.items():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        entries, hf = out.setdefault(mode, {}), None
        for variant, context in cases:
            with context():
                loss, grads, peak, _ = one_step(model, ids, labels, device)
                seen = fallbacks() if variant.startswith("fl_patch") else {}
            hf = grads if variant == "hf" else hf
            entry = {"loss": loss, "peak_gib": round(peak, 3), **judge_gradients(grads, hf, exact)}
            entry["loss_ok"] = abs(loss - entries.get("hf", {"loss": loss})["loss"]) <= 2**-7 * abs(loss)
            entry["kernel_errors"] = kernel_errors(seen)
            entry["rms_norm_fallbacks"] = {w: r for w, r in seen.items() if w.endswith(tuple(norms))}
            entry["pass"] = (entry["loss_ok"] and not entry["failed"] and not entry["kernel_errors"]
                             and not (variant == "fl_patch_all" and entry["rms_norm_fallbacks"]))
            entry["fallbacks"] = seen
            entries[variant] = entry
            print(f"  checkpointing {name} {mode:<13} {variant:<12} loss {loss:.4f} worst err/bound "
                  f"{entry['worst_err_over_bound']:.2f} peak {peak:.2f} GiB {'pass' if entry['pass'] else 'FAIL'}",
                  flush=True)
            save()
    model.gradient_checkpointing_disable()


# ---------------------------------------------------------------------------------------------------------


def markdown(results: dict) -> str:
    lines = [f"# Training on {results['device']}, {results['date']}", "", f"versions: {results['versions']}", ""]
    for name, parts in results["models"].items():
        lines += [f"## {name}", ""]
        if "gradients" in parts:
            lines += ["| gradients | loss | worst err / bound | peak GiB | logits None | pass |",
                      "| --- | --- | --- | --- | --- | --- |"]
            for variant, e in parts["gradients"].items():
                if "worst_err_over_bound" in e:
                    lines.append(f"| {variant} | {e['loss']:.4f} | {e['worst_err_over_bound']:.2f} | "
                                 f"{e['peak_gib']:.2f} | {e['logits_none']} | {e['pass']} |")
            lines.append("")
        if "curves" in parts:
            rule = parts["curves"].get("rule", {})
            lines += [f"curves: bound {rule.get('bound', float('nan')):.4g} = max(3 x HF eager vs HF noise "
                      f"{rule.get('noise_hf_eager_vs_hf', float('nan')):.4g}, one bf16 ulp of the first loss)", "",
                      "| curve | first | last | max diff vs hf | pass |", "| --- | --- | --- | --- | --- |"]
            for variant, e in parts["curves"].items():
                if isinstance(e, dict) and "losses" in e:
                    lines.append(f"| {variant} | {e['losses'][0]:.4f} | {e['losses'][-1]:.4f} | "
                                 f"{e.get('max_diff_vs_hf', 0):.4g} | {e.get('pass', '-')} |")
                elif isinstance(e, dict) and ("skipped" in e or "error" in e):
                    lines.append(f"| {variant} | {e.get('skipped') or e.get('error')} | | | |")
            lines.append("")
        if "checkpointing" in parts:
            part = parts["checkpointing"]
            lines += ["| checkpointing | loss | worst err / bound | peak GiB | kernel errors | RMSNorm fallbacks "
                      "| pass |", "| --- | --- | --- | --- | --- | --- | --- |"]
            for problem in ("skipped", "error"):
                if problem in part:
                    lines.append(f"| {part[problem][problem]} | | | | | | |")
            for mode in CHECKPOINTING:
                for variant, e in part.get(mode, {}).items():
                    norm_fallbacks = sum(n for reasons in e["rms_norm_fallbacks"].values() for n in reasons.values())
                    lines.append(f"| {mode} {variant} | {e['loss']:.4f} | {e['worst_err_over_bound']:.2f} | "
                                 f"{e['peak_gib']:.2f} | {len(e['kernel_errors'])} | {norm_fallbacks} | {e['pass']} |")
            lines.append("")
    return "\n".join(lines)


def verdicts_in(tree) -> list[bool]:
    """Every ``pass`` under `tree` (nested dicts)."""
    if not isinstance(tree, dict):
        return []
    own = [tree["pass"]] if "pass" in tree else []
    return own + [verdict for value in tree.values() for verdict in verdicts_in(value)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--dry-run", action="store_true", help="CPU, torch reference kernels, tiny models")
    parser.add_argument("--models", default="llama,qwen3")
    parser.add_argument("--checkpointing-models", default="llama,gemma3",
                        help="models of part 3, gradient checkpointing ('' for none)")
    parser.add_argument("--budget-s", type=float, default=170.0)
    args = parser.parse_args()
    fl_patch.revert()
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit("train_gpu: no GPU here; --dry-run runs the CPU harness check")
    device, kernels = ("cpu", "reference") if args.dry_run else ("cuda", "gems")
    from fl_patch.environment import describe

    info = describe()
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": info["device"] if not args.dry_run else "cpu",
               "versions": {k: info.get(k) for k in ("torch", "transformers", "flag_gems", "triton")},
               "kernels": kernels, "models": {}}
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    def save():
        clean = json.loads(json.dumps(results, default=lambda o: None))
        (out_dir / "train-gpu.json").write_text(json.dumps(clean, indent=2))

    started = time.perf_counter()
    names = [name for name in args.models.split(",") if name]
    parts_to_run = [(name, part) for name in names for part in ("gradients", "curves")] + [
        (name, "checkpointing") for name in args.checkpointing_models.split(",") if name]
    runners = {
        "gradients": lambda n, out: gradients(n, args, device, kernels, save, out),
        "curves": lambda n, out: curves(n, args, device, kernels, save, out, started),
        "checkpointing": lambda n, out: checkpointing(n, args, device, kernels, save, out),
    }
    for name, part in parts_to_run:
        entry = results["models"].setdefault(name, {}).setdefault(part, {})
        if time.perf_counter() - started > args.budget_s:
            entry["skipped"] = {"skipped": f"over the {args.budget_s:.0f} s budget"}
            continue
        try:
            runners[part](name, entry)
        except Exception as exc:  # one part's failure must not lose the others
            entry["error"] = {"error": f"{type(exc).__name__}: {exc}"}
            traceback.print_exc()
        save()
    for name in names:  # Liger last: it can't be reverted
        entry = results["models"][name]["curves"]
        model, initial = entry.pop("_model", (None, None))
        if model is None or args.dry_run or time.perf_counter() - started > args.budget_s:
            continue
        try:
            liger(name, model)
            batches = curve_batches(model.config.vocab_size, args.dry_run, device)
            entry["liger_flce"] = {"losses": curve(model, initial, batches, STEPS)}
            judge_curves(entry)
        except Exception as exc:
            entry["liger_flce"] = {"error": f"{type(exc).__name__}: {exc}"}
        save()
    for entry in (e for parts in results["models"].values() for e in parts.values()):
        entry.pop("_model", None)
    save()
    (out_dir / "train-gpu.md").write_text(markdown(results))
    print(markdown(results))
    verdicts = verdicts_in(results["models"])
    errors = [part["error"] for parts in results["models"].values() for part in parts.values() if "error" in part]
    print(f"train_gpu: {sum(verdicts)}/{len(verdicts)} checks pass, {len(errors)} errors, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 0 if all(verdicts) and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
