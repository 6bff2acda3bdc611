"""The CPU compatibility layer: device mapping, CUDA type answers, the RNG tracker."""

import pytest
import torch

from minitron_mcore import compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU layer is off on GPU")


@pytest.fixture(scope="module", autouse=True)
def active():
    assert compat.activate() is True


def test_cuda_allocations_land_on_cpu():
    t = torch.empty(3, device=torch.cuda.current_device())
    assert t.device.type == "cpu"
    assert torch.zeros(2, device="cuda").device.type == "cpu"
    assert torch.ones(2).cuda().device.type == "cpu"
    assert torch.ones(2).to("cuda:0").device.type == "cpu"
    assert torch.arange(4, device=torch.device("cuda", 0)).tolist() == [0, 1, 2, 3]


def test_tensor_type_answers_like_cuda():
    # Megatron's optimizers compare param.type() with these strings.
    assert torch.ones(1).type() == "torch.cuda.FloatTensor"
    assert torch.ones(1, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    # Casting through .type(dtype) still works.
    assert torch.ones(1).type(torch.float64).dtype == torch.float64


def test_streams_events_are_noops():
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        pass
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    b.record()
    torch.cuda.synchronize()
    assert b.elapsed_time(a) <= 0 <= a.elapsed_time(b)


def _tracker_draws(seed, tp_rank):
    from megatron.core import tensor_parallel

    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed, tp_rank=tp_rank, ep_rank=0, etp_rank=0)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    before = torch.rand(3)
    with tracker.fork():
        inside = torch.rand(3)
    after = torch.rand(3)
    return before, inside, after


def test_rng_tracker_is_reproducible_and_rank_specific():
    b0, i0, a0 = _tracker_draws(7, tp_rank=0)
    b0b, i0b, a0b = _tracker_draws(7, tp_rank=0)
    _, i1, a1 = _tracker_draws(7, tp_rank=1)
    # Same seed, same rank: identical draws.
    assert torch.equal(i0, i0b) and torch.equal(a0, a0b) and torch.equal(b0, b0b)
    # Model-parallel region: different per TP rank (dropout masks differ across TP shards).
    assert not torch.equal(i0, i1)
    # Outside the fork the default stream is shared by TP ranks and untouched by the fork.
    assert torch.equal(a0, a1)
    torch.manual_seed(7)
    ref = torch.rand(6)
    assert torch.equal(torch.cat([b0, a0]), ref)


def test_dropout_in_tracker_fork_reproducible():
    from megatron.core import tensor_parallel

    def masks():
        tensor_parallel.model_parallel_cuda_manual_seed(3, tp_rank=1, ep_rank=0, etp_rank=0)
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(torch.ones(64), p=0.5)

    assert torch.equal(masks(), masks())


def test_cuda_allocations_in_a_custom_backward_land_on_cpu():
    """The autograd engine empties the torch-function mode stack for a custom Function's
    backward; Megatron allocates there with device=torch.cuda.current_device() (sequence
    parallelism's reduce-scatter buffers, recomputed forwards). The compat layer covers it."""
    from minitron_mcore import compat

    compat.activate()

    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * 2

        @staticmethod
        def backward(ctx, g):
            buf = torch.empty(list(g.shape), dtype=g.dtype, device=torch.cuda.current_device())
            return buf.copy_(g) * 2

    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
