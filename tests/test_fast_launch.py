"""The fast launch path (fl_patch/kernels/fast_launch.py) on CPU, with the stand-in launcher of tests/fake_launch.py:
signature keys, recording and binding, direct launches equal to the public call, every reason a call stays on the
public function, threads, streams, capture, hooks, and the FL_PATCH_FAST_LAUNCH switch."""

import logging
import threading

import pytest
import torch

import fake_launch
import fl_patch
from fl_patch import runtime, settings
from fl_patch.kernels import fast_launch, gems, layer_norm, rms_norm, rope


@pytest.fixture
def ops(monkeypatch):
    """FastOps over the stand-in FlagGems, the stand-in launcher as the launch API; its state reset."""
    monkeypatch.setattr(fake_launch, "STATE", fake_launch.SimpleNamespace(stream=7, capturing=False, device=-1,
                                                                          launches=[]))
    monkeypatch.setattr(fake_launch, "HOOKS", fake_launch.SimpleNamespace(enter=None, exit=None))
    fake_launch._tuned.clear()
    fast_launch.use_api(fake_launch.api())
    yield fast_launch.FastOps(fake_launch.gems, fast_launch.FUNCTIONS + fake_launch.UNBOUND)
    fast_launch.use_api(None)


def site(ops, name):
    """The fast path's site `name`: a FlagGems function's, or a composite's (``rope.gems_hf_full``, ...)."""
    return next(found for found in ops.sites() if found.name == name)


def stats(ops, name):
    return site(ops, name).stats()


def counting(monkeypatch, name):
    """Count the public function's calls (the stand-in's `name`, wrapped)."""
    calls = []
    public = getattr(fake_launch.gems, name)

    def counted(*args, **kwargs):
        calls.append(name)
        return public(*args, **kwargs)

    monkeypatch.setattr(fake_launch.gems, name, counted)
    return calls


def equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b) and a.stride() == b.stride() and a.dtype == b.dtype and a.shape == b.shape
    return len(a) == len(b) and all(equal(x, y) for x, y in zip(a, b, strict=True))


def bf16(*shape):
    return torch.randn(*shape).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------- signatures

def test_signature_keys_tell_apart_what_a_launch_depends_on():
    x = torch.randn(4, 64)
    key, tensors, reason = fast_launch.signature((x, (64,), torch.ones(64), 1e-6), {})
    assert reason is None and tensors[0] is x and len(tensors) == 2
    same, _, _ = fast_launch.signature((torch.randn(4, 64), (64,), torch.ones(64), 1e-6), {})
    assert same == key  # other values, same shapes: one signature
    for other in [(torch.randn(4, 32), (32,), torch.ones(32), 1e-6),  # shape
                  (torch.randn(64, 4).t(), (64,), torch.ones(64), 1e-6),  # strides
                  (bf16(4, 64), (64,), torch.ones(64), 1e-6),  # dtype
                  (torch.randn(4, 64), (64,), torch.ones(64), 1e-5),  # a scalar argument
                  (torch.randn(4, 64), [64], torch.ones(64), 1e-6),  # a list is not a tuple
                  (torch.randn(4, 64), (64,), torch.ones(65)[1:], 1e-6)]:  # a weight 4 bytes off 16-byte alignment
        assert fast_launch.signature(other, {})[0] != key
    with_kwargs, _, _ = fast_launch.signature((x,), {"eps": 1e-6})
    assert with_kwargs != fast_launch.signature((x, 1e-6), {})[0]


def test_signature_refuses_what_it_cant_key():
    x = torch.randn(4, 8)
    assert fast_launch.signature((x.requires_grad_(),), {})[2] == fast_launch.AUTOGRAD
    with torch.no_grad():
        assert fast_launch.signature((x,), {})[2] is None  # no autograd without grad mode
    assert fast_launch.signature((torch.randn(2), float("nan")), {})[2] == "nan argument"
    assert fast_launch.signature((torch.randn(2), (1, "a")), {})[2] == "argument type tuple"
    assert fast_launch.signature((torch.randn(2), object()), {})[2] == "argument type object"

    class Sub(torch.Tensor):
        pass

    assert fast_launch.signature((torch.randn(2).as_subclass(Sub),), {})[2] == "tensor subclass Sub"
    assert fast_launch.signature((torch.nn.Parameter(torch.randn(2), requires_grad=False),), {})[2] is None


