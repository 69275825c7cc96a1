"""Linear ops (upstream ``lightx2v/common/ops/mm/mm_weight.py``), key = ``dit_quant_scheme``.

Constructor, as models call it::

    MM_WEIGHT_REGISTER[key](weight_name, bias_name, create_cuda_buffer, create_cpu_buffer,
                            lazy_load, lazy_load_file, lora_prefix=..., lora_path=...)

``load(weight_dict)`` stores the checkpoint's ``[out, in]`` weight TRANSPOSED, as a ``.t()`` view
of shape ``[in, out]``, and the bias as is: on a non-CPU device directly in ``self.weight`` /
``self.bias``; from CPU tensors in ``self.pin_weight`` / ``self.pin_bias`` (the entries are deleted
from ``weight_dict``; ``self.weight``/``self.bias`` stay None until ``to_cuda()``).
``apply(input_tensor)`` takes a 2-D ``[tokens, in]`` input and returns
``input @ weight (+ bias) (+ LoRA branch)`` in the input's dtype.

Quantised schemes: ``MMWeightQuantTemplate`` (upstream's base of every ``fp8-*`` / ``int8-*`` scheme, not a
registered key) and the two per-channel Triton schemes built on it, ``fp8-triton`` and ``int8-triton``, whose
Triton kernels are replaced by torch versions with the same arithmetic (``triton_kernels.py``). They load
``<prefix>.weight`` (int8 / e4m3 ``[out, in]``, kept untransposed), ``<prefix>.weight_scale`` (``[out, 1]``)
and a bias (cast to float32), and compute ``act_quant(x)`` then the scaled GEMM in the infer dtype. The other
quantised schemes (``fp8-vllm``, ``fp8-sgl``, ``mxfp*``, ``nvfp4``, ``gguf-*``, ``Calib*``, ...),
``TensorParallel``, lazy loading, offload buffers and the state-dict methods are not reproduced.
"""

from abc import ABCMeta, abstractmethod

import torch

from lightx2v.common.ops.utils import (
    build_lora_and_diff_names,
    create_default_tensors,
    move_attr_to_cpu,
    move_attr_to_cuda,
    refuse_file_loading,
)
from lightx2v.common.ops.mm.triton_kernels import (
    fp8_gemm_bias_triton,
    fp8_gemm_triton,
    fp8_quantize_triton,
    int8_gemm_bias_triton,
    int8_gemm_triton,
    int8_quantize_triton,
)
from lightx2v.utils.envs import GET_DTYPE
from lightx2v.utils.quant_utils import FloatQuantizer, IntegerQuantizer
from lightx2v.utils.registry_factory import MM_WEIGHT_REGISTER
from lightx2v_platform.base.global_var import AI_DEVICE

__all__ = [
    "MMWeightTemplate",
    "MMWeight",
    "MMWeightForceFp32",
    "MMWeightQuantTemplate",
    "MMWeightWfp8channelAfp8channeldynamicTriton",
    "MMWeightWint8channelAint8channeldynamicTriton",
]


