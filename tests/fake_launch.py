"""A CPU stand-in for Triton's launch path and for FlagGems functions that launch through it, for the fast launch
path (fl_patch/kernels/fast_launch.py) in CPU tests and in the ``--dry-run`` of tests/gpu/fast_launch_gpu.py and
benchmarks/bench_host_cost.py.

- :class:`Kernel` plays Triton's ``CompiledKernel``: ``kernel[grid](*args)`` and the ``run`` property lead to one
  launcher, called as Triton's is (``launcher(gx, gy, gz, stream, function, packed_metadata, launch_metadata,
  enter_hook, exit_hook, *args)``). Its body works like a kernel's: it reaches tensors through their addresses
  (``data_ptr()``) and the strides it is given, never through the Python objects' shapes, so a launch is right
  only if the addresses are. The launcher's outer frame is in a module named as FlagGems' generated code
  (:data:`LAUNCHER`), as Triton's launcher is Triton's on a GPU: fl_patch/failures.py tells a kernel's own failure
  from a callback's by the module of each frame.
- :func:`api` is the matching :class:`~fl_patch.kernels.fast_launch.LaunchApi` ("cpu" tensors, :data:`STATE`'s
  stream and capture flag, launch hooks in :data:`HOOKS`).
- :data:`gems` holds functions named and called like FlagGems' (``rms_norm``, ``silu_and_mul``,
  ``apply_rotary_pos_emb``, ``layer_norm``, ``rms_norm_forward``), written the way FlagGems writes them (allocate,
  take views, launch), plus ones that can't be bound, one per reason.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import torch
from torch.utils._python_dispatch import _disable_current_modes

from fl_patch.kernels import fast_launch

LAUNCHER: dict = {"__name__": "_gen_fake_launcher"}  # the launcher's outer frame (see the module docstring)
exec("def launcher(kernel, *args):\n    return kernel._launcher(*args)\n", LAUNCHER)
STATE = SimpleNamespace(stream=7, capturing=False, device=-1, launches=[])  # launches: (kernel name, stream)
HOOKS = SimpleNamespace(enter=None, exit=None)


class Strided:
    """FlagGems' StridedBuffer: a tensor reinterpreted (address, shape, strides); only ``data_ptr`` reaches a
    kernel."""

    def __init__(self, base: torch.Tensor, shape, strides):
        self.base, self.shape, self._strides, self.dtype = base, tuple(shape), tuple(strides), base.dtype

    def data_ptr(self) -> int:
        return self.base.data_ptr()

    def stride(self):
        return self._strides


class Kernel:
    """A compiled kernel: `params` as (name, Triton type) pairs, `body(grid, *args)` what it computes."""

    def __init__(self, name: str, params: list[tuple[str, str]], body):
        self.name = name
        self.src = SimpleNamespace(signature=dict(params))
        self.function = object()
        self.packed_metadata = (4, 1, 0)
        self.body = body
        self._run = None

    @property
    def run(self):
        if self._run is None:
            self._run = functools.partial(LAUNCHER["launcher"], self)
        return self._run

    def _launcher(self, gx, gy, gz, stream, function, packed, metadata, enter, leave, *args):
        assert function is self.function and packed is self.packed_metadata
        if enter is not None:
            enter(metadata)
        STATE.launches.append((self.name, stream))
        with _disable_current_modes():  # a kernel's work is not torch's: dispatch modes don't see it
            self.body((gx, gy, gz), *args)
        if leave is not None:
            leave(metadata)

    def launch_metadata(self, grid, stream, *args):
        return {"name": self.name, "stream": stream, "grid": grid}

    def __getitem__(self, grid):
        grid = tuple(grid) + (1, 1)

        def runner(*args):
            stream = STATE.stream
            enter, leave = _hooks()
            metadata = self.launch_metadata(grid[:3], stream, *args)
            self.run(grid[0], grid[1], grid[2], stream, self.function, self.packed_metadata, metadata, enter, leave,
                     *args)

        return runner


def _hooks():
    return HOOKS.enter, HOOKS.exit


def api() -> fast_launch.LaunchApi:
    """The LaunchApi of this stand-in."""

    def hooks():
        return None if HOOKS.enter is None and HOOKS.exit is None else (HOOKS.enter, HOOKS.exit)

    return fast_launch.LaunchApi(Kernel, "cpu", lambda: STATE.device, lambda index: STATE.stream,
                                 lambda: STATE.capturing, hooks, name="fake launcher")


def at(pointer, dtype: torch.dtype, size, stride) -> torch.Tensor:
    """What a kernel sees at `pointer` (an object with ``data_ptr``) read as `dtype` with `size` and `stride`."""
    base = pointer if isinstance(pointer, torch.Tensor) else pointer.base
    assert base.dtype == dtype
    offset, rest = divmod(pointer.data_ptr() - base.untyped_storage().data_ptr(), dtype.itemsize)
    assert rest == 0
    return torch.as_strided(base, size, stride, offset)


def _dtype(pointer) -> torch.dtype:
    return pointer.dtype


# ------------------------------------------------------------------------------------------------ kernels

def _rms_body(grid, out, inv_rms, x, w, y_stride_r, y_stride_c, x_stride_r, x_stride_c, n, eps, block):
    rows = grid[0]
    dtype = _dtype(x)
    h = at(x, dtype, (rows, n), (x_stride_r, x_stride_c)).float()
    r = torch.rsqrt(h.pow(2).mean(-1) + eps)
    at(inv_rms, torch.float32, (rows,), (1,)).copy_(r)
    y = h * r[:, None] * at(w, _dtype(w), (n,), (1,)).float()
    at(out, dtype, (rows, n), (y_stride_r, y_stride_c)).copy_(y)


RMS_NORM = Kernel("rms_norm_kernel", [("out_ptr", "*fp"), ("INV_RMS", "*fp32"), ("in_ptr", "*fp"), ("w_ptr", "*fp"),
                                      ("y_stride_r", "i32"), ("y_stride_c", "i32"), ("x_stride_r", "i32"),
                                      ("x_stride_c", "i32"), ("N", "i32"), ("eps", "fp32"),
                                      ("BLOCK_SIZE", "constexpr")], _rms_body)


def rms_norm_forward(x, normalized_shape, weight, eps=1e-5):
    """FlagGems' ``rms_norm_forward``: contiguous x, ``(y, inv_rms)``, one launch."""
    n = math.prod(normalized_shape)
    rows = x.numel() // n
    x = x.contiguous()
    weight = weight.contiguous()
    y = torch.empty_like(x)
    inv_rms = torch.empty((rows,), device=x.device, dtype=torch.float32)
    RMS_NORM[rows,](y, inv_rms, x, weight, n, 1, n, 1, n, eps, 1 << (n - 1).bit_length())
    return y, inv_rms


