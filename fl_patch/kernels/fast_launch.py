"""FlagGems at Triton's launch cost: what a FlagGems function launched for a call signature, bound once and
launched directly on later calls of that signature.

FlagGems' kernels are quick; calling them is not: ``autograd.Function.apply``, libentry's per-call key rebuild,
``pointwise_dynamic``'s argument preparation cost 50 to 90 µs of host time a call, against the 10 µs of the Triton
launcher underneath. For each function of :data:`FUNCTIONS` and each call signature (:func:`signature`: shapes,
strides, dtypes, devices and 16-byte alignment of the tensors, every other argument's value), this module:

1. records the first calls: FlagGems' public function runs as usual while every Triton launch it makes is recorded
   (the compiled kernel, grid, stream and full positional launch arguments, seen where every Triton launch passes:
   the compiled kernel's ``run`` property, swapped for a recording one while a thread records), and every torch
   operation it runs is seen through a dispatch mode;
2. binds, when two consecutive recordings agree: each launch argument is one of the call's input tensors (same
   address), one of the tensors the call returns (allocated fresh per call, same shape, strides and dtype), a
   scratch tensor allocated inside the call and not returned, or a constant; and only once the plan, launched on
   the binding call's own inputs, gives the result FlagGems' own call just returned, bitwise (checked once per
   signature, on the device: a binding wrong on a Triton or device nobody checked never reaches a caller);
3. launches later calls of the signature directly: allocate the outputs, put the call's tensors in place, call the
   compiled kernel's launcher on the current stream of the tensors' device.

A recording binds only if the call did nothing but allocate, take views and launch Triton kernels on the current
stream (a copy, a reduction or a fill in torch would be skipped by a direct launch), if every returned tensor was
written by a launch, and if no pointer argument is a raw integer. Anything it can't bind runs the public function,
counted per reason in :func:`stats`: calls that need autograd, a CUDA graph capture before the signature is bound
(recording never runs inside a capture), launches that differ from one call to the next (autotuning settles within
the recordings; anything else is data-dependent), a direct launch that did not reproduce the public call's result,
a Triton without the launcher API used here (detected once), and any exception while binding or launching (the
signature then stays on the public function). A bound launch inside a CUDA graph capture is captured like any
launch on that stream. Calls made while torch.compile traces run the public function too, uncounted (a counter
inside a trace would be replayed by every compiled call); fl_patch's kernels reach FlagGems through its custom ops
there (``fl_patch.kernels.custom_ops``), whose real functions, run by the compiled graph, take this path.

Thread safety: the signature table is read without a lock and changed under one; each thread records only its own
launches. Counters are updated without a lock (exact for one thread, a lower bound otherwise), as
``fl_patch.reporting.Record.fallback``. Scratch tensors are reused per stream only for single-launch signatures
(nothing reads them after that launch) and never while capturing.

Which FlagGems functions take this path is :data:`FUNCTIONS`: out of place, no autograd of their own needed.
``fl_patch.kernels.gems.ops`` hands the kernel modules :class:`FastOps` (``FL_PATCH_FAST_LAUNCH=0``: the module).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fl_patch import failures

log = logging.getLogger("fl_patch")

FUNCTIONS = ("rms_norm", "rms_norm_forward", "silu_and_mul", "apply_rotary_pos_emb", "layer_norm")
RECORDINGS = 4  # recorded calls per signature before it stays on the public function
SIGNATURES = 512  # signatures kept per function; a new one beyond that runs the public function
SCRATCH_STREAMS = 8  # streams per signature whose scratch tensors are kept for reuse

# Reasons a call runs the public function (stable strings: counter keys).
RECORDING = "first calls (recording)"
AUTOGRAD = "autograd"
CAPTURING = "cuda graph capture before binding"
NESTED = "called while recording"
FULL = "signature table full"
NOT_CURRENT = "tensors not on the current device"
DIFFERENT = "launches differ between calls"
DIFFERED = "direct launch differed from FlagGems' own call"

ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"})
VIEWS = frozenset({"_unsafe_view", "alias", "detach", "view", "_reshape_alias"})  # besides ops marked is_view
SCALARS = (int, float, bool, str, type(None), torch.dtype)


class Unbindable(Exception):
    """A recorded call can't be bound; the message is the short reason."""


