"""Rotary position embedding: HF ``apply_rotary_pos_emb`` and LightX2V's interleaved complex form.

FlagGems ``apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, rotary_interleaved=False)`` wants
heads on dim -2 with every earlier dim flattened into tokens, and a half-width table with one row per
position. Without ``position_ids`` it takes a 4-D q and gives token ``t`` the position ``t % q.shape[-3]``;
that is how HF's per-token cos/sin map onto it with no index tensor: the table's rows are HF's cos rows
(``cos[..., :rotary_dim // 2]``, HF builds cos as ``cat(freqs, freqs)`` so both halves are equal), and
when cos differs per batch row the batch is folded into the sequence.

The table's row count is a compile-time constant of the kernel (a new count is a new compile), so the
table is copied into a buffer of a bucketed row count (4096, or the next power of two above) and cached
for the cos/sin pair it came from: HF passes the same cos/sin objects to every layer of one forward, so
the copy is paid once per forward. The cache keeps one entry, held by identity (and version counter,
except for inference tensors, which can't be changed outside inference mode). Under torch.compile there is no
cache: the copy is traced into the graph (dynamo can't trace ``is_inference`` or the module-level entry).

The FlagGems kernel has no autograd: calls that need gradients are routed away.
"""

from __future__ import annotations

import torch

from fl_patch.kernels import gems

FAMILY = "rope"  # routing keys of this module: "rope.<form>" (fl_patch.device.routing)

MIN_TABLE_ROWS = 4096

# (cos source, sin source, their versions, (cos table, sin table)); one entry, replaced as a whole.
_table_cache: tuple | None = None


