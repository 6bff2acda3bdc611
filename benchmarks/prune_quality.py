"""Pruning quality on a trained tiny model: activation-based importance (every aggregation)
against random pruning to the same shape, by LM loss before any retraining.

    python benchmarks/prune_quality.py                       # ~3 min on 2 CPU cores
    python benchmarks/prune_quality.py --steps 400 --random-seeds 5

Steps (all through the `minitron` CLI): pretrain a small Llama on demo:stdlib-code, estimate
importance on calibration samples, prune the width with each of the six (sequence, batch)
aggregations and with random scores, and evaluate every pruned model on held-out data.
Prints a table and one final JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

AGGS = [f"{s}-{b}" for s in ("mean", "l2") for b in ("mean", "l2", "var")]
MODEL = [
    "model=tiny-llama",
    "model.hidden_size=128",
    "model.ffn_hidden_size=384",
    "model.num_attention_heads=8",
    "model.num_query_groups=4",
    "model.kv_channels=16",
]
TARGET = [
    "prune.target.hidden_size=96",
    "prune.target.ffn_hidden_size=192",
    "prune.target.num_attention_heads=4",
]


def cli(*args: str) -> dict:
    r = subprocess.run(
        [sys.executable, "-m", "minitron_mcore", *args], capture_output=True, text=True
    )
    if r.returncode != 0:
        sys.exit(f"minitron {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def random_scores(src: str, dst: str, seed: int) -> None:
    """Scores with the real file's keys and provenance but random values."""
    from minitron_mcore.importance.scores import Scores

    s = Scores.load(src)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: torch.rand(v.shape, generator=g) for k, v in s.tensors.items()}
    Scores(tensors, s.info).save(dst)


def run(
    work: str,
    tokenizer: str,
    steps: int,
    random_seeds: int,
    samples: int,
    aggs: list[str] = AGGS,
    seed: int = 1234,
) -> dict:
    data = ["data.train=[demo:stdlib-code]", f"data.cache_dir={work}/data", f"seed={seed}"]
    base = f"{work}/base"
    if not os.path.isdir(base):
        cli(
            "pretrain",
            *MODEL,
            f"tokenizer={tokenizer}",
            f"save={base}",
            *data,
            f"train.steps={steps}",
            "train.seq_length=128",
            "train.global_batch_size=16",
            "train.micro_batch_size=8",
            "train.lr=3e-3",
            "train.warmup_steps=10",
            "train.eval_iters=0",
        )
    evaluate = [
        "data.valid=[demo:stdlib-docs]",
        f"data.cache_dir={work}/data",
        "seq_length=128",
        "iters=4",
        "global_batch_size=16",
        "micro_batch_size=8",
    ]
    results = {
        "unpruned": cli("evaluate", f"load={base}", f"save={work}/eval_base", *evaluate)[
            "valid_loss"
        ]
    }
    scores = f"{work}/scores"
    if not os.path.isdir(scores):
        cli(
            "importance",
            f"load={base}",
            f"save={scores}",
            *data,
            f"importance.num_samples={samples}",
            "importance.seq_length=128",
            "importance.layer_loss_samples=0",
        )

    def pruned_loss(name: str, score_dir: str, agg: str | None) -> float:
        out = f"{work}/pruned_{name}"
        extra = [f"prune.agg={agg}"] if agg else []
        cli(
            "prune",
            f"load={base}",
            f"scores={score_dir}",
            f"save={out}",
            *TARGET,
            *extra,
            "overwrite=true",
        )
        return cli("evaluate", f"load={out}", f"save={out}.eval", *evaluate)["valid_loss"]

    for agg in aggs:
        results[agg] = pruned_loss(agg, scores, agg)
    rand = []
    for seed in range(random_seeds):
        rs = f"{work}/random_scores_{seed}"
        random_scores(scores, rs, seed)
        rand.append(pruned_loss(f"random{seed}", rs, None))
    results["random_mean"] = sum(rand) / len(rand)
    results["random_best"] = min(rand)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work-dir", default="")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--random-seeds", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1234, help="pretraining/calibration seed")
    args = ap.parse_args()
    work = args.work_dir or tempfile.mkdtemp(prefix="minitron_quality_")
    from minitron_mcore.testing.hf_models import make_tokenizer

    tok = os.path.join(work, "tokenizer")
    if not os.path.isdir(tok):
        make_tokenizer(tok)
    res = run(work, tok, args.steps, args.random_seeds, args.samples, seed=args.seed)
    print(f"{'pruning (hidden 128->96, ffn 384->192, heads 8->4)':<52} valid loss")
    for k, v in res.items():
        mark = "  <- papers' choice" if k == "mean-l2" else ""
        print(f"{k:<52} {v:.4f}{mark}")
    best = min(AGGS, key=lambda a: res[a])
    print(
        f"best aggregation: {best}; papers' (seq mean, batch l2) rank: "
        f"{sorted(AGGS, key=lambda a: res[a]).index('mean-l2') + 1} of {len(AGGS)}"
    )
    print(json.dumps({"work_dir": work, **res}))


if __name__ == "__main__":
    main()