@dataclass(frozen=True)
class LaunchApi:
    """How this module reaches the launch runtime: Triton's (:func:`triton_api`), or a stand-in on CPU.

    ``kernel_class``: the compiled-kernel class; its ``run`` property gives the launcher every launch goes through,
    called as ``launcher(gx, gy, gz, stream, function, packed_metadata, launch_metadata, enter_hook, exit_hook,
    *args)``. ``device_type``: the torch device type it launches for. ``current_device()``: the current device
    index; ``current_stream(index)``: that device's current stream as the launcher takes it; ``capturing()``:
    whether the current stream captures a CUDA graph; ``hooks()``: None when no launch hook is set, else (enter,
    exit) as the launcher takes them (with ``kernel.launch_metadata(grid, stream, *args)``). ``name``: for reports.
    """

    kernel_class: type
    device_type: str
    current_device: Callable[[], int]
    current_stream: Callable[[int], int]
    capturing: Callable[[], bool]
    hooks: Callable[[], tuple | None]
    name: str = "triton"


def triton_api() -> LaunchApi:
    """The launch API of the installed Triton, checked by feature; raises Unbindable naming what is missing."""
    try:
        import triton
        from triton import knobs
        from triton.compiler.compiler import CompiledKernel
    except Exception as exc:  # no Triton, or one laid out otherwise
        raise Unbindable(f"no launch API (triton: {type(exc).__name__})") from exc
    runtime = getattr(knobs, "runtime", None)
    missing = [what for what, present in (
        ("CompiledKernel.run as a property", isinstance(CompiledKernel.__dict__.get("run"), property)),
        ("CompiledKernel.launch_metadata", callable(getattr(CompiledKernel, "launch_metadata", None))),
        ("knobs.runtime launch hooks", hasattr(runtime, "launch_enter_hook") and hasattr(runtime, "launch_exit_hook")),
        ("torch's raw stream and device getters", hasattr(torch._C, "_cuda_getCurrentRawStream")
         and hasattr(torch._C, "_cuda_getDevice")),
    ) if not present]
    if missing:
        raise Unbindable(f"no launch API (triton {triton.__version__} lacks {', '.join(missing)})")

    def hooks():
        enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
        if _idle(enter) and _idle(leave):
            return None
        return enter, leave

    return LaunchApi(CompiledKernel, "cuda", torch._C._cuda_getDevice, torch._C._cuda_getCurrentRawStream,
                     torch.cuda.is_current_stream_capturing, hooks, f"triton {triton.__version__}")


def _idle(hook) -> bool:
    """No hook, or Triton's empty HookChain (3.5+ always passes one; calling it does nothing)."""
    return hook is None or getattr(hook, "calls", None) == []


_api_lock = threading.Lock()
_api: LaunchApi | None = None
_api_problem: str | None = None


def launch_api() -> tuple[LaunchApi | None, str | None]:
    """(the launch API, None), or (None, why there is none); detected once (thread-safe)."""
    global _api, _api_problem
    if _api is None and _api_problem is None:
        with _api_lock:
            if _api is None and _api_problem is None:
                try:
                    _api = triton_api()
                except Unbindable as exc:
                    _api_problem = str(exc)
    return _api, _api_problem


def use_api(api: LaunchApi | None) -> None:
    """Use `api` from now on (a stand-in: CPU tests, ``--dry-run`` scripts); None detects Triton's again."""
    global _api, _api_problem
    with _api_lock:
        _api, _api_problem = api, None


# ----------------------------------------------------------------------------------------------- signatures

