"""Vocab-parallel KD losses against a plain full-softmax reference: values and gradients, with
temperature, padded vocabulary, masked tokens, top-k and the CE mix; chunked = unchunked; and
at TP=2 and TP=4 over gloo."""

import os

import pytest
import torch
from conftest import WORKERS, launch

from minitron_mcore.distill.losses import KDSpec, chunked_kd, vocab_parallel_kd
from minitron_mcore.testing.kd_reference import reference_kd

V_REAL, V_PAD, N, H = 50, 64, 24, 16  # 14 padded vocabulary entries
SPECS = {
    "forward": KDSpec(V_REAL),
    "forward-T2": KDSpec(V_REAL, temperature=2.0),
    "reverse-T0.5": KDSpec(V_REAL, temperature=0.5, mode="reverse"),
    "topk5": KDSpec(V_REAL, top_k=5),
    "ce-mix-T2": KDSpec(V_REAL, temperature=2.0, ce_weight=0.3),
    "reverse-ce": KDSpec(V_REAL, mode="reverse", ce_weight=1.0),
}


def _data(seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    zs = torch.randn(N, V_PAD, generator=g, dtype=dtype) * 3
    zt = torch.randn(N, V_PAD, generator=g, dtype=dtype) * 3
    zs[:, V_REAL:] = 100.0  # padding must not take any mass, however large its logits
    zt[:, V_REAL:] = 100.0
    labels = torch.randint(0, V_REAL, (N,), generator=g)
    mask = (torch.rand(N, generator=g) > 0.25).to(dtype)
    return zs, zt, labels, mask


def _ref(spec, zs, zt, labels, mask):
    zs = zs.clone().requires_grad_(True)
    loss, lm = reference_kd(zs, zt, spec, labels)
    total = (loss * mask).sum()
    total.backward()
    return total.detach(), (lm * mask).sum(), zs.grad


def _close(a, b, rel=1e-6):
    scale = b.abs().max().clamp(min=1e-12)
    assert ((a - b).abs().max() / scale).item() <= rel, ((a - b).abs().max(), scale)


@pytest.mark.parametrize("name", list(SPECS))
def test_single_rank_equals_reference(name):
    spec = SPECS[name]
    zs, zt, labels, mask = _data()
    want, want_lm, want_grad = _ref(spec, zs, zt, labels, mask)
    x = zs.clone().requires_grad_(True)
    kd, lm = vocab_parallel_kd(x, zt, spec, labels=labels)
    (kd * mask).sum().backward()
    _close((kd * mask).sum(), want)
    _close((lm * mask).sum(), want_lm)
    _close(x.grad, want_grad)
    assert x.grad[:, V_REAL:].abs().max() == 0  # padded entries get no gradient


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_chunked_with_output_layer_equals_unchunked(name, chunk):
    """Logits made chunk by chunk from hidden states and output weights: same loss, same
    gradients w.r.t. the student's hidden states and output weight."""
    spec = SPECS[name]
    g = torch.Generator().manual_seed(1)
    hs = torch.randn(N, H, generator=g, dtype=torch.float64)
    ws = torch.randn(V_PAD, H, generator=g, dtype=torch.float64)
    ht = torch.randn(N, H + 8, generator=g, dtype=torch.float64)  # a wider teacher
    wt = torch.randn(V_PAD, H + 8, generator=g, dtype=torch.float64)
    _, _, labels, mask = _data()
    a = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    kd, lm = vocab_parallel_kd(a[0] @ a[1].t(), ht @ wt.t(), spec, labels=labels)
    ref = (kd * mask).sum()
    ref.backward()
    b = [hs.clone().requires_grad_(True), ws.clone().requires_grad_(True)]
    got, got_lm = chunked_kd(b[0], b[1], ht, wt, spec, mask, labels, chunk_tokens=chunk)
    got.backward()
    _close(got, ref)
    _close(got_lm, (lm * mask).sum())
    _close(b[0].grad, a[0].grad)
    _close(b[1].grad, a[1].grad)


def test_chunked_in_fp32_and_bf16_inputs():
    """fp32 inputs match the float64 reference to fp32 precision; bf16 ones run and stay close."""
    spec = SPECS["forward"]
    g = torch.Generator().manual_seed(2)
    hs, ws = torch.randn(N, H, generator=g), torch.randn(V_PAD, H, generator=g)
    ht, wt = torch.randn(N, H, generator=g), torch.randn(V_PAD, H, generator=g)
    _, _, labels, mask = _data()
    ref, _ = chunked_kd(hs.double(), ws.double(), ht.double(), wt.double(), spec, mask, labels)
    f32, _ = chunked_kd(hs, ws, ht, wt, spec, mask.float(), labels, chunk_tokens=5)
    assert abs(f32.item() - ref.item()) / ref.item() < 1e-5
    bf = [t.bfloat16() for t in (hs, ws, ht, wt)]
    b16, _ = chunked_kd(*bf, spec, mask.float(), labels, chunk_tokens=5)
    assert abs(b16.item() - ref.item()) / ref.item() < 5e-2


class _CountOps(torch.overrides.TorchFunctionMode):
    """Counts the matrix products and the tensors allocated with ``zeros_like`` under it."""

    def __init__(self):
        super().__init__()
        self.matmuls = self.zeros_like = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in ("matmul", "__matmul__", "mm"):
            self.matmuls += 1
        if name == "zeros_like":
            self.zeros_like += 1
        return func(*args, **(kwargs or {}))


def test_validation_allocates_no_gradient_buffers():
    """Under ``torch.no_grad()`` (KD validation) the student's weights still require grad, but
    no gradient is wanted: only the two logit GEMMs per chunk run (no ``g @ ws``/``g.T @ hs``)
    and no fp32 gradient buffer is allocated; with grad mode on, both are there."""
    zs, _, labels, mask = _data()
    g = torch.Generator().manual_seed(4)
    hs = torch.randn(N, H, generator=g, requires_grad=True)
    ws = torch.randn(V_PAD, H, generator=g, requires_grad=True)
    ht, wt = torch.randn(N, 12, generator=g), torch.randn(V_PAD, 12, generator=g)
    chunks = -(-N // 5)
    counts = {}
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode), _CountOps() as ops:
            kd, _ = chunked_kd(hs, ws, ht, wt, SPECS["forward"], mask, labels, 0, 5)
            kd2, _ = vocab_parallel_kd(hs @ ws.t(), ht @ wt.t(), SPECS["forward"], labels)
        counts[grad_mode] = (ops.matmuls, ops.zeros_like, kd.requires_grad)
        if grad_mode:  # the same loss either way
            assert torch.allclose(kd.detach(), counts["value"])
        else:
            counts["value"] = kd.detach()
    # chunked: 2 logit GEMMs per chunk (+2 gradient GEMMs with grad); unchunked: 2 products
    assert counts[False] == (2 * chunks + 2, 0, False), counts
    assert counts[True] == (4 * chunks + 2, 2, True), counts


def test_spec_rejects_nonsense():
    with pytest.raises(ValueError):
        KDSpec(10, mode="sideways")
    with pytest.raises(ValueError):
        KDSpec(10, temperature=0)
    with pytest.raises(ValueError):
        KDSpec(10, mode="reverse", top_k=3)


@pytest.mark.multiproc
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_reference(tp, tmp_path):
    """Each rank holds V/tp columns of both models' logits; losses and the gathered gradient
    equal the single-rank reference (every spec, also chunked with the output layer)."""
    out = str(tmp_path / "result.pt")
    launch([os.path.join(WORKERS, "kd_tp.py"), out], nproc=tp)
    res = torch.load(out, weights_only=True)
    zs, zt, labels, mask = _data()
    for name, spec in SPECS.items():
        want, want_lm, want_grad = _ref(spec, zs, zt, labels, mask)
        got = res[name]
        _close(got["loss"], want)
        _close(got["lm"], want_lm)
        _close(got["grad"], want_grad)
        _close(got["chunked_loss"], got["unchunked_loss"])
        _close(got["chunked_grad_h"], res[name]["unchunked_grad_h"])
        _close(got["chunked_grad_w"], res[name]["unchunked_grad_w"])


def test_hidden_state_layer_map_and_projection():
    """Pairs follow the prune plan's kept layers (else proportionally); a projection that
    starts as the prune plan's channel selection gives zero loss on the unpruned channels."""
    from minitron_mcore.distill import intermediate as inter

    plan = {"kept_layers": [0, 3, 5]}
    assert inter.layer_pairs(3, 6, plan, [0, 1, 2]) == [(0, 0), (1, 3), (2, 5)]
    assert inter.layer_pairs(2, 4, None, [0, 1]) == [(0, 1), (1, 3)]
    kept = [0, 2, 5]
    g = torch.Generator().manual_seed(4)
    h_t = torch.randn(5, 2, 8, generator=g)
    h_t[..., [1, 3, 4, 6, 7]] = 0.0  # the teacher's signal lives in the kept channels
    h_s = h_t[..., kept].clone()
    student = torch.nn.Module()
    student.dummy = torch.nn.Parameter(torch.zeros(1))
    inter.attach_projections(student, [(0, 0)], 3, 8, kept)
    proj = student.kd_projection["0"]
    mask = torch.ones(2, 5)
    assert inter.cosine_loss_sum(h_s, h_t, mask, proj).item() < 1e-6
    worse = inter.cosine_loss_sum(h_s.flip(-1), h_t, mask, proj)
    assert worse.item() > 0.1
    worse.backward()
    assert proj.weight.grad is not None and proj.weight.grad.abs().sum() > 0