# ------------------------------------------------------------------------------------------ record and bind

def test_first_calls_run_the_public_function_then_the_signature_binds(ops, monkeypatch):
    calls = counting(monkeypatch, "rms_norm")
    weight = bf16(64)
    for call in range(5):
        x = bf16(6, 64)
        out = ops.rms_norm(x, (64,), weight, 1e-6)
        assert equal(out, fake_launch.rms_norm(x, (64,), weight, 1e-6)), call
    assert calls == ["rms_norm"] * 2  # two recordings, then direct launches
    assert stats(ops, "rms_norm") == {"bound": 1, "fast_calls": 3, "recording": 0, "not_bound": {},
                                      "public_calls": {fast_launch.RECORDING: 2}}
    assert fake_launch.Kernel.__dict__["run"].fget.__name__ == "run"  # the class's own property back
    assert "_recording_property" not in fake_launch.Kernel.__dict__["run"].fget.__qualname__


def test_every_stand_in_function_binds_and_gives_the_public_results(ops):
    torch.manual_seed(0)
    cos, sin = torch.randn(4096, 8).to(torch.bfloat16), torch.randn(4096, 8).to(torch.bfloat16)
    fused = bf16(3, 5, 3 * 4 * 16)  # q, k as slices of one projection, as models with a fused qkv give them

    def cases():
        qkv = bf16(*fused.shape)
        return {
            "rms_norm": (bf16(3, 5, 64), (64,), bf16(64), 1e-6),
            "rms_norm_forward": (bf16(7, 32), (32,), torch.randn(32), 1e-5),  # Gemma: fp32 weight
            "silu_and_mul": (bf16(4, 96), bf16(4, 96)),
            "apply_rotary_pos_emb": (qkv[..., :64].view(3, 5, 4, 16), qkv[..., 64:128].view(3, 5, 4, 16), cos, sin),
            "layer_norm": (bf16(6, 48), (48,), bf16(48), None, 1e-5),
        }

    for _ in range(4):
        for name, args in cases().items():
            assert equal(getattr(ops, name)(*args), getattr(fake_launch.gems, name)(*args)), name
    for name in cases():
        assert stats(ops, name)["bound"] == 1 and stats(ops, name)["fast_calls"] == 2, name


def test_outputs_are_allocated_as_the_public_call_allocates_them(ops):
    x = torch.randn(8, 4, 6).permute(2, 0, 1)  # dense, not contiguous: empty_like keeps its strides
    for _ in range(4):
        out = ops.autotuned_scale(x, 3.0)
    assert out.stride() == x.stride() and out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out, x * 3.0) and stats(ops, "autotuned_scale")["fast_calls"] == 1
    q, k = bf16(2, 3, 4, 16), bf16(2, 3, 2, 16)
    cos, sin = bf16(4096, 8), bf16(4096, 8)
    for _ in range(3):
        q_out, k_out = ops.apply_rotary_pos_emb(q, k, cos, sin)
    assert q_out.shape == q.shape and k_out.shape == k.shape and q_out.is_contiguous()
    for _ in range(3):
        y, mean, rstd = ops.layer_norm(bf16(5, 32), (32,))
    assert (y.shape, mean.shape, rstd.shape, mean.dtype) == ((5, 32), (5,), (5,), torch.bfloat16)
    assert stats(ops, "layer_norm")["fast_calls"] == 1


def test_autotuning_settles_within_the_recordings(ops, monkeypatch):
    calls = counting(monkeypatch, "autotuned_scale")
    x = torch.randn(32)
    for _ in range(5):
        assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0)
    assert calls == ["autotuned_scale"] * 3  # the tuning call differs from the next; the next two agree
    assert stats(ops, "autotuned_scale")["fast_calls"] == 2


def test_a_recording_that_cant_bind_lets_go_of_what_it_held():
    """An autotuning call allocates benchmark buffers (256 MB each in Triton's do_bench) and clears them: once
    torch work shows the call can't bind, its allocations and launches are no longer held."""
    recording = fast_launch._Recording()
    with fast_launch._torch_work_mode(recording):
        kept = torch.empty(8)
        torch.empty(1024).zero_()
        torch.empty(16)
    assert recording.torch_work == ["aten.zero_"] and recording.allocations == [] and kept.numel() == 8
    fresh = fast_launch._Recording()
    with fast_launch._torch_work_mode(fresh):
        torch.empty(8)
        torch.empty(4).view(2, 2)
    assert fresh.torch_work == [] and [t.shape for t in fresh.allocations] == [(8,), (4,)]


