"""Kernel layer: one module per op family, each with a FlagGems path, a torch reference and a cheap check.

- ``gems``: lazy, thread-safe FlagGems loader (imports neither torch nor flag_gems itself); ``gems.ops()`` is
  what the kernels call FlagGems through.
- ``custom_ops``: the FlagGems functions as ``torch.library`` custom ops, what ``gems.ops()`` gives while
  torch.compile traces (defined on the first traced gems call).
- ``rms_norm``: HF Llama-style, Gemma-style (``1 + w``) and ``F.rms_norm``.
- ``rope``: HF ``apply_rotary_pos_emb`` (full and partial rotary) and LightX2V's interleaved complex form.
- ``attention``: ``F.scaled_dot_product_attention`` and flash-style varlen attention.
- ``linear``: ``F.linear`` (weight ``[out, in]``) and LightX2V's transposed weight (``[in, out]``).
- ``swiglu``: ``silu(gate) * up``.
- ``layer_norm``: ``F.layer_norm``.

Each family module offers ``reference_<form>`` (plain torch, the original's semantics), ``gems_<form>``
(the FlagGems kernel, same semantics) and ``unsupported_<form>(provider, ...)``, which returns None when
that provider can take the call, else a short stable reason. Family modules import torch at top level,
so import them only after torch.
"""
