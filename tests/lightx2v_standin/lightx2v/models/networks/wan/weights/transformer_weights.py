"""Wan's transformer blocks and head (upstream ``wan/weights/transformer_weights.py``), text-to-video.

``WanTransformerWeights(config)`` holds ``num_layers`` blocks, each three phases of ops built from the
registries by the config's keys, with upstream's weight names (``blocks.<i>.self_attn.q.weight``, ...):

- ``WanSelfAttention``: ``rope`` (``rope_type``, default ``flashinfer_rope``; wrapped in ``chunked_rope`` with
  ``rope_chunk``), ``modulation`` (tensor ``blocks.<i>.modulation`` ``[1, 6, dim]``), ``norm1`` (LayerNorm
  without weight), ``self_attn_q/k/v/o`` (``dit_quant_scheme``), ``self_attn_norm_q/k`` (``rms_norm_type``,
  default ``sgl-kernel``), ``self_attn_1`` (``self_attn_1_type``);
- ``WanCrossAttention``: ``norm3`` (LayerNorm with ``blocks.<i>.norm3.weight/bias``), ``cross_attn_q/k/v/o``,
  ``cross_attn_norm_q/k``, ``cross_attn_1`` (``cross_attn_1_type``);
- ``WanFFN``: ``norm2`` (LayerNorm without weight), ``ffn_0`` and ``ffn_2``.

Then ``norm`` (LayerNorm without weight), ``head`` (always ``Default``: ``head.head.weight/bias``) and
``head_modulation`` (tensor ``head.modulation``). A scheme other than ``Default`` needs ``dit_quantized``
(asserted, as upstream). Offload buffers, tensor parallelism, image cross-attention and the advanced-PTQ
smoothing tensors are not reproduced.
"""

import torch

from lightx2v.common.modules.weight_module import WeightModule, WeightModuleList
from lightx2v.utils.registry_factory import (
    ATTN_WEIGHT_REGISTER,
    LN_WEIGHT_REGISTER,
    MM_WEIGHT_REGISTER,
    RMS_WEIGHT_REGISTER,
    ROPE_REGISTER,
    TENSOR_REGISTER,
)

__all__ = ["WanTransformerWeights", "WanTransformerAttentionBlock", "WanSelfAttention", "WanCrossAttention", "WanFFN"]


def _mm_weight(config, weight_name, bias_name, lora_prefix="", lora_path="", mm_type_override=None):
    mm_type = mm_type_override or config.get("dit_quant_scheme", "Default")
    return MM_WEIGHT_REGISTER[mm_type](weight_name, bias_name, False, False, False, None, lora_prefix=lora_prefix,
                                       lora_path=lora_path)


def _rms_weight(config, weight_name, lora_prefix="", lora_path=""):
    return RMS_WEIGHT_REGISTER[config.get("rms_norm_type", "sgl-kernel")](
        weight_name, False, False, False, None, lora_prefix=lora_prefix, lora_path=lora_path)


class WanTransformerWeights(WeightModule):
    def __init__(self, config, lazy_load_path=None, lora_path=None):
        super().__init__()
        self.blocks_num = config["num_layers"]
        self.task = config["task"]
        self.config = config
        self.mm_type = config.get("dit_quant_scheme", "Default")
        if self.mm_type != "Default":
            assert config.get("dit_quantized") is True
        self.lazy_load = False
        self.blocks = WeightModuleList([
            WanTransformerAttentionBlock(i, self.task, self.mm_type, config, block_prefix="blocks", lora_path=lora_path)
            for i in range(self.blocks_num)])
        self.add_module("blocks", self.blocks)
        self.register_parameter("norm", LN_WEIGHT_REGISTER[config.get("layer_norm_type", "torch")]())
        self.add_module("head", MM_WEIGHT_REGISTER["Default"]("head.head.weight", "head.head.bias",
                                                              lora_prefix="diffusion_model.head"))
        self.register_parameter("head_modulation", TENSOR_REGISTER["Default"]("head.modulation"))


