"""LightX2V integration: its registered op classes on the kernel layer, the seed plugin's ``flagos_*`` keys, and
``PLATFORM=flagos``.

LightX2V builds ops from registries in ``lightx2v.utils.registry_factory``, by keys read from the config. That
module copies the chip-side ``lightx2v_platform.registry_factory.PLATFORM_*`` tables once, at its first import,
so importing it (or an op module) early would freeze the copy before chip ops are in, and op modules keep the
``AI_DEVICE`` they saw at their first import. Nothing here imports either. Each row hooks one op module by its
exact name and runs when the user's code imports it, that is after the device is set and after the copy (every
op module imports the registry module first); the registry it writes is that module's own global. So the order
in which the user imports ``lightx2v``, ``lightx2v_platform`` or the registry module does not matter.

- Existing keys: the ``apply`` of each registered framework class (found through the registry by key, since
  both LayerNorm classes are named ``LNWeight``) is replaced at class level, reaching ops already built. Each
  replacement reproduces that class's own math with the kernel layer and hands every call it can't take to
  the original, counting the reason. Keys of the module with no kernel form (sparse or quantised variants)
  stay original and are listed in one skipped record.
- ``flagos_flash_attn``, ``flagos_rms_norm``, ``flagos_layer_norm``, ``flagos_rope`` and the quant scheme
  ``flagos``: the keys of lightx2v-plugin-FL, so configs written for it work unchanged. Each is a subclass of
  the framework class with that behaviour (so it has upstream's constructor, ``load``, LoRA and diff
  handling) whose ``apply`` runs the kernel with that class's original as fallback; ``flagos_flash_attn``
  falls back to torch's attention instead, since flash-attn may not be installed where FlagGems runs. They
  are set into the final registries' dicts through the ledger (``Register.register`` refuses an existing
  key; item assignment does not), so revert removes them, or restores a key another plugin had set.
- ``flagos-fp8`` / ``flagos-int8``: subclasses of LightX2V's ``MMWeightQuantTemplate`` that load the
  checkpoints of its per-channel schemes (``fp8-triton``, ``int8-triton``, ``fp8-vllm``, ...) with its own
  loaders and refuse a bf16 checkpoint with a clear message (LightX2V's schemes load it and fail at the
  first call); ``apply`` quantises activations per token and runs FlagGems' scaled mm
  (``fl_patch.kernels.quant_linear``), or the torch reference for a call FlagGems can't take (counted).
  ``BaseTransformerModel._check_dit_quantized`` learns the ``flagos*`` schemes: ``dit_quantized=true`` is how a
  config reaches a scheme other than ``Default``, and its hard-coded list would refuse them.
- ``PLATFORM=flagos`` (or ``fl``): a ``flagos`` device in ``PLATFORM_DEVICE_REGISTER`` that delegates to the
  first registered device that is available (``cuda`` first), so ``AI_DEVICE`` is the real accelerator.
  Its row belongs to the ``distributed`` family, as the device also starts the process group (on FlagCX
  when the ``torch.distributed.flagcx`` row is active).
- :func:`register_platform` is the ``lightx2v.platform_plugins`` entry point (``flagos``): LightX2V calls it
  from ``set_ai_device()``; it only makes sure fl_patch is active, and the hooks above do the rest.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import types
import weakref
from collections.abc import Callable

from fl_patch.replacements import kernel_pair, like
from fl_patch.runtime import Skip, kernel_failed
from fl_patch.table import Target

log = logging.getLogger("fl_patch")

_HERE = "fl_patch.integrations.lightx2v"
OPS = "lightx2v.common.ops"
REGISTRY_MODULE = "lightx2v.utils.registry_factory"
PLATFORM_NAMES = ("flagos", "fl")


def _row(name: str, family: str, module: str, attribute: str, factory: str, description: str,
         kernel_free: bool = False) -> Target:
    # The seed plugin's keys (rows named "...flagos*") are registered even without a kernel provider (torch
    # paths then), so that configs naming them keep working wherever FlagGems can't run, as they did with the
    # seed plugin; a config must name them, so performance defaults never hold them back.
    seed_key = name.rsplit(".", 1)[-1].startswith("flagos")
    return Target(name=name, family=family, module=module, attribute=attribute, factory=f"{_HERE}:{factory}",
                  description=description, runs_without_kernels=seed_key, explicit_choice=seed_key,
                  kernel_free=kernel_free)


TARGETS = [
    _row("lightx2v.platform", "platform", "lightx2v_platform.registry_factory",
         "PLATFORM_DEVICE_REGISTER['flagos'] when PLATFORM=flagos", "register_flagos_device",
         "PLATFORM=flagos: a device on the machine's accelerator"),
    _row("lightx2v.attention.flash_attn", "attention", f"{OPS}.attn.flash_attn",
         "FlashAttn2Weight / FlashAttn3Weight / FlashAttn4Weight.apply", "patch_flash_attn",
         "flash_attn2/3/4 on the provider's varlen attention"),
    _row("lightx2v.attention.sage_attn", "attention", f"{OPS}.attn.sage_attn",
         "SageAttn2Weight / SageAttn3Weight.apply", "patch_sage_attn",
         "sage_attn2/3 on the provider's (exact) varlen attention"),
    _row("lightx2v.attention.torch_sdpa", "attention", f"{OPS}.attn.torch_sdpa", "TorchSDPAWeight.apply",
         "patch_torch_sdpa", "torch_sdpa on the provider's sdpa"),
    _row("lightx2v.attention.flagos", "attention", f"{OPS}.attn.torch_sdpa",
         "ATTN_WEIGHT_REGISTER['flagos_flash_attn']", "register_flagos_attention",
         "the seed plugin's flagos_flash_attn key (flash_attn2 semantics)"),
    _row("lightx2v.rms_norm", "rms_norm", f"{OPS}.norm.rms_norm_weight",
         "RMSWeight* .apply of the 7 RMS_WEIGHT_REGISTER keys", "patch_rms_norm",
         "every RMSNorm key on the provider's RMSNorm, each with its own math"),
    _row("lightx2v.rms_norm.flagos", "rms_norm", f"{OPS}.norm.rms_norm_weight",
         "RMS_WEIGHT_REGISTER['flagos_rms_norm']", "register_flagos_rms_norm",
         "the seed plugin's flagos_rms_norm key (the 'torch' key's math)"),
    _row("lightx2v.layer_norm", "layer_norm", f"{OPS}.norm.layer_norm_weight",
         "LNWeight.apply of LN_WEIGHT_REGISTER 'torch' and 'Triton'", "patch_layer_norm",
         "LayerNorm keys on the provider's LayerNorm"),
    _row("lightx2v.layer_norm.flagos", "layer_norm", f"{OPS}.norm.layer_norm_weight",
         "LN_WEIGHT_REGISTER['flagos_layer_norm']", "register_flagos_layer_norm",
         "the seed plugin's flagos_layer_norm key (the 'torch' key's math)"),
    _row("lightx2v.rope.flashinfer", "rope", f"{OPS}.rope.flashinfer_rope", "FlashInferRope.apply",
         "patch_flashinfer_rope", "flashinfer_rope (in place, interleaved) on the provider's rope"),
    _row("lightx2v.rope.torch", "rope", f"{OPS}.rope.torch_rope", "TorchComplexRope / TorchRealRope.apply",
         "patch_torch_rope", "torch_complex_rope / torch_real_rope on the provider's interleaved rope"),
    _row("lightx2v.rope.flagos", "rope", f"{OPS}.rope.torch_rope", "ROPE_REGISTER['flagos_rope']",
         "register_flagos_rope", "the seed plugin's flagos_rope key (torch_complex_rope semantics)"),
    _row("lightx2v.linear", "linear", f"{OPS}.mm.mm_weight",
         "MMWeight.apply (Default; Default-ForceFp32 inherits it)", "patch_mm",
         "the Default quant scheme on the provider's GEMM, LoRA branch kept"),
    _row("lightx2v.linear.flagos", "linear", f"{OPS}.mm.mm_weight", "MM_WEIGHT_REGISTER['flagos']",
         "register_flagos_mm", "the seed plugin's flagos quant scheme (Default semantics)"),
    _row("lightx2v.linear.flagos_fp8", "linear", f"{OPS}.mm.mm_weight", "MM_WEIGHT_REGISTER['flagos-fp8']",
         "register_flagos_fp8", "the seed plugin's flagos-fp8 scheme: fp8-triton's checkpoints, W8A8 on FlagGems"),
    _row("lightx2v.linear.flagos_int8", "linear", f"{OPS}.mm.mm_weight", "MM_WEIGHT_REGISTER['flagos-int8']",
         "register_flagos_int8", "the seed plugin's flagos-int8 scheme: int8-triton's checkpoints, W8A8 on FlagGems"),
    _row("lightx2v.linear.flagos_schemes", "linear", "lightx2v.models.networks.base_model",
         "BaseTransformerModel._check_dit_quantized", "patch_dit_quant_check",
         "dit_quantized=true accepts the flagos* schemes (its hard-coded list does not)", kernel_free=True),
]


def register_platform() -> None:
    """The ``lightx2v.platform_plugins`` entry point ``flagos``, called by LightX2V's ``set_ai_device()`` with no
    arguments before it picks the device and before the op modules are imported.

    Makes sure fl_patch is active, unless ``FL_PATCH=0``, ``FL_PATCH_AUTO=0`` or ``LIGHTX2V_FL_AUTO_REGISTER=0``
    says not to activate automatically; idempotent. It imports nothing of LightX2V: the rows' hooks register the
    ``flagos`` device and patch the op modules as LightX2V imports them.
    """
    import fl_patch

    if fl_patch._wants_auto_activation(os.environ):
        fl_patch._bootstrap.activate("lightx2v plugin")


# ---------------------------------------------------------------------------------------------------------
# Shared helpers

# replacement function -> the original it replaces; lets a flagos class fall back to the true original even
# when its base's apply is patched by another row.
_originals: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _replacement(function: Callable, original: Callable) -> Callable:
    """`function` dressed as `original` (name, docstring, ``__wrapped__``), remembered as its replacement."""
    replaced = like(function, original)
    _originals[replaced] = original
    return replaced


def _unpatched(function: Callable) -> Callable:
    """The original behind one of our replacements, else `function` itself."""
    return _originals.get(function, function)


def _registry(module, name: str):
    """The framework registry `name` as `module` imported it, or Skip."""
    registry = getattr(module, name, None)
    if registry is None or not hasattr(registry, "get"):
        raise Skip(f"{module.__name__} has no {name} (LightX2V changed?)")
    return registry


def _framework_class(registry, key: str, module):
    """The class registered under `key` if `module` defines it, else None."""
    cls = registry.get(key)
    return cls if isinstance(cls, type) and cls.__module__ == module.__name__ else None


def _where(cls: type, key: str) -> str:
    return f"{cls.__module__}.{cls.__qualname__}.apply [{key!r}]"


def _patch_keys(ctx, module, registry_name: str, builders: dict[str, Callable]) -> None:
    """Patch ``apply`` of the class registered under each key of `builders`; one skipped record for the keys
    `module` registers that have no builder. ``builders[key](cls, original, rec)`` returns the replacement, or
    a string: why that class stays original."""
    registry = _registry(module, registry_name)
    for key, build in builders.items():
        cls = _framework_class(registry, key, module)
        if cls is None:
            rec = ctx.record(f"{REGISTRY_MODULE}.{registry_name}[{key!r}]", variant=key)
            ctx.skip(rec, f"key not registered by {module.__name__} (LightX2V changed?)")
            continue
        rec = ctx.record(_where(cls, key), variant=key)
        built = build(cls, cls.apply, rec)
        if isinstance(built, str):
            ctx.skip(rec, built)
        else:
            ctx.setattr(rec, cls, "apply", built)
    others = sorted(key for key in registry if key not in builders and _framework_class(registry, key, module))
    if others:
        rec = ctx.record(f"{module.__name__}: {', '.join(others)}")
        ctx.skip(rec, "no kernel form reproduces these keys' math (sparse, parallel or quantised variants)")


def _set_key(ctx, rec, registry, registry_name: str, key: str, cls: type) -> None:
    """``registry[key] = cls`` through the ledger, on the registry's own dict (``register`` refuses a taken key;
    revert deletes the key, or restores what another plugin had put there)."""
    table = _table(registry)
    previous = table.get(key)
    if previous is not None:
        log.info("fl_patch: %s[%r] replaces %r until revert", registry_name, key, previous)
    ctx.setitem(rec, table, key, cls)


def _table(registry):
    """The dict behind a LightX2V ``Register`` (the registry itself if it has none)."""
    table = getattr(registry, "_dict", None)
    return table if isinstance(table, dict) else registry


def _register_flagos(ctx, module, registry_name: str, base_key: str, key: str, class_name: str,
                     build_apply: Callable) -> None:
    """Register under `key` a subclass of the class `module` registers under `base_key`, whose ``apply`` is
    ``build_apply(base, base's original apply, rec)``."""
    registry = _registry(module, registry_name)
    base = _framework_class(registry, base_key, module)
    if base is None:
        raise Skip(f"{registry_name}[{base_key!r}] is not defined by {module.__name__} (LightX2V changed?)")
    rec = ctx.record(f"{REGISTRY_MODULE}.{registry_name}[{key!r}]", variant=base_key)
    original = _unpatched(base.apply)
    apply = build_apply(base, original, rec) if ctx.provider else original
    _set_key(ctx, rec, registry, registry_name, key, _subclass(class_name, base, {"apply": apply}))


def _subclass(name: str, base: type, namespace: dict) -> type:
    """A subclass of `base` (whatever its metaclass) defined in this module."""
    cls = types.new_class(name, (base,), exec_body=lambda body: body.update(namespace))
    cls.__module__ = __name__
    return cls


# ---------------------------------------------------------------------------------------------------------
# PLATFORM=flagos


def register_flagos_device(module, ctx) -> None:
    """Register the ``flagos`` (or ``fl``) device when ``$PLATFORM`` asks for it; other platforms leave the
    device table as it is."""
    platform = os.environ.get("PLATFORM", "cuda")
    registry = getattr(module, "PLATFORM_DEVICE_REGISTER", None)
    if registry is None:
        raise Skip(f"{module.__name__} has no PLATFORM_DEVICE_REGISTER (LightX2V changed?)")
    name = platform if platform in PLATFORM_NAMES else PLATFORM_NAMES[0]
    rec = ctx.record(f"{module.__name__}.PLATFORM_DEVICE_REGISTER[{name!r}]")
    if platform != name:
        ctx.skip(rec, f"PLATFORM={platform!r}; registered only for PLATFORM=flagos")
        return
    ctx.setitem(rec, _table(registry), name, _flagos_device(registry, name))


def _flagos_device(registry, name: str) -> type:
    """A device class for `registry` that delegates to the first available registered device (``cuda`` first,
    then the others in registration order), chosen at its first use."""
    chosen: list = []

    def backing():
        if not chosen:
            chosen.append(_pick_device(registry))
        return chosen[0]

    class FlagOSDevice:
        """LightX2V's ``flagos`` platform: the machine's accelerator (FlagGems kernels through fl_patch)."""

        @staticmethod
        def init_device_env():
            backing().init_device_env()

        @staticmethod
        def is_available() -> bool:
            return backing().is_available()

        @staticmethod
        def get_device() -> str:
            return backing().get_device()

        @staticmethod
        def init_parallel_env():
            backing().init_parallel_env()

    FlagOSDevice.name = name
    FlagOSDevice.__module__ = __name__
    return FlagOSDevice


def _pick_device(registry):
    names = [n for n in ("cuda", *registry) if n in registry and n not in PLATFORM_NAMES]
    for name in dict.fromkeys(names):
        try:
            if registry[name].is_available():
                log.info("fl_patch: PLATFORM=flagos runs on LightX2V's %r device", name)
                return registry[name]
        except Exception as exc:  # a vendor's probe failing means "not this one"
            log.info("fl_patch: device %r not usable for PLATFORM=flagos: %s", name, exc)
    if "cuda" in registry:
        return registry["cuda"]
    raise RuntimeError(f"PLATFORM=flagos: no LightX2V device is registered (have {list(registry)})")


# ---------------------------------------------------------------------------------------------------------
# Attention: (T, H, D) varlen calls, output (rows, H * D)


@functools.lru_cache(maxsize=64)
def _cumulative(count: int, length: int, device) -> object:
    """int32 ``[0, length, 2 * length, ..., count * length]`` on `device`, cached (no copy per call)."""
    import torch

    return torch.arange(count + 1, dtype=torch.int32, device=device) * length


def _flash_inputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv):
    """flash_attn2/3's reading of a call as ``(q, k, v, cu_q, cu_kv, max_q, max_kv, batch)`` on ``(T, H, D)``
    tensors, or a reason: 3-D (or 4-D with one batch row) is one sequence; 4-D with more rows is flattened
    and split by the given cumulative lengths."""
    if q.dim() == 4 and q.shape[0] == 1 and k.dim() == 4 and v.dim() == 4:
        q, k, v = q[0], k[0], v[0]
    if q.dim() == 3:
        length_q, length_kv = q.shape[0], k.shape[0]
        cu_q, cu_kv = _cumulative(1, length_q, q.device), _cumulative(1, length_kv, k.device)
        return q, k, v, cu_q, cu_kv, length_q, length_kv, 1
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return "shape"
    if cu_seqlens_q is None or cu_seqlens_kv is None or max_seqlen_q is None or max_seqlen_kv is None:
        return "no cu_seqlens"
    flat = [t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v)]
    return (*flat, cu_seqlens_q.to(q.device), cu_seqlens_kv.to(k.device), max_seqlen_q, max_seqlen_kv, q.shape[0])


