"""Wan2.1 DiT configs and random checkpoints in the layout LightX2V loads (no download), for the CPU tests and
tests/gpu/lightx2v_quant_gpu.py.

A checkpoint is a dict of upstream's tensor names: ``patch_embedding``, ``text_embedding.{0,2}``,
``time_embedding.{0,2}``, ``time_projection.1``, ``blocks.<i>.{modulation, self_attn.*, cross_attn.*, norm3,
ffn.{0,2}}``, ``head.{head, modulation}``. ``quantize="int8"`` / ``"fp8"`` writes what LightX2V's converter
(``tools/convert/converter.py --quantized --linear_type int8|fp8 --model_type wan_dit``) writes: each 2-D
weight under ``self_attn`` / ``cross_attn`` / ``ffn`` of a block becomes ``<name>.weight`` int8 / e4m3 with
``<name>.weight_scale`` ``[out, 1]`` (``max|w| / qmax`` per output row; int8 rounded, fp8 clipped then
rounded to nearest), every other tensor stays bf16.
"""

from __future__ import annotations

import re

import torch

# From the Wan2.1 T2V checkpoints' config.json (text_dim: the umT5-XXL encoder's width).
WAN_MODELS = {
    "1.3B": {"dim": 1536, "ffn_dim": 8960, "num_heads": 12, "num_layers": 30, "freq_dim": 256, "in_dim": 16,
             "out_dim": 16, "text_len": 512, "text_dim": 4096},
    "14B": {"dim": 5120, "ffn_dim": 13824, "num_heads": 40, "num_layers": 40, "freq_dim": 256, "in_dim": 16,
            "out_dim": 16, "text_len": 512, "text_dim": 4096},
    "tiny": {"dim": 64, "ffn_dim": 128, "num_heads": 2, "num_layers": 2, "freq_dim": 16, "in_dim": 4, "out_dim": 4,
             "text_len": 8, "text_dim": 32},
}
NATIVE_KEYS = {"self_attn_1_type": "torch_sdpa", "cross_attn_1_type": "torch_sdpa", "cross_attn_2_type": "torch_sdpa",
               "rms_norm_type": "torch", "layer_norm_type": "torch", "rope_type": "torch_complex_rope",
               "dit_quant_scheme": "Default"}
FLAGOS_KEYS = {"self_attn_1_type": "flagos_flash_attn", "cross_attn_1_type": "flagos_flash_attn",
               "cross_attn_2_type": "flagos_flash_attn", "rms_norm_type": "flagos_rms_norm",
               "layer_norm_type": "flagos_layer_norm", "rope_type": "flagos_rope", "dit_quant_scheme": "flagos"}
QUANTIZED_LINEAR = re.compile(r"blocks\.\d+\.(self_attn|cross_attn|ffn)\.[^.]+\.weight$")


def gemm_shapes(model: str, tokens: int) -> dict[str, tuple[int, int, int]]:
    """The distinct ``(M, K, N)`` GEMMs of one Wan2.1 block at `tokens` video tokens (text context: text_len)."""
    m = WAN_MODELS[model]
    dim, ffn, text = m["dim"], m["ffn_dim"], m["text_len"]
    return {"attn q/k/v/o, cross q/o": (tokens, dim, dim), "cross k/v (text)": (text, dim, dim),
            "ffn.0": (tokens, dim, ffn), "ffn.2": (tokens, ffn, dim)}


def lightx2v_config(model: str, keys: dict, num_layers: int | None = None, **extra) -> dict:
    """LightX2V's runtime config for a text-to-video Wan2.1 run of `model` with op `keys`; a scheme other than
    ``Default`` sets ``dit_quantized`` (Wan's weights assert it)."""
    config = {k: v for k, v in WAN_MODELS[model].items() if k != "text_dim"}
    if num_layers is not None:
        config["num_layers"] = num_layers
    config.update(task="t2v", model_cls="wan2.1", seq_parallel=False, cfg_parallel=False, cpu_offload=False,
                  feature_caching="NoCaching", enable_cfg=False, infer_steps=50, target_video_length=81,
                  sample_shift=5.0, sample_guide_scale=5.0, **keys)
    config["dit_quantized"] = config["dit_quant_scheme"] != "Default"
    config.update(extra)
    return config


