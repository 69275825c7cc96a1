"""Base of the transformer models (upstream ``lightx2v/models/networks/base_model.py``), single device.

``BaseTransformerModel(model_path, config, device, model_type=None, lora_path=None, lora_strength=1.0)``.
With ``config["dit_quantized"]`` true it first runs ``_check_dit_quantized``, which asserts that
``dit_quant_scheme`` is one of upstream's hard-coded schemes. ``_init_weights()`` reads every
``*.safetensors`` under ``model_path`` (or ``dit_original_ckpt`` / ``dit_quantized_ckpt``; a file path works
too) onto ``self.device``: the original checkpoint with every tensor cast to ``GET_DTYPE()`` (or
``GET_SENSITIVE_DTYPE()`` for keys holding a ``sensitive_layer`` name), the quantised one with its float
tensors (bias, norms and the ``weight_scale`` tensors too) cast the same way and the others (int8 / fp8
weights) kept; then it builds ``pre_weight_class(config)`` / ``transformer_weight_class(config)`` and loads
them. Sequence and tensor parallelism, lazy loading, CPU offload, dummy models, GGUF, LoRA and the
distributed loaders are not reproduced (a config asking for them raises NotImplementedError).
"""

import glob
import os
from abc import ABC, abstractmethod

import torch
from safetensors import safe_open

from lightx2v.utils.envs import GET_DTYPE, GET_SENSITIVE_DTYPE

__all__ = ["BaseTransformerModel"]

QUANTIZED_SCHEMES = (
    "fp8-pertensor", "fp8-musa", "fp8-triton", "int8-triton", "fp8-vllm", "int8-vllm", "int8-vllm-hygon-dcu",
    "fp8-q8f", "int8-q8f", "fp8-b128-deepgemm", "fp8-sgl", "int8-sgl", "int8-torchao", "fp8-torchao", "nvfp4",
    "mxfp4", "mxfp6-mxfp8", "mxfp8", "int8-tmo", "gguf-Q8_0", "gguf-Q6_K", "gguf-Q5_K_S", "gguf-Q5_K_M",
    "gguf-Q5_0", "gguf-Q5_1", "gguf-Q4_K_S", "gguf-Q4_K_M", "gguf-Q4_0", "gguf-Q4_1", "gguf-Q3_K_S", "gguf-Q3_K_M",
    "int8-npu", "fp8-intel-xpu", "int8-iluvatar",
)
UNSUPPORTED = ("seq_parallel", "tensor_parallel", "lazy_load", "cpu_offload", "dummy_model", "lora_configs")


class BaseTransformerModel(ABC):
    pre_weight_class = None
    transformer_weight_class = None
    post_weight_class = None

    def __init__(self, model_path, config, device, model_type=None, lora_path=None, lora_strength=1.0):
        super().__init__()
        asked = [name for name in UNSUPPORTED if config.get(name)]
        if asked:
            raise NotImplementedError(f"the stand-in model does not reproduce {', '.join(asked)}")
        self.device = device
        self.model_path = model_path
        self.lora_path, self.lora_strength = lora_path, lora_strength
        self.model_type = model_type
        if not hasattr(self, "remove_keys"):
            self.remove_keys = []
        self.sensitive_layer = {}
        self.config = config
        self.cpu_offload = False
        self.seq_p_group = None
        self.lazy_load = False
        self.clean_cuda_cache = config.get("clean_cuda_cache", False)
        self.dit_quantized = config.get("dit_quantized", False)
        if self.dit_quantized:
            self._check_dit_quantized()
        self.use_tp, self.tp_group, self.tp_rank, self.tp_size = False, None, 0, 1

    def _check_dit_quantized(self):
        assert self.config.get("dit_quant_scheme", "Default") in QUANTIZED_SCHEMES

    @abstractmethod
    def _init_infer_class(self):
        pass

    @abstractmethod
    def _init_infer(self):
        pass

    def _init_weights(self, weight_dict=None):
        if weight_dict is None:
            unified = GET_DTYPE() == GET_SENSITIVE_DTYPE()
            if self.dit_quantized:
                weight_dict = self._load_quant_ckpt(unified, self.sensitive_layer)
            else:
                weight_dict = self._load_ckpt(unified, self.sensitive_layer)
        self.original_weight_dict = weight_dict
        self.pre_weight = self.pre_weight_class(self.config)
        self.transformer_weights = self.transformer_weight_class(self.config)
        if self.post_weight_class is not None:
            self.post_weight = self.post_weight_class(self.config)
        self._apply_weights()

    def _apply_weights(self, weight_dict=None):
        if weight_dict is not None:
            self.original_weight_dict = weight_dict
        self.pre_weight.load(self.original_weight_dict)
        self.transformer_weights.load(self.original_weight_dict)
        if hasattr(self, "post_weight"):
            self.post_weight.load(self.original_weight_dict)
        del self.original_weight_dict

    def _safetensors_files(self, key):
        path = self.config.get(key) or self.model_path
        return sorted(glob.glob(os.path.join(path, "*.safetensors"))) if os.path.isdir(path) else [path]

    def _dtype_for(self, key, unified, sensitive_layer):
        return GET_DTYPE() if unified or all(s not in key for s in sensitive_layer) else GET_SENSITIVE_DTYPE()

    def _load_ckpt(self, unified_dtype, sensitive_layer):
        weight_dict = {}
        for path in self._safetensors_files("dit_original_ckpt"):
            with safe_open(path, framework="pt", device=str(self.device)) as f:
                for key in f.keys():
                    if not any(r in key for r in self.remove_keys):
                        weight_dict[key] = f.get_tensor(key).to(self._dtype_for(key, unified_dtype, sensitive_layer))
        return weight_dict

    def _load_quant_ckpt(self, unified_dtype, sensitive_layer):
        weight_dict = {}
        for path in self._safetensors_files("dit_quantized_ckpt"):
            with safe_open(path, framework="pt") as f:
                for key in f.keys():
                    if any(r in key for r in self.remove_keys):
                        continue
                    tensor = f.get_tensor(key)
                    if tensor.dtype in (torch.float16, torch.bfloat16, torch.float32):
                        tensor = tensor.to(self._dtype_for(key, unified_dtype, sensitive_layer))
                    weight_dict[key] = tensor.to(self.device)
        return weight_dict

    def set_scheduler(self, scheduler):
        self.scheduler = scheduler
        self.pre_infer.set_scheduler(scheduler)
        self.transformer_infer.set_scheduler(scheduler)
        self.post_infer.set_scheduler(scheduler)

    def to_cpu(self):
        self.pre_weight.to_cpu()
        self.transformer_weights.to_cpu()

    def to_cuda(self):
        self.pre_weight.to_cuda()
        self.transformer_weights.to_cuda()