def _sage_inputs(q, k, v):
    """sage_attn2/3's reading: every batch row is one sequence (3-D: one row); cumulative lengths ignored.
    Same tuple as :func:`_flash_inputs`, or a reason."""
    if q.dim() == 3 and k.dim() == 3:
        batch, length_q, length_kv = 1, q.shape[0], k.shape[0]
    elif q.dim() == 4 and k.dim() == 4 and v.dim() == 4:
        batch, length_q, length_kv = q.shape[0], q.shape[1], k.shape[1]
        q, k, v = (t.reshape(-1, t.shape[-2], t.shape[-1]) for t in (q, k, v))
    else:
        return "shape"
    cu_q, cu_kv = _cumulative(batch, length_q, q.device), _cumulative(batch, length_kv, k.device)
    return q, k, v, cu_q, cu_kv, length_q, length_kv, batch


def _varlen_apply(form: str, original: Callable, rec, provider: str) -> Callable:
    """The replacement of a flash/sage ``apply`` (output ``(batch * max_seqlen_q, H * D)``). form: ``flash``
    (flash_attn2/3: reads ``causal`` and ``softmax_scale``), ``flash4`` (one batch row; keywords ignored) or
    ``sage`` (batch rows are sequences; keywords and cumulative lengths ignored; ``max_seqlen_q`` defaults
    to the sequence length)."""
    from fl_patch.kernels import attention

    kernel, unsupported = kernel_pair(attention, "varlen", provider, rec)
    reads_keywords = form == "flash"

    def apply(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None,
              **kwargs):
        causal = kwargs.get("causal", False) if reads_keywords else False
        scale = kwargs.get("softmax_scale") if reads_keywords else None
        if form == "sage":
            inputs = _sage_inputs(q, k, v)
        elif form == "flash4" and q.dim() == 4 and q.shape[0] != 1:
            inputs = "batch > 1"
        else:
            inputs = _flash_inputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv)
        if isinstance(inputs, str):
            reason = inputs
        elif max_seqlen_q is None and form != "sage":
            reason = "no max_seqlen_q"
        else:
            reason = unsupported(provider, inputs[0], inputs[1], inputs[2], causal, scale)
        if reason is None:
            q3, k3, v3, cu_q, cu_kv, max_q, max_kv, batch = inputs
            try:
                out = kernel(q3, k3, v3, cu_q, cu_kv, max_q, max_kv, causal, scale)
                return out.reshape(batch * (max_q if max_seqlen_q is None else max_seqlen_q), -1)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(self, q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv, **kwargs)

    return _replacement(apply, original)