def test_launches_that_differ_between_calls_are_never_bound(ops, caplog):
    caplog.set_level(logging.INFO, "fl_patch")
    x = torch.randn(16)
    for _ in range(fast_launch.RECORDINGS + 3):
        assert torch.equal(ops.data_dependent_scale(x, 2.0), x * 2.0)
    entry = stats(ops, "data_dependent_scale")
    assert entry["bound"] == 0 and entry["not_bound"] == {fast_launch.DIFFERENT: 1}
    assert entry["public_calls"] == {fast_launch.RECORDING: fast_launch.RECORDINGS, fast_launch.DIFFERENT: 3}
    assert "stays off for a signature (launches differ between calls)" in caplog.text


@pytest.mark.parametrize("name, reason", [
    ("scale_with_torch_work", "torch work in the call: aten.mul"),
    ("scale_by_raw_pointer", "raw pointer argument"),
    ("scale_by_descriptor", "launch argument of type TensorDescriptor"),
    ("scale_into_input", "returns a tensor not allocated by the call"),
])
def test_calls_a_direct_launch_would_get_wrong_are_never_bound(ops, name, reason):
    for _ in range(fast_launch.RECORDINGS + 1):
        x = torch.randn(16)
        expected = x * 2.0
        assert torch.equal(getattr(ops, name)(x, 2.0), expected)
    entry = stats(ops, name)
    assert entry["bound"] == 0 and entry["not_bound"] == {reason: 1}
    assert entry["public_calls"] == {fast_launch.RECORDING: fast_launch.RECORDINGS, reason: 1}


def test_a_direct_launch_that_does_not_reproduce_the_public_call_is_never_bound(ops, monkeypatch, caplog):
    """Before a signature binds, its plan is launched once on the binding call's inputs and compared with the result
    FlagGems' own call returned: a kernel whose direct launch gives other numbers (here one that reads a launch
    counter, as a binding this module got wrong on an unknown Triton would read the wrong memory) never binds, and
    no caller gets the plan's result."""
    launches = []

    def body(grid, out, x, n):
        launches.append(grid)
        fake_launch.at(out, torch.float32, (n,), (1,)).copy_(fake_launch.at(x, torch.float32, (n,), (1,))
                                                             + len(launches))

    kernel = fake_launch.Kernel("drifting_kernel", [("out", "*fp32"), ("x", "*fp32"), ("n", "i32")], body)

    def drifting(x):
        out = torch.empty_like(x)
        kernel[(1,)](out, x, x.numel())
        return out

    monkeypatch.setattr(fake_launch.gems, "drifting", drifting, raising=False)
    fast = fast_launch.wrap(fake_launch.gems, "drifting")
    x = torch.zeros(4)
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        outs = [fast(x) for _ in range(5)]
    assert fast.site.stats() == {"bound": 0, "fast_calls": 0, "recording": 0,
                                 "not_bound": {fast_launch.DIFFERED: 1},
                                 "public_calls": {fast_launch.RECORDING: 2, fast_launch.DIFFERED: 3}}
    # every caller got FlagGems' own result: launches 1, 2, then the check's (3), then 4, 5, 6
    assert [int(out[0]) for out in outs] == [1, 2, 4, 5, 6]
    assert caplog.text.count("did not reproduce FlagGems' own call") == 1
    with caplog.at_level(logging.WARNING, logger="fl_patch"):
        for _ in range(2):
            fast(torch.zeros(5))  # another signature, refused too: said once per function
    assert fast.site.stats()["not_bound"] == {fast_launch.DIFFERED: 2}
    assert caplog.text.count("did not reproduce FlagGems' own call") == 1


def test_the_check_compares_bits_so_a_nan_result_still_binds(ops):
    weight = bf16(64)
    for _ in range(3):
        x = bf16(4, 64)
        x[1, 3] = float("nan")  # a row of NaN out: the same bits from both launches
        out = ops.rms_norm(x, (64,), weight, 1e-6)
        assert equal(out.view(torch.int16), fake_launch.rms_norm(x, (64,), weight, 1e-6).view(torch.int16))
    assert stats(ops, "rms_norm")["bound"] == 1 and stats(ops, "rms_norm")["fast_calls"] == 1
    assert not fast_launch._same(torch.tensor([0.0]), torch.tensor([-0.0]))  # bits, not values
    assert not fast_launch._same(torch.zeros(2, 2), torch.zeros(2, 2).t().contiguous().t())  # strides too


