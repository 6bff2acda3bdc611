"""Distillation from stored top-k teacher predictions (issue 19's loss): the stored top-k equals
the teacher's, the loss and gradient from them equal the online top-k loss with the teacher's
logits in memory, the tail-modelled loss equals its definition under autograd, and all of it
at TP=2 equals one rank."""

import os

import pytest
import torch
from conftest import WORKERS, launch
from test_distill_losses import V_PAD, V_REAL, _close, _data

from minitron_mcore.distill.losses import KDSpec, vocab_parallel_kd
from minitron_mcore.distill.offline import offline_kd, teacher_top_k

K = 5


def test_stored_top_k_is_the_teachers():
    _, zt, _, _ = _data()
    ids, logp, log_tail = teacher_top_k(zt, K, V_REAL)
    full = torch.log_softmax(zt[:, :V_REAL], -1)
    want = full.topk(K, -1)
    assert torch.equal(ids, want.indices) and (ids < V_REAL).all()  # padding never stored
    _close(logp.double(), want.values, 1e-6)
    tail = torch.log1p(-want.values.exp().sum(-1))
    _close(log_tail.double(), tail, 1e-5)


@pytest.mark.parametrize("temperature,ce", [(1.0, 0.0), (2.0, 0.0), (1.0, 0.5)])
def test_offline_equals_online_top_k(temperature, ce):
    zs, zt, labels, mask = _data()
    online = KDSpec(V_REAL, temperature=temperature, top_k=K, ce_weight=ce)
    x = zs.clone().requires_grad_(True)
    kd, lm = vocab_parallel_kd(x, zt, online, labels)
    (kd * mask).sum().backward()
    ids, logp, log_tail = teacher_top_k(zt, K, V_REAL)
    y = zs.clone().requires_grad_(True)
    spec = KDSpec(V_REAL, temperature=temperature, ce_weight=ce)
    kd2, lm2 = offline_kd(y, ids, logp.double(), log_tail.double(), spec, labels=labels)
    (kd2 * mask).sum().backward()
    _close((kd2 * mask).sum(), (kd * mask).sum(), 1e-6)
    _close(lm2, lm, 1e-9)
    _close(y.grad, x.grad, 1e-6)
    assert y.grad[:, V_REAL:].abs().max() == 0


def _tail_reference(zs, ids, logp, log_tail):
    """KL over the k stored tokens and one "other" outcome, with autograd."""
    x = zs.clone().requires_grad_(True)
    log_s = torch.log_softmax(x[:, :V_REAL], -1)
    log_s_k = log_s.gather(-1, ids)
    log_s_t = torch.log1p(-log_s_k.exp().sum(-1))
    q, q_t = logp.exp(), log_tail.exp()
    loss = (q * (logp - log_s_k)).sum(-1) + q_t * (log_tail - log_s_t)
    return loss, x


def test_tail_term_equals_its_definition():
    zs, zt, _, mask = _data()
    ids, logp, log_tail = teacher_top_k(zt, K, V_REAL)
    logp, log_tail = logp.double(), log_tail.double()
    want, x = _tail_reference(zs, ids, logp, log_tail)
    (want * mask).sum().backward()
    y = zs.clone().requires_grad_(True)
    got, _ = offline_kd(y, ids, logp, log_tail, KDSpec(V_REAL), tail=True)
    (got * mask).sum().backward()
    # (the reference's log1p(-sum s_K) cancels where the student's tail is tiny: ~1e-8)
    _close(got, want.detach(), 1e-7)
    _close(y.grad, x.grad, 1e-7)
    # the tail term is what the renormalised loss leaves out: with the whole vocabulary stored,
    # both are the full forward KL
    ids_all, logp_all, tail_all = teacher_top_k(zt, V_REAL, V_REAL)
    full, _ = vocab_parallel_kd(zs, zt, KDSpec(V_REAL))
    for tail in (False, True):
        kd, _ = offline_kd(zs, ids_all, logp_all.double(), tail_all.double(), KDSpec(V_REAL), tail)
        _close(kd, full, 1e-5)


def test_tail_needs_temperature_one():
    zs, zt, _, _ = _data()
    ids, logp, log_tail = teacher_top_k(zt, K, V_REAL)
    with pytest.raises(Exception, match="temperature 1"):
        offline_kd(zs, ids, logp, log_tail, KDSpec(V_REAL, temperature=2.0), tail=True)