class _RmsNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        y, inv_rms = rms_norm_forward(x, normalized_shape, weight, eps)
        ctx.save_for_backward(x, inv_rms, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        raise NotImplementedError


def rms_norm(x, normalized_shape, weight, eps=1e-5):
    """FlagGems' ``rms_norm``: an autograd.Function around ``rms_norm_forward``; returns y (inv_rms is scratch)."""
    return _RmsNorm.apply(x, normalized_shape, weight, eps)


def _silu_body(grid, out, a, b, n, a_stride, b_stride, out_stride):
    dtype = _dtype(out)
    left = at(a, _dtype(a), (n,), (a_stride,)).float()
    right = at(b, _dtype(b), (n,), (b_stride,)).float()
    at(out, dtype, (n,), (out_stride,)).copy_(left / (1.0 + torch.exp(-left)) * right)


SILU_AND_MUL = Kernel("silu_and_mul_kernel", [("out0", "*fp"), ("in0", "*fp"), ("in1", "*fp"), ("n", "i64"),
                                              ("s0", "i64"), ("s1", "i64"), ("s2", "i64")], _silu_body)


def _silu_rows_body(grid, out, a, b, rows, cols, a_row, b_row, out_row):
    left = at(a, _dtype(a), (rows, cols), (a_row, 1)).float()
    right = at(b, _dtype(b), (rows, cols), (b_row, 1)).float()
    at(out, _dtype(out), (rows, cols), (out_row, 1)).copy_(left / (1.0 + torch.exp(-left)) * right)


SILU_AND_MUL_ROWS = Kernel("silu_and_mul_kernel_2d", [("out0", "*fp"), ("in0", "*fp"), ("in1", "*fp"),
                                                      ("rows", "i64"), ("cols", "i64"), ("s0", "i64"), ("s1", "i64"),
                                                      ("s2", "i64")], _silu_rows_body)


def silu_and_mul(a, b):
    """FlagGems' ``silu_and_mul`` (pointwise_dynamic): contiguous inputs as one flat task, 2-D ones with row strides
    as a 2-D task, through StridedBuffer wrappers; output ``empty_like(a)``."""
    out = torch.empty_like(a)
    if a.is_contiguous() and b.is_contiguous():
        n = a.numel()
        SILU_AND_MUL[(n + 511) // 512,](Strided(out, (n,), (1,)), Strided(a, (n,), (1,)), Strided(b, (n,), (1,)),
                                        n, 1, 1, 1)
    else:
        assert a.dim() == 2 and a.stride(1) == 1 and b.stride(1) == 1, "fake: 2-D row-strided inputs only"
        rows, cols = a.shape
        SILU_AND_MUL_ROWS[rows,](out, a, b, rows, cols, a.stride(0), b.stride(0), out.stride(0))
    return out


def _rope_body(grid, oq, ok, q, k, cos, sin, pos, qs, qh, qd, ks, kh, kd, oqs, oqh, oqd, oks, okh, okd, ps,
               cos_s, sin_s, seq_len, q_heads, k_heads, head_dim, padded, interleaved, max_positions):
    tokens = grid[0]
    half = head_dim // 2
    positions = torch.arange(tokens) % seq_len
    c = at(cos, _dtype(cos), (max_positions, half), (cos_s, 1))[positions].float()[:, None, :]
    s = at(sin, _dtype(sin), (max_positions, half), (sin_s, 1))[positions].float()[:, None, :]
    for src, dst, heads, strides, out_strides in ((q, oq, q_heads, (qs, qh, qd), (oqs, oqh, oqd)),
                                                  (k, ok, k_heads, (ks, kh, kd), (oks, okh, okd))):
        h = at(src, _dtype(src), (tokens, heads, head_dim), strides).float()
        if interleaved:
            even, odd = h[..., 0::2], h[..., 1::2]
            out = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1).flatten(-2)
        else:
            first, second = h[..., :half], h[..., half:]
            out = torch.cat((first * c - second * s, second * c + first * s), dim=-1)
        at(dst, _dtype(dst), (tokens, heads, head_dim), out_strides).copy_(out)