def test_the_check_before_binding_is_not_counted_as_a_call(ops):
    x, weight = bf16(4, 64), bf16(64)
    before = len(fake_launch.STATE.launches)
    for _ in range(3):
        ops.rms_norm(x, (64,), weight, 1e-6)
    assert stats(ops, "rms_norm")["fast_calls"] == 1  # the third call; the second's check launched once more
    assert len(fake_launch.STATE.launches) - before == 4


def test_out_of_memory_in_the_check_leaves_the_signature_to_a_later_call(ops, monkeypatch):
    x, weight = bf16(4, 64), bf16(64)
    original = fast_launch._Plan.run
    raised = []

    def short_of_memory_once(self, tensors):
        if not raised:
            raised.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return original(self, tensors)

    monkeypatch.setattr(fast_launch._Plan, "run", short_of_memory_once)
    outs = [ops.rms_norm(x, (64,), weight, 1e-6) for _ in range(4)]
    assert all(equal(out, fake_launch.rms_norm(x, (64,), weight, 1e-6)) for out in outs)
    assert raised and stats(ops, "rms_norm")["bound"] == 1  # the fourth call's check passed


def test_aliased_inputs_are_never_bound(ops):
    x = torch.randn(4, 32)
    for _ in range(fast_launch.RECORDINGS):
        assert equal(ops.silu_and_mul(x, x), fake_launch.silu_and_mul(x, x))
    assert stats(ops, "silu_and_mul")["not_bound"] == {"aliased inputs": 1}


def test_direct_launches_put_each_calls_tensors_in_place(ops):
    """Many calls of one signature, new tensors each time, a strided pair of inputs (slices of one tensor)."""
    torch.manual_seed(1)
    for _ in range(6):
        both = torch.randn(5, 64)
        gate, up = both[:, :32], both[:, 32:]
        assert equal(ops.silu_and_mul(gate, up), fake_launch.silu_and_mul(gate, up))
    assert stats(ops, "silu_and_mul")["fast_calls"] == 4


# ------------------------------------------------------------------------------------- reasons and states

def test_calls_needing_autograd_run_the_public_function(ops, monkeypatch):
    calls = counting(monkeypatch, "rms_norm")
    x, weight = torch.randn(4, 16, requires_grad=True), torch.randn(16)
    for _ in range(3):
        ops.rms_norm(x, (16,), weight, 1e-6)
    assert calls == ["rms_norm"] * 3
    assert stats(ops, "rms_norm")["public_calls"] == {fast_launch.AUTOGRAD: 3}
    with torch.no_grad():
        for _ in range(3):
            ops.rms_norm(x, (16,), weight, 1e-6)
    assert stats(ops, "rms_norm")["fast_calls"] == 1


def test_without_a_launch_api_every_call_is_public_and_says_why(ops, monkeypatch):
    def missing():
        raise fast_launch.Unbindable("no launch API (triton 3.2 lacks CompiledKernel.run as a property)")

    fast_launch.use_api(None)
    monkeypatch.setattr(fast_launch, "triton_api", missing)
    x = torch.randn(4)
    for _ in range(3):
        assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0)
    reason = "no launch API (triton 3.2 lacks CompiledKernel.run as a property)"
    assert stats(ops, "autotuned_scale")["public_calls"] == {reason: 3}
    assert fast_launch.stats()["api_problem"] == reason and reason in fast_launch.summary_line()


def test_the_installed_triton_is_checked_by_feature():
    try:
        api = fast_launch.triton_api()
    except fast_launch.Unbindable as exc:
        assert str(exc).startswith("no launch API")
    else:  # a machine with Triton: what this module relies on is there
        assert isinstance(api.kernel_class.__dict__["run"], property) and api.device_type == "cuda"


def test_tensors_the_api_doesnt_launch_for_are_public(ops):
    fast_launch.use_api(fake_launch.api().__class__(**{**fake_launch.api().__dict__, "device_type": "cuda"}))
    x = torch.randn(8)
    for _ in range(3):
        assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0)
    assert stats(ops, "autotuned_scale")["public_calls"] == {"cpu tensor": 3}