def per_channel(weight: torch.Tensor, quantize: str) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V's converter on one ``[out, in]`` weight: ``(q, scale [out, 1] float32)``."""
    dtype = torch.int8 if quantize == "int8" else torch.float8_e4m3fn
    qmax = 127.0 if quantize == "int8" else torch.finfo(dtype).max
    w = weight.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-5) / qmax
    scaled = (w / scale).clamp(-qmax, qmax)
    return (scaled.round().to(dtype) if quantize == "int8" else scaled.to(dtype)), scale


def checkpoint(model: str, num_layers: int | None = None, seed: int = 0, device="cpu") -> dict[str, torch.Tensor]:
    """Random bf16 weights of `model` with fan-in scaled linears, norm weights near 1 and small biases and
    modulations, so activations stay of order one through the blocks."""
    m = WAN_MODELS[model]
    dim, ffn, text_dim, freq, in_dim, out_dim = (m[k] for k in ("dim", "ffn_dim", "text_dim", "freq_dim", "in_dim",
                                                                 "out_dim"))
    gen = torch.Generator(device=device).manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(torch.bfloat16)

    tensors = {}

    def linear(name, out_features, in_features):
        tensors[f"{name}.weight"] = randn(out_features, in_features, scale=in_features**-0.5)
        tensors[f"{name}.bias"] = randn(out_features, scale=0.02)

    tensors["patch_embedding.weight"] = randn(dim, in_dim, 1, 2, 2, scale=(in_dim * 4) ** -0.5)
    tensors["patch_embedding.bias"] = randn(dim, scale=0.02)
    linear("text_embedding.0", dim, text_dim)
    linear("text_embedding.2", dim, dim)
    linear("time_embedding.0", dim, freq)
    linear("time_embedding.2", dim, dim)
    linear("time_projection.1", 6 * dim, dim)
    for i in range(m["num_layers"] if num_layers is None else num_layers):
        p = f"blocks.{i}"
        tensors[f"{p}.modulation"] = randn(1, 6, dim, scale=dim**-0.5)
        for attention in ("self_attn", "cross_attn"):
            for name in "qkvo":
                linear(f"{p}.{attention}.{name}", dim, dim)
            for name in ("norm_q", "norm_k"):
                tensors[f"{p}.{attention}.{name}.weight"] = (1 + randn(dim, scale=0.1).float()).to(torch.bfloat16)
        tensors[f"{p}.norm3.weight"] = (1 + randn(dim, scale=0.1).float()).to(torch.bfloat16)
        tensors[f"{p}.norm3.bias"] = randn(dim, scale=0.02)
        linear(f"{p}.ffn.0", ffn, dim)
        linear(f"{p}.ffn.2", dim, ffn)
    linear("head.head", out_dim * 4, dim)
    tensors["head.modulation"] = randn(1, 2, dim, scale=dim**-0.5)
    return tensors


def quantized(tensors: dict[str, torch.Tensor], quantize: str) -> dict[str, torch.Tensor]:
    """`tensors` as LightX2V's converter writes them for ``--linear_type <quantize>`` (see the module docstring)."""
    out = {}
    for name, tensor in tensors.items():
        if QUANTIZED_LINEAR.match(name) and tensor.dim() == 2:
            out[name], out[f"{name}_scale"] = per_channel(tensor, quantize)
        else:
            out[name] = tensor
    return out


def inputs(model: str, frames: int, height: int, width: int, seed: int = 0, device="cpu"):
    """``(latent_shape, text_encoder_output)``: a ``[in_dim, F, H, W]`` latent shape and a random bf16 umT5
    context ``[1, text_len, text_dim]`` (``context_null`` too)."""
    m = WAN_MODELS[model]
    gen = torch.Generator(device=device).manual_seed(seed + 1)
    context = [torch.randn(1, m["text_len"], m["text_dim"], generator=gen, device=device).to(torch.bfloat16)
               for _ in range(2)]
    return [m["in_dim"], frames, height, width], {"context": context[0], "context_null": context[1]}
