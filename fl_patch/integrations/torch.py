"""torch-level targets: functions of ``torch.nn.functional`` that modules look up at call time.

``nn.RMSNorm.forward`` calls ``F.rms_norm`` through the module attribute at every call, so rebinding the
attribute reaches it and every other caller that did not bind the function early
(``from torch.nn.functional import rms_norm`` before activation keeps the original).
"""

from __future__ import annotations

from fl_patch.replacements import kernel_pair, like
from fl_patch.table import Target

TARGETS = [
    Target(
        name="torch.rms_norm",
        family="rms_norm",
        module="torch",
        attribute="torch.nn.functional.rms_norm (reaches nn.RMSNorm.forward)",
        factory="fl_patch.integrations.torch:patch_rms_norm",
        variant="torch",
        requires=("torch>=2.4",),
        description="F.rms_norm and nn.RMSNorm on the provider's RMSNorm kernel",
    ),
]


def patch_rms_norm(torch_module, ctx) -> None:
    """Rebind ``torch.nn.functional.rms_norm`` to a replacement with the same signature."""
    from torch.nn import functional

    from fl_patch.kernels import rms_norm as kernels

    original = functional.rms_norm
    kernel, unsupported = kernel_pair(kernels, "torch", ctx.provider)
    provider = ctx.provider
    rec = ctx.record("torch.nn.functional.rms_norm")

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        reason = unsupported(provider, input, normalized_shape, weight)
        if reason is not None:
            rec.fallback(reason)
            return original(input, normalized_shape, weight, eps)
        return kernel(input, normalized_shape, weight, eps)

    ctx.setattr(rec, functional, "rms_norm", like(rms_norm, original))