def patch_flash_attn(module, ctx) -> None:
    """flash_attn2 / flash_attn3 (one sequence, or varlen for 4-D batches; ``causal``, ``softmax_scale``) and
    flash_attn4 (one sequence, keywords ignored) on the varlen kernel (bottom-right causal, as flash-attn)."""
    forms = {"flash_attn2": "flash", "flash_attn3": "flash", "flash_attn4": "flash4"}
    builders = {key: functools.partial(_build_varlen, form, ctx.provider) for key, form in forms.items()}
    _patch_keys(ctx, module, "ATTN_WEIGHT_REGISTER", builders)


def patch_sage_attn(module, ctx) -> None:
    """sage_attn2 / sage_attn3 on the varlen kernel. SageAttention quantises q/k/v; the kernel is exact, so
    results differ from upstream's by SageAttention's own error, not more."""
    builders = {key: functools.partial(_build_varlen, "sage", ctx.provider) for key in ("sage_attn2", "sage_attn3")}
    _patch_keys(ctx, module, "ATTN_WEIGHT_REGISTER", builders)


def _build_varlen(form, provider, cls, original, rec):
    return _varlen_apply(form, original, rec, provider)


def patch_torch_sdpa(module, ctx) -> None:
    """torch_sdpa: ``(q, k, v, drop_rate=0, attn_mask=None, causal=False, ...)`` on the sdpa kernel."""
    _patch_keys(ctx, module, "ATTN_WEIGHT_REGISTER",
                {"torch_sdpa": lambda cls, original, rec: _sdpa_apply(original, rec, ctx.provider)})