class WanTransformerAttentionBlock(WeightModule):
    def __init__(self, block_index, task, mm_type, config, create_cuda_buffer=False, create_cpu_buffer=False,
                 block_prefix="blocks", lazy_load=False, lazy_load_path=None, lora_path=None):
        super().__init__()
        self.block_index, self.mm_type, self.task, self.config = block_index, mm_type, task, config
        phases = [phase(block_index, block_prefix, task, mm_type, config, lora_path=lora_path)
                  for phase in (WanSelfAttention, WanCrossAttention, WanFFN)]
        self.compute_phases = WeightModuleList(phases)
        self.add_module("compute_phases", self.compute_phases)


class WanSelfAttention(WeightModule):
    def __init__(self, block_index, block_prefix, task, mm_type, config, create_cuda_buffer=False,
                 create_cpu_buffer=False, lazy_load=False, lazy_load_file=None, lora_path=None):
        super().__init__()
        self.block_index, self.mm_type, self.task, self.config = block_index, mm_type, task, config
        p = f"{block_prefix}.{block_index}"
        rope = ROPE_REGISTER[config.get("rope_type", "flashinfer_rope")](layout="interleaved",
                                                                         compute_dtype=torch.float32)
        if config.get("rope_chunk", False):
            rope = ROPE_REGISTER["chunked_rope"](inner=rope, chunk_size=config.get("rope_chunk_size", 100))
        self.add_module("rope", rope)
        self.add_module("modulation", TENSOR_REGISTER["Default"](f"{p}.modulation"))
        self.add_module("norm1", LN_WEIGHT_REGISTER[config.get("layer_norm_type", "torch")]())
        for name in ("q", "k", "v", "o"):
            self.add_module(f"self_attn_{name}", _mm_weight(config, f"{p}.self_attn.{name}.weight",
                                                            f"{p}.self_attn.{name}.bias", block_prefix, lora_path))
        for name in ("q", "k"):
            self.add_module(f"self_attn_norm_{name}",
                            _rms_weight(config, f"{p}.self_attn.norm_{name}.weight", block_prefix, lora_path))
        self.add_module("self_attn_1", ATTN_WEIGHT_REGISTER[config["self_attn_1_type"]]())


class WanCrossAttention(WeightModule):
    def __init__(self, block_index, block_prefix, task, mm_type, config, create_cuda_buffer=False,
                 create_cpu_buffer=False, lazy_load=False, lazy_load_file=None, lora_path=None):
        super().__init__()
        self.block_index, self.mm_type, self.task, self.config = block_index, mm_type, task, config
        p = f"{block_prefix}.{block_index}"
        self.add_module("norm3", LN_WEIGHT_REGISTER[config.get("layer_norm_type", "torch")](
            f"{p}.norm3.weight", f"{p}.norm3.bias", False, False, False, None, lora_prefix=block_prefix,
            lora_path=lora_path))
        for name in ("q", "k", "v", "o"):
            self.add_module(f"cross_attn_{name}", _mm_weight(config, f"{p}.cross_attn.{name}.weight",
                                                             f"{p}.cross_attn.{name}.bias", block_prefix, lora_path))
        for name in ("q", "k"):
            self.add_module(f"cross_attn_norm_{name}",
                            _rms_weight(config, f"{p}.cross_attn.norm_{name}.weight", block_prefix, lora_path))
        self.add_module("cross_attn_1", ATTN_WEIGHT_REGISTER[config["cross_attn_1_type"]]())


class WanFFN(WeightModule):
    def __init__(self, block_index, block_prefix, task, mm_type, config, create_cuda_buffer=False,
                 create_cpu_buffer=False, lazy_load=False, lazy_load_file=None, lora_path=None):
        super().__init__()
        self.block_index, self.mm_type, self.task, self.config = block_index, mm_type, task, config
        p = f"{block_prefix}.{block_index}"
        self.add_module("norm2", LN_WEIGHT_REGISTER[config.get("layer_norm_type", "torch")]())
        for name in ("0", "2"):
            self.add_module(f"ffn_{name}", _mm_weight(config, f"{p}.ffn.{name}.weight", f"{p}.ffn.{name}.bias",
                                                      block_prefix, lora_path))
