"""The Wan DiT (upstream ``lightx2v/models/networks/wan/model.py``): text-to-video, one device.

``WanModel(model_path, config, device)`` reads the checkpoint under ``model_path`` (see ``base_model``), builds
``WanPreWeights`` and ``WanTransformerWeights`` from the config (op keys ``self_attn_1_type``,
``cross_attn_1_type``, ``rms_norm_type``, ``layer_norm_type``, ``rope_type``, ``dit_quant_scheme``), loads
them, and builds ``WanPreInfer`` / ``WanTransformerInfer`` / ``WanPostInfer``. After ``set_scheduler``,
``infer(inputs)`` sets the scheduler's ``noise_pred`` (guided when ``enable_cfg``). On the stand-in's CPU
device the weights stay pinned until ``to_cuda()``. Feature caching, offload, parallelism and the adapter
variants are not reproduced.
"""

import torch

from lightx2v.models.networks.base_model import BaseTransformerModel
from lightx2v.models.networks.wan.infer.post_infer import WanPostInfer
from lightx2v.models.networks.wan.infer.pre_infer import WanPreInfer
from lightx2v.models.networks.wan.infer.transformer_infer import WanTransformerInfer
from lightx2v.models.networks.wan.weights.pre_weights import WanPreWeights
from lightx2v.models.networks.wan.weights.transformer_weights import WanTransformerWeights

__all__ = ["WanModel"]


class WanModel(BaseTransformerModel):
    pre_weight_class = WanPreWeights
    transformer_weight_class = WanTransformerWeights

    def __init__(self, model_path, config, device, model_type="wan2.1", lora_path=None, lora_strength=1.0):
        super().__init__(model_path, config, device, model_type, lora_path, lora_strength)
        self.sensitive_layer = {"norm", "embedding", "modulation", "time", "img_emb.proj.0", "img_emb.proj.4",
                                "before_proj", "after_proj"}
        self._init_infer_class()
        self._init_weights()
        self._init_infer()

    def _init_infer_class(self):
        if self.config["feature_caching"] != "NoCaching":
            raise NotImplementedError(f"the stand-in has no feature caching ({self.config['feature_caching']!r})")
        self.pre_infer_class = WanPreInfer
        self.post_infer_class = WanPostInfer
        self.transformer_infer_class = WanTransformerInfer

    def _init_infer(self):
        self.pre_infer = self.pre_infer_class(self.config)
        self.post_infer = self.post_infer_class(self.config)
        self.transformer_infer = self.transformer_infer_class(self.config)
        self.pre_infer.set_rope(self.transformer_weights.blocks[0].compute_phases[0].rope)

    @torch.no_grad()
    def _infer_cond_uncond(self, inputs, infer_condition=True):
        self.scheduler.infer_condition = infer_condition
        pre_infer_out = self.pre_infer.infer(self.pre_weight, inputs)
        x = self.transformer_infer.infer(self.transformer_weights, pre_infer_out)
        return self.post_infer.infer(x, pre_infer_out)[0]

    @torch.no_grad()
    def infer(self, inputs):
        if self.config["enable_cfg"]:
            if self.config["cfg_parallel"]:
                raise NotImplementedError("the stand-in Wan model runs on one device (cfg_parallel)")
            cond = self._infer_cond_uncond(inputs, infer_condition=True)
            uncond = self._infer_cond_uncond(inputs, infer_condition=False)
            guided = uncond + self.scheduler.sample_guide_scale * (cond - uncond)
            self.scheduler.noise_pred_cond, self.scheduler.noise_pred_uncond = cond, uncond
        else:
            guided = self._infer_cond_uncond(inputs, infer_condition=True)
            self.scheduler.noise_pred_cond, self.scheduler.noise_pred_uncond = guided, None
        self.scheduler.noise_pred_guided = self.scheduler.noise_pred = guided
