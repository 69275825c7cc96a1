"""Tiny CPU builds of every causal-LM model type in the installed transformers, for the coverage test.

:func:`tiny_config` shrinks a model type's default config generically (no per-model code): the sizes it has
are set small, per-layer lists are cut to one layer of each kind, and special token ids are kept inside the
small vocabulary. :func:`build` makes the causal-LM model in fp32 eval mode, or raises :class:`NotTiny`
saying why the type can't be built tiny on CPU. :func:`padded_batch` is the left-padded input.
"""

from __future__ import annotations

import torch

VOCAB = 256
LAYERS = 2
# Sizes set on every config that has the attribute in use (not 0 or None). Head dim 32 is one every attention
# kernel path takes; the names are config attributes, shared by several model types.
SIZES = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_experts": 4,
    "num_local_experts": 4,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 32,
    "qk_nope_head_dim": 32,
    "qk_head_dim": 64,
    "v_head_dim": 64,
    "num_layers": LAYERS,
    "ffn_hidden_size": 128,
    "expert_ffn_hidden_size": 32,
    "moe_topk": 2,
    "zero_expert_num": 2,
    "encoder_hash_byte_group_vocab": VOCAB,
    "first_k_dense_replace": 1,
    "rotary_dim": 16,
    "vocab_size_per_layer_input": VOCAB,
    "hidden_size_per_layer_input": 16,
}
# Set wherever the config has the attribute, even unset: special token ids kept inside the vocabulary, a
# head dim any config may derive, and causal masking for encoder classes used as decoders.
ALWAYS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "head_dim": 32, "is_decoder": True}


class NotTiny(Exception):
    """This model type can't be built tiny on CPU here; the message says why."""


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal LM."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


