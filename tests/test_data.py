"""Tokenizers, preprocessing to .bin/.idx, blends, data errors."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, WORKERS, _env, _free_port

from minitron_mcore.cli import main
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_datasets
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import MinitronError


@pytest.fixture
def jsonl(tmp_path):
    docs = [
        "def add(a, b):\n    return a + b\n",
        "Hello tokenizer world.",
        "x = [i * i for i in r]",
    ]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path), docs


def test_preprocess_round_trip(capsys, tmp_path, tokenizer_dir, jsonl):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    path, docs = jsonl
    prefix = str(tmp_path / "out" / "docs")
    code = main(
        [
            "preprocess",
            f"input=[{path}]",
            f"tokenizer={tokenizer_dir}",
            f"save={prefix}",
            "json_key=body",
            "workers=2",
        ]
    )
    assert code == 0, capsys.readouterr().err
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tok = Tokenizer(tokenizer_dir)
    ds = IndexedDataset(prefix)
    assert len(ds) == len(docs) == metrics["documents"]
    for i, doc in enumerate(docs):
        want = tok.tokenize(doc) + [tok.eod]  # EOD appended to every document
        assert ds[i].tolist() == want
    assert metrics["tokens"] == sum(len(tok.tokenize(d)) + 1 for d in docs)
    with open(prefix + ".json") as f:
        assert json.load(f)["tokenizer_fingerprint"] == tok.fingerprint()


def test_sentencepiece_tokenizer(tmp_path):
    import sentencepiece as spm

    text = tmp_path / "t.txt"
    text.write_text(
        "\n".join(f"line {i} of some training text for sentencepiece" for i in range(200))
    )
    spm.SentencePieceTrainer.train(
        input=str(text),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=40,
        eos_id=2,
        bos_id=1,
        unk_id=0,
        pad_id=3,
    )
    tok = Tokenizer(str(tmp_path / "sp.model"))
    ids = tok.tokenize("line 7 of some text")
    assert tok.detokenize(ids) == "line 7 of some text"
    assert tok.eod == 2 and tok.pad == 3 and tok.vocab_size == 40


def _constant_prefix(tmp_path, name, token, n_docs=40, length=50):
    """A dataset whose every token is ``token`` (to tell blend components apart)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / name)
    b = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for _ in range(n_docs):
        b.add_document(np.full(length, token), [length])
    b.finalize(prefix + ".idx")
    return prefix


def test_blend_samples_in_proportion(tmp_path, tokenizer_dir):
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    a = _constant_prefix(tmp_path, "a", 11)
    b = _constant_prefix(tmp_path, "b", 22)
    cfg = DataConfig(train=[0.75, a, 0.25, b], valid=[a], cache_dir=str(tmp_path / "cache"))
    with parallel_context(ParallelConfig()):
        train, _ = build_datasets(cfg, Tokenizer(tokenizer_dir), 32, 0, 2000, 10)
        first = np.array([int(train[i]["tokens"][0]) for i in range(2000)])
    frac_a = float(np.mean(first == 11))
    assert abs(frac_a - 0.75) < 0.02, frac_a
    assert set(np.unique(first)) == {11, 22}


def test_weighted_blend_with_a_held_out_split(tmp_path, tokenizer_dir):
    """A weighted blend and no data.valid: validation is the split's held-out share of the
    blend (Megatron's builder refused the unused test split: 'size_is_none =>
    weights_are_none'), for training and for evaluate's held-out read."""
    from minitron_mcore.data.datasets import build_eval_dataset
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    a = _constant_prefix(tmp_path, "a", 11, n_docs=200)
    b = _constant_prefix(tmp_path, "b", 22, n_docs=200)
    cfg = DataConfig(train=[0.5, a, 0.5, b], split="90,10,0", cache_dir=str(tmp_path / "cache"))
    with parallel_context(ParallelConfig()):
        tok = Tokenizer(tokenizer_dir)
        train, valid = build_datasets(cfg, tok, 32, 0, 400, 20)
        held = build_eval_dataset(cfg, tok, 32, 0, 20, held_out=True)
        assert len(train) >= 400 and len(valid) >= 20 and len(held) >= 20
        firsts = {int(valid[i]["tokens"][0]) for i in range(20)}
    assert firsts == {11, 22}


def test_global_batches_split_over_dp_ranks():
    ds = [
        {"tokens": [i], "labels": [i], "loss_mask": [1.0], "position_ids": [0]} for i in range(64)
    ]
    seen = []
    for r in range(2):
        gb = GlobalBatches(ds, global_batch=8, micro_batch=2, dp_rank=r, dp_size=2)
        assert gb.num_microbatches == 2
        seen += [int(t) for mb in gb.get(3) for t in mb["tokens"].flatten()]
    assert sorted(seen) == list(range(24, 32))  # step 3 = samples 24..31, split over DP


def run(capsys, *argv):
    """(exit code, the single `error:` line) - progress log lines may precede it."""
    code = main(list(argv))
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0]


def test_preprocess_empty_input(capsys, tmp_path, tokenizer_dir):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    code, err = run(
        capsys, "preprocess", f"input=[{empty}]", f"tokenizer={tokenizer_dir}", f"save={tmp_path}/e"
    )
    assert code == 2 and "no documents" in err
    assert not os.path.exists(f"{tmp_path}/e.bin")