def test_a_bound_signature_on_another_device_than_the_current_one_is_public(ops):
    x = torch.randn(8)
    for _ in range(3):
        ops.autotuned_scale(x, 2.0)
    fake_launch.STATE.device = 1
    assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0)
    assert stats(ops, "autotuned_scale")["public_calls"][fast_launch.NOT_CURRENT] == 1


def test_nothing_is_recorded_during_a_capture_and_bound_launches_are_captured(ops):
    weight = torch.randn(16)
    fake_launch.STATE.capturing = True
    for _ in range(2):
        ops.rms_norm(torch.randn(2, 16), (16,), weight, 1e-6)
    assert stats(ops, "rms_norm")["public_calls"] == {fast_launch.CAPTURING: 2}
    fake_launch.STATE.capturing = False
    for _ in range(2):
        ops.rms_norm(torch.randn(2, 16), (16,), weight, 1e-6)
    fake_launch.STATE.capturing, fake_launch.STATE.stream = True, 99
    x = torch.randn(2, 16)
    assert torch.equal(ops.rms_norm(x, (16,), weight, 1e-6), fake_launch.rms_norm(x, (16,), weight, 1e-6))
    assert fake_launch.STATE.launches[-2] == ("rms_norm_kernel", 99)  # the fast launch, on the capturing stream
    [plan] = ops.rms_norm.site.entries.values()
    assert plan.calls == 1 and 99 not in plan.scratch_by_stream  # no scratch kept from inside a capture


def test_launches_go_to_the_current_stream_and_single_launch_scratch_is_kept_per_stream(ops):
    weight = torch.randn(16)
    for stream in (7, 7, 7, 8, 8, 7):
        fake_launch.STATE.stream = stream
        x = torch.randn(3, 16)
        assert torch.equal(ops.rms_norm(x, (16,), weight, 1e-6), fake_launch.rms_norm(x, (16,), weight, 1e-6))
        assert fake_launch.STATE.launches[-1] == ("rms_norm_kernel", stream)
    [plan] = ops.rms_norm.site.entries.values()
    assert set(plan.scratch_by_stream) == {7, 8} and plan.reuse_scratch
    for _ in range(3):
        ops.layer_norm(torch.randn(3, 16), (16,))
    [two_launches] = ops.layer_norm.site.entries.values()
    assert not two_launches.reuse_scratch and not two_launches.scratch_by_stream  # scratch read by the 2nd launch


def test_launch_hooks_get_the_metadata_of_direct_launches(ops):
    seen = []
    fake_launch.HOOKS.enter = seen.append
    x = torch.randn(4)
    for _ in range(4):
        ops.autotuned_scale(x, 2.0)
    assert stats(ops, "autotuned_scale")["fast_calls"] == 1
    assert seen[-1] == {"name": "scale_kernel", "stream": 7, "grid": (4, 1, 1)}


def test_calls_traced_by_torch_compile_run_the_public_function_uncounted(ops):
    def double_silu(a, b):
        return ops.silu_and_mul(a, b) * 2

    compiled = torch.compile(double_silu, backend="eager")
    a, b = torch.randn(4, 32), torch.randn(4, 32)
    assert torch.equal(compiled(a, b), fake_launch.silu_and_mul(a, b) * 2)
    torch._dynamo.reset()


def test_a_call_made_while_recording_is_public(ops, monkeypatch):
    inner = []

    def outer(x, factor):
        inner.append(ops.autotuned_scale(x, factor))
        return fake_launch.autotuned_scale(x, factor)

    monkeypatch.setattr(fake_launch.gems, "outer", outer, raising=False)
    fast_outer = fast_launch.wrap(fake_launch.gems, "outer")
    fast_outer(torch.randn(4), 2.0)
    assert stats(ops, "autotuned_scale")["public_calls"] == {fast_launch.NESTED: 1}


def test_a_full_signature_table_sends_new_signatures_to_the_public_function(ops, monkeypatch):
    monkeypatch.setattr(fast_launch, "SIGNATURES", 2)
    for size in (4, 4, 5, 5, 6, 6, 4):
        ops.autotuned_scale(torch.randn(size), 2.0)
    entry = stats(ops, "autotuned_scale")
    assert entry["public_calls"][fast_launch.FULL] == 2  # size 6: no room
    assert entry["bound"] == 1 and entry["recording"] == 1  # size 4 bound on its third call, size 5 recording
    assert len(ops.autotuned_scale.site.entries) == 2


