"""Wan's non-block input weights (upstream ``wan/weights/pre_weights.py``), text-to-video.

The patch embedding (``CONV3D_WEIGHT_REGISTER["Default"]``, stride ``(1, 2, 2)``) and the ``Default`` linear
ops of the text embedding (``text_embedding.0`` / ``.2``), the time embedding (``time_embedding.0`` / ``.2``)
and the time projection (``time_projection.1``): these stay ``Default`` whatever ``dit_quant_scheme`` says.
The image-conditioned parts (``img_emb``) are not reproduced.
"""

from lightx2v.common.modules.weight_module import WeightModule
from lightx2v.utils.registry_factory import CONV3D_WEIGHT_REGISTER, MM_WEIGHT_REGISTER

__all__ = ["WanPreWeights"]

LINEARS = {  # attribute -> (checkpoint prefix, LoRA prefix)
    "text_embedding_0": ("text_embedding.0", "diffusion_model.text_embedding"),
    "text_embedding_2": ("text_embedding.2", "diffusion_model.text_embedding"),
    "time_embedding_0": ("time_embedding.0", "diffusion_model.time_embedding"),
    "time_embedding_2": ("time_embedding.2", "diffusion_model.time_embedding"),
    "time_projection_1": ("time_projection.1", "diffusion_model.time_projection"),
}


class WanPreWeights(WeightModule):
    def __init__(self, config):
        super().__init__()
        if config["task"] != "t2v":
            raise NotImplementedError(f"the stand-in Wan model is text-to-video only, not {config['task']!r}")
        self.in_dim = config["in_dim"]
        self.dim = config["dim"]
        self.patch_size = (1, 2, 2)
        self.config = config
        self.add_module("patch_embedding", CONV3D_WEIGHT_REGISTER["Default"](
            "patch_embedding.weight", "patch_embedding.bias", stride=self.patch_size,
            lora_prefix="diffusion_model.patch_embedding"))
        for attribute, (prefix, lora_prefix) in LINEARS.items():
            self.add_module(attribute, MM_WEIGHT_REGISTER["Default"](
                f"{prefix}.weight", f"{prefix}.bias", lora_prefix=lora_prefix))