def test_preprocess_missing_json_key(capsys, tmp_path, tokenizer_dir, jsonl):
    code, err = run(
        capsys,
        "preprocess",
        f"input=[{jsonl[0]}]",
        f"tokenizer={tokenizer_dir}",
        f"save={tmp_path}/k",
    )
    assert code == 2 and "json_key" in err


def test_missing_data_prefix(tmp_path, tokenizer_dir):
    cfg = DataConfig(train=[str(tmp_path / "nope")], cache_dir=str(tmp_path))
    with pytest.raises(MinitronError, match="not found.*minitron preprocess"):
        build_datasets(cfg, Tokenizer(tokenizer_dir), 32, 0, 10, 0)


def test_dataset_smaller_than_a_sequence(tmp_path, tokenizer_dir):
    tiny = _constant_prefix(tmp_path, "tiny", 5, n_docs=1, length=10)
    with pytest.raises(MinitronError, match="fewer than one sample"):
        build_datasets(
            DataConfig(train=[tiny], cache_dir=str(tmp_path)),
            Tokenizer(tokenizer_dir),
            64,
            0,
            10,
            0,
        )


def test_global_batch_not_divisible():
    with pytest.raises(MinitronError, match="not divisible by train.micro_batch_size"):
        GlobalBatches([], global_batch=10, micro_batch=4, dp_rank=0, dp_size=1)


def test_dataset_from_another_tokenizer(tmp_path, tokenizer_dir, jsonl):
    from minitron_mcore.data.preprocess import iter_documents, write_indexed
    from minitron_mcore.testing.hf_models import make_tokenizer

    other = make_tokenizer(str(tmp_path / "other"), vocab_size=300)
    prefix = str(tmp_path / "other_data")
    write_indexed(iter_documents([jsonl[0]], "body", "file"), other, prefix, 1)
    with pytest.raises(MinitronError, match="different tokenizer"):
        build_datasets(
            DataConfig(train=[prefix], cache_dir=str(tmp_path)),
            Tokenizer(tokenizer_dir),
            8,
            0,
            10,
            0,
        )


def _two_ranks(mode: str, tokenizer_dir: str, corpus: str, cache: str, timeout_s=2, delay_s=1.0):
    """Run tests/workers/slow_tokenize.py as global ranks 0 and 1 -> [(returncode, out, err)]."""
    port, procs = _free_port(), []
    for r in range(2):
        env = _env()
        env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2")
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        args = [mode, tokenizer_dir, corpus, cache, str(timeout_s), str(delay_s)]
        procs.append(
            subprocess.Popen(
                [sys.executable, os.path.join(WORKERS, "slow_tokenize.py"), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                cwd=ROOT,
            )
        )
    deadline, results = time.monotonic() + 300, []
    for p in procs:
        try:
            out, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err += "\n[killed: still running after the deadline]"
        results.append((p.returncode, out, err))
    return results


@pytest.fixture
def six_docs(tmp_path):
    path = tmp_path / "six.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n" for i in range(6)))
    return str(path)


@pytest.mark.multiproc
def test_ranks_wait_for_slow_tokenization_without_collective_timeout(
    tmp_path, tokenizer_dir, six_docs
):
    """Rank 0 tokenizes for ~6 s; the process group's collectives time out after 2 s. The other
    rank waits on the filesystem, not in a collective, so both get the finished dataset."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    cache = str(tmp_path / "cache")
    (r0, out0, err0), (r1, out1, err1) = _two_ranks("ok", tokenizer_dir, six_docs, cache)
    assert r0 == 0 and r1 == 0, f"rank 0:\n{err0[-3000:]}\nrank 1:\n{err1[-3000:]}"
    got = [json.loads(out.strip().splitlines()[-1]) for out in (out0, out1)]
    assert got[0]["prefix"] == got[1]["prefix"]
    assert got[1]["seconds"] > 4, got  # rank 1 really waited longer than the timeout
    assert len(IndexedDataset(got[0]["prefix"])) == 6
    assert os.listdir(os.path.join(cache, ".sync")) == []  # the status file is cleaned up


@pytest.mark.multiproc
@pytest.mark.parametrize(
    "mode,rank0_code,needle",
    [("fail", 2, "rank 0 failed while preparing"), ("die", 17, "stopped reporting progress")],
)
def test_waiting_ranks_stop_when_rank0_fails_tokenizing(
    tmp_path, tokenizer_dir, six_docs, mode, rank0_code, needle
):
    """Rank 0 raises (or its process vanishes) while tokenizing: the waiting rank does not hang,
    it exits with one error line saying why."""
    cache = str(tmp_path / "cache")
    (r0, _, err0), (r1, _, err1) = _two_ranks(mode, tokenizer_dir, six_docs, cache)
    assert r0 == rank0_code, err0[-3000:]
    errors = [line for line in err1.splitlines() if line.startswith("error:")]
    assert r1 == 2 and len(errors) == 1 and needle in errors[0], err1[-3000:]
    if mode == "fail":
        assert "bad record 3 in the corpus" in errors[0]
