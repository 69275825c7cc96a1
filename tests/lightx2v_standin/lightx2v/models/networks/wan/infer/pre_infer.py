"""Wan's input step (upstream ``wan/infer/pre_infer.py``), text-to-video.

``infer(weights, inputs)`` reads the scheduler's ``latents`` ``[C, F, H, W]`` and ``timestep_input``, and the
text context ``inputs["text_encoder_output"]["context"]`` (``"context_null"`` for the unconditional pass):
patch embedding to ``(F*H/2*W/2, dim)`` tokens, the sinusoidal timestep embedding through the time MLP
(``embed``) and its six-way projection (``embed0``, ``[6, dim]``), the text MLP (gelu tanh), and the 3-D rope
cache of the token grid (complex ``[S, 1, head_dim/2]`` from frame, height and width frequencies), prepared
once per grid by the block's rope op (``prepare_freqs`` / ``prepare_positions``). Image conditioning, dynamic
CFG, mean-flow distillation and sequence parallelism are not reproduced.
"""

import torch

from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE
from lightx2v_platform.base.global_var import AI_DEVICE

from .module_io import GridOutput, WanPreInferModuleOutput
from .utils import sinusoidal_embedding_1d

__all__ = ["WanPreInfer"]


class WanPreInfer:
    def __init__(self, config):
        assert (config["dim"] % config["num_heads"]) == 0 and (config["dim"] // config["num_heads"]) % 2 == 0
        self.config = config
        self.rope = None
        self.task = config["task"]
        self.freq_dim = config["freq_dim"]
        self.dim = config["dim"]
        self.infer_dtype = GET_DTYPE()
        self.sensitive_layer_dtype = GET_SENSITIVE_DTYPE()
        self.cos_sin = None
        self.rope_positions = None
        self.grid_sizes = (0, 0, 0)
        self.head_size = config["dim"] // config["num_heads"]
        d = self.head_size
        self.freqs = torch.cat([self.rope_params(1024, d - 4 * (d // 6)), self.rope_params(1024, 2 * (d // 6)),
                                self.rope_params(1024, 2 * (d // 6))], dim=1).to(torch.device(AI_DEVICE))

    def rope_params(self, max_seq_len, dim, theta=10000):
        assert dim % 2 == 0
        angles = torch.outer(torch.arange(max_seq_len),
                             1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float32).div(dim)))
        return torch.polar(torch.ones_like(angles), angles)

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler

    def set_rope(self, rope):
        self.rope = rope
        self.cos_sin = None
        self.rope_positions = None
        self.grid_sizes = (0, 0, 0)

    def prepare_rope_cache(self, freqs):
        freqs = self.rope.prepare_freqs(freqs, rotary_dim=self.head_size)
        self.rope_positions = self.rope.prepare_positions(freqs)
        return freqs

    def prepare_cos_sin(self, grid_sizes, freqs):
        c = self.head_size // 2
        freqs = freqs.split([c - 2 * (c // 3), c // 3, c // 3], dim=1)
        f, h, w = grid_sizes
        cos_sin = torch.cat([freqs[0][:f].view(f, 1, 1, -1).expand(f, h, w, -1),
                             freqs[1][:h].view(1, h, 1, -1).expand(f, h, w, -1),
                             freqs[2][:w].view(1, 1, w, -1).expand(f, h, w, -1)], dim=-1)
        return cos_sin.reshape(f * h * w, 1, -1)

    @torch.no_grad()
    def infer(self, weights, inputs, kv_start=0, kv_end=0):
        x = self.scheduler.latents
        t = self.scheduler.timestep_input
        context = inputs["text_encoder_output"]["context" if self.scheduler.infer_condition else "context_null"]
        sensitive = self.sensitive_layer_dtype != self.infer_dtype

        x = weights.patch_embedding.apply(x.unsqueeze(0))
        grid_t, grid_h, grid_w = x.shape[2:]
        x = x.flatten(2).transpose(1, 2).squeeze(0).contiguous()

        embed = sinusoidal_embedding_1d(self.freq_dim, t.flatten())
        embed = weights.time_embedding_0.apply(embed.to(self.sensitive_layer_dtype) if sensitive else embed)
        embed = weights.time_embedding_2.apply(torch.nn.functional.silu(embed))
        embed0 = weights.time_projection_1.apply(torch.nn.functional.silu(embed)).unflatten(1, (6, self.dim))

        context = context.squeeze(0)
        out = weights.text_embedding_0.apply(context.to(self.sensitive_layer_dtype) if sensitive else context)
        context = weights.text_embedding_2.apply(torch.nn.functional.gelu(out, approximate="tanh"))

        grid = (grid_t, grid_h, grid_w)
        grid_sizes = GridOutput(tensor=torch.tensor([grid], dtype=torch.int32, device=x.device), tuple=grid)
        if self.cos_sin is None or self.grid_sizes != grid:
            self.grid_sizes = grid
            self.cos_sin = self.prepare_rope_cache(self.prepare_cos_sin(grid, self.freqs.clone()))
        return WanPreInferModuleOutput(embed=embed, grid_sizes=grid_sizes, x=x, embed0=embed0.squeeze(0),
                                       context=context, cos_sin=self.cos_sin, rope_positions=self.rope_positions,
                                       adapter_args={"motion_vec": None})
