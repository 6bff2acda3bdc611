"""Unmodified Megatron-Core training on CPU/gloo: schedules, Megatron DDP, Megatron optimizer
(also the distributed optimizer) at TP/PP/DP > 1 give the unsharded loss trajectory."""

import json

import pytest
from conftest import WORKERS, launch, minitron

pytestmark = pytest.mark.multiproc

STEPS = 3


def trajectory(ckpt, tmp_path, tp, pp, nproc, dist_opt=False):
    out = str(tmp_path / f"loss_{tp}{pp}{nproc}{int(dist_opt)}.json")
    args = [
        f"{WORKERS}/train_steps.py",
        ckpt,
        out,
        str(tp),
        str(pp),
        str(STEPS),
        str(dist_opt).lower(),
    ]
    launch(args, nproc=nproc)
    with open(out) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def ckpt(hf_models, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("train") / "ckpt")
    minitron("import-hf", f"load={hf_models['llama']}", f"save={path}", "dtype=fp32")
    return path


@pytest.fixture(scope="module")
def reference(ckpt, tmp_path_factory):
    return trajectory(ckpt, tmp_path_factory.mktemp("ref"), 1, 1, 1)


@pytest.mark.parametrize(
    "tp,pp,nproc,dist_opt",
    [(2, 1, 4, False), (1, 2, 4, False), (2, 2, 4, False), (1, 1, 2, True)],
    ids=["tp2-dp2", "pp2-dp2", "tp2-pp2", "dp2-distopt"],
)
def test_sharded_loss_trajectory_equals_unsharded(
    ckpt, reference, tmp_path, tp, pp, nproc, dist_opt
):
    got = trajectory(ckpt, tmp_path, tp, pp, nproc, dist_opt)
    assert len(got) == len(reference) == STEPS
    for ref, step in zip(reference, got):
        assert abs(step["loss"] - ref["loss"]) / ref["loss"] <= 1e-4, (ref, step)
        assert abs(step["grad_norm"] - ref["grad_norm"]) / ref["grad_norm"] <= 1e-4, (ref, step)
        assert step["lr"] == pytest.approx(ref["lr"])
    # The optimizer really stepped: the loss changed between steps.
    assert len({round(s["loss"], 6) for s in got}) == STEPS