ROPE = Kernel("apply_rotary_pos_emb_kernel",
              [(name, "*fp") for name in ("oq_ptr", "ok_ptr", "q_ptr", "k_ptr", "cos_ptr", "sin_ptr")]
              + [("pos_ptr", "constexpr")]
              + [(name, "i64") for name in ("q_stride_s", "q_stride_h", "q_stride_d", "k_stride_s", "k_stride_h",
                                           "k_stride_d", "oq_stride_s", "oq_stride_h", "oq_stride_d", "ok_stride_s",
                                           "ok_stride_h", "ok_stride_d", "p_stride_s", "cos_stride_s", "sin_stride_s",
                                           "seq_len")]
              + [(name, "constexpr") for name in ("NUM_Q_HEADS", "NUM_K_HEADS", "HEAD_DIM", "PADDED_HEAD_DIM",
                                                 "ROTARY_INTERLEAVED", "MAX_POSITION_EMBEDDINGS")], _rope_body)


def apply_rotary_pos_emb(q, k, cos, sin, position_ids=None, rotary_interleaved=False, inplace=False):
    """FlagGems' ``apply_rotary_pos_emb`` without position ids: q, k viewed as (tokens, heads, dim), outputs
    ``empty_like`` of those views, returned as views in q's and k's shapes."""
    assert position_ids is None and not inplace, "fake: no position ids, not in place"
    q_shape, k_shape = q.shape, k.shape
    seq_len = q.shape[-3]
    q = q.view(-1, q.shape[-2], q.shape[-1])
    k = k.view(-1, k.shape[-2], k.shape[-1])
    tokens, q_heads, head_dim = q.shape
    q_embed, k_embed = torch.empty_like(q), torch.empty_like(k)
    ROPE[(tokens,)](q_embed, k_embed, q, k, cos, sin, None, *q.stride(), *k.stride(), *q_embed.stride(),
                    *k_embed.stride(), 0, cos.stride(0), sin.stride(0), seq_len, q_heads, k.shape[-2], head_dim,
                    max(16, 1 << (head_dim - 1).bit_length()), rotary_interleaved, cos.shape[0])
    return q_embed.view(q_shape), k_embed.view(k_shape)