def _sdpa_apply(original: Callable, rec, provider: str) -> Callable:
    import torch

    from fl_patch.kernels import attention

    kernel, unsupported = kernel_pair(attention, "sdpa", provider, rec)

    def apply(self, q, k, v, drop_rate=0, attn_mask=None, causal=False, cu_seqlens_q=None, cu_seqlens_kv=None,
              max_seqlen_q=None, max_seqlen_kv=None, **kwargs):
        q4, k4, v4 = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)) if q.dim() == 3 else (q, k, v)
        query, key, value = q4.transpose(1, 2), k4.transpose(1, 2), v4.transpose(1, 2)
        mask = attn_mask
        if mask is not None and mask.dtype != torch.bool:
            mask = mask.to(query.dtype)
        reason = unsupported(provider, query, key, value, mask, drop_rate, causal, None, False)
        if reason is None:
            try:
                x = kernel(query, key, value, mask, drop_rate, causal, None, False).transpose(1, 2)
                return x.reshape(x.shape[0], x.shape[1], -1).squeeze(0)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(self, q, k, v, drop_rate, attn_mask, causal, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q,
                        max_seqlen_kv, **kwargs)

    return _replacement(apply, original)


def _torch_flash_attention(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None,
                           max_seqlen_kv=None, **kwargs):
    """flash_attn2's semantics in torch (per-sequence ``F.scaled_dot_product_attention``, bottom-right causal,
    grouped heads): the fallback of ``flagos_flash_attn``, which must not need flash-attn."""
    import torch
    import torch.nn.functional as F

    inputs = _flash_inputs(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv)
    if isinstance(inputs, str):
        raise ValueError(f"flagos_flash_attn: unsupported input ({inputs}): q {tuple(q.shape)}, k {tuple(k.shape)}")
    q3, k3, v3, cu_q, cu_kv, _, _, batch = inputs
    causal, scale = kwargs.get("causal", False), kwargs.get("softmax_scale")
    outputs = []
    if batch == 1:  # no device-to-host copy for the common one-sequence call
        bounds_q, bounds_kv = [0, q3.shape[0]], [0, k3.shape[0]]
    else:
        bounds_q, bounds_kv = cu_q.tolist(), cu_kv.tolist()
    for i in range(len(bounds_q) - 1):
        query = q3[bounds_q[i]:bounds_q[i + 1]].transpose(0, 1)
        key = k3[bounds_kv[i]:bounds_kv[i + 1]].transpose(0, 1)
        value = v3[bounds_kv[i]:bounds_kv[i + 1]].transpose(0, 1)
        length_q, length_kv = query.shape[1], key.shape[1]
        mask = None
        if causal:
            mask = torch.ones(length_q, length_kv, dtype=torch.bool, device=q3.device).tril(length_kv - length_q)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, scale=scale,
                                             enable_gqa=key.shape[0] != query.shape[0])
        outputs.append(out.transpose(0, 1))
    out = torch.cat(outputs, dim=0)
    rows = batch * max_seqlen_q if max_seqlen_q is not None else out.shape[0]
    return out.reshape(rows, -1)


