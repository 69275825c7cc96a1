"""Wan's transformer blocks (upstream ``wan/infer/transformer_infer.py``), text-to-video, one device.

Per block, with ``(shift, scale, gate) x 2`` from ``modulation + embed0``: self-attention on the modulated
``norm1(x)`` (q/k RMSNorm, rope, ``self_attn_1``, ``o``), ``x += o * gate``; cross-attention of ``norm3(x)``
to the text context (``cross_attn_1``), ``x += o``; the FFN on the modulated ``norm2(x)`` (``ffn_0``, gelu
tanh, ``ffn_2``), ``x += y * c_gate``. Then the head's LayerNorm, its two-way modulation and ``head``.
Attention ops get ``(T, H, D)`` tensors and CPU int32 ``[0, T]`` cumulative lengths by keyword, as upstream.
The modulation is ``x * (1 + scale) + shift`` (upstream's Triton kernel for it is not reproduced), under a
sensitive-layer dtype in that dtype. Image cross-attention, sequence parallelism, offload, the MXFP8 fusions,
the Sol-Attn reordering and the post adapters are not reproduced.
"""

import torch

from lightx2v.common.transformer_infer.transformer_infer import BaseTransformerInfer
from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE

__all__ = ["WanTransformerInfer", "modulate"]


def modulate(x, scale, shift):
    return x * (1 + scale.squeeze()) + shift.squeeze()


