"""Run unmodified Megatron-Core on CPU over gloo.

Megatron-Core assumes CUDA in many places: ``torch.cuda.current_device()`` and
``device="cuda"`` as allocation targets (rotary embeddings, schedules, optimizer buffers),
``torch.cuda`` RNG state in the model-parallel RNG tracker, CUDA streams/events/NVTX, and
``param.type() == "torch.cuda.FloatTensor"`` checks in its optimizers.  Nothing in PyTorch or
Megatron provides a CPU fallback for these, so this module is written by hand.  It is the only
place in the project that patches torch or Megatron, and it is activated only when CUDA is
unavailable (see ``minitron_mcore.compat.activate``).

Five pieces:

* :class:`CudaToCpuMode` - a ``TorchFunctionMode`` that rewrites CUDA device arguments to
  CPU, makes ``Tensor.cuda()`` a no-op and answers ``Tensor.type()`` the way a CUDA tensor
  would, so Megatron's optimizer type checks pass with the same code as on GPU.
* :class:`CpuRNGStatesTracker` - Megatron's RNG tracker with the CPU generator standing in for
  the CUDA one, so tensor-parallel dropout is reproducible and differs per TP rank.
* no-op stand-ins for streams, events, NVTX, ``synchronize`` and memory statistics.
* the mode re-entered for custom autograd ``Function``s' backward, which the autograd engine
  runs with the mode stack emptied.
* the MoE token dispatcher's split sizes copied to the host as on a GPU (numpy arrays).
"""

from __future__ import annotations

import contextlib
import time

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


def _is_cuda_device(dev) -> bool:
    if isinstance(dev, torch.device):
        return dev.type == "cuda"
    if isinstance(dev, str):
        return dev.startswith("cuda")
    # A bare int is how torch.cuda.current_device() names a device.
    return isinstance(dev, int) and not isinstance(dev, bool)


def _cpu_device_args(args, kwargs):
    dev = kwargs.get("device")
    if dev is not None and _is_cuda_device(dev):
        kwargs = dict(kwargs, device=_CPU)
    return args, kwargs


_TENSOR_TO = torch.Tensor.to
_TENSOR_CUDA = torch.Tensor.cuda
_TENSOR_TYPE = torch.Tensor.type
_PIN_MEMORY = torch.Tensor.pin_memory


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device placements to CPU for every torch call made under it."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TENSOR_CUDA or func is _PIN_MEMORY:
            return args[0]
        if func is _TENSOR_TYPE and len(args) == 1 and not kwargs:
            # 'torch.FloatTensor' -> 'torch.cuda.FloatTensor' for Megatron's optimizer checks.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        if func is _TENSOR_TO:
            args = tuple(_CPU if _is_cuda_device(a) else a for a in args)
        if "device" in kwargs:
            args, kwargs = _cpu_device_args(args, kwargs)
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for ``torch.cuda.Stream``; CPU work is already ordered."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event or _TimedEvent()

    def synchronize(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _TimedEvent:
    """Stands in for ``torch.cuda.Event``; ``elapsed_time`` uses the wall clock (ms)."""

    def __init__(self, *args, **kwargs):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def wait(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, end):
        return (end.t - self.t) * 1000.0


def _cpu_rng_state(*args, **kwargs):
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, *args, **kwargs):
    if isinstance(new_state, torch.Generator):
        new_state = new_state.get_state()
    torch.set_rng_state(new_state)


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Event = _TimedEvent
    cuda.Stream = _NullStream
    cuda.current_stream = lambda *a, **k: _NullStream()
    cuda.default_stream = lambda *a, **k: _NullStream()
    cuda.set_stream = lambda *a, **k: None
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.memory_stats = lambda *a, **k: {}
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    cuda.reset_peak_memory_stats = lambda *a, **k: None
    cuda.set_device = lambda *a, **k: None
    # torch.manual_seed itself calls cuda.manual_seed_all: seed the CPU generator directly.
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = _cpu_rng_state
    cuda.set_rng_state = _set_cpu_rng_state
    cuda.nvtx.range_push = lambda *a, **k: None
    cuda.nvtx.range_pop = lambda *a, **k: None
    cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()


def _make_cpu_tracker(base):
    class CpuRNGStatesTracker(base):
        """Megatron's RNG tracker on the CPU generator.

        ``add`` seeds a named CPU generator state; ``fork`` swaps it in and out, exactly as the
        CUDA tracker does with the device generator.  The base class warns when the CPU state
        changes inside ``fork``; here that state *is* the tracked one, so the check is dropped.
        """

        def add(self, name, seed):
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self._is_initialized = True
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name="model-parallel-rng"):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            outer_name = self._current_state_name
            if outer_name != "default-rng":
                self.states_[outer_name] = outer
            torch.set_rng_state(self.states_[name])
            self._current_state_name = name
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                if outer_name != "default-rng":
                    outer = self.states_[outer_name]
                torch.set_rng_state(outer)
                self._current_state_name = outer_name

    return CpuRNGStatesTracker


def _host_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """Megatron's ``moe_utils.maybe_move_tensor_to_cpu`` on the host: the MoE all-to-all token
    dispatcher counts tokens per rank on the device and copies the counts to the host as numpy
    arrays (the split sizes ``all_to_all_single`` takes); it copies only CUDA tensors, so on
    CPU the counts stayed tensors, which the collective refuses. Same result as on a GPU."""
    if as_numpy and torch.is_tensor(tensor):
        return tensor.numpy()
    return tensor


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    moe_utils.maybe_move_tensor_to_cpu = _host_split_sizes
    token_dispatcher.maybe_move_tensor_to_cpu = _host_split_sizes

    mrandom.CudaRNGStatesTracker = _make_cpu_tracker(mrandom.CudaRNGStatesTracker)
    mrandom._get_cuda_rng_state = _cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    # A tracker built before activation would still hold the CUDA class.
    mrandom.initialize_rng_tracker(force_reset=True)


def _patch_autograd_backward():
    """The autograd engine runs a custom ``Function``'s ``backward`` with the torch-function
    mode stack emptied, so :class:`CudaToCpuMode` does not see what Megatron allocates there -
    e.g. the reduce-scatter buffers of sequence parallelism
    (``torch.empty(..., device=torch.cuda.current_device())``) and the forward that
    activation recomputation replays. Each such backward runs under the mode again."""
    from torch.autograd.function import BackwardCFunction

    plain = BackwardCFunction.apply

    def apply(self, *args):
        if torch.overrides._get_current_function_mode_stack():
            return plain(self, *args)
        with CudaToCpuMode():
            return plain(self, *args)

    BackwardCFunction.apply = apply


_MODE: CudaToCpuMode | None = None


def activate_cpu_compat() -> None:
    """Install the CPU stand-ins (idempotent). Call before building any Megatron object."""
    global _MODE
    if _MODE is not None:
        return
    _patch_torch_cuda()
    _patch_megatron()
    _patch_autograd_backward()
    _MODE = CudaToCpuMode()
    _MODE.__enter__()


def is_active() -> bool:
    return _MODE is not None