def register_flagos_attention(module, ctx) -> None:
    """``flagos_flash_attn``: flash_attn2's semantics, constructor ``()``, torch attention as fallback."""
    registry = _registry(module, "ATTN_WEIGHT_REGISTER")
    base = getattr(module, "AttnWeightTemplate", None)
    if base is None:
        raise Skip(f"{module.__name__} has no AttnWeightTemplate (LightX2V changed?)")
    rec = ctx.record(f"{REGISTRY_MODULE}.ATTN_WEIGHT_REGISTER['flagos_flash_attn']", variant="flash_attn2")

    def __init__(self):
        self.config = {}

    apply = _torch_flash_attention
    if ctx.provider:
        apply = _varlen_apply("flash", _torch_flash_attention, rec, ctx.provider)
    cls = _subclass("FlagOSFlashAttnWeight", base, {"__init__": __init__, "apply": apply})
    _set_key(ctx, rec, registry, "ATTN_WEIGHT_REGISTER", "flagos_flash_attn", cls)


# ---------------------------------------------------------------------------------------------------------
# RMSNorm: seven keys, each with its own math. Form -> what the class computes (x: input, w: weight):
#   torch, self_forcing, qwen: normalise in fp32, cast to x's dtype, times w (HF's order)  -> kernel form "hf"
#   native, sgl, one_pass: normalise and times w in fp32, cast to x's dtype (F.rms_norm)    -> kernel form "torch"
#   fp32_variance: "hf" with a half-precision w of x's dtype, "torch" with an fp32 w
# torch and sgl take the kernel only without a sensitive-layer dtype (else they compute in x's dtype); qwen
# multiplies by self.weight (no diff tensor); sgl takes sgl_kernel's math even where upstream lacks sgl_kernel.
RMS_FORMS = {
    "torch": "torch",
    "torch_native": "native",
    "sgl-kernel": "sgl",
    "fp32_variance": "fp32_variance",
    "fp32_variance_qwen": "qwen",
    "self_forcing": "self_forcing",
    "one-pass": "one_pass",
}
_HF_FORMS = ("torch", "self_forcing", "qwen")
_SENSITIVE_FORMS = ("torch", "sgl")
_NORM_FORMS = ("torch", "self_forcing")  # forms whose original calls self._norm


def patch_rms_norm(module, ctx) -> None:
    """Each RMS_WEIGHT_REGISTER key of the module on the RMSNorm kernel with that key's math."""
    builders = {key: functools.partial(_build_rms, form, ctx.provider) for key, form in RMS_FORMS.items()}
    _patch_keys(ctx, module, "RMS_WEIGHT_REGISTER", builders)


def _build_rms(form, provider, cls, original, rec):
    if "apply" not in vars(cls):
        return "apply is inherited, not the key's own (LightX2V changed?)"
    if not hasattr(cls, "_get_actual_weight"):
        return "no _get_actual_weight (LightX2V changed?)"
    return _rms_apply(form, cls, original, rec, provider)


def _rms_apply(form: str, cls: type, original: Callable, rec, provider: str) -> Callable:
    import torch

    from fl_patch.kernels import rms_norm

    hf, hf_unsupported = kernel_pair(rms_norm, "hf", provider, rec)
    fused, fused_unsupported = kernel_pair(rms_norm, "torch", provider, rec)
    norm = getattr(cls, "_norm", None)
    half = (torch.float16, torch.bfloat16)

    def body(self, x):
        weight = self.weight if form == "qwen" else self._get_actual_weight()
        if weight is None:
            reason = "no weight"
        elif form in _SENSITIVE_FORMS and self.sensitive_layer_dtype != self.infer_dtype:
            reason = "sensitive dtype"
        elif form in _NORM_FORMS and getattr(type(self), "_norm", None) is not norm:
            reason = "overridden _norm"
        elif form in _HF_FORMS or (form == "fp32_variance" and weight.dtype in half and weight.dtype == x.dtype):
            reason = hf_unsupported(provider, x, weight)
            if reason is None:
                try:
                    return hf(x, weight, self.eps)
                except Exception as exc:
                    reason = kernel_failed(rec, exc)
        elif form == "fp32_variance" and weight.dtype != torch.float32:
            reason = "mixed dtypes" if weight.dtype in half else "weight dtype"
        else:
            shape = (x.shape[-1],)
            reason = fused_unsupported(provider, x, shape, weight)
            if reason is None:
                try:
                    return fused(x, shape, weight, self.eps)
                except Exception as exc:
                    reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(self, x)

    return _replacement(_one_tensor_method(body, original), original)


def _one_tensor_method(body: Callable, original: Callable) -> Callable:
    """``apply(self, <name>)`` calling ``body(self, tensor)``, with the original's parameter name (upstream uses
    ``input_tensor``, ``hidden_states`` and ``x``), so keyword calls keep working."""
    code = getattr(original, "__code__", None)
    name = code.co_varnames[1] if code is not None and code.co_argcount == 2 else "input_tensor"
    if name == "hidden_states":
        def apply(self, hidden_states):
            return body(self, hidden_states)
    elif name == "x":
        def apply(self, x):
            return body(self, x)
    else:
        def apply(self, input_tensor):
            return body(self, input_tensor)
    return apply


def register_flagos_rms_norm(module, ctx) -> None:
    """``flagos_rms_norm``: the ``torch`` key's class (upstream constructor, LoRA/diff tensors) on the kernel."""
    _register_flagos(ctx, module, "RMS_WEIGHT_REGISTER", "torch", "flagos_rms_norm", "FlagOSRmsNormWeight",
                     lambda base, original, rec: _rms_apply("torch", base, original, rec, ctx.provider))


# ---------------------------------------------------------------------------------------------------------
# LayerNorm: both classes are named LNWeight; reached through the registry.
#   torch: F.layer_norm in x's dtype (under a sensitive-layer dtype: in fp32, then infer_dtype: fallback)
#   triton: fp32 math, x's dtype out, 2-D input only (the original raises otherwise: fallback)
LN_FORMS = {"torch": "torch", "Triton": "triton"}


