"""``minitron teacher-logits``: the teacher's top-k predictions stored once, in the sample order
a distillation run with the same keys reads (issue 19): equal to the teacher's own top-k on
those samples, the same at TP=2 / PP=2, resumable shard by shard."""

import os

import numpy as np
import pytest
import torch
from conftest import hf_logits, minitron

KEYS = [
    "data.train=[demo:stdlib-code]",
    "train.steps=3",
    "train.seq_length=32",
    "train.global_batch_size=4",
    "train.micro_batch_size=2",
    "distill.top_k=8",
    "distill.shard_samples=4",
]


def _run(ckpt, save, tmp_path, *extra, nproc=1, check=True):
    return minitron(
        "teacher-logits",
        f"load={ckpt}",
        f"save={save}",
        f"data.cache_dir={tmp_path}/cache",
        *KEYS,
        *extra,
        nproc=nproc,
        check=check,
    )


def _decoded(save):
    from minitron_mcore.distill.logit_store import LogitStore
    from minitron_mcore.distill.topk_codec import decode

    store = LogitStore.open(save)
    info = store.info
    rows = store.rows(list(range(info.samples))).reshape(-1, info.row_bytes)
    return decode(rows, info.k, info.vocab_size, info.precision)


@pytest.fixture(scope="module")
def stored(llama_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("tl")
    save = str(root / "logits")
    _run(llama_ckpt, save, root)
    return save, root


def test_rows_are_the_teachers_top_k_in_training_order(stored, hf_models, tokenizer_dir):
    """Position p of the store holds the top-k of the teacher's logits on the p-th sample the
    distillation run reads (Megatron's shuffled dataset, built from the same keys)."""
    from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_datasets
    from minitron_mcore.data.tokenizer import Tokenizer
    from minitron_mcore.distill.offline import teacher_top_k
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    save, root = stored
    cfg = DataConfig(train=["demo:stdlib-code"], cache_dir=str(root / "cache"))
    with parallel_context(ParallelConfig()):
        ds, _ = build_datasets(cfg, Tokenizer(tokenizer_dir), 32, 1234, 12, 0)
        batches = GlobalBatches(ds, 4, 2, 0, 1)
        tokens = torch.cat([b["tokens"] for step in range(3) for b in batches.get(step)])
    assert tokens.shape == (12, 32)
    ids, logp, tail = _decoded(save)
    logits = hf_logits(hf_models["llama"], tokens).reshape(12 * 32, -1)
    want_ids, want_logp, want_tail = teacher_top_k(logits, 8, logits.shape[-1])
    assert (ids == want_ids).float().mean() > 0.999
    same = ids == want_ids
    assert (logp - want_logp)[same].abs().max() <= 2**-8 * want_logp.abs().max()
    assert (tail - want_tail).abs().max() <= 2**-7 * want_tail.abs().max()


@pytest.mark.multiproc
@pytest.mark.slow  # (teacher_top_k at TP=2 = one rank runs in CI: tests/test_offline_kd.py)
@pytest.mark.parametrize("layout", ["parallel.tp=2", "parallel.pp=2"])
def test_same_predictions_at_tp2_and_pp2(stored, llama_ckpt, tmp_path, layout):
    save, _ = stored
    other = str(tmp_path / "logits")
    _run(llama_ckpt, other, tmp_path, layout, nproc=2)
    (a_ids, a_logp, a_tail), (b_ids, b_logp, b_tail) = _decoded(save), _decoded(other)
    same = a_ids == b_ids
    assert same.float().mean() > 0.999
    assert (a_logp - b_logp)[same].abs().max() <= 2**-7 * a_logp.abs().max()
    assert (a_tail - b_tail).abs().max() <= 2**-6 * a_tail.abs().max()


def test_resume_computes_only_missing_shards(stored, llama_ckpt, tmp_path):
    """A shard lost (a kill before its rename leaves a .partial) is all a re-run computes; the
    result is byte-identical; a complete store is not recomputed; other keys into the same
    directory are refused in one line."""
    import json
    import shutil

    save, root = stored
    copy = str(tmp_path / "logits")
    shutil.copytree(save, copy)
    before = {f: open(os.path.join(copy, f), "rb").read() for f in os.listdir(copy) if "shard" in f}
    os.replace(os.path.join(copy, "shard-00001.npy"), os.path.join(copy, "shard-00001.npy.partial"))
    r = _run(llama_ckpt, copy, root)
    assert json.loads(r.stdout.strip().splitlines()[-1])["shards_computed"] == 1
    after = {f: open(os.path.join(copy, f), "rb").read() for f in before}
    assert after == before
    r = _run(llama_ckpt, copy, root)
    assert json.loads(r.stdout.strip().splitlines()[-1])["shards_computed"] == 0
    bad = _run(llama_ckpt, copy, root, "distill.top_k=4", check=False)
    assert bad.returncode == 2 and "already holds something else" in bad.stderr.splitlines()[-1]
    assert np.load(os.path.join(copy, "shard-00000.npy")).shape[-1] == 27  # untouched


@pytest.mark.slow  # (a lost shard's re-run runs in CI: test_resume_computes_only_missing_shards)
def test_sigkill_then_rerun_gives_identical_predictions(llama_ckpt, tmp_path):
    """SIGKILL while the third of six shards is being computed; the re-run computes the rest
    and every shard is byte-identical to an uninterrupted run's."""
    import json

    from conftest import run_and_kill_when

    keys = ["train.steps=6", f"data.cache_dir={tmp_path}/cache"]
    ref, cut = str(tmp_path / "ref"), str(tmp_path / "cut")
    _run(llama_ckpt, ref, tmp_path, *keys)
    args = ["teacher-logits", f"load={llama_ckpt}", f"save={cut}", *KEYS, *keys]
    run_and_kill_when(args, os.path.join(cut, "shard-00002.npy"))
    assert not os.path.exists(os.path.join(cut, "shard-00005.npy"))
    r = _run(llama_ckpt, cut, tmp_path, *keys)
    assert 0 < json.loads(r.stdout.strip().splitlines()[-1])["shards_computed"] < 8
    for root, _, files in os.walk(ref):
        for f in files:
            if f.startswith("shard-"):
                other = os.path.join(cut, os.path.relpath(os.path.join(root, f), ref))
                assert open(os.path.join(root, f), "rb").read() == open(other, "rb").read(), f