class MMWeightTemplate(metaclass=ABCMeta):
    def __init__(
        self,
        weight_name,
        bias_name,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        self.weight_name = weight_name
        self.bias_name = bias_name
        self.create_cuda_buffer = create_cuda_buffer
        self.create_cpu_buffer = create_cpu_buffer
        self.lazy_load = lazy_load
        self.lazy_load_file = lazy_load_file
        self.is_post_adapter = is_post_adapter
        self.config = {}
        self.lora_prefix = lora_prefix
        self.lora_path = lora_path
        self.has_lora_branch = False
        self.has_diff = False
        self.base_attrs = [(weight_name, "weight", True)]
        if bias_name is not None:
            self.base_attrs.append((bias_name, "bias", False))
        (
            self.lora_down_name,
            self.lora_up_name,
            self.lora_alpha_name,
            self.weight_diff_name,
            self.bias_diff_name,
        ) = build_lora_and_diff_names(weight_name, lora_prefix)
        self.lora_attrs = {
            "lora_alpha": "lora_alpha_name",
            "lora_down": "lora_down_name",
            "lora_up": "lora_up_name",
            "weight_diff": "weight_diff_name",
            "bias_diff": "bias_diff_name",
        }

    def _get_actual_weight(self):
        return self.weight + self.weight_diff if hasattr(self, "weight_diff") else self.weight

    def _get_actual_bias(self, bias=None):
        if bias is None:
            bias = getattr(self, "bias", None)
            if bias is None:
                return None
        return bias + self.bias_diff if hasattr(self, "bias_diff") else bias

    def apply_lora(self, input_tensor):
        """``strength * scale * (x @ lora_down.T @ lora_up.T)``."""
        hidden = torch.mm(input_tensor, self.lora_down.t())
        return self.lora_strength * self.lora_scale * torch.mm(hidden, self.lora_up.t())

    def set_config(self, config={}):  # noqa: B006  (upstream signature)
        self.config = config

    def register_diff(self, weight_dict):
        """Take this layer's ``.diff`` (transposed, like the weight) and ``.diff_b`` tensors when present."""
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.weight_diff_name in weight_dict:
            self.has_diff = True
            self.weight_diff = weight_dict[self.weight_diff_name].t()
        if self.bias_diff_name in weight_dict:
            self.has_diff = True
            self.bias_diff = weight_dict[self.bias_diff_name]

    def register_lora(self, weight_dict, lora_strength=1):
        """Take this layer's ``lora_down``/``lora_up`` (and ``alpha``) tensors and turn the LoRA branch on.

        ``lora_scale`` is ``alpha / rank`` when ``alpha`` is present, else 1.
        """
        if self.lazy_load and not (self.create_cuda_buffer or self.create_cpu_buffer):
            return
        if self.lora_down_name not in weight_dict:
            return
        self.has_lora_branch = True
        device = self.weight.device if getattr(self, "weight", None) is not None else AI_DEVICE
        self.lora_down = weight_dict[self.lora_down_name].to(device)
        self.lora_up = weight_dict[self.lora_up_name].to(device)
        self.lora_strength = lora_strength
        if self.lora_alpha_name in weight_dict:
            self.lora_alpha = weight_dict[self.lora_alpha_name].to(device)
            self.lora_scale = self.lora_alpha / self.lora_down.shape[0]
        else:
            self.lora_scale = torch.tensor(1.0, device=device)

    def to_cuda(self, non_blocking=False):
        move_attr_to_cuda(self, self.base_attrs, self.lora_attrs, non_blocking)

    def to_cpu(self, non_blocking=False):
        move_attr_to_cpu(self, self.base_attrs, self.lora_attrs, non_blocking)

    @abstractmethod
    def load(self, weight_dict):
        pass

    @abstractmethod
    def apply(self):
        pass


@MM_WEIGHT_REGISTER("Default")
class MMWeight(MMWeightTemplate):
    def __init__(
        self,
        weight_name,
        bias_name=None,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            lora_prefix,
            lora_path,
        )

    def load(self, weight_dict):
        """Place weight (transposed) and bias; see the module docstring."""
        if self.create_cuda_buffer or self.create_cpu_buffer:
            refuse_file_loading()
        if self.lazy_load:
            return
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        self.weight = device_tensors.get("weight")
        self.bias = device_tensors.get("bias")
        self.pin_weight = pin_tensors.get("weight")
        self.pin_bias = pin_tensors.get("bias")

    def apply(self, input_tensor):
        """``addmm(bias, x, weight)`` (``mm`` without bias) into a fresh tensor of x's dtype, plus the LoRA branch.

        The weight must share x's dtype (no cast happens).
        """
        output = torch.empty(
            (input_tensor.shape[0], self.weight.shape[1]), dtype=input_tensor.dtype, device=input_tensor.device
        )
        if getattr(self, "bias", None) is not None:
            output = torch.addmm(self._get_actual_bias(), input_tensor, self._get_actual_weight(), out=output)
        else:
            output = torch.mm(input_tensor, self._get_actual_weight(), out=output)
        return output + self.apply_lora(input_tensor) if self.has_lora_branch else output


@MM_WEIGHT_REGISTER("Default-ForceFp32")
class MMWeightForceFp32(MMWeight):
    """``Default`` with weight and bias kept in float32; ``apply`` is inherited, so x must be float32 too."""

    def load(self, weight_dict):
        super().load(weight_dict)
        for name in ("weight", "bias", "pin_weight", "pin_bias"):
            tensor = getattr(self, name, None)
            if tensor is not None:
                setattr(self, name, tensor.to(torch.float32))


class MMWeightQuantTemplate(MMWeightTemplate):
    """Base of the quantised schemes (not registered). Its tensors: ``weight``, ``weight_scale`` (named
    ``<weight_name without .weight>.weight_scale``) and ``bias``, none transposed at placement.

    ``load`` is ``load_quantized`` (placement as ``Default``'s: CPU tensors go to ``pin_*`` and leave
    ``weight_dict``; a missing scale or bias is skipped without a word, as upstream) then ``post_process``:
    the weight (and its pinned copy) transposed when ``weight_need_transpose``, the bias cast to float32
    (``bias_force_fp32``) or the infer dtype, the scale to float32 when ``scale_force_fp32``. Subclasses set
    ``load_func`` (the loader a model's auto-quant hook calls; with ``weight_auto_quant`` in ``self.config`` it
    quantises a float weight itself), ``act_quant_func`` and those flags.
    """

    def __init__(
        self,
        weight_name,
        bias_name,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            lora_prefix,
            lora_path,
        )
        self.weight_scale_name = self.weight_name.removesuffix(".weight") + ".weight_scale"
        self.load_func = None
        self.weight_need_transpose = True
        self.act_quant_func = None
        self.infer_dtype = GET_DTYPE()
        self.bias_force_fp32 = False
        self.scale_force_fp32 = False
        self.base_attrs = [(self.weight_name, "weight", False), (self.weight_scale_name, "weight_scale", False)]
        if self.bias_name is not None:
            self.base_attrs.append((self.bias_name, "bias", False))

    def load(self, weight_dict):
        self.load_quantized(weight_dict)
        self.post_process()

    def load_quantized(self, weight_dict):
        """Place weight, scale and bias from ``weight_dict`` as they are."""
        if self.create_cuda_buffer or self.create_cpu_buffer:
            refuse_file_loading()
        if self.lazy_load:
            return
        device_tensors, pin_tensors = create_default_tensors(self.base_attrs, weight_dict)
        for attr in ("weight", "weight_scale", "bias"):
            setattr(self, attr, device_tensors.get(attr))
            setattr(self, f"pin_{attr}", pin_tensors.get(attr))

    def post_process(self):
        if self.weight_need_transpose:
            for attr in ("weight", "pin_weight"):
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, getattr(self, attr).t())
        bias_dtype = torch.float32 if self.bias_force_fp32 else self.infer_dtype
        for attr in ("bias", "pin_bias"):
            if getattr(self, attr, None) is not None:
                setattr(self, attr, getattr(self, attr).to(bias_dtype))
        if self.bias_force_fp32 and hasattr(self, "bias_diff"):
            self.bias_diff = self.bias_diff.to(torch.float32)
        if self.scale_force_fp32:
            for attr in ("weight_scale", "pin_weight_scale"):
                if getattr(self, attr, None) is not None:
                    setattr(self, attr, getattr(self, attr).to(torch.float32))

    def load_fp8_perchannel_sym(self, weight_dict):
        """With ``weight_auto_quant``: quantise the float weight to e4m3 per output channel (weight and a float32
        scale only); otherwise ``load_quantized``."""
        self._load_perchannel_sym(weight_dict, FloatQuantizer("e4m3", True, "per_channel"), torch.float8_e4m3fn)

    def load_int8_perchannel_sym(self, weight_dict):
        """With ``weight_auto_quant``: quantise the float weight to int8 per output channel; else ``load_quantized``."""
        self._load_perchannel_sym(weight_dict, IntegerQuantizer(8, True, "per_channel"), torch.int8)

    def _load_perchannel_sym(self, weight_dict, quantizer, dtype):
        if not self.config.get("weight_auto_quant", False):
            self.load_quantized(weight_dict)
            return
        weight, scale, _ = quantizer.real_quant_tensor(weight_dict[self.weight_name].to(torch.float32))
        self.weight, self.weight_scale = weight.to(dtype), scale.to(torch.float32)