def patch_layer_norm(module, ctx) -> None:
    """LN_WEIGHT_REGISTER 'torch' and 'Triton' on the LayerNorm kernel (one tensor out)."""
    builders = {key: functools.partial(_build_layer_norm, form, ctx.provider) for key, form in LN_FORMS.items()}
    _patch_keys(ctx, module, "LN_WEIGHT_REGISTER", builders)


def _build_layer_norm(form, provider, cls, original, rec):
    if not (hasattr(cls, "_get_actual_weight") and hasattr(cls, "_get_actual_bias")):
        return "no _get_actual_weight / _get_actual_bias (LightX2V changed?)"
    return _layer_norm_apply(form, original, rec, provider)


def _layer_norm_apply(form: str, original: Callable, rec, provider: str) -> Callable:
    from fl_patch.kernels import layer_norm

    kernel, unsupported = kernel_pair(layer_norm, "", provider, rec)

    def apply(self, input_tensor):
        if form == "torch" and self.sensitive_layer_dtype != self.infer_dtype:
            reason = "sensitive dtype"
        elif form == "triton" and input_tensor.dim() != 2:
            reason = "not 2-d"
        else:
            weight, bias = self._get_actual_weight(), self._get_actual_bias()
            shape = (input_tensor.shape[-1],)
            reason = unsupported(provider, input_tensor, shape, weight, bias)
            if reason is None:
                try:
                    return kernel(input_tensor, shape, weight, bias, self.eps)
                except Exception as exc:
                    reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(self, input_tensor)

    return _replacement(apply, original)


def register_flagos_layer_norm(module, ctx) -> None:
    """``flagos_layer_norm``: the ``torch`` key's LNWeight on the kernel."""
    _register_flagos(ctx, module, "LN_WEIGHT_REGISTER", "torch", "flagos_layer_norm", "FlagOSLayerNormWeight",
                     lambda base, original, rec: _layer_norm_apply("torch", original, rec, ctx.provider))


# ---------------------------------------------------------------------------------------------------------
# Rope: LightX2V's interleaved pairs (2j, 2j + 1) rotated by the complex [S, 1, D/2] cache, in fp32, out in
# x's dtype. chunked_rope calls its inner op's apply per chunk, so it is reached through the inner op.


def patch_torch_rope(module, ctx) -> None:
    """torch_complex_rope and torch_real_rope (both keep the complex cache) on the interleaved rope kernel."""
    builders = {key: functools.partial(_build_torch_rope, ctx.provider)
                for key in ("torch_complex_rope", "torch_real_rope")}
    _patch_keys(ctx, module, "ROPE_REGISTER", builders)


def _build_torch_rope(provider, cls, original, rec):
    return _torch_rope_apply(cls, original, rec, provider)


def _torch_rope_apply(cls: type, original: Callable, rec, provider: str) -> Callable:
    """``apply(q, k, freqs, **kwargs)`` of a class whose apply rotates q and k by ``apply_single``: the kernel
    for full-width rotation of ``[S, H, D]`` q/k by a complex ``[S, 1, D/2]`` cache, interleaved, fp32."""
    import torch

    from fl_patch.kernels import rope

    kernel, unsupported = kernel_pair(rope, "interleaved", provider, rec)
    apply_single = getattr(cls, "apply_single", None)

    def apply(self, q, k, freqs, **kwargs):
        rotary_dim = kwargs.get("rotary_dim")
        if self.layout != "interleaved":
            reason = "split_half layout"
        elif self.compute_dtype != torch.float32:
            reason = "compute dtype"
        elif rotary_dim is not None and rotary_dim != q.shape[-1]:
            reason = "partial rotary"
        elif getattr(type(self), "apply_single", None) is not apply_single:
            reason = "overridden apply_single"
        elif not (torch.is_tensor(freqs) and freqs.is_complex()):
            reason = "freqs not complex"
        else:
            reason = unsupported(provider, q, k, freqs)
            if reason is None:
                try:
                    return kernel(q, k, freqs)
                except Exception as exc:
                    reason = kernel_failed(rec, exc)
        rec.fallback(reason)
        return original(self, q, k, freqs, **kwargs)

    return _replacement(apply, original)


def register_flagos_rope(module, ctx) -> None:
    """``flagos_rope``: torch_complex_rope on the kernel, as the seed's (complex cache, no positions)."""
    _register_flagos(ctx, module, "ROPE_REGISTER", "torch_complex_rope", "flagos_rope", "FlagOSRope",
                     lambda base, original, rec: _torch_rope_apply(base, original, rec, ctx.provider))


def patch_flashinfer_rope(module, ctx) -> None:
    """flashinfer_rope: the prepared real ``[S, D]`` cache (cos | sin) plus positions, rotating q/k in place."""
    _patch_keys(ctx, module, "ROPE_REGISTER",
                {"flashinfer_rope": lambda cls, original, rec: _flashinfer_apply(cls, original, rec, ctx.provider)})


# (cache, positions, length, their versions, complex rows): one entry, replaced as a whole. The model passes the
# same prepared cache and positions to every layer, so the rows are gathered once per forward.
_rows_cache: tuple | None = None


def _complex_rows(cache, positions, length: int):
    """``cos + i sin`` of the cache rows the tokens use, as ``[length, 1, D/2]`` complex64 (cached)."""
    import torch

    global _rows_cache
    versions = tuple(None if t is None or t.is_inference() else t._version for t in (cache, positions))
    entry = _rows_cache
    if entry is not None and entry[0] is cache and entry[1] is positions and entry[2:4] == (length, versions):
        return entry[4]
    half = cache.shape[-1] // 2
    rows = cache[:length] if positions is None else cache.index_select(0, positions)
    value = torch.complex(rows[:, :half], rows[:, half:]).unsqueeze(1)
    _rows_cache = (cache, positions, length, versions, value)
    return value


def _positions_fit(positions, cache, length: int) -> bool:
    """Whether flashinfer would find one cache row per token: ``positions`` of shape ``(length,)``, or none and
    a cache of at least `length` rows."""
    if positions is None:
        return cache.shape[0] >= length
    return tuple(positions.shape) == (length,)