class WanTransformerInfer(BaseTransformerInfer):
    def __init__(self, config):
        if config["seq_parallel"] or config.get("tensor_parallel", False):
            raise NotImplementedError("the stand-in Wan model runs on one device")
        self.config = config
        self.task = config["task"]
        self.seq_parallel = False
        self.has_image_context = False
        self.blocks_num = config["num_layers"]
        self.phases_num = 3
        self.num_heads = config["num_heads"]
        self.head_dim = config["dim"] // config["num_heads"]
        self.modulate_func = modulate
        self.clean_cuda_cache = config.get("clean_cuda_cache", False)
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()
        self.infer_func = self.infer_without_offload
        self.cos_sin = None
        self.rope_positions = None
        self.init_compile(config)

    def reset_infer_states(self, x, context):
        self.self_attn_cu_seqlens_qkv = torch.tensor([0, x.shape[0]], dtype=torch.int32)
        self.cross_attn_cu_seqlens_q = torch.tensor([0, x.shape[0]], dtype=torch.int32)
        self.cross_attn_cu_seqlens_kv = torch.tensor([0, context.shape[0]], dtype=torch.int32)

    @torch.no_grad()
    def infer(self, weights, pre_infer_out):
        self.cos_sin = pre_infer_out.cos_sin
        self.rope_positions = pre_infer_out.rope_positions
        self.reset_infer_states(pre_infer_out.x, pre_infer_out.context)
        x = self.infer_main_blocks(weights.blocks, pre_infer_out)
        return self.infer_non_blocks(weights, x, pre_infer_out.embed)

    def infer_main_blocks(self, blocks, pre_infer_out):
        return self.infer_func(blocks, pre_infer_out.x, pre_infer_out)

    def infer_without_offload(self, blocks, x, pre_infer_out):
        for block_idx, block in enumerate(blocks):
            self.block_idx = block_idx
            x = self.run_block(block_idx, block, x, pre_infer_out)
        return x

    def infer_non_blocks(self, weights, x, e):
        e = (weights.head_modulation.tensor + e.unsqueeze(1)).chunk(2, dim=1)
        x = weights.norm.apply(x)
        if self.sensitive_layer_dtype != self.infer_dtype:
            x = x.to(self.sensitive_layer_dtype)
        x.mul_(1 + e[1].squeeze()).add_(e[0].squeeze())
        if self.sensitive_layer_dtype != self.infer_dtype:
            x = x.to(self.infer_dtype)
        return weights.head.apply(x)

    def infer_block(self, block, x, pre_infer_out):
        shift_msa, scale_msa, gate_msa, c_shift_msa, c_scale_msa, c_gate_msa = self.pre_process(
            block.compute_phases[0].modulation, pre_infer_out.embed0)
        y_out = self.infer_self_attn(block.compute_phases[0], x, shift_msa, scale_msa,
                                     grid_sizes=pre_infer_out.grid_sizes.tuple)
        x, attn_out = self.infer_cross_attn(block.compute_phases[1], x, pre_infer_out.context, y_out, gate_msa)
        y = self.infer_ffn(block.compute_phases[2], x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa)
        return self.post_process(x, y, c_gate_msa, pre_infer_out)

    def pre_process(self, modulation, embed0):
        return (modulation.tensor + embed0).chunk(6, dim=1)

    def _modulated(self, norm, x, scale, shift):
        out = norm.apply(x)
        if self.sensitive_layer_dtype != self.infer_dtype:
            out = out.to(self.sensitive_layer_dtype)
        out = self.modulate_func(out, scale=scale, shift=shift).squeeze()
        return out.to(self.infer_dtype) if self.sensitive_layer_dtype != self.infer_dtype else out

    def infer_self_attn(self, phase, x, shift_msa, scale_msa, grid_sizes=None):
        norm1_out = self._modulated(phase.norm1, x, scale_msa, shift_msa)
        s, n, d = norm1_out.shape[0], self.num_heads, self.head_dim
        q = phase.self_attn_norm_q.apply(phase.self_attn_q.apply(norm1_out)).view(s, n, d)
        k = phase.self_attn_norm_k.apply(phase.self_attn_k.apply(norm1_out)).view(s, n, d)
        v = phase.self_attn_v.apply(norm1_out).view(s, n, d)
        if self.rope_positions is None:
            q, k = phase.rope.apply(q, k, self.cos_sin)
        else:
            q, k = phase.rope.apply(q, k, self.cos_sin, positions=self.rope_positions)
        attn_out = phase.self_attn_1.apply(
            q=q, k=k, v=v, cu_seqlens_q=self.self_attn_cu_seqlens_qkv, cu_seqlens_kv=self.self_attn_cu_seqlens_qkv,
            max_seqlen_q=q.shape[0], max_seqlen_kv=q.shape[0], block_idx=self.block_idx, scheduler=self.scheduler,
            grid_sizes=grid_sizes, sol_morton_preordered=False)
        return phase.self_attn_o.apply(attn_out)

    def infer_cross_attn(self, phase, x, context, y_out, gate_msa):
        if self.sensitive_layer_dtype != self.infer_dtype:
            x = x.to(self.sensitive_layer_dtype) + y_out.to(self.sensitive_layer_dtype) * gate_msa.squeeze()
            context = context.to(self.infer_dtype)
        else:
            x.add_(y_out * gate_msa.squeeze())
        norm3_out = phase.norm3.apply(x)
        n, d = self.num_heads, self.head_dim
        q = phase.cross_attn_norm_q.apply(phase.cross_attn_q.apply(norm3_out)).view(-1, n, d)
        k = phase.cross_attn_norm_k.apply(phase.cross_attn_k.apply(context)).view(-1, n, d)
        v = phase.cross_attn_v.apply(context).view(-1, n, d)
        attn_out = phase.cross_attn_1.apply(
            q=q, k=k, v=v, cu_seqlens_q=self.cross_attn_cu_seqlens_q, cu_seqlens_kv=self.cross_attn_cu_seqlens_kv,
            max_seqlen_q=q.size(0), max_seqlen_kv=k.size(0))
        return x, phase.cross_attn_o.apply(attn_out)

    def infer_ffn(self, phase, x, attn_out, c_shift_msa, c_scale_msa, c_gate_msa=None):
        x.add_(attn_out)
        norm2_out = self._modulated(phase.norm2, x, c_scale_msa, c_shift_msa)
        y = torch.nn.functional.gelu(phase.ffn_0.apply(norm2_out), approximate="tanh")
        return phase.ffn_2.apply(y)

    def post_process(self, x, y, c_gate_msa, pre_infer_out=None):
        if self.sensitive_layer_dtype != self.infer_dtype:
            return x.to(self.sensitive_layer_dtype) + y.to(self.sensitive_layer_dtype) * c_gate_msa.squeeze()
        return x.add_(y * c_gate_msa.squeeze())
