"""`minitron evaluate` gives the loss transformers computes on the same samples."""

import json

import pytest
import torch
from conftest import minitron

pytestmark = pytest.mark.multiproc


@pytest.mark.parametrize("tp", [1, 2])
def test_evaluate_matches_transformers_loss(
    hf_models, llama_ckpt, corpora, tokenizer_dir, tmp_path, tp
):
    from transformers import AutoModelForCausalLM

    from minitron_mcore.data.datasets import DataConfig, build_eval_dataset
    from minitron_mcore.data.tokenizer import Tokenizer
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    seq, gbs, iters = 64, 4, 2
    cache = str(tmp_path / "cache")
    r = minitron(
        "evaluate",
        f"load={llama_ckpt}",
        f"save={tmp_path}/eval",
        f"data.valid=[{corpora['stdlib-docs']}]",
        f"data.cache_dir={cache}",
        f"seq_length={seq}",
        f"global_batch_size={gbs}",
        "micro_batch_size=2",
        f"iters={iters}",
        f"parallel.tp={tp}",
        nproc=tp,
    )
    ours = json.loads(r.stdout.strip().splitlines()[-1])["valid_loss"]

    with parallel_context(ParallelConfig()):
        ds = build_eval_dataset(
            DataConfig(valid=[corpora["stdlib-docs"]], cache_dir=cache),
            Tokenizer(tokenizer_dir),
            seq,
            1234,
            iters * gbs,
        )
        samples = [ds[i] for i in range(iters * gbs)]
    tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples])
    labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples])
    hf = AutoModelForCausalLM.from_pretrained(hf_models["llama"], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(tokens).logits
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()).item()
    assert abs(ours - ref) / ref <= 1e-5, (ours, ref)


def test_evaluate_reads_data_train_when_no_valid_is_given(llama_ckpt, corpora, tmp_path):
    """`data.train=[X]` alone evaluates X (no demo corpus behind the user's back): the same
    loss as `data.valid=[X]`, and the demo corpus is never written."""
    common = [
        f"load={llama_ckpt}",
        "seq_length=32",
        "global_batch_size=4",
        "micro_batch_size=2",
        "iters=2",
    ]
    losses = {}
    for key in ("train", "valid"):
        cache = tmp_path / f"cache_{key}"
        r = minitron(
            "evaluate",
            *common,
            f"save={tmp_path}/eval_{key}",
            f"data.{key}=[{corpora['stdlib-docs']}]",
            f"data.cache_dir={cache}",
        )
        losses[key] = json.loads(r.stdout.strip().splitlines()[-1])["valid_loss"]
        assert not (cache / "demo").exists(), key
    assert losses["train"] == losses["valid"], losses
