"""CPU stand-in for the FlagGems 5.0.2 functions fl_patch calls, in plain torch.

Same signatures, return shapes, dtypes and quirks as the real kernels, so that the mapping code of the
gems paths runs on CPU tests; assertions mirror the real wrappers' asserts. Calls are recorded in
``calls`` (function name, and for rope the table row count, which is a compile-time constant of the real
kernel) so tests can see what reached "FlagGems".
"""

import math

import torch
import torch.nn.functional as F

__version__ = "5.0.2-fake"
vendor_name = "fake"
device = "cpu"

calls = []

_LOG2E = 1.4426950408889634


def rms_norm(x, normalized_shape, weight, eps=1e-5):
    """Normalise in fp32, multiply by the weight in fp32, return x's dtype (weight required)."""
    calls.append(("rms_norm",))
    n = math.prod(normalized_shape)
    rows = x.contiguous().view(-1, n).float()
    normed = rows * torch.rsqrt(rows.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.reshape(n).float()).to(x.dtype).view(x.shape)


def rms_norm_forward(x, normalized_shape, weight, eps=1e-5):
    """``(y, inv_rms)``: y as ``rms_norm`` gives it (contiguous), inv_rms ``(rows,)`` fp32."""
    calls.append(("rms_norm_forward",))
    n = math.prod(normalized_shape)
    rows = x.contiguous().view(-1, n).float()
    inv_rms = torch.rsqrt(rows.pow(2).mean(-1) + eps)
    y = (rows * inv_rms[:, None] * weight.reshape(n).float()).to(x.dtype).view(x.shape)
    return y, inv_rms


def rms_norm_backward(dy, x, inv_rms, normalized_shape, weight, eps=1e-5):
    """``(dx, dw)`` in fp32 math: dx contiguous in x's dtype, dw ``(N,)`` in x's dtype (as the real one)."""
    calls.append(("rms_norm_backward",))
    n = math.prod(normalized_shape)
    rows, grads = x.contiguous().view(-1, n).float(), dy.contiguous().view(-1, n).float()
    w, r = weight.reshape(n).float(), inv_rms[:, None]
    normed = rows * r
    dx = r * (grads * w - normed * (grads * w * normed).mean(-1, keepdim=True))
    dw = (grads * normed).sum(0)
    return dx.to(x.dtype).view(x.shape), dw.to(x.dtype)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, rotary_interleaved=False, inplace=False):
    """Heads on dim -2, earlier dims flattened to tokens; half-width tables indexed by position
    (``position_ids``, or ``token % q.shape[-3]`` for a 4-D q); the math in fp32, out in q's dtype."""
    assert not inplace, "fake: inplace not modelled"
    assert k.shape[-1] == q.shape[-1]
    assert cos.shape[-1] == sin.shape[-1]
    assert cos.shape[-1] * 2 == q.shape[-1], "cos/sin dim must be half of q/k dim"
    assert cos.stride(-1) == 1 and sin.stride(-1) == 1
    assert q.shape[:-2] == k.shape[:-2]
    if position_ids is None:
        assert len(q.shape) == 4, "q must have 4 dimensions if position_ids is not provided"
        seq_len = q.shape[-3]
        positions = None
    else:
        assert position_ids.shape == q.shape[:-2]
        positions = position_ids.view(-1)
    calls.append(("apply_rotary_pos_emb", cos.shape[0]))
    q_shape, k_shape = q.shape, k.shape
    q_tokens = q.view(-1, q.shape[-2], q.shape[-1])  # raises like the real wrapper if tokens don't merge
    k_tokens = k.view(-1, k.shape[-2], k.shape[-1])
    if positions is None:
        positions = torch.arange(q_tokens.shape[0]) % seq_len
    assert int(positions.max()) < cos.shape[0], "position id out of bound"
    cos_rows = cos[positions].float()[:, None, :]
    sin_rows = sin[positions].float()[:, None, :]
    q_embed, k_embed = torch.empty_like(q_tokens), torch.empty_like(k_tokens)  # the real one's outputs
    q_embed.copy_(_rotate(q_tokens, cos_rows, sin_rows, rotary_interleaved))
    k_embed.copy_(_rotate(k_tokens, cos_rows, sin_rows, rotary_interleaved))
    return q_embed.view(q_shape), k_embed.view(k_shape)


