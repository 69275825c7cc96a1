"""Weight placement helpers shared by the weight-holding ops (upstream ``lightx2v/common/ops/utils.py``).

A weight op describes its tensors as ``base_attrs``: ``(name in weight_dict, attribute, transpose)``
triples, e.g. ``("blocks.0.ffn.0.weight", "weight", True)``. Reading tensors from safetensors files
(``lazy_load``) and the offload buffers are not reproduced.
"""

import logging

import torch

from lightx2v_platform.base.global_var import AI_DEVICE

logger = logging.getLogger(__name__)


def refuse_file_loading():
    """Raise NotImplementedError: the stand-in has no lazy loading or offload buffers."""
    raise NotImplementedError("the stand-in does not reproduce lazy loading or offload buffers")


def build_lora_and_diff_names(weight_name, lora_prefix):
    """Return ``(lora_down, lora_up, lora_alpha, weight_diff, bias_diff)`` tensor names for a weight.

    ``"blocks.0.ffn.0.weight"`` with prefix ``"diffusion_model.blocks"`` gives
    ``"diffusion_model.blocks.0.ffn.0.lora_down.weight"``, ... , ``"diffusion_model.blocks.0.ffn.0.diff_b"``:
    the last 7 characters (``.weight``) are dropped and the first dotted component is replaced by
    the prefix.
    """
    module_path = ".".join(weight_name[:-7].split(".")[1:])
    base = f"{lora_prefix}.{module_path}"
    return (
        f"{base}.lora_down.weight",
        f"{base}.lora_up.weight",
        f"{base}.alpha",
        f"{base}.diff",
        f"{base}.diff_b",
    )


def create_pin_tensor(tensor, transpose=False, dtype=None):
    """Copy ``tensor`` into pinned CPU memory (plain CPU memory when pinning is unavailable).

    With ``transpose`` the copy is returned as a transposed view, ``.t()``.
    """
    dtype = dtype or tensor.dtype
    try:
        pinned = torch.empty(tensor.shape, pin_memory=True, dtype=dtype)
    except RuntimeError as e:
        logger.debug("Failed to allocate pinned memory, using regular CPU memory: %s", e)
        pinned = torch.empty(tensor.shape, dtype=dtype)
    pinned.copy_(tensor)
    return pinned.t() if transpose else pinned


def create_default_tensors(base_attrs, weight_dict):
    """Split ``weight_dict`` entries into ``(device_tensors, pin_tensors)`` keyed by attribute.

    The device of the first listed tensor decides: CPU tensors are copied to pinned memory and
    deleted from ``weight_dict``; tensors on another device are kept as they are. Names missing
    from ``weight_dict`` (other than the first) are skipped. Transposed entries come back as
    ``.t()`` views.
    """
    device_tensors, pin_tensors = {}, {}
    if not base_attrs:
        return device_tensors, pin_tensors
    on_cpu = weight_dict[base_attrs[0][0]].device.type == "cpu"
    for name, attr, transpose in base_attrs:
        if name not in weight_dict:
            continue
        if on_cpu:
            pin_tensors[attr] = create_pin_tensor(weight_dict.pop(name), transpose=transpose)
        else:
            tensor = weight_dict[name]
            device_tensors[attr] = tensor.t() if transpose else tensor
    return device_tensors, pin_tensors


def move_tensor_to_device(obj, attr, target_device, non_blocking=False, use_copy=False):
    """Set ``obj.<attr>`` on ``target_device``, from ``obj.pin_<attr>`` when there is one.

    With ``use_copy`` and both present, the current value is first copied back into the pinned one.
    """
    pinned = getattr(obj, f"pin_{attr}", None)
    current = getattr(obj, attr, None)
    if pinned is not None:
        if current is not None and use_copy:
            pinned = pinned.copy_(current, non_blocking=non_blocking)
        setattr(obj, attr, pinned.to(target_device, non_blocking=non_blocking))
    elif current is not None:
        setattr(obj, attr, current.to(target_device, non_blocking=non_blocking))


def _move_lora_attrs(obj, lora_attrs, target_device, non_blocking):
    for attr in lora_attrs:
        value = getattr(obj, attr, None)
        if value is not None:
            setattr(obj, attr, value.to(target_device, non_blocking=non_blocking))


def move_attr_to_cuda(obj, base_attrs, lora_attrs, non_blocking=False):
    """Move the base attributes (from their pinned copies) and the LoRA attributes to ``AI_DEVICE``."""
    for _, attr, _ in base_attrs:
        move_tensor_to_device(obj, attr, AI_DEVICE, non_blocking)
    _move_lora_attrs(obj, lora_attrs, AI_DEVICE, non_blocking)


def move_attr_to_cpu(obj, base_attrs, lora_attrs, non_blocking=False):
    """Move the base attributes (through their pinned copies) and the LoRA attributes to the CPU."""
    for _, attr, _ in base_attrs:
        move_tensor_to_device(obj, attr, "cpu", non_blocking, use_copy=True)
    _move_lora_attrs(obj, lora_attrs, "cpu", non_blocking)