def _flashinfer_apply(cls: type, original: Callable, rec, provider: str) -> Callable:
    """FlashInferRope.apply: kernel on the rows picked by `positions`, written back into q/k as flashinfer does
    (for contiguous q/k the results are views of the inputs, which hold the rotated values)."""
    import torch

    from fl_patch.kernels import rope

    kernel, unsupported = kernel_pair(rope, "interleaved", provider, rec)
    overridable = {name: getattr(cls, name, None) for name in ("prepare_freqs", "_apply_eager")}

    def apply(self, q, k, freqs, positions=None, **kwargs):
        squeeze = q.dim() == 4 and q.shape[0] == 1 and k.dim() == 4 and k.shape[0] == 1
        q3, k3 = (q[0], k[0]) if squeeze else (q, k)
        freqs_cis = None
        if self.layout != "interleaved":
            reason = "split_half layout"
        elif any(getattr(type(self), name, None) is not seen for name, seen in overridable.items()):
            reason = "overridden prepare_freqs/_apply_eager"
        elif q3.dim() != 3 or k3.dim() != 3:
            reason = "shape"
        elif not (torch.is_tensor(freqs) and freqs.dtype == torch.float32 and freqs.dim() == 2
                  and freqs.shape[-1] == q3.shape[-1]):
            reason = "freqs not a prepared full-width cache"
        elif not _positions_fit(positions, freqs, q3.shape[0]):
            reason = "positions shape"
        else:
            freqs_cis = _complex_rows(freqs, positions, q3.shape[0])
            reason = unsupported(provider, q3, k3, freqs_cis)
        if reason is None:
            length, head_dim = q3.shape[0], q3.shape[-1]
            query = q3.reshape(length, -1).contiguous()
            key = k3.reshape(length, -1).contiguous()
            query_heads, key_heads = query.view(length, -1, head_dim), key.view(length, -1, head_dim)
            try:
                q_rot, k_rot = kernel(query_heads, key_heads, freqs_cis)
            except Exception as exc:  # nothing written yet: the original gets q and k as they came
                reason = kernel_failed(rec, exc)
            else:
                query_heads.copy_(q_rot)
                key_heads.copy_(k_rot)
                q_out, k_out = query.view_as(q3), key.view_as(k3)
                return (q_out.unsqueeze(0), k_out.unsqueeze(0)) if squeeze else (q_out, k_out)
        rec.fallback(reason)
        return original(self, q, k, freqs, positions, **kwargs)

    return _replacement(apply, original)


# ---------------------------------------------------------------------------------------------------------
# Linear: MMWeight keeps the checkpoint's [out, in] weight as a .t() view [in, out]; apply takes a 2-D input.


def patch_mm(module, ctx) -> None:
    """The ``Default`` scheme on the GEMM (``x @ weight (+ bias)``), LoRA branch kept. ``Default-ForceFp32``
    inherits this apply, which is right for it: its fp32 calls fall back under FlagGems (reason ``dtype
    float32``) and run the same mm under ``kernels="reference"``; its record says so."""
    provider = ctx.provider

    def force_fp32(cls, original, rec):
        if "apply" in vars(cls):
            return "has its own apply: left original"
        return "inherits the patched MMWeight.apply (its calls are counted there)"

    _patch_keys(ctx, module, "MM_WEIGHT_REGISTER",
                {"Default": lambda cls, original, rec: _build_mm(cls, original, rec, provider),
                 "Default-ForceFp32": force_fp32})


def _build_mm(cls, original, rec, provider):
    if not (hasattr(cls, "_get_actual_weight") and hasattr(cls, "_get_actual_bias")):
        return "no _get_actual_weight / _get_actual_bias (LightX2V changed?)"
    return _mm_apply(original, rec, provider)


def _mm_apply(original: Callable, rec, provider: str) -> Callable:
    from fl_patch.kernels import linear

    kernel, unsupported = kernel_pair(linear, "in_out", provider, rec)

    def apply(self, input_tensor):
        if input_tensor.dim() != 2:
            reason = "not 2-d"
        else:
            weight = self._get_actual_weight()
            bias = self._get_actual_bias() if getattr(self, "bias", None) is not None else None
            reason = unsupported(provider, input_tensor, weight, bias)
        if reason is None:
            try:
                output = kernel(input_tensor, weight, bias)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
            else:  # the LoRA branch is LightX2V's code, not the kernel: what it raises reaches the caller
                return output + self.apply_lora(input_tensor) if self.has_lora_branch else output
        rec.fallback(reason)
        return original(self, input_tensor)

    return _replacement(apply, original)


def register_flagos_mm(module, ctx) -> None:
    """Quant scheme ``flagos``: ``Default``'s MMWeight (weight stored transposed, LoRA, diff) on the kernel."""
    _register_flagos(ctx, module, "MM_WEIGHT_REGISTER", "Default", "flagos", "FlagOSMMWeight",
                     lambda base, original, rec: _mm_apply(original, rec, ctx.provider))


# ---------------------------------------------------------------------------------------------------------
# Quantised linear: flagos-fp8 / flagos-int8 load what LightX2V's per-channel schemes load (fp8-triton,
# int8-triton, fp8-vllm, fp8-sgl, ...: <prefix>.weight int8 / e4m3 [out, in], <prefix>.weight_scale [out, 1],
# the bias), through LightX2V's own MMWeightQuantTemplate, placed as fp8-triton places them (weight kept
# [out, in], bias float32) with the scale in float32 (FlagGems' scaled mm takes no other). apply: W8A8 with
# per-token dynamic activations (fl_patch.kernels.quant_linear), output in the infer dtype as fp8-triton's.

# key -> (kernel form, class name, LightX2V's loader of that checkpoint, schemes whose checkpoints it loads)
QUANT_SCHEMES = {
    "flagos-fp8": ("fp8", "FlagOSFp8MMWeight", "load_fp8_perchannel_sym", "fp8-triton, fp8-vllm, fp8-sgl"),
    "flagos-int8": ("int8", "FlagOSInt8MMWeight", "load_int8_perchannel_sym", "int8-triton, int8-vllm, int8-sgl"),
}
# The schemes _check_dit_quantized must accept: dit_quantized=true is how a config reaches any scheme other
# than Default (Wan's weights assert it), so without them flagos* configs could not build a model.
FLAGOS_SCHEMES = ("flagos", *QUANT_SCHEMES)