def _triton_scheme_apply(op, input_tensor, gemm, gemm_bias):
    """``fp8-triton`` / ``int8-triton``'s apply: quantise the activations per token, then the scaled GEMM (with
    the bias when there is one) in the infer dtype; a 3-D output loses its leading dim (upstream's
    ``squeeze(0)``); plus the LoRA branch."""
    quantized, scale = op.act_quant_func(input_tensor)
    if op.bias is not None:
        output = gemm_bias(quantized, op.weight, op._get_actual_bias(), scale, op.weight_scale,
                           output_dtype=op.infer_dtype)
    else:
        output = gemm(quantized, op.weight, scale, op.weight_scale, output_dtype=op.infer_dtype)
    if output.dim() == 3:
        output = output.squeeze(0)
    return output + op.apply_lora(input_tensor) if op.has_lora_branch else output


@MM_WEIGHT_REGISTER("fp8-triton")
class MMWeightWfp8channelAfp8channeldynamicTriton(MMWeightQuantTemplate):
    """W fp8 per-channel symmetric, A fp8 per-token dynamic symmetric, Triton kernels."""

    def __init__(
        self,
        weight_name,
        bias_name,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            lora_prefix,
            lora_path,
        )
        self.load_func = self.load_fp8_perchannel_sym
        self.act_quant_func = fp8_quantize_triton
        self.weight_need_transpose = False
        self.bias_force_fp32 = True

    def apply(self, input_tensor):
        return _triton_scheme_apply(self, input_tensor, fp8_gemm_triton, fp8_gemm_bias_triton)


@MM_WEIGHT_REGISTER("int8-triton")
class MMWeightWint8channelAint8channeldynamicTriton(MMWeightQuantTemplate):
    """W int8 per-channel symmetric, A int8 per-token dynamic symmetric, Triton kernels."""

    def __init__(
        self,
        weight_name,
        bias_name,
        create_cuda_buffer=False,
        create_cpu_buffer=False,
        lazy_load=False,
        lazy_load_file=None,
        is_post_adapter=False,
        lora_prefix="diffusion_model.blocks",
        lora_path="",
    ):
        super().__init__(
            weight_name,
            bias_name,
            create_cuda_buffer,
            create_cpu_buffer,
            lazy_load,
            lazy_load_file,
            is_post_adapter,
            lora_prefix,
            lora_path,
        )
        self.load_func = self.load_int8_perchannel_sym
        self.act_quant_func = int8_quantize_triton
        self.weight_need_transpose = False
        self.bias_force_fp32 = True

    def apply(self, input_tensor):
        return _triton_scheme_apply(self, input_tensor, int8_gemm_triton, int8_gemm_bias_triton)
