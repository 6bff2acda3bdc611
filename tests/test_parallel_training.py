"""Unmodified Megatron-Core training on CPU/gloo through the real CLI: TP=2, PP=2, DP=2 (and the
distributed optimizer) reproduce the unsharded loss trajectory."""

import pytest
from conftest import minitron, read_log

pytestmark = pytest.mark.multiproc

STEPS = 5


def trajectory(ckpt, data, out, tp=1, pp=1, nproc=1, extra=()):
    minitron(
        "correct",
        f"load={ckpt}",
        f"save={out}",
        f"data.train=[{data}]",
        f"train.steps={STEPS}",
        "train.lr=1e-3",
        "train.warmup_steps=1",
        "train.global_batch_size=8",
        "train.micro_batch_size=2",
        "train.seq_length=64",
        "train.eval_iters=0",
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        "train.precision=fp32",
        *extra,
        nproc=nproc,
    )
    rows = [r for r in read_log(out + ".logs/train_log.jsonl") if "train/loss" in r]
    return [(r["train/loss"], r["train/grad_norm"], r["train/lr"]) for r in rows]


@pytest.fixture(scope="module")
def reference(llama_ckpt, corpora, tmp_path_factory):
    return trajectory(
        llama_ckpt, corpora["stdlib-code"], str(tmp_path_factory.mktemp("ref") / "out")
    )


@pytest.mark.parametrize(
    "tp,pp,nproc,extra",
    [(2, 1, 4, ()), (1, 2, 4, ()), (2, 2, 4, ()), (1, 1, 2, ("train.distributed_optimizer=true",))],
    ids=["tp2-dp2", "pp2-dp2", "tp2-pp2", "dp2-distopt"],
)
def test_sharded_loss_trajectory_equals_unsharded(
    llama_ckpt, corpora, reference, tmp_path, tp, pp, nproc, extra
):
    got = trajectory(
        llama_ckpt, corpora["stdlib-code"], str(tmp_path / "out"), tp, pp, nproc, extra
    )
    assert len(got) == len(reference) == STEPS
    for (loss, gn, lr), (rloss, rgn, rlr) in zip(got, reference):
        assert abs(loss - rloss) / rloss <= 1e-4, (got, reference)
        assert abs(gn - rgn) / rgn <= 1e-4, (got, reference)
        assert lr == pytest.approx(rlr)
    # The optimizer really stepped: the loss moved.
    assert len({round(x[0], 5) for x in got}) > 1