def reference_hf(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF Llama's ``apply_rotary_pos_emb``; when ``cos.shape[-1]`` is below the head dim, Phi-3's partial
    rotary (rotate the first ``cos.shape[-1]`` channels, pass the rest through)."""
    cos = cos.unsqueeze(unsqueeze_dim)
    sin = sin.unsqueeze(unsqueeze_dim)
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[-1]:
        return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)
    q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]
    k_rot, k_pass = k[..., :rotary_dim], k[..., rotary_dim:]
    q_embed = torch.cat([(q_rot * cos) + (_rotate_half(q_rot) * sin), q_pass], dim=-1)
    k_embed = torch.cat([(k_rot * cos) + (_rotate_half(k_rot) * sin), k_pass], dim=-1)
    return q_embed, k_embed


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def gems_hf(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_hf`` on FlagGems (fp32 math, one rounding: within bf16/fp16 tolerance of HF's).

    q, k are ``(B, H, S, D)`` (``unsqueeze_dim=1``) or ``(B, S, H, D)`` (``unsqueeze_dim=2``); cos, sin
    ``(1 or B, S, rotary_dim)`` with equal halves, as HF's rotary embeddings build them. Returns tensors
    in q's layout: for HF's usual q (a transposed ``(B, S, H, D)`` projection) no copy is made besides
    the kernel's output.
    """
    flag_gems = gems.ops()
    folded = cos.shape[0] != 1 and q.shape[0] != 1  # a table row per (batch row, position): one long sequence
    cos_table, sin_table = _hf_table(cos, sin)
    rotary_dim = cos.shape[-1]
    if rotary_dim == q.shape[3]:
        return gems.composed(flag_gems, "apply_rotary_pos_emb", gems_hf_full)(
            q, k, cos_table, sin_table, unsqueeze_dim, folded)
    q_tokens, k_tokens = _tokens(q, unsqueeze_dim, folded), _tokens(k, unsqueeze_dim, folded)
    q_rot, k_rot = flag_gems.apply_rotary_pos_emb(
        q_tokens[..., :rotary_dim], k_tokens[..., :rotary_dim], cos_table, sin_table
    )
    q_out = torch.cat((q_rot, q_tokens[..., rotary_dim:]), dim=-1)
    k_out = torch.cat((k_rot, k_tokens[..., rotary_dim:]), dim=-1)
    return _in_layout(q_out, q.shape, unsqueeze_dim, folded), _in_layout(k_out, k.shape, unsqueeze_dim, folded)


def gems_hf_full(
    flag_gems, q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor, unsqueeze_dim: int,
    folded: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """``gems_hf`` with every channel rotated, once the tables are made: FlagGems' call between views of q and k
    in its layout and views of its outputs in theirs. On the fast launch path it is bound as one call on the caller's
    q and k (``gems.composed``): a bound call takes none of the four views (a microsecond of host time each at
    decode) and allocates the outputs in the caller's layout."""
    q_tokens, k_tokens = _tokens(q, unsqueeze_dim, folded), _tokens(k, unsqueeze_dim, folded)
    q_out, k_out = flag_gems.apply_rotary_pos_emb(q_tokens, k_tokens, cos_table, sin_table)
    return _in_layout(q_out, q.shape, unsqueeze_dim, folded), _in_layout(k_out, k.shape, unsqueeze_dim, folded)


def _tokens(x: torch.Tensor, unsqueeze_dim: int, folded: bool) -> torch.Tensor:
    """x in FlagGems' layout: batch folded into one sequence, or ``(B, S, H, D)`` (position = token % sequence)."""
    return _folded(x, unsqueeze_dim) if folded else _tokens_first(x, unsqueeze_dim)


def _in_layout(out: torch.Tensor, shape: torch.Size, unsqueeze_dim: int, folded: bool) -> torch.Tensor:
    """The kernel's output (in FlagGems' layout, as `_tokens` gave) in the caller's layout `shape`."""
    if folded:
        return _unfolded(out, shape, unsqueeze_dim)
    return out.transpose(1, 2) if unsqueeze_dim == 1 else out


def _tokens_first(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """x as ``(B, S, H, D)`` whose B and S dims FlagGems can flatten with ``view`` (copied only if not)."""
    tokens = x.transpose(1, 2) if unsqueeze_dim == 1 else x
    batch, seq = tokens.shape[0], tokens.shape[1]
    if batch == 1 or seq == 1 or tokens.stride(0) == seq * tokens.stride(1):
        return tokens
    return tokens.contiguous()


def _folded(x: torch.Tensor, unsqueeze_dim: int) -> torch.Tensor:
    """x as ``(1, B * S, H, D)``: the batch folded into one long sequence, in one ``as_strided`` (a transpose and a
    reshape took twice its host time, on a launch-bound call); a copy only where B and S can't be merged."""
    if unsqueeze_dim == 1:
        batch, heads, seq, dim = x.shape
        batch_stride, heads_stride, seq_stride, dim_stride = x.stride()
    else:
        batch, seq, heads, dim = x.shape
        batch_stride, seq_stride, heads_stride, dim_stride = x.stride()
    if seq > 1 and batch_stride != seq * seq_stride:
        x = (x.transpose(1, 2) if unsqueeze_dim == 1 else x).contiguous()  # (B, S, H, D)
        seq_stride, heads_stride, dim_stride = heads * dim, dim, 1
    token_stride = seq_stride if seq > 1 else batch_stride
    tokens = batch * seq
    return x.as_strided((1, tokens, heads, dim), (tokens * token_stride, token_stride, heads_stride, dim_stride))


def _unfolded(out: torch.Tensor, shape: torch.Size, unsqueeze_dim: int) -> torch.Tensor:
    """The kernel's ``(1, B * S, H, D)`` output in the caller's layout `shape` (q's or k's): ``(B, H, S, D)`` for
    ``unsqueeze_dim=1``, ``(B, S, H, D)`` for 2, in one ``as_strided``."""
    _, token_stride, heads_stride, dim_stride = out.stride()
    batch_stride = shape[3 - unsqueeze_dim] * token_stride
    if unsqueeze_dim == 1:
        return out.as_strided(shape, (batch_stride, heads_stride, token_stride, dim_stride))
    return out.as_strided(shape, (batch_stride, token_stride, heads_stride, dim_stride))


def _hf_table(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compiling = torch.compiler.is_compiling()  # no cache in a graph: the copy is part of it, once per forward
    entry = _table_cache
    if not compiling and entry is not None and entry[0] is cos and entry[1] is sin and entry[2] == _versions(cos, sin):
        return entry[3]
    rotary_dim = cos.shape[-1]
    half = rotary_dim // 2
    tables = _padded_tables(cos.reshape(-1, rotary_dim)[:, :half], sin.reshape(-1, rotary_dim)[:, :half])
    if not compiling:
        _remember(cos, sin, tables)
    return tables


def _interleaved_table(freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    compiling = torch.compiler.is_compiling()
    entry = _table_cache
    if (not compiling and entry is not None and entry[0] is freqs_cis and entry[1] is None
            and entry[2] == _versions(freqs_cis, None)):
        return entry[3]
    pairs = torch.view_as_real(freqs_cis).reshape(freqs_cis.shape[0], -1, 2)
    tables = _padded_tables(pairs[..., 0], pairs[..., 1])
    if not compiling:
        _remember(freqs_cis, None, tables)
    return tables


def _padded_tables(cos_rows: torch.Tensor, sin_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Contiguous copies of two ``(rows, half)`` tables in one buffer of a bucketed row count."""
    rows, half = cos_rows.shape
    bucket = max(MIN_TABLE_ROWS, 1 << (rows - 1).bit_length())
    buffer = cos_rows.new_empty((2, bucket, half))
    buffer[0, :rows] = cos_rows
    buffer[1, :rows] = sin_rows
    return buffer[0], buffer[1]


def _versions(a: torch.Tensor, b: torch.Tensor | None) -> tuple:
    return (_version(a), None if b is None else _version(b))


def _version(t: torch.Tensor) -> int | None:
    return None if t.is_inference() else t._version


def _remember(a: torch.Tensor, b: torch.Tensor | None, tables: tuple[torch.Tensor, torch.Tensor]) -> None:
    global _table_cache
    _table_cache = (a, b, _versions(a, b), tables)


def unsupported_hf(
    provider: str, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int
) -> str | None:
    """None when `provider` can take ``apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)``, else a reason.

    Both providers: q, k 4-D with ``unsqueeze_dim`` 1 or 2, cos/sin ``(1 or B, S, rotary_dim)`` with an
    even ``rotary_dim`` up to the head dim. gems also: device, fp16/bf16, one dtype for q, k, cos, sin
    (HF would promote), no autograd.
    """
    if provider == "gems":
        reason = gems.tensor_reason(q)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if unsqueeze_dim not in (1, 2):
        return "unsqueeze dim"
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3:
        return "shape"
    q_shape, k_shape, cos_shape = q.shape, k.shape, cos.shape
    seq_dim = 3 - unsqueeze_dim
    seq_len = q_shape[seq_dim]
    if (
        k_shape[0] != q_shape[0]
        or k_shape[seq_dim] != seq_len
        or cos_shape[1] != seq_len
        or (cos_shape[0] != 1 and cos_shape[0] != q_shape[0])
        or sin.shape != cos_shape
    ):
        return "cos shape"
    rotary_dim = cos_shape[2]
    if rotary_dim % 2 or rotary_dim > q_shape[3] or k_shape[3] != q_shape[3]:
        return "rotary dim"
    if provider == "gems":
        if k.dtype != q.dtype or cos.dtype != q.dtype or sin.dtype != q.dtype:
            return "mixed dtypes"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or cos.requires_grad):
            return "requires grad"
    return None


def reference_interleaved(
    q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """LightX2V's rope: channel pairs as complex numbers times ``freqs_cis`` ``(S, 1, D/2)``, in fp32.

    q, k are ``(S, H, D)``; each result is ``view_as_real(view_as_complex(x.float().reshape(S, H, D/2, 2))
    * freqs_cis).flatten(2).type_as(x)``.
    """
    return _rotate_pairs(q, freqs_cis), _rotate_pairs(k, freqs_cis)


def _rotate_pairs(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    seq_len, heads, head_dim = x.shape
    pairs = torch.view_as_complex(x.float().reshape(seq_len, heads, head_dim // 2, 2))
    return torch.view_as_real(pairs * freqs_cis).flatten(2).type_as(x)


def gems_interleaved(
    q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_interleaved`` on FlagGems (``rotary_interleaved=True``, cos/sin = real/imag of freqs)."""
    flag_gems = gems.ops()
    cos_table, sin_table = _interleaved_table(freqs_cis)
    q_out, k_out = flag_gems.apply_rotary_pos_emb(
        q.unsqueeze(0), k.unsqueeze(0), cos_table, sin_table, rotary_interleaved=True
    )
    return q_out[0], k_out[0]


def unsupported_interleaved(
    provider: str, q: torch.Tensor, k: torch.Tensor, freqs_cis: torch.Tensor
) -> str | None:
    """None when `provider` can take the interleaved rope on ``(S, H, D)`` q, k, else a short reason."""
    if provider == "gems":
        reason = gems.tensor_reason(q)  # first: see gems.tensor_reason
        if reason is not None:
            return reason
    if q.dim() != 3 or k.dim() != 3 or freqs_cis.dim() != 3:
        return "shape"
    if not freqs_cis.is_complex():
        return "freqs dtype"
    q_shape, k_shape, freqs_shape = q.shape, k.shape, freqs_cis.shape
    if (
        k_shape[0] != q_shape[0]
        or freqs_shape[0] != q_shape[0]
        or freqs_shape[1] != 1
        or k_shape[2] != q_shape[2]
        or 2 * freqs_shape[2] != q_shape[2]
    ):
        return "freqs shape"
    if provider == "gems":
        if k.dtype != q.dtype:
            return "mixed dtypes"
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
            return "requires grad"
    return None