def signature(args: tuple, kwargs: dict) -> tuple[tuple | None, list, str | None]:
    """(key, input tensors in argument order, None) for a call, or (None, [], why it can't take the fast path).

    The key holds, per tensor, shape, strides, dtype, device and whether its address is 16-byte aligned (what
    Triton specialises a pointer on); per other argument its type and value (ints, floats, bools, strings, None,
    dtypes, and tuples / lists of ints). A tensor that needs autograd (grad mode on) gives ``AUTOGRAD``.
    """
    grad = torch.is_grad_enabled()
    parts = []
    tensors = []
    for value in (*args, *kwargs.values()) if kwargs else args:
        kind = type(value)
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            if grad and value.requires_grad:
                return None, [], AUTOGRAD
            parts.append((value.shape, value.stride(), value.dtype, value.is_cuda, value.get_device(),
                          value.data_ptr() % 16 == 0))
            tensors.append(value)
        elif kind in SCALARS:
            if kind is float and value != value:
                return None, [], "nan argument"
            parts.append((kind, value))
        elif kind is tuple or kind is list or kind is torch.Size:
            if not all(type(item) is int for item in value):
                return None, [], "argument type " + kind.__name__
            parts.append((kind, tuple(value)))
        elif isinstance(value, torch.Tensor):
            return None, [], "tensor subclass " + kind.__name__
        else:
            return None, [], "argument type " + kind.__name__
    if kwargs:
        parts.append(tuple(kwargs))
    return tuple(parts), tensors, None


# ------------------------------------------------------------------------------------------------ recording

class _Recording:
    """What one public call did: its Triton launches, the tensors torch allocated, any other torch work.

    Allocations are held until the call is analysed, so that no address is reused within it; once torch work is
    seen (the call can't be bound) nothing more is held: an autotuning call's benchmark buffers are let go."""

    def __init__(self):
        self.launches: list[tuple] = []  # (kernel, launcher, grid, stream, function, packed, args)
        self.allocations: list[torch.Tensor] = []
        self.torch_work: list[str] = []

    def launch(self, kernel, launcher, gx, gy, gz, stream, function, packed, metadata, enter, leave, *args):
        if not self.torch_work:
            self.launches.append((kernel, launcher, (gx, gy, gz), stream, function, packed, args))
        return launcher(gx, gy, gz, stream, function, packed, metadata, enter, leave, *args)

    def work(self, name: str) -> None:
        self.torch_work.append(name)
        self.allocations.clear()
        self.launches.clear()


_local = threading.local()  # .recording: the _Recording of the public call this thread is running, if any
_hook_lock = threading.Lock()
_hook_users = 0
_hooked: tuple | None = None  # (kernel class, its own run property) while the recording property is installed


def _recording_property(original: property) -> property:
    get_launcher = original.fget

    def run(kernel):
        launcher = get_launcher(kernel)
        recording = getattr(_local, "recording", None)
        if recording is None:  # another thread's launch, or a launch outside any recorded call
            return launcher
        return functools.partial(recording.launch, kernel, launcher)

    return property(run, doc=original.__doc__)


@contextlib.contextmanager
def _recording_hook(api: LaunchApi):
    """The recording ``run`` property on ``api.kernel_class`` while any thread records; the class's own property
    (the identical object) back once the last one is done."""
    global _hook_users, _hooked
    with _hook_lock:
        if _hook_users == 0:
            original = api.kernel_class.__dict__["run"]
            api.kernel_class.run = _recording_property(original)
            _hooked = (api.kernel_class, original)
        _hook_users += 1
    try:
        yield
    finally:
        with _hook_lock:
            _hook_users -= 1
            if _hook_users == 0:
                owner, original = _hooked
                owner.run = original
                _hooked = None