def register_flagos_fp8(module, ctx) -> None:
    """Quant scheme ``flagos-fp8``: per-channel fp8 weights, per-token fp8 activations, FlagGems' scaled mm."""
    _register_quant_mm(module, ctx, "flagos-fp8")


def register_flagos_int8(module, ctx) -> None:
    """Quant scheme ``flagos-int8``: per-channel int8 weights, per-token int8 activations, FlagGems' scaled mm."""
    _register_quant_mm(module, ctx, "flagos-int8")


def _register_quant_mm(module, ctx, key: str) -> None:
    form, class_name, loader, _ = QUANT_SCHEMES[key]
    registry = _registry(module, "MM_WEIGHT_REGISTER")
    base = getattr(module, "MMWeightQuantTemplate", None)
    if not isinstance(base, type) or not callable(getattr(base, loader, None)):
        raise Skip(f"{module.__name__} has no MMWeightQuantTemplate.{loader} (LightX2V changed?)")
    rec = ctx.record(f"{REGISTRY_MODULE}.MM_WEIGHT_REGISTER[{key!r}]", variant=form)
    namespace = {"__init__": _quant_init(base, loader), "load": _quant_load(base, key),
                 "apply": _quant_mm_apply(form, rec, ctx.provider)}
    _set_key(ctx, rec, registry, "MM_WEIGHT_REGISTER", key, _subclass(class_name, base, namespace))


def _quant_init(base: type, loader: str) -> Callable:
    def __init__(self, weight_name, bias_name=None, create_cuda_buffer=False, create_cpu_buffer=False,
                 lazy_load=False, lazy_load_file=None, is_post_adapter=False, lora_prefix="diffusion_model.blocks",
                 lora_path=""):
        base.__init__(self, weight_name, bias_name, create_cuda_buffer, create_cpu_buffer, lazy_load,
                      lazy_load_file, is_post_adapter, lora_prefix, lora_path)
        self.load_func = getattr(self, loader)  # what an auto-quant loader (weight_auto_quant) calls
        self.weight_need_transpose = False
        self.bias_force_fp32 = True
        self.scale_force_fp32 = True

    return __init__


def _quant_load(base: type, key: str) -> Callable:
    def load(self, weight_dict):
        """The template's load (LightX2V's placement and post-processing), after checking that `weight_dict`
        holds this layer's quantised weight and its per-channel scale."""
        if not (self.lazy_load or self.create_cuda_buffer or self.create_cpu_buffer):
            _check_quantized(key, self, weight_dict)
        base.load(self, weight_dict)

    return load


def _check_quantized(key: str, op, weight_dict) -> None:
    """Raise ValueError unless `weight_dict` holds `op`'s weight in the scheme's dtype with one scale per output
    channel. LightX2V's own schemes skip a missing scale silently and fail (or worse) at the first call; a
    missing weight is left to LightX2V's loader, which raises KeyError naming it."""
    import torch

    form, _, _, peers = QUANT_SCHEMES[key]
    weight = weight_dict.get(op.weight_name)
    if weight is None:
        return
    scale = weight_dict.get(op.weight_scale_name)
    dtype = torch.float8_e4m3fn if form == "fp8" else torch.int8
    layout = (f"{op.weight_name!r} as {str(dtype).removeprefix('torch.')} [out, in] with {op.weight_scale_name!r} "
              f"[out, 1], the checkpoints of {peers}")
    if weight.dtype != dtype or scale is None:
        found = f"a {str(weight.dtype).removeprefix('torch.')} weight" + ("" if scale is not None else " and no scale")
        raise ValueError(
            f"dit_quant_scheme {key!r} needs {layout}; found {found}. LightX2V does not quantise at load for these "
            f"schemes: convert the checkpoint first (LightX2V's tools/convert/converter.py --quantized "
            f"--linear_type {form}), or use a scheme for its dtype")
    if weight.dim() != 2 or scale.numel() != weight.shape[0]:
        raise ValueError(f"dit_quant_scheme {key!r} needs {layout}; found a weight of shape {tuple(weight.shape)} "
                         f"with {scale.numel()} scales (per-channel: one per output row)")


def _quant_mm_apply(form: str, rec, provider: str | None) -> Callable:
    """apply(input_tensor): the provider's W8A8 kernel, or the torch reference (dequantised product) for a call
    it can't take (counted), and the LoRA branch. Without a provider every call is the reference, counted."""
    from fl_patch.kernels import quant_linear

    reference = getattr(quant_linear, f"reference_{form}")
    kernel, unsupported = kernel_pair(quant_linear, form, provider, rec) if provider else (None, None)

    def apply(self, input_tensor):
        weight, scale, bias = self.weight, self.weight_scale, self._get_actual_bias()
        if kernel is None:
            reason = "no kernel provider"
        else:
            reason = unsupported(provider, input_tensor, weight, scale, bias, self.infer_dtype)
        output = None
        if reason is None:
            try:
                output = kernel(input_tensor, weight, scale, bias, self.infer_dtype)
            except Exception as exc:
                reason = kernel_failed(rec, exc)
        if output is None:
            rec.fallback(reason)
            output = reference(input_tensor, weight, scale, bias, self.infer_dtype)
        return output + self.apply_lora(input_tensor) if self.has_lora_branch else output

    return apply


def patch_dit_quant_check(module, ctx) -> None:
    """``BaseTransformerModel._check_dit_quantized`` accepts the flagos* schemes registered in
    ``MM_WEIGHT_REGISTER``; every other scheme goes to upstream's check (its hard-coded list)."""
    cls = getattr(module, "BaseTransformerModel", None)
    original = getattr(cls, "_check_dit_quantized", None)
    if original is None:
        raise Skip(f"{module.__name__} has no BaseTransformerModel._check_dit_quantized (LightX2V changed?)")
    rec = ctx.record(f"{module.__name__}.BaseTransformerModel._check_dit_quantized", variant="flagos")

    def _check_dit_quantized(self):
        scheme = self.config.get("dit_quant_scheme", "Default")
        registry = sys.modules.get(REGISTRY_MODULE)
        if scheme in FLAGOS_SCHEMES and registry is not None and scheme in registry.MM_WEIGHT_REGISTER:
            return
        return original(self)

    ctx.setattr(rec, cls, "_check_dit_quantized", like(_check_dit_quantized, original))