def test_errors_while_binding_or_launching_leave_the_signature_on_the_public_function(ops, monkeypatch, caplog):
    monkeypatch.setattr(fast_launch, "_pointer_types", lambda kernel: 1 / 0)
    x = torch.randn(4)
    for _ in range(fast_launch.RECORDINGS + 1):
        assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0)
    assert stats(ops, "autotuned_scale")["not_bound"] == {"binding error: ZeroDivisionError": 1}
    monkeypatch.undo()
    fast_launch.use_api(fake_launch.api())

    def broken(grid, *args):
        raise RuntimeError("launch failed")

    for _ in range(2):
        ops.silu_and_mul(torch.randn(8), torch.randn(8))
    monkeypatch.setattr(fake_launch.SILU_AND_MUL, "body", broken)
    with pytest.raises(RuntimeError):  # the public call launches the same kernel: its error is the caller's
        ops.silu_and_mul(torch.randn(8), torch.randn(8))
    entry = stats(ops, "silu_and_mul")
    assert entry["not_bound"] == {"launch error: RuntimeError": 1} and "launch failed" in caplog.text


def test_out_of_memory_in_a_bound_launch_reaches_the_caller_and_the_signature_stays_bound(ops, monkeypatch, caplog):
    """Not the kernel's failure (fl_patch/failures.py): raised unchanged, once, with no second try on the public
    function and no warning; the next call launches directly again."""
    x, y = torch.randn(8), torch.randn(8)
    for _ in range(2):
        ops.silu_and_mul(x, y)
    assert stats(ops, "silu_and_mul")["bound"] == 1
    tries = []

    def out_of_memory(grid, *args):
        tries.append(grid)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fake_launch.SILU_AND_MUL, "body", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        ops.silu_and_mul(x, y)
    assert len(tries) == 1 and "fast launch of" not in caplog.text
    monkeypatch.undo()
    fast_launch.use_api(fake_launch.api())
    before = stats(ops, "silu_and_mul")["fast_calls"]
    ops.silu_and_mul(x, y)
    entry = stats(ops, "silu_and_mul")
    assert entry["bound"] == 1 and entry["fast_calls"] == before + 1 and not entry["not_bound"]


def test_a_replaced_public_function_drops_the_signatures_bound_for_the_old_one(ops, monkeypatch):
    x = torch.randn(8)
    for _ in range(3):
        ops.autotuned_scale(x, 2.0)
    assert stats(ops, "autotuned_scale")["bound"] == 1
    monkeypatch.setattr(fake_launch.gems, "autotuned_scale", lambda x, factor: x * factor + 1)
    assert torch.equal(ops.autotuned_scale(x, 2.0), x * 2.0 + 1)
    assert stats(ops, "autotuned_scale")["bound"] == 0


# ------------------------------------------------------------------------------------------------ composites