def _torch_work_mode(recording: _Recording):
    """A dispatch mode that keeps what torch allocates during the call and names any other work it does."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class TorchWork(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            if name in ALLOCATIONS:
                if not recording.torch_work:
                    recording.allocations.append(out)
            elif not (getattr(func, "is_view", False) or name in VIEWS or _is_query(func, out)):
                recording.work(f"{func.namespace}.{name}")
            return out

    return TorchWork()


def _is_query(func, out) -> bool:
    """An op that changes nothing and returns no tensor (``is_non_overlapping_and_dense``, sizes, ...)."""
    if func._schema.is_mutable:
        return False
    items = out if isinstance(out, (tuple, list)) else (out,)
    return not any(isinstance(item, torch.Tensor) for item in items)


def _record(public: Callable, api: LaunchApi, args: tuple, kwargs: dict) -> tuple[object, _Recording]:
    recording = _Recording()
    with _recording_hook(api), _torch_work_mode(recording):
        _local.recording = recording
        try:
            result = public(*args, **kwargs)
        finally:
            _local.recording = None
    return result, recording


# -------------------------------------------------------------------------------------------------- binding

def _flatten(result, outputs: list):
    """The result's template (an output's index, None, or (tuple/list, templates)); its tensors appended to
    `outputs`."""
    if type(result) is torch.Tensor:
        outputs.append(result)
        return len(outputs) - 1
    if result is None:
        return None
    if type(result) in (tuple, list):
        return type(result), tuple(_flatten(item, outputs) for item in result)
    raise Unbindable(f"returns {type(result).__name__}")


def _build(template, outputs: list):
    if type(template) is int:
        return outputs[template]
    if template is None:
        return None
    kind, items = template
    return kind(_build(item, outputs) for item in items)


def _tensor_spec(tensor: torch.Tensor, what: str) -> tuple:
    """(shape, strides, dtype, device) of a tensor that a fresh ``empty_strided`` replaces exactly: at the start
    of its storage, which holds nothing else."""
    if tensor.numel() == 0:
        raise Unbindable(f"{what} is empty")
    span = 1 + sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    if tensor.storage_offset() != 0 or tensor.untyped_storage().nbytes() != span * tensor.element_size():
        raise Unbindable(f"{what} inside a larger buffer")
    return tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device


def _pointer_types(kernel) -> list[bool] | None:
    """Per launch argument, whether the kernel takes it as a pointer (Triton's signature ``*fp16``, ...)."""
    src = getattr(kernel, "src", None)
    types = getattr(src, "signature", None)
    if not isinstance(types, dict):
        return None
    return [isinstance(kind, str) and kind.startswith("*") for kind in types.values()]


def _analyse(recording: _Recording, tensors: list, result, api: LaunchApi) -> tuple[tuple, dict]:
    """(fingerprint, plan parts) of a recorded call, or Unbindable. The fingerprint is what two recordings of one
    signature must share to bind: launches (kernel, grid, where each argument comes from), outputs, scratch."""
    if recording.torch_work:
        raise Unbindable("torch work in the call: " + ", ".join(sorted(set(recording.torch_work))[:3]))
    if not recording.launches:
        raise Unbindable("no launch")
    device = tensors[0].get_device() if tensors else -1
    if not tensors or any(t.get_device() != device for t in tensors):
        raise Unbindable("inputs on several devices" if tensors else "no tensor input")
    inputs: dict[int, int] = {}
    for index, tensor in enumerate(tensors):
        address = tensor.data_ptr()
        inputs[address] = -1 if address in inputs else index  # -1: two inputs share an address
    outputs: list[torch.Tensor] = []
    template = _flatten(result, outputs)
    if not outputs:
        raise Unbindable("returns no tensor")
    allocated = {tensor.data_ptr(): tensor for tensor in recording.allocations if isinstance(tensor, torch.Tensor)}
    output_at: dict[int, int] = {}
    for index, tensor in enumerate(outputs):
        address = tensor.data_ptr()
        if address in inputs or address not in allocated or address in output_at:
            raise Unbindable("returns a tensor not allocated by the call")
        output_at[address] = index
    output_specs = tuple(_tensor_spec(tensor, "an output") for tensor in outputs)
    written: set[int] = set()
    scratch_at: dict[int, int] = {}
    scratch_specs: list[tuple] = []
    launches = []
    stream = api.current_stream(device)
    for kernel, launcher, grid, launch_stream, function, packed, args in recording.launches:
        if launch_stream != stream:
            raise Unbindable("launch on another stream")
        pointers = _pointer_types(kernel)
        if pointers is None or len(pointers) != len(args):
            raise Unbindable("kernel signature unreadable")
        sources = []
        for position, value in enumerate(args):
            if hasattr(value, "data_ptr") and not isinstance(value, int):
                sources.append(_source(value.data_ptr(), inputs, output_at, allocated, scratch_at, scratch_specs))
                written.add(value.data_ptr())
            elif pointers[position] and value is not None:
                raise Unbindable("raw pointer argument")
            elif type(value) in SCALARS or type(value).__module__.startswith("triton.language"):  # dtypes, constexprs
                sources.append(("const", type(value), value))
            else:
                raise Unbindable(f"launch argument of type {type(value).__name__}")
        launches.append((kernel, launcher, grid, function, packed, tuple(sources)))
    if not set(output_at) <= written:
        raise Unbindable("returns a tensor no launch wrote")
    # kernels by identity (the fingerprint holds them, so an id is never reused while it is compared)
    fingerprint = (tuple((k, grid, sources) for k, _, grid, _, _, sources in launches), output_specs, template,
                   tuple(scratch_specs))
    parts = dict(launches=launches, outputs=output_specs, scratch=tuple(scratch_specs), template=template,
                 inputs=len(tensors), device=device)
    return fingerprint, parts


def _source(address: int, inputs: dict, output_at: dict, allocated: dict, scratch_at: dict, scratch_specs: list):
    if address in output_at:
        return "out", output_at[address]
    index = inputs.get(address)
    if index == -1:
        raise Unbindable("aliased inputs")
    if index is not None:
        return "in", index
    if address in allocated:
        if address not in scratch_at:
            scratch_at[address] = len(scratch_specs)
            scratch_specs.append(_tensor_spec(allocated[address], "a scratch tensor"))
        return "scratch", scratch_at[address]
    raise Unbindable("tensor argument from outside the call")


ELSEWHERE = object()  # what _Plan.run returns when the current device is not the signature's


class _Plan:
    """A bound signature: its launches with their arguments' sources, what to allocate, what to return."""

    def __init__(self, api: LaunchApi, launches, outputs, scratch, template, inputs, device):
        self.api = api
        self.device = device
        self.calls = 0
        first_output, first_scratch = inputs, inputs + len(outputs)
        self.launches = []
        for kernel, launcher, (gx, gy, gz), function, packed, sources in launches:
            arguments, slots = [], []
            for position, source in enumerate(sources):
                if source[0] == "const":
                    arguments.append(source[2])
                    continue
                arguments.append(None)
                base = {"in": 0, "out": first_output, "scratch": first_scratch}[source[0]]
                slots.append((position, base + source[1]))
            self.launches.append((launcher, gx, gy, gz, function, packed, kernel, arguments, tuple(slots)))
        self.allocate = tuple(_allocator(*spec) for spec in outputs)
        self.scratch = tuple(_allocator(*spec) for spec in scratch)
        self.reuse_scratch = len(self.launches) == 1  # nothing reads a single launch's scratch afterwards
        self.scratch_by_stream: dict[int, list] = {}
        if type(template) is int:
            self.result = functools.partial(_first_or, template)
        elif template == (tuple, tuple(range(len(outputs)))):
            self.result = tuple
        else:
            self.result = functools.partial(_build, template)

    def run(self, tensors: list):
        """The call's outputs, launched directly; ELSEWHERE when the current device is not the tensors'."""
        api = self.api
        device = self.device
        if api.current_device() != device:
            return ELSEWHERE
        stream = api.current_stream(device)
        outputs = [allocate() for allocate in self.allocate]
        pool = tensors + outputs
        if self.scratch:
            pool += self._scratch(stream)
        hooks = api.hooks()
        for launcher, gx, gy, gz, function, packed, kernel, arguments, slots in self.launches:
            args = arguments.copy()
            for position, index in slots:
                args[position] = pool[index]
            if hooks is None:
                launcher(gx, gy, gz, stream, function, packed, None, None, None, *args)
            else:
                metadata = kernel.launch_metadata((gx, gy, gz), stream, *args)
                launcher(gx, gy, gz, stream, function, packed, metadata, hooks[0], hooks[1], *args)
        self.calls += 1
        return self.result(outputs)

    def _scratch(self, stream: int) -> list:
        if not self.reuse_scratch or self.api.capturing():
            return [allocate() for allocate in self.scratch]
        kept = self.scratch_by_stream.get(stream)
        if kept is None:
            kept = [allocate() for allocate in self.scratch]
            if len(self.scratch_by_stream) < SCRATCH_STREAMS:
                self.scratch_by_stream[stream] = kept
        return kept


def _same(a, b) -> bool:
    """Whether two results are bitwise the same: tensors of one shape, strides and dtype whose elements have the
    same bits (NaNs included), the same structure around them."""
    if type(a) is torch.Tensor:
        return (type(b) is torch.Tensor and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
                and torch.equal(_bits(a), _bits(b)))
    if type(a) in (tuple, list):
        return type(b) is type(a) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a is b


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}  # element size -> integer dtype


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """A floating tensor's elements as integers of the same size (a NaN equals itself), any other tensor as is."""
    if tensor.is_floating_point() and tensor.element_size() in _BITS:
        return tensor.view(_BITS[tensor.element_size()])
    return tensor


