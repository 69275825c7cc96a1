"""Weight quantisers (upstream ``lightx2v/utils/quant_utils.py``), per-channel symmetric min-max only.

``real_quant_tensor(w)`` returns ``(q, scales, zeros)`` for a ``[out, in]`` weight: ``scales = max(|w|) /
qmax`` per row (at least ``1e-5 / qmax``), shape ``[out, 1]``, ``zeros`` None. ``IntegerQuantizer(8, True,
"per_channel")`` rounds to the nearest integer (half to even) in ``[-128, 127]``; ``FloatQuantizer("e4m3",
True, "per_channel")`` clips to +-448 and rounds to the nearest e4m3 value (upstream calls qtorch's
``float_quantize(..., rounding="nearest")``, which gives the same values). Both return the values as float;
the loaders cast them to int8 / ``float8_e4m3fn``. Per-tensor and per-group granularity, asymmetric
quantisation and the other calibration algorithms are not reproduced.
"""

import torch


class BaseQuantizer:
    def __init__(self, bit, symmetric, granularity, **kwargs):
        if not symmetric or granularity != "per_channel":
            raise NotImplementedError("the stand-in reproduces symmetric per-channel quantisation only")
        self.bit = bit
        self.sym = symmetric
        self.granularity = granularity
        self.kwargs = kwargs

    def real_quant_tensor(self, tensor):
        abs_max = torch.maximum(tensor.amax(dim=-1, keepdim=True).abs(), tensor.amin(dim=-1, keepdim=True).abs())
        scales = abs_max.clamp(min=1e-5) / self.qmax
        return self.quant(tensor, scales), scales, None


class IntegerQuantizer(BaseQuantizer):
    def __init__(self, bit, symmetric, granularity, **kwargs):
        super().__init__(bit, symmetric, granularity, **kwargs)
        self.qmin, self.qmax = -(2 ** (bit - 1)), 2 ** (bit - 1) - 1

    def quant(self, tensor, scales):
        return torch.clamp(torch.round(tensor / scales), self.qmin, self.qmax)


class FloatQuantizer(BaseQuantizer):
    def __init__(self, bit, symmetric, granularity, **kwargs):
        super().__init__(bit, symmetric, granularity, **kwargs)
        assert bit == "e4m3", f"Unsupported bit configuration: {bit}"
        finfo = torch.finfo(torch.float8_e4m3fn)
        self.qmin, self.qmax = finfo.min, finfo.max

    def quant(self, tensor, scales):
        clipped = torch.clip(tensor / scales, self.qmin, self.qmax)
        return clipped.float().to(torch.float8_e4m3fn).float()