def hf_rope_args(batch, seq, unsqueeze_dim=1, per_row=False, heads=4, kv_heads=2, dim=16):
    """q, k as HF's attention gives them (a (B, S, H*D) projection viewed per head; transposed for
    ``unsqueeze_dim=1``) and cos, sin with equal halves, one row per position (per batch row with `per_row`)."""
    q = bf16(batch, seq, heads * dim).view(batch, seq, heads, dim)
    k = bf16(batch, seq, kv_heads * dim).view(batch, seq, kv_heads, dim)
    if unsqueeze_dim == 1:
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    freqs = torch.randn(batch if per_row else 1, seq, dim // 2)
    cos, sin = torch.cat((freqs.cos(), freqs.cos()), -1), torch.cat((freqs.sin(), freqs.sin()), -1)
    return q, k, cos.to(torch.bfloat16), sin.to(torch.bfloat16), unsqueeze_dim


class OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    """The names of the torch ops run while it is on."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", [dict(batch=16, seq=1, per_row=True), dict(batch=1, seq=1),
                                    dict(batch=2, seq=5), dict(batch=3, seq=4, per_row=True),
                                    dict(batch=2, seq=5, unsqueeze_dim=2), dict(batch=4, seq=1, unsqueeze_dim=2,
                                                                                per_row=True)])
def test_hf_rope_binds_as_one_call_on_the_callers_q_and_k_and_takes_no_view(ops, layout):
    """rope.gems_hf's views into FlagGems' layout and back are part of the bound call: a bound call allocates the
    two outputs and launches, nothing else, and gives FlagGems' own results in the same layout."""
    fast, public = gems.calling_through(ops, rope.gems_hf), gems.calling_through(fake_launch.gems, rope.gems_hf)
    _, _, cos, sin, _ = hf_rope_args(**layout)  # one table per forward, as HF passes it to every layer
    for call in range(4):
        q, k, _, _, unsqueeze_dim = hf_rope_args(**layout)
        with OpNames() as seen:
            out = fast(q, k, cos, sin, unsqueeze_dim)
        assert equal(out, public(q, k, cos, sin, unsqueeze_dim)), call
    assert stats(ops, "rope.gems_hf_full") == {"bound": 1, "fast_calls": 2, "recording": 0, "not_bound": {},
                                               "public_calls": {fast_launch.RECORDING: 2}}
    assert set(seen.names) <= fast_launch.ALLOCATIONS and len(seen.names) == 2, seen.names
    assert stats(ops, "apply_rotary_pos_emb")["fast_calls"] == 0  # the composite's FlagGems call is its own


def test_hf_rope_in_a_layout_that_needs_a_copy_stays_on_its_body(ops):
    fast, public = gems.calling_through(ops, rope.gems_hf), gems.calling_through(fake_launch.gems, rope.gems_hf)
    for _ in range(fast_launch.RECORDINGS + 2):
        q, k, cos, sin, unsqueeze_dim = hf_rope_args(3, 4, per_row=True)
        q = bf16(3, 5, 4, 16)[:, :4].transpose(1, 2)  # batch and sequence can't be merged: copied
        assert equal(fast(q, k, cos, sin, unsqueeze_dim), public(q, k, cos, sin, unsqueeze_dim))
    entry = stats(ops, "rope.gems_hf_full")
    assert entry["bound"] == 0 and list(entry["not_bound"]) == ["torch work in the call: aten.clone"]
    assert "rope.gems_hf_full 0 bound / 0 calls" in fast_launch.summary_line()


def test_a_replaced_flag_gems_function_drops_the_composites_bound_on_it(ops, monkeypatch):
    fast = gems.calling_through(ops, rope.gems_hf)
    args = hf_rope_args(16, 1, per_row=True)
    for _ in range(3):
        fast(*args)
    assert stats(ops, "rope.gems_hf_full")["bound"] == 1
    calls = counting(monkeypatch, "apply_rotary_pos_emb")
    assert equal(fast(*args), gems.calling_through(fake_launch.gems, rope.gems_hf)(*args))
    assert calls == ["apply_rotary_pos_emb"] * 2 and stats(ops, "rope.gems_hf_full")["bound"] == 0


def test_layer_norm_binds_with_its_output_only_so_mean_and_rstd_are_scratch(ops):
    fast, public = gems.calling_through(ops, layer_norm.gems), gems.calling_through(fake_launch.gems, layer_norm.gems)
    weight, bias = bf16(48), bf16(48)
    for _ in range(4):
        x = bf16(6, 48)
        assert equal(fast(x, 48, weight, bias, 1e-5), public(x, 48, weight, bias, 1e-5))
    plan = next(iter(site(ops, "layer_norm.gems_y").entries.values()))
    assert plan.calls == 2 and len(plan.allocate) == 1 and len(plan.scratch) == 3  # y; mean, rstd and the partials
    assert stats(ops, "layer_norm")["fast_calls"] == 0


def test_threads_calling_one_signature_get_right_results_and_bind_it_once(ops, monkeypatch):
    plans = []
    original = fast_launch._Plan.__init__

    def counted(self, *args, **kwargs):
        plans.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(fast_launch._Plan, "__init__", counted)
    weight = torch.randn(32)
    failures = []
    start = threading.Barrier(12)

    def worker(seed):
        generator = torch.Generator().manual_seed(seed)
        start.wait()
        for _ in range(40):
            x = torch.randn(6, 32, generator=generator)
            if not torch.equal(ops.rms_norm(x, (32,), weight, 1e-6), fake_launch.rms_norm(x, (32,), weight, 1e-6)):
                failures.append(seed)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == [] and len(plans) == 1
    entry = stats(ops, "rms_norm")
    assert entry["bound"] == 1 and entry["fast_calls"] + entry["public_calls"][fast_launch.RECORDING] <= 12 * 40
    assert "_recording_property" not in fake_launch.Kernel.__dict__["run"].fget.__qualname__
    assert fast_launch._hook_users == 0


# ------------------------------------------------------------------------------------ switch and report

def test_gems_ops_is_the_fast_path_unless_switched_off(fake_gems, monkeypatch):
    monkeypatch.delenv("FL_PATCH_FAST_LAUNCH", raising=False)
    gems.configure_fast_launch(None)
    assert isinstance(gems.ops(), fast_launch.FastOps) and gems.ops().module is fake_gems  # on by default
    assert gems.ops().mm is fake_gems.mm  # everything else: the module's own
    monkeypatch.setenv("FL_PATCH_FAST_LAUNCH", "0")
    gems.configure_fast_launch(None)
    assert gems.ops() is fake_gems
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"], fast_launch=True)
    fast = gems.ops()
    assert isinstance(fast, fast_launch.FastOps)  # an explicit setting wins over the environment
    fl_patch.apply(kernels="gems", include=["torch.rms_norm", "rope"], fast_launch=True)
    assert gems.ops() is fast  # the same setting: what was bound stays bound
    fl_patch.apply(kernels="gems", include=["torch.rms_norm"])  # the environment again
    assert gems.ops() is fake_gems and "fast launch: off" in runtime.report_text()
    gems.configure_fast_launch(None)


def test_a_bad_fast_launch_value_is_reported(monkeypatch, caplog):
    with pytest.raises(settings.SettingsError, match="FL_PATCH_FAST_LAUNCH='sometimes' is not a boolean"):
        settings.load({"FL_PATCH_FAST_LAUNCH": "sometimes"})
    chosen, problems = settings.load_lenient({"FL_PATCH_FAST_LAUNCH": "sometimes"})
    assert chosen.fast_launch and problems == [
        "FL_PATCH_FAST_LAUNCH='sometimes' is not a boolean; accepted: 1, 0, true, false, yes, no, on, off; "
        "ignored: the fast launch path stays on, its default"]
    assert not settings.load({"FL_PATCH_FAST_LAUNCH": "off"}).fast_launch
    monkeypatch.setenv("FL_PATCH_FAST_LAUNCH", "sometimes")  # read by gems without apply(): said once, stays on
    monkeypatch.setattr(gems, "_said", set())
    gems.configure_fast_launch(None)
    assert gems.fast_launch_enabled() and gems.fast_launch_enabled()
    assert caplog.text.count("FL_PATCH_FAST_LAUNCH='sometimes' is not a boolean") == 1


def test_patched_calls_on_a_flag_gems_that_launches_nothing_are_never_wrong(fake_gems, monkeypatch):
    """The stand-in FlagGems of tests/fake_flag_gems computes in torch (no launch): never bound, same results."""
    monkeypatch.setattr(gems, "device_reason", lambda tensor: None)
    monkeypatch.setenv("FL_PATCH_FAST_LAUNCH", "1")
    fast_launch.use_api(fake_launch.api())
    try:
        x, weight = bf16(4, 64), bf16(64)
        outs = [rms_norm.gems_hf(x, weight, 1e-6) for _ in range(fast_launch.RECORDINGS + 2)]
        assert all(torch.equal(out, fake_gems.rms_norm(x, (64,), weight, 1e-6)) for out in outs)
        entry = gems.fast_launch_info()["functions"]["rms_norm"]
        assert entry["bound"] == 0 and len(entry["not_bound"]) == 1
        assert next(iter(entry["not_bound"])).startswith("torch work in the call")
    finally:
        fast_launch.use_api(None)


def test_the_report_says_what_the_fast_path_did(ops):
    assert fast_launch.summary_line() == "fast launch: on, no FlagGems call yet"
    x = torch.randn(4)
    for _ in range(4):
        ops.autotuned_scale(x, 2.0)
    with torch.enable_grad():
        ops.rms_norm(torch.randn(2, 4, requires_grad=True), (4,), torch.randn(4), 1e-6)
    assert fast_launch.summary_line() == (
        "fast launch: rms_norm 0 bound / 0 calls, autotuned_scale 1 bound / 1 calls; FlagGems' own call: autograd 1,"
        " first calls (recording) 3")