def _first_or(index: int, outputs: list):
    return outputs[index]


def _allocator(shape: tuple, stride: tuple, dtype: torch.dtype, device: torch.device) -> Callable[[], torch.Tensor]:
    contiguous = stride == torch.empty(shape, device="meta").stride()
    if contiguous:
        return functools.partial(torch.empty, shape, dtype=dtype, device=device)
    return functools.partial(torch.empty_strided, shape, stride, dtype=dtype, device=device)


def launch_error(exc: Exception) -> str:
    """The reason a signature whose bound launch raised `exc` stays on FlagGems' public call."""
    return f"launch error: {type(exc).__name__}"


class _Pending:
    """A signature being recorded: the last recording's fingerprint, how many were made, the last problem, and
    whether a thread is checking a plan for it (:meth:`_Site._admit`)."""

    def __init__(self):
        self.fingerprint = None
        self.recorded = 0
        self.problem = DIFFERENT
        self.checking = False


class _Never:
    """A signature that stays on the public function, and why."""

    def __init__(self, reason: str):
        self.reason = reason


# ---------------------------------------------------------------------------------------------------- sites

class _Site:
    """One FlagGems function on the fast path (or a composite of fl_patch's around it, see :func:`wrap`): its
    signature table and counters. ``function``: the FlagGems function as last looked up; ``public``: what a call
    the bound plan doesn't take runs (that function, or the composite's body with the module)."""

    def __init__(self, name: str, module, function: Callable, body: Callable | None = None):
        self.name = name
        self.module = module
        self.body = body
        self.function, self.public = function, self._public(function)
        self.entries: dict = {}  # signature key -> _Plan | _Pending | _Never; read without the lock
        self.lock = threading.Lock()
        self.public_calls: dict[str, int] = {}
        self.warned = False  # a checked plan was refused and said so

    def _public(self, function: Callable) -> Callable:
        return function if self.body is None else functools.partial(self.body, self.module)

    def renew(self, function: Callable) -> None:
        """Take `function` as the FlagGems function from now on, dropping every signature bound for the one
        before."""
        with self.lock:
            if function is not self.function:
                self.function, self.public, self.entries = function, self._public(function), {}

    def count(self, reason: str) -> None:
        calls = self.public_calls
        calls[reason] = calls.get(reason, 0) + 1

    def slow(self, key, entry, tensors: list, args: tuple, kwargs: dict):
        """Every call the bound plan doesn't take: count why, run the public function (recording it when the
        signature may still bind)."""
        if type(entry) is _Never:
            self.count(entry.reason)
            return self.public(*args, **kwargs)
        if type(entry) is _Plan:  # its device is not the current one
            self.count(NOT_CURRENT)
            return self.public(*args, **kwargs)
        api, problem = launch_api()
        reason = problem or self._not_now(key, entry, tensors, api)
        if reason is not None:
            self.count(reason)
            return self.public(*args, **kwargs)
        self.count(RECORDING)
        result, recording = _record(self.public, api, args, kwargs)
        try:
            fingerprint, parts = _analyse(recording, tensors, result, api)
        except Unbindable as exc:
            self._recorded(key, None, None, str(exc), api)
        except Exception as exc:  # a layout this module doesn't know: never wrong, stay on the public function
            self._recorded(key, None, None, f"binding error: {type(exc).__name__}", api)
        else:
            plan = self._recorded(key, fingerprint, parts, None, api)
            if plan is not None:
                self._admit(key, plan, tensors, result)
        return result

    def _admit(self, key, plan: _Plan, tensors: list, result) -> None:
        """Bind `plan` for `key` only if its direct launch on this call's own inputs gives the result FlagGems' own
        call just returned, bitwise (same shapes, strides, dtypes, values): a binding this module got wrong on a
        device and Triton nobody checked stays on the public function instead of reaching a caller. Once per
        signature: one more launch and a comparison that waits for the device. The caller's call has its result
        already: an error that only passes through the check (out of memory, fl_patch/failures.py) leaves the
        signature to be checked by a later call instead of reaching the caller; an interrupt does reach it."""
        try:
            out = plan.run(tensors)
        except Exception as exc:
            if failures.passes_through(exc):
                self._unchecked(key)
                return
            reason = launch_error(exc)
        except BaseException:
            self._unchecked(key)
            raise
        else:
            reason = NOT_CURRENT if out is ELSEWHERE else (None if _same(out, result) else DIFFERED)
        plan.calls = 0  # the check is not a caller's call
        with self.lock:
            if type(self.entries.get(key)) is not _Pending:
                return  # cleared meanwhile (a new public function)
            self.entries[key] = plan if reason is None else _Never(reason)
        if reason is not None and reason != NOT_CURRENT:
            level = logging.INFO if self.warned else logging.WARNING  # once per function; the count says the rest
            self.warned = True
            log.log(level, "fl_patch: fast launch of flag_gems.%s: a signature's direct launch did not reproduce"
                    " FlagGems' own call (%s); it runs FlagGems' own call", self.name, reason)

    def _unchecked(self, key) -> None:
        with self.lock:
            entry = self.entries.get(key)
            if type(entry) is _Pending:
                entry.checking = False

    def _not_now(self, key, entry, tensors: list, api: LaunchApi) -> str | None:
        """Why this call can't be recorded, or None."""
        if entry is None:
            if len(self.entries) >= SIGNATURES:
                return FULL
            wrong = next((t.device.type for t in tensors if t.device.type != api.device_type), None)
            if wrong is not None or not tensors:
                reason = f"{wrong} tensor" if wrong else "no tensor input"
                with self.lock:
                    self.entries.setdefault(key, _Never(reason))
                return reason
        if getattr(_local, "recording", None) is not None:
            return NESTED
        if api.capturing():
            return CAPTURING
        return None

    def _recorded(self, key, fingerprint, parts, problem: str | None, api: LaunchApi) -> _Plan | None:
        """Take one recording into the table (under the lock): on the second equal one in a row, the plan to bind
        (:meth:`_admit` checks it first); after RECORDINGS without, stay on the public function."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is None:
                if len(self.entries) >= SIGNATURES:
                    return None
                entry = self.entries[key] = _Pending()
            if type(entry) is not _Pending or entry.checking:
                return None  # another thread bound it, gave up on it, or is checking a plan for it
            entry.recorded += 1
            if problem is None and fingerprint == entry.fingerprint:
                try:
                    plan = _Plan(api, **parts)
                except Exception as exc:  # never wrong: stay on the public function
                    self.entries[key] = _Never(f"binding error: {type(exc).__name__}")
                    return None
                entry.checking = True
                return plan
            entry.fingerprint = fingerprint
            if problem is not None:
                entry.problem = problem
            if entry.recorded >= RECORDINGS:
                self.entries[key] = _Never(entry.problem)
                log.info("fl_patch: fast launch of flag_gems.%s stays off for a signature (%s)", self.name,
                         entry.problem)
        return None

    def failed(self, key, exc: Exception) -> None:
        """A bound launch raised: that signature stays on the public function from now on."""
        reason = launch_error(exc)
        with self.lock:
            self.entries[key] = _Never(reason)
        self.count(reason)
        log.warning("fl_patch: fast launch of flag_gems.%s failed (%s: %s); that signature runs FlagGems' own call"
                    " from now on", self.name, type(exc).__name__, exc)

    def stats(self) -> dict:
        entries = list(self.entries.values())
        plans = [entry for entry in entries if type(entry) is _Plan]
        never: dict[str, int] = {}
        for entry in entries:
            if type(entry) is _Never:
                never[entry.reason] = never.get(entry.reason, 0) + 1
        return {"bound": len(plans), "fast_calls": sum(plan.calls for plan in plans),
                "recording": sum(type(entry) is _Pending for entry in entries), "not_bound": never,
                "public_calls": dict(self.public_calls)}


def wrap(module, name: str, body: Callable | None = None) -> Callable:
    """``module.<name>`` (a FlagGems function) on the fast path: same arguments, same results, bitwise. The
    function is looked up on every call: when it changes (a patch, a vendor override), the signatures bound for
    the old one are dropped.

    With `body`, the call bound is ``body(module, *args)`` instead: a function of fl_patch's that takes views of its
    tensors, calls ``module.<name>`` on them and returns views of its results (:meth:`FastOps.composed`). Views are
    not work a launch skips (their addresses are the caller's tensors' and the outputs'), so its signature binds
    like a FlagGems function's, keyed on the caller's tensors, and a bound call takes none of the views: each costs
    a microsecond of host time. A body that copies (torch work) stays on ``body`` for that signature."""
    site = _Site(name if body is None else f"{body.__module__.rsplit('.', 1)[-1]}.{body.__name__}", module,
                 getattr(module, name), body)
    is_compiling = torch.compiler.is_compiling

    def fast(*args, **kwargs):
        function = getattr(module, name)
        if function is not site.function:
            site.renew(function)
        public = site.public
        if is_compiling():  # not counted: inside a trace a counter would be replayed by every compiled call
            return public(*args, **kwargs)
        key, tensors, reason = signature(args, kwargs)
        if key is None:
            site.count(reason)
            return public(*args, **kwargs)
        entry = site.entries.get(key)
        if type(entry) is _Plan:
            try:
                out = entry.run(tensors)
            except Exception as exc:
                if failures.passes_through(exc):  # out of memory, torch's control flow, a hook's: the caller's
                    raise
                site.failed(key, exc)
                return public(*args, **kwargs)
            if out is not ELSEWHERE:
                return out
        return site.slow(key, entry, tensors, args, kwargs)

    fast.__name__ = fast.__qualname__ = site.name
    fast.__doc__ = f"{'flag_gems.' if body is None else ''}{site.name} on fl_patch's fast launch path" \
        " (fl_patch.kernels.fast_launch)."
    fast.site = site
    return fast


class FastOps:
    """``flag_gems`` with the functions named in `names` (default :data:`FUNCTIONS`) on the fast launch path; any
    other attribute is the module's own."""

    def __init__(self, module, names: tuple[str, ...] = FUNCTIONS):
        self.module = module
        self.names = tuple(name for name in names if callable(getattr(module, name, None)))
        for name in self.names:
            setattr(self, name, wrap(module, name))
        self.composites: dict[Callable, Callable] = {}  # body -> its fast path (see composed)
        _current["ops"] = self

    def __getattr__(self, name: str):
        return getattr(self.module, name)

    def composed(self, name: str, body: Callable) -> Callable:
        """``body(module, *args)`` on the fast path as one call, bound on the caller's tensors (:func:`wrap` with
        `body`): `body` takes views of its tensors, calls FlagGems' `name` and returns views of the results.
        Called as ``composed(name, body)(*args)``."""
        fast = self.composites.get(body)
        if fast is None:
            fast = self.composites.setdefault(body, wrap(self.module, name, body))  # one wrapper, even when raced
        return fast

    def sites(self) -> list:
        """The fast path's sites: one per function of ``names``, then one per composite."""
        composites = list(self.composites.values())  # a copy: another thread may add one
        return [self.__dict__[name].site for name in self.names] + [fast.site for fast in composites]


_current: dict = {}  # "ops": the FastOps made last (what gems.ops() hands out), for stats()


def stats() -> dict:
    """What the fast path did in this process: the launch API (or why there is none) and, per function, the
    signatures bound, calls launched directly, signatures left on the public function per reason, and public calls
    per reason."""
    ops = _current.get("ops")
    functions = {site.name: site.stats() for site in ops.sites()} if ops is not None else {}
    return {"api": _api.name if _api is not None else None, "api_problem": _api_problem, "functions": functions}


def summary_line(data: dict | None = None) -> str:
    """One line for the report: per function, bound signatures and direct launches; public calls per reason."""
    data = stats() if data is None else data
    used = {name: entry for name, entry in data["functions"].items() if entry["fast_calls"] or entry["public_calls"]}
    if not used:
        return "fast launch: on, no FlagGems call yet" + (f" ({data['api_problem']})" if data["api_problem"] else "")
    bound = ", ".join(f"{name} {entry['bound']} bound / {entry['fast_calls']} calls" for name, entry in used.items())
    public: dict[str, int] = {}
    for entry in used.values():
        for reason, count in entry["public_calls"].items():
            public[reason] = public.get(reason, 0) + count
    line = f"fast launch: {bound}"
    if public:
        line += "; FlagGems' own call: " + ", ".join(f"{reason} {count}" for reason, count in sorted(public.items()))
    return line