def _rotate(x, cos_rows, sin_rows, interleaved):
    h = x.float()
    if interleaved:
        even, odd = h[..., 0::2], h[..., 1::2]
        out = torch.stack((even * cos_rows - odd * sin_rows, odd * cos_rows + even * sin_rows), dim=-1)
        return out.flatten(-2).to(x.dtype)
    half = h.shape[-1] // 2
    first, second = h[..., :half], h[..., half:]
    out = torch.cat((first * cos_rows - second * sin_rows, second * cos_rows + first * sin_rows), dim=-1)
    return out.to(x.dtype)


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False
):
    """5.0.2's kernel, quirks included: a bool mask becomes ``mask * -1e6`` (True = masked); a float mask
    is added after the scores are scaled to log2 units; the mask is read as ``(B, Hq, Sq, Skv)`` through
    its own strides (a smaller mask would be read out of bounds: asserted here)."""
    head_dim = query.shape[-1]
    assert head_dim == key.shape[-1] == value.shape[-1]
    assert head_dim in {16, 32, 64, 128, 256}
    assert dropout_p == 0.0, "Currenty only support dropout_p=0.0"
    batch, q_heads, q_len, _ = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    assert enable_gqa or q_heads == kv_heads
    calls.append(("scaled_dot_product_attention", attn_mask is not None))
    sm_scale = 1.0 / head_dim**0.5 if scale is None else scale
    groups = q_heads // kv_heads
    k = key.float().repeat_interleave(groups, dim=1)
    v = value.float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(query.float(), k.transpose(-2, -1)) * (sm_scale * _LOG2E)
    if attn_mask is not None:
        assert attn_mask.dim() == 4 and tuple(attn_mask.shape) == (batch, q_heads, q_len, kv_len), (
            "fake: the 5.0.2 kernel reads the mask out of bounds unless it is (B, Hq, Sq, Skv)"
        )
        assert not is_causal, "fake: causal with a mask scales the mask differently per block in 5.0.2"
        if attn_mask.dtype == torch.bool:
            attn_mask = attn_mask.to(query.dtype) * -1.0e6
        scores = scores + attn_mask.float()
    if is_causal:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril()
        scores = scores + torch.where(keep, 0.0, -1.0e6)
    probs = torch.exp2(scores - scores.amax(dim=-1, keepdim=True))
    out = torch.empty_like(query, dtype=value.dtype)  # the real one's output layout
    return out.copy_(torch.matmul(probs / probs.sum(dim=-1, keepdim=True), v))


def flash_attention_forward(
    query,
    key,
    value,
    cumulative_sequence_length_q,
    cumulative_sequence_length_k,
    max_q,
    max_k,
    dropout_p,
    is_causal,
    return_debug_mask,
    *,
    scale=None,
    softcap=0.0,
    window_size_left=None,
    window_size_right=None,
    seqused_k=None,
    alibi_slopes=None,
    disable_splitkv=False,
):
    """Flash layout ``(B, S, H, D)``, fp16/bf16, head dim a multiple of 32 up to 256 (16 fails),
    bottom-right causal (off for one query), ``scale or 1/sqrt(D)``. Where the real one would split the
    keys (few query blocks for an H100/H200's 132 SMs), its combine step is only right for one-query GQA
    calls: asserted here.
    Returns ``(out, lse, philox_seed, philox_offset, p)``."""
    assert cumulative_sequence_length_q is None and cumulative_sequence_length_k is None
    n_tasks = query.shape[0] * query.shape[2] * -(-query.shape[1] // 128)
    splits = not disable_splitkv and n_tasks < 0.8 * 132
    single_query_gqa = query.shape[1] == 1 and query.shape[2] > key.shape[2]
    assert not splits or single_query_gqa, "fake: 5.0.2's split-KV combine scrambles this output"
    assert query.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert query.dtype == key.dtype == value.dtype
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1
    head_dim = query.shape[-1]
    assert head_dim % 32 == 0, "head_size must be rounded to 32 (the real one pads 80, 160, 224 first)"
    assert query.shape[2] % key.shape[2] == 0
    calls.append(("flash_attention_forward", is_causal, disable_splitkv))
    softmax_scale = scale or 1.0 / head_dim**0.5
    q = query.transpose(1, 2).float()
    groups = query.shape[2] // key.shape[2]
    k = key.transpose(1, 2).float().repeat_interleave(groups, dim=1)
    v = value.transpose(1, 2).float().repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(-2, -1)) * softmax_scale
    q_len, kv_len = q.shape[2], k.shape[2]
    if is_causal and q_len > 1:
        keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.empty_like(query)  # the real one's output layout
    out.copy_(torch.matmul(probs, v).transpose(1, 2))
    return out, None, None, None, None