# Tried in order until one builds and runs: the plain shrink, then with more or fewer heads (some attention
# variants need equal or even head counts), then with the default head dim and layer lists.
ATTEMPTS = (
    {},
    {"num_key_value_heads": 2},
    {"num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 128},
    {"head_dim": None},
    {"head_dim": None, "num_key_value_heads": 2},
    {"num_hidden_layers": None},
)


def tiny_config(model_type: str, attempt: dict | None = None):
    """The model type's default config shrunk: SIZES (updated by `attempt`; None = keep the default),
    ALWAYS, at most one layer of each kind, and the same for its sub-configs."""
    from transformers import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    try:
        default = config_class()
    except Exception as exc:
        raise NotTiny(f"default config rejected: {type(exc).__name__}: {_first_line(exc)}") from None
    if getattr(default, "is_encoder_decoder", False):
        raise NotTiny("encoder-decoder")
    try:
        return _shrunk(config_class, default, {**SIZES, **(attempt or {})})
    except Exception as exc:
        raise NotTiny(f"tiny config rejected: {type(exc).__name__}: {_first_line(exc)}") from None


def _shrunk(config_class, default, sizes: dict):
    overrides = {name: value for name, value in ALWAYS.items() if _has(default, name) and _settable(default, name)}
    for name, value in sizes.items():  # only sizes in use: 0 or None often switches a feature off
        if value is None:
            overrides.pop(name, None)
        elif _get(default, name) and _settable(default, name):
            overrides[name] = value
    if sizes.get("num_hidden_layers", LAYERS) is not None:
        overrides.update(_per_layer(default))
    for name in getattr(default, "sub_configs", {}):
        sub = _get(default, name)
        if sub is not None and hasattr(sub, "sub_configs"):
            overrides[name] = _shrunk(type(sub), sub, sizes)
    return config_class(**overrides)


def _get(config, name: str):
    try:
        return getattr(config, name, None)
    except Exception:  # attributes that can only be read per layer
        return None


def _has(config, name: str) -> bool:
    try:
        getattr(config, name)
    except Exception:  # absent, or readable only per layer
        return False
    return True


def _settable(config, name: str) -> bool:
    return not isinstance(getattr(type(config), name, None), property)


def _per_layer(default) -> dict:
    """num_hidden_layers and every list with one entry per layer, cut to the first layer of each kind."""
    layers = _get(default, "num_hidden_layers")
    if not isinstance(layers, int):
        return {}
    lists = {name: value for name, value in vars(default).items()
             if isinstance(value, (list, tuple)) and len(value) == layers and not name.startswith("_")}
    keep, kinds = [], set()
    for index in range(layers):
        kind = tuple(str(value[index]) for value in lists.values())
        if kind not in kinds:
            kinds.add(kind)
            keep.append(index)
    keep = sorted((keep + [i for i in range(layers) if i not in keep])[: max(LAYERS, len(keep))])
    out = {name: type(value)(value[i] for i in keep) for name, value in lists.items()}
    out["num_hidden_layers"] = len(keep)
    return out


def build(model_type: str, attempt: dict | None = None):
    """The tiny causal-LM model (fp32, eval, seeded), as AutoModelForCausalLM builds it, or raise NotTiny."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, attempt)
    torch.manual_seed(0)
    try:
        model = AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise NotTiny(f"build failed: {type(exc).__name__}: {_first_line(exc)}") from None
    return model.float().eval()


def build_and_run(model_type: str, input_ids, attention_mask):
    """(model, logits) from the first of ATTEMPTS that builds and runs; NotTiny with the first failure."""
    first = None
    for attempt in ATTEMPTS:
        try:
            model = build(model_type, attempt)
            return model, logits(model, input_ids, attention_mask)
        except NotTiny as exc:
            first = first or exc
            if str(exc) == "encoder-decoder":
                break
    raise first


def padded_batch(seq_len: int = 8, pad: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask): batch 2, the first row left-padded by `pad` tokens."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (2, seq_len), generator=generator)
    attention_mask = torch.ones(2, seq_len, dtype=torch.long)
    attention_mask[0, :pad] = 0
    input_ids[0, :pad] = ALWAYS["pad_token_id"]
    return input_ids, attention_mask


def logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The model's logits on the batch (no cache), or raise NotTiny if it can't run on it."""
    try:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    except Exception as exc:
        raise NotTiny(f"forward failed: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException, limit: int = 140) -> str:
    line = (str(exc).strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


# Kernel functions the reference provider calls, per family: spied on to see the patched path really run.
SPIED = {
    "rms_norm": ("fl_patch.kernels.rms_norm", ("reference_hf", "reference_gemma", "reference_fp32", "reference_gated")),
    "rope": ("fl_patch.kernels.rope", ("reference_hf",)),
    "attention": ("fl_patch.kernels.attention", ("reference_sdpa",)),
    "swiglu": ("fl_patch.kernels.swiglu", ("reference",)),
}


def spy_on_kernels(monkeypatch) -> dict[str, int]:
    """Count calls of the reference kernels per family (install before ``fl_patch.apply``: the
    replacements take their kernel when they are made). Returns the live counter."""
    import importlib

    calls = dict.fromkeys(SPIED, 0)
    for family, (module_name, names) in SPIED.items():
        module = importlib.import_module(module_name)
        for name in names:
            monkeypatch.setattr(module, name, _counting(getattr(module, name), family, calls))
    return calls


def _counting(kernel, family: str, calls: dict[str, int]):
    def counted(*args, **kwargs):
        calls[family] += 1
        return kernel(*args, **kwargs)

    return counted


def fallback_counts() -> dict[str, int]:
    """Total fallbacks per "where: reason" in fl_patch's report."""
    import fl_patch

    return {f"{r['where']}: {reason}": n for r in fl_patch.report() for reason, n in r["fallbacks"].items()}


def rms_norm_classes(model) -> tuple[set[str], set[str]]:
    """(every *RMSNorm class the model uses, those whose forward fl_patch replaced)."""
    used = {type(m) for m in model.modules() if "RMSNorm" in type(m).__name__}
    patched = {c for c in used if hasattr(c.forward, "_fl_patch_helpers")}
    return {c.__name__ for c in used}, {c.__name__ for c in patched}