def _layer_norm_partial_body(grid, x, partial, rows, n):
    h = at(x, _dtype(x), (rows, n), (n, 1)).float()
    at(partial, torch.float32, (rows, 2), (2, 1)).copy_(torch.stack((h.mean(-1), h.var(-1, unbiased=False)), -1))


def _layer_norm_body(grid, x, y, w, b, mean, rstd, partial, rows, n, eps):
    dtype = _dtype(x)
    h = at(x, dtype, (rows, n), (n, 1)).float()
    stats = at(partial, torch.float32, (rows, 2), (2, 1))
    r = torch.rsqrt(stats[:, 1] + eps)
    out = (h - stats[:, 0:1]) * r[:, None]
    if w is not None:
        out = out * at(w, _dtype(w), (n,), (1,)).float()
    if b is not None:
        out = out + at(b, _dtype(b), (n,), (1,)).float()
    at(y, dtype, (rows, n), (n, 1)).copy_(out)
    at(mean, dtype, (rows,), (1,)).copy_(stats[:, 0])
    at(rstd, dtype, (rows,), (1,)).copy_(r)


LAYER_NORM_STATS = Kernel("layer_norm_stats", [("x", "*fp"), ("partial", "*fp32"), ("M", "i32"), ("N", "i32")],
                          _layer_norm_partial_body)
LAYER_NORM = Kernel("layer_norm_kernel", [("x", "*fp"), ("y", "*fp"), ("w", "*fp"), ("b", "*fp"), ("mean", "*fp"),
                                          ("rstd", "*fp"), ("partial", "*fp32"), ("M", "i32"), ("N", "i32"),
                                          ("eps", "fp32")], _layer_norm_body)


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """FlagGems' ``layer_norm`` returns ``(y, mean, rstd)``; this one in two launches sharing a scratch tensor
    (statistics, then the normalisation), so a binding must allocate that scratch per call."""
    n = math.prod(normalized_shape)
    rows = x.numel() // n
    x = x.contiguous()
    y = torch.empty_like(x)
    mean = torch.empty(rows, dtype=x.dtype, device=x.device)
    rstd = torch.empty(rows, dtype=x.dtype, device=x.device)
    partial = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
    LAYER_NORM_STATS[rows,](x, partial, rows, n)
    LAYER_NORM[rows,](x, y, weight, bias, mean, rstd, partial, rows, n, eps)
    return y, mean, rstd


# -------------------------------------------------------------------------- functions that can't be bound

_tuned: set = set()


