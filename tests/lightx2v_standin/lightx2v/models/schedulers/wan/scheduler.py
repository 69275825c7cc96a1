"""Wan's flow-matching UniPC scheduler (upstream ``lightx2v/models/schedulers/wan/scheduler.py``), first step.

``prepare(seed, latent_shape)`` draws float32 latents on ``AI_DEVICE`` from a generator seeded with `seed` and
sets ``infer_steps`` shifted sigmas (``sample_shift``) and their int64 timesteps; ``step_pre(i)`` sets
``timestep_input``; after the model's ``infer`` has set ``noise_pred``, ``step_post()`` moves the latents one
step: the data prediction ``x0 = x - sigma * noise_pred`` and UniPC's first-order predictor
``x' = sigma'/sigma * x - alpha' * expm1(-h) * x0`` (``h`` the log-SNR step). Only that first step (no
earlier model output, no corrector) is reproduced: later steps raise NotImplementedError. Image-conditioned
latent prefixes are not reproduced either.
"""

import numpy as np
import torch

from lightx2v.models.schedulers.scheduler import BaseScheduler
from lightx2v_platform.base.global_var import AI_DEVICE

__all__ = ["WanScheduler"]


class WanScheduler(BaseScheduler):
    def __init__(self, config):
        super().__init__(config)
        self.infer_steps = config["infer_steps"]
        self.target_video_length = config["target_video_length"]
        self.sample_shift = config["sample_shift"]
        self.patch_size = (1, 2, 2)
        self.shift = 1
        self.num_train_timesteps = 1000
        self.solver_order = 2
        self.noise_pred = None
        self.sample_guide_scale = config["sample_guide_scale"]

    def prepare(self, seed, latent_shape, image_encoder_output=None):
        self.prepare_latents(seed, latent_shape, dtype=torch.float32)
        alphas = np.linspace(1, 1 / self.num_train_timesteps, self.num_train_timesteps)[::-1].copy()
        sigmas = torch.from_numpy(1.0 - alphas).to(torch.float32)
        sigmas = self.shift * sigmas / (1 + (self.shift - 1) * sigmas)
        self.sigma_min, self.sigma_max = sigmas[-1].item(), sigmas[0].item()
        self.model_outputs = [None] * self.solver_order
        self.set_timesteps(self.infer_steps, device=AI_DEVICE, shift=self.sample_shift)

    def prepare_latents(self, seed, latent_shape, dtype=torch.float32):
        if self.generator is None:
            self.generator = torch.Generator(device=AI_DEVICE).manual_seed(seed)
        self.latents = torch.randn(*latent_shape[:4], dtype=dtype, device=AI_DEVICE, generator=self.generator)

    def set_timesteps(self, infer_steps=None, device=None, sigmas=None, mu=None, shift=None):
        sigmas = np.linspace(self.sigma_max, self.sigma_min, infer_steps + 1).copy()[:-1]
        shift = self.shift if shift is None else shift
        sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
        self.timesteps = torch.from_numpy(sigmas * self.num_train_timesteps).to(device=device, dtype=torch.int64)
        self.sigmas = torch.from_numpy(np.concatenate([sigmas, [0]]).astype(np.float32))
        self.lower_order_nums = 0
        self.last_sample = None

    def step_pre(self, step_index):
        super().step_pre(step_index)
        self.timestep_input = torch.stack([self.timesteps[self.step_index]])

    def step_post(self):
        if self.lower_order_nums or self.last_sample is not None:
            raise NotImplementedError("the stand-in WanScheduler reproduces the first step only")
        sample = self.latents.to(torch.float32)
        sigma_s0, sigma_t = self.sigmas[self.step_index], self.sigmas[self.step_index + 1]
        alpha_s0, alpha_t = 1 - sigma_s0, 1 - sigma_t
        x0 = sample - sigma_s0 * self.noise_pred.to(torch.float32)
        h = (torch.log(alpha_t) - torch.log(sigma_t)) - (torch.log(alpha_s0) - torch.log(sigma_s0))
        self.last_sample = sample
        self.lower_order_nums = 1
        self.latents = (sigma_t / sigma_s0 * sample - alpha_t * torch.expm1(-h) * x0).to(sample.dtype)