def flash_attn_varlen_func(
    q,
    k,
    v,
    max_seqlen_q,
    cu_seqlens_q,
    max_seqlen_k,
    cu_seqlens_k=None,
    seqused_k=None,
    q_v=None,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=None,
    softcap=0.0,
    alibi_slopes=None,
    deterministic=False,
    return_attn_probs=False,
    block_table=None,
    return_softmax_lse=False,
    out=None,
    **unused,
):
    """``(T, H, D)`` tokens of all sequences; int32 cumulative lengths; bottom-right causal; a query
    that sees no key gives zeros. Returns ``(Tq, Hq, D)``."""
    assert q.dtype in (torch.float16, torch.bfloat16), "FlashAttention only support fp16 and bf16 data type"
    assert q.dtype == k.dtype == v.dtype
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_q.is_contiguous()
    assert cu_seqlens_k is not None and cu_seqlens_k.dtype == torch.int32
    assert q.shape[-1] <= 256 and q.shape[-1] % 8 == 0
    assert q.shape[1] % k.shape[1] == 0
    calls.append(("flash_attn_varlen_func", causal))
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    groups = q.shape[1] // k.shape[1]
    result = torch.zeros_like(q)
    bq, bk = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for i in range(len(bq) - 1):
        qs = q[bq[i]:bq[i + 1]].transpose(0, 1).float()
        ks = k[bk[i]:bk[i + 1]].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        vs = v[bk[i]:bk[i + 1]].transpose(0, 1).float().repeat_interleave(groups, dim=0)
        scores = torch.matmul(qs, ks.transpose(-2, -1)) * scale
        q_len, kv_len = qs.shape[1], ks.shape[1]
        if causal and max_seqlen_q > 1:
            keep = torch.ones(q_len, kv_len, dtype=torch.bool).tril(kv_len - q_len)
            scores = scores.masked_fill(~keep, float("-inf"))
        probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        result[bq[i]:bq[i + 1]] = torch.matmul(probs, vs).transpose(0, 1).to(q.dtype)
    return result


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """Returns ``(y, mean, rstd)``; statistics in fp32, y and the statistics in input's dtype."""
    calls.append(("layer_norm",))
    n = math.prod(normalized_shape)
    rows = input.contiguous().view(-1, n).float()
    mean = rows.mean(-1, keepdim=True)
    rstd = torch.rsqrt((rows - mean).pow(2).mean(-1, keepdim=True) + eps)
    y = (rows - mean) * rstd
    if weight is not None:
        y = y * weight.reshape(n).float()
    if bias is not None:
        y = y + bias.reshape(n).float()
    return y.to(input.dtype).view(input.shape), mean.view(-1).to(input.dtype), rstd.view(-1).to(input.dtype)


def silu_and_mul(A, B):
    """``silu(A) * B`` with silu in fp32 and one rounding to the promoted dtype."""
    calls.append(("silu_and_mul",))
    out_dtype = torch.promote_types(A.dtype, B.dtype)
    return (F.silu(A.float()) * B.float()).to(out_dtype)


def mm(a, b):
    """2-D matrix product, fp32 accumulation, output in the higher of the two dtypes."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0], "incompatible dimensions"
    calls.append(("mm",))
    return torch.mm(a.float(), b.float()).to(torch.promote_types(a.dtype, b.dtype))


def addmm(bias, mat1, mat2, *, beta=1, alpha=1):
    """``beta * bias + alpha * mat1 @ mat2`` with the bias broadcast to ``(M, N)``; output in mat1's dtype."""
    assert mat1.dim() == 2 and mat2.dim() == 2 and mat1.shape[1] == mat2.shape[0], "Incompatible dimensions"
    calls.append(("addmm",))
    product = torch.mm(mat1.float(), mat2.float())
    return (alpha * product + beta * bias.float().broadcast_to(product.shape)).to(mat1.dtype)


SUPPORTED_FP8_DTYPE = torch.float32  # the real one: float8_e4m3fn on sm90+ devices, float32 elsewhere (this "device")