def autotuned_scale(x, factor):
    """An autotuned kernel: its first call per shape clears a benchmark buffer (as Triton's ``do_bench`` does) and
    launches every config; later calls launch the chosen config."""
    out = torch.empty_like(x)
    configs = (2,)
    if x.shape not in _tuned:
        torch.empty(1024, device=x.device).zero_()
        configs = (1, 2, 4)
    _tuned.add(x.shape)
    for block in configs:
        SCALE[x.numel(),](out, x, x.numel(), factor, block)
    return out


def _scale_body(grid, out, x, n, factor, block):
    at(out, _dtype(out), (n,), (1,)).copy_(at(x, _dtype(x), (n,), (1,)) * factor)


SCALE = Kernel("scale_kernel", [("out", "*fp"), ("x", "*fp"), ("n", "i32"), ("factor", "fp32"),
                                ("BLOCK", "constexpr")], _scale_body)
_counter = [0]


def data_dependent_scale(x, factor):
    """Launches that change from call to call (a grid that grows)."""
    out = torch.empty_like(x)
    _counter[0] += 1
    SCALE[x.numel() + _counter[0],](out, x, x.numel(), factor, 1)
    return out


def scale_with_torch_work(x, factor):
    """Torch work besides the launch (``x * 1`` is a multiplication a direct launch would skip)."""
    out = torch.empty_like(x)
    x = x * 1
    SCALE[x.numel(),](out, x, x.numel(), factor, 1)
    return out


def scale_by_raw_pointer(x, factor):
    """A pointer passed as an integer address (constant for a bound launch: never bound)."""
    out = torch.empty_like(x)
    RAW_SCALE[x.numel(),](out.data_ptr(), x, x.numel(), factor, 1, out)
    return out


def _raw_body(grid, out_address, x, n, factor, block, out):
    assert out_address == out.data_ptr()
    _scale_body(grid, out, x, n, factor, block)


RAW_SCALE = Kernel("raw_scale", [("out", "*fp"), ("x", "*fp"), ("n", "i32"), ("factor", "fp32"),
                                 ("BLOCK", "constexpr"), ("out_again", "*fp")], _raw_body)


class TensorDescriptor:
    """Triton's host-side tensor descriptor: an object that carries a tensor's address without being one."""

    __module__ = "triton.tools.tensor_descriptor"

    def __init__(self, base):
        self.base = base


def scale_by_descriptor(x, factor):
    """A launch argument that holds a tensor inside an object (never taken for a constant)."""
    out = torch.empty_like(x)
    DESCRIPTOR_SCALE[x.numel(),](out, TensorDescriptor(x), x.numel(), factor, 1)
    return out


def _descriptor_body(grid, out, descriptor, n, factor, block):
    _scale_body(grid, out, descriptor.base, n, factor, block)


DESCRIPTOR_SCALE = Kernel("descriptor_scale", [("out", "*fp"), ("x", "tensordesc<fp32[16]>"), ("n", "i32"),
                                               ("factor", "fp32"), ("BLOCK", "constexpr")], _descriptor_body)


def scale_into_input(x, factor):
    """Returns one of its inputs (written in place): nothing fresh to return, never bound."""
    SCALE[x.numel(),](x, x, x.numel(), factor, 1)
    return x


UNBOUND = ("autotuned_scale", "data_dependent_scale", "scale_with_torch_work", "scale_by_raw_pointer",
           "scale_by_descriptor", "scale_into_input")  # the functions besides FlagGems' (autotuned_scale binds, late)
gems = SimpleNamespace(
    __name__="fake_launch.gems", rms_norm=rms_norm, rms_norm_forward=rms_norm_forward, silu_and_mul=silu_and_mul,
    apply_rotary_pos_emb=apply_rotary_pos_emb, layer_norm=layer_norm, autotuned_scale=autotuned_scale,
    data_dependent_scale=data_dependent_scale, scale_with_torch_work=scale_with_torch_work,
    scale_by_raw_pointer=scale_by_raw_pointer, scale_by_descriptor=scale_by_descriptor,
    scale_into_input=scale_into_input,
)