@pytest.mark.multiproc
def test_offline_kd_at_tp2_equals_one_rank(tmp_path):
    """Each rank holds half of the vocabulary of both models' logits: the stored top-k found
    across ranks, the losses and the gathered gradients equal one rank's (both loss forms)."""
    out = str(tmp_path / "r.pt")
    launch([os.path.join(WORKERS, "offline_kd_tp.py"), out], nproc=2)
    res = torch.load(out, weights_only=True)
    zs, zt, labels, mask = _data()
    ids, logp, log_tail = teacher_top_k(zt, K, V_REAL)
    assert torch.equal(res["ids"], ids)
    _close(res["logp"], logp, 1e-6)
    _close(res["log_tail"], log_tail, 1e-5)
    # the loss at TP=2 against one rank's, from the same stored predictions
    stored = res["ids"], res["logp"].double(), res["log_tail"].double()
    for tail in (False, True):
        y = zs.clone().requires_grad_(True)
        kd, lm = offline_kd(y, *stored, KDSpec(V_REAL), tail, labels)
        (kd * mask).sum().backward()
        got = res[f"tail={tail}"]
        _close(got["loss"], (kd * mask).sum().detach(), 1e-9)
        _close(got["lm"], (lm * mask).sum(), 1e-9)
        _close(got["grad"], y.grad, 1e-9)
        assert got["grad"].shape == (zs.shape[0], V_PAD)


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_stored_rows_round_trip(precision):
    """Rows are fixed-size bytes per token; ids come back exactly (packed to the vocabulary's
    bit width), log-probabilities within the format's precision; the bytes per token at the
    issue's reference point (k = 64, a 128K vocabulary) are as documented."""
    from minitron_mcore.distill.topk_codec import decode, encode, id_bits, row_bytes

    vocab = 151936
    g = torch.Generator().manual_seed(0)
    zt = torch.randn(40, vocab, generator=g) * 4
    ids, logp, log_tail = teacher_top_k(zt, 64, vocab)
    rows = encode(ids, logp, log_tail, vocab, precision)
    assert id_bits(vocab) == 18 and rows.shape == (40, row_bytes(64, vocab, precision))
    ids2, logp2, tail2 = decode(rows, 64, vocab, precision)
    assert torch.equal(ids2, ids)
    err = (logp2 - logp).abs().max().item()
    spread = (logp[:, 0] - logp[:, -1]).max().item()
    bound = 2 * 2**-8 * logp.abs().max().item() if precision == "bf16" else spread / 255
    assert err <= bound, (err, bound)
    assert (tail2 - log_tail).abs().max() <= 2**-7 * log_tail.abs().max()
    assert row_bytes(64, 2**17, "bf16") == 266 and row_bytes(64, 2**17, "int8") == 206
    # the loss from decoded rows stays close to the loss from the exact values
    zs = torch.randn(40, vocab, generator=g) * 4
    exact, _ = offline_kd(zs, ids, logp, log_tail, KDSpec(vocab))
    coded, _ = offline_kd(zs, ids2, logp2, tail2, KDSpec(vocab))
    assert (coded - exact).abs().max() <= (0.02 if precision == "bf16" else 0.05)


def test_logit_store_resumes_and_reads_by_sample_position(tmp_path):
    """Shards are written whole and found again by a re-run (only the missing ones are left);
    rows come back by training-order position across shards; a reader with another
    fingerprint, an incomplete store, a truncated shard and a foreign directory are refused in
    one line each."""
    import numpy as np

    from minitron_mcore.distill.logit_store import LogitStore, StoreInfo
    from minitron_mcore.errors import MinitronError

    info = StoreInfo(
        "fp1", k=4, precision="int8", vocab_size=300, seq_length=3, samples=10, shard_samples=4
    )
    path = str(tmp_path / "logits")
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, size=(10, 3, info.row_bytes), dtype=np.uint8)
    store = LogitStore.create(path, info)
    assert store.missing() == [0, 1, 2]
    store.write_shard(0, data[0:4])
    store.write_shard(2, data[8:10])
    with pytest.raises(MinitronError, match="incomplete .1 of 3 shards missing"):
        LogitStore.open(path)
    again = LogitStore.create(path, info)  # a resumed run keeps what is complete
    assert again.missing() == [1]
    again.write_shard(1, data[4:8])
    reader = LogitStore.open(path, "fp1")
    assert np.array_equal(reader.rows([9, 0, 5, 4]), data[[9, 0, 5, 4]])
    with pytest.raises(MinitronError, match="another teacher, data or sample order"):
        LogitStore.open(path, "fp2")
    with pytest.raises(MinitronError, match="beyond the 10 samples"):
        reader.rows([10])
    with pytest.raises(MinitronError, match="already holds something else"):
        LogitStore.create(path, StoreInfo("fp2", 4, "int8", 300, 3, 10, 4))
    shard = os.path.join(path, "shard-00001.npy")
    with open(shard, "r+b") as f:  # a shard cut short (a disk that filled up)
        f.truncate(os.path.getsize(shard) - 5)
    assert LogitStore.create(path, info).missing() == [1]
    with pytest.raises(MinitronError, match="not a teacher-logits directory"):
        LogitStore.open(str(tmp_path))