def per_token_group_quant_fp8(x, group_size, eps=1e-10, dtype=None, column_major_scales=False, scale_ue8m0=False):
    """Groups of ``group_size`` along the last dim: ``s = max(|g|, eps) / max``, ``q = clamp(g / s)`` in fp32,
    stored as `dtype` (default SUPPORTED_FP8_DTYPE, which is float32 off sm90). Returns ``(q like x, s of
    shape x.shape[:-1] + (groups,))``; the row stride is read as ``x.shape[1]`` columns (2-D in practice)."""
    assert not column_major_scales and not scale_ue8m0, "fake: only row-major fp32 scales modelled"
    fp8_dtype = SUPPORTED_FP8_DTYPE if dtype is None else dtype
    assert x.shape[-1] % group_size == 0, "the last dimension of `x` must be divisible by `group_size`"
    assert x.stride(-1) == 1, "`x` groups must be contiguous"
    calls.append(("per_token_group_quant_fp8", group_size))
    finfo = torch.finfo(fp8_dtype)  # raises TypeError for an integer dtype, as the real one
    groups = x.float().reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size)
    scale = groups.abs().amax(dim=-1, keepdim=True).clamp(min=eps) / finfo.max
    q = (groups / scale).clamp(finfo.min, finfo.max).to(fp8_dtype)
    return q.reshape(x.shape), scale.squeeze(-1)


def cutlass_scaled_mm(c, a, b, a_scale, b_scale, bias=None):
    """``c = (a @ b) * a_scale * b_scale`` cast to c's dtype, then ``+ bias`` (added after the cast, as the real
    kernel does), written into c. a row-major ``[M, K]`` fp8 or int8, b column-major ``[K, N]``; scales fp32,
    per tensor (one), per token (``M``) / per channel (``N``) elements, contiguous; the real wrapper's asserts."""
    assert a.dim() == 2 and b.dim() == 2 and c.dim() == 2, "All inputs must be 2D tensors"
    assert c.size(0) == a.size(0) and a.size(1) == b.size(0) and b.size(1) == c.size(1)
    assert a.stride(1) == 1 and c.stride(1) == 1, "a and c must be row-major"
    assert b.stride(0) == 1, "b must be column-major"
    assert c.stride(0) % 16 == 0, "Row stride of c must be 16-byte aligned"
    assert b.stride(1) % 16 == 0, "Column stride of b must be 16-byte aligned"
    if bias is not None:
        assert bias.numel() == b.size(1) and bias.is_contiguous() and bias.dim() == 1
        # 5.0.2's Triton kernel fails to compile (CompilationError "at 94:4", its `c += bias`) when the bias is not
        # of c's dtype: seen on an H200 with triton 3.6, 2026-12-03
        assert bias.dtype == c.dtype, "fake: a bias of another dtype than c does not compile in the real kernel"
    assert a_scale.dtype == torch.float32 and b_scale.dtype == torch.float32, "scales must be float32"
    assert a_scale.numel() in (1, a.size(0)) and b_scale.numel() in (1, b.size(1)), "fake: block-wise not modelled"
    assert a_scale.is_contiguous() and b_scale.is_contiguous()
    assert a.dtype in (torch.float8_e4m3fn, torch.int8) and b.dtype == a.dtype, f"Unsupported dtype: {a.dtype}"
    calls.append(("cutlass_scaled_mm", str(a.dtype).removeprefix("torch.")))
    acc = torch.mm(a.double(), b.double()).float()  # exact for int8 (int32 in the real kernel) and fp8 products
    out = (a_scale.reshape(-1, 1) * acc * b_scale.reshape(1, -1)).to(c.dtype)
    if bias is not None:
        out = (out + bias).to(c.dtype)
    c.copy_(out)
    return c


def cross_entropy_loss(inp, target, weight=None, reduction="mean", ignore_index=-100, label_smoothing=0.0):
    """5.0.2's ``fused/cross_entropy_loss`` for integer targets ``[N]`` and logits ``[N, C]``: fp32 math, output in
    inp's dtype, its own backward (autograd here). Its quirk: the kernel loads the logit at *every* row's target,
    ignored rows included, masked only by the row bound (-100 reads before the row, before the tensor for row 0):
    asserted here, as that read is what can turn the masked-out value into NaN."""
    assert weight is None and label_smoothing == 0.0, "fake: only the unweighted, unsmoothed form modelled"
    assert inp.dim() == 2 and target.dim() == 1 and target.shape[0] == inp.shape[0], "fake: only [N, C] modelled"
    classes = inp.shape[1]
    assert bool(((target >= 0) & (target < classes)).all()), (
        "fake: 5.0.2 reads inp[row, target] for every row, ignored ones included: out of bounds here")
    calls.append(("cross_entropy_loss", reduction))
    x = inp.float()
    keep = (target != ignore_index).float()
    rows = (torch.logsumexp(x, dim=-1) - x.gather(1, target[:, None]).squeeze(1)) * keep
    if reduction == "mean":
        out = rows.sum() / keep.sum()
    elif reduction == "sum":
        out = rows.sum()
    else:
        assert reduction == "none"
        out = rows
    return out.to(inp.dtype)
