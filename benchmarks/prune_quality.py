"""Pruning quality on a trained small model: activation-based importance (every aggregation)
against random pruning to the same shape, by LM loss before any retraining.

    python benchmarks/prune_quality.py                         # default model, one seed
    python benchmarks/prune_quality.py --seeds 1 2 3 --work-dir /tmp/pq
    # your own model and data, on a GPU node:
    python benchmarks/prune_quality.py --hf-model /models/Llama-3.1-8B --nproc 8 --tp 8 \
        --target hidden_size=3072 ffn_hidden_size=9216 --train-data my.jsonl \
        --valid-data my_valid.jsonl --seq-length 4096 --samples 1024

Steps (all through the `minitron` CLI): pretrain a small Llama on demo:stdlib-code, estimate
importance on calibration samples of it, then for each pruning target (one axis at a time and
all together) prune with each of the six (sequence, batch) aggregations and with random scores,
and evaluate every pruned model on held-out data (demo:stdlib-docs). Prints one table per
target, the rank of the papers' choice (sequence mean, batch L2) in each, and a final JSON line.
With several seeds it also prints the mean loss per aggregation and its spread across seeds.
With ``--hf-model`` the model is imported instead of pretrained and ``--target`` is the only
target.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

AGGS = [f"{s}-{b}" for s in ("mean", "l2") for b in ("mean", "l2", "var")]
PAPERS = "mean-l2"

# name -> (model overrides, {target name: prune.target overrides})
SIZES = {
    # 0.6M parameters: quick, used by the test
    "tiny": (
        {
            "hidden_size": 128,
            "ffn_hidden_size": 384,
            "num_attention_heads": 8,
            "num_query_groups": 4,
            "kv_channels": 16,
            "num_layers": 4,
        },
        {"all": {"hidden_size": 96, "ffn_hidden_size": 192, "num_attention_heads": 4}},
    ),
    # 4.3M parameters
    "small": (
        {
            "hidden_size": 256,
            "ffn_hidden_size": 768,
            "num_attention_heads": 8,
            "num_query_groups": 4,
            "kv_channels": 32,
            "num_layers": 6,
        },
        {
            "ffn": {"ffn_hidden_size": 384},
            "heads": {"num_attention_heads": 4},
            "hidden": {"hidden_size": 192},
            "all": {"hidden_size": 192, "ffn_hidden_size": 384, "num_attention_heads": 4},
        },
    ),
}


NPROC = 1  # processes per command, under torch.distributed.run when > 1 (set by --nproc)
PARALLEL: list[str] = []  # e.g. parallel.tp=8 (set by --tp)


def cli(*args: str) -> dict:
    """``python -m minitron_mcore ARGS`` in a fresh process: its metrics (last stdout line)."""
    cmd = [*harness.python_cmd(NPROC), "-m", "minitron_mcore"]
    extra = PARALLEL if args[0] in ("import-hf", "importance", "prune", "evaluate") else []
    r = subprocess.run([*cmd, *args, *extra], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"minitron {args[0]} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def work_and_tokenizer(work_dir: str, prefix: str) -> tuple[str, str]:
    """The work directory (a new temporary one if ``work_dir`` is empty) and the BPE tokenizer
    made in it once."""
    from minitron_mcore.testing.hf_models import make_tokenizer

    work = work_dir or tempfile.mkdtemp(prefix=prefix)
    os.makedirs(work, exist_ok=True)
    tok = os.path.join(work, "tokenizer")
    if not os.path.isdir(tok):
        make_tokenizer(tok)
    return work, tok


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
    size: str = "tiny",
    targets: list[str] | None = None,
    eval_iters: int = 4,
    log=lambda msg: None,
    hf_model: str = "",
    custom_target: dict | None = None,
    train_data: str = "demo:stdlib-code",
    valid_data: str = "demo:stdlib-docs",
    seq_length: int = 128,
) -> dict:
    """{target: {"unpruned"|agg|"random_mean"|"random_best": valid loss}} for one seed.

    With ``hf_model``, that Hugging Face model is imported instead of pretraining one, and
    ``custom_target`` (prune.target fields) is the only target."""
    model, all_targets = SIZES[size]
    if hf_model:
        all_targets = {"custom": custom_target}
    targets = targets or list(all_targets)
    data = [f"data.train=[{train_data}]", f"data.cache_dir={work}/data", f"seed={seed}"]
    base = f"{work}/base"
    if not os.path.isdir(base) and hf_model:
        log(f"import-hf {hf_model}")
        cli("import-hf", f"load={hf_model}", f"save={base}")
    elif not os.path.isdir(base):
        log(f"pretrain {size} model, {steps} steps")
        cli(
            "pretrain",
            "model=tiny-llama",
            *[f"model.{k}={v}" for k, v in model.items()],
            f"tokenizer={tokenizer}",
            f"save={base}",
            *data,
            f"train.steps={steps}",
            f"train.seq_length={seq_length}",
            "train.global_batch_size=16",
            "train.micro_batch_size=8",
            "train.lr=3e-3",
            f"train.warmup_steps={max(10, steps // 20)}",
            "train.eval_iters=0",
        )
    evaluate = [
        f"data.valid=[{valid_data}]",
        f"data.cache_dir={work}/data",
        f"seq_length={seq_length}",
        f"iters={eval_iters}",
        "global_batch_size=16",
        "micro_batch_size=8",
    ]
    unpruned = cli("evaluate", f"load={base}", f"save={work}/eval_base", *evaluate)["valid_loss"]
    scores = f"{work}/scores"
    if not os.path.isdir(scores):
        log(f"importance on {samples} calibration samples")
        cli(
            "importance",
            f"load={base}",
            f"save={scores}",
            *data,
            f"importance.num_samples={samples}",
            f"importance.seq_length={seq_length}",
            "importance.layer_loss_samples=0",
        )
    for r in range(random_seeds):
        if not os.path.isdir(f"{work}/random_scores_{r}"):
            random_scores(scores, f"{work}/random_scores_{r}", r)

    def pruned_loss(name: str, target: str, score_dir: str, agg: str | None) -> float:
        out = f"{work}/pruned_{target}_{name}"
        done = f"{out}.eval/metrics.json"
        if os.path.isfile(done):  # measured by an earlier run on the same work dir
            with open(done) as f:
                return json.load(f)["valid_loss"]
        extra = [f"prune.agg={agg}"] if agg else []
        tgt = [f"prune.target.{k}={v}" for k, v in all_targets[target].items()]
        cli(
            "prune",
            f"load={base}",
            f"scores={score_dir}",
            f"save={out}",
            *tgt,
            *extra,
            "overwrite=true",
        )
        loss = cli("evaluate", f"load={out}", f"save={out}.eval", *evaluate)["valid_loss"]
        log(f"  {target:<7} {name:<10} {loss:.4f}")
        return loss

    results = {}
    for target in targets:
        res = {"unpruned": unpruned}
        for agg in aggs:
            res[agg] = pruned_loss(agg, target, scores, agg)
        rand = [
            pruned_loss(f"random{r}", target, f"{work}/random_scores_{r}", None)
            for r in range(random_seeds)
        ]
        res["random_mean"] = sum(rand) / len(rand)
        res["random_best"] = min(rand)
        results[target] = res
    return results


def rank_of(res: dict, agg: str = PAPERS) -> int:
    return sorted(AGGS, key=lambda a: res[a]).index(agg) + 1


def describe(size: str, target: str, custom: dict | None = None) -> str:
    if custom:
        return "model from --hf-model, " + ", ".join(f"{k} -> {v}" for k, v in custom.items())
    model, targets = SIZES[size]
    return f"{size} model, " + ", ".join(f"{k} {model[k]}->{v}" for k, v in targets[target].items())


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument(
        "--work-dir",
        default="",
        help="reused if it exists: finished steps are skipped (use a new one after changing "
        "--steps, --samples or --eval-iters)",
    )
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--targets", nargs="*", default=None, help="subset of the size's targets")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--samples", type=int, default=1024, help="calibration samples")
    ap.add_argument("--eval-iters", type=int, default=16, help="x 16 sequences held out")
    ap.add_argument("--random-seeds", type=int, default=3)
    harness.add_seeds(ap, "pretraining/calibration seeds; one model per seed")
    ap.add_argument("--hf-model", default="", help="import this HF model instead of pretraining")
    ap.add_argument(
        "--target",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="with --hf-model: the prune target, e.g. hidden_size=1536 ffn_hidden_size=6144",
    )
    ap.add_argument("--train-data", default="demo:stdlib-code", help="pretraining/calibration")
    ap.add_argument("--valid-data", default="demo:stdlib-docs", help="held-out evaluation")
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--nproc", type=int, default=1, help="processes per command (torchrun)")
    ap.add_argument("--tp", type=int, default=1, help="parallel.tp for every command")
    args = ap.parse_args()
    if args.hf_model and not args.target:
        ap.error("--hf-model needs --target FIELD=VALUE ...")
    custom = dict(t.split("=", 1) for t in args.target) or None
    global NPROC
    NPROC = args.nproc
    if args.tp > 1:
        PARALLEL[:] = [f"parallel.tp={args.tp}"]
    work, tok = work_and_tokenizer(args.work_dir, "minitron_quality_")
    per_seed = {}
    for seed in args.seeds:
        harness.log(f"seed {seed}")
        per_seed[seed] = run(
            os.path.join(work, f"seed{seed}"),
            tok,
            args.steps,
            args.random_seeds,
            args.samples,
            seed=seed,
            size=args.size,
            targets=args.targets,
            eval_iters=args.eval_iters,
            log=harness.log,
            hf_model=args.hf_model,
            custom_target=custom,
            train_data=args.train_data,
            valid_data=args.valid_data,
            seq_length=args.seq_length,
        )
    targets = list(per_seed[args.seeds[0]])
    rows = ["unpruned", *AGGS, "random_mean", "random_best"]
    for target in targets:
        print(f"\n{describe(args.size, target, custom)}: valid loss")
        print(
            f"{'pruning':<14}"
            + "".join(f"{'seed ' + str(s):>12}" for s in args.seeds)
            + (f"{'mean':>10}{'sd':>8}" if len(args.seeds) > 1 else "")
        )
        for row in rows:
            vals = [per_seed[s][target][row] for s in args.seeds]
            line = f"{row:<14}" + "".join(f"{v:>12.4f}" for v in vals)
            if len(vals) > 1:
                line += f"{statistics.mean(vals):>10.4f}{statistics.stdev(vals):>8.4f}"
            print(line + ("  <- papers' choice" if row == PAPERS else ""))
        ranks = [rank_of(per_seed[s][target]) for s in args.seeds]
        mean_loss = {a: statistics.mean(per_seed[s][target][a] for s in args.seeds) for a in AGGS}
        order = sorted(AGGS, key=mean_loss.get)
        print(
            f"rank of the papers' choice per seed: {ranks}; by mean loss: "
            f"{order.index(PAPERS) + 1} of {len(AGGS)} (best: {order[0]})"
        )
    print(
        json.dumps(
            {
                "work_dir": work,
                "size": args.size,
                "results": {str(s): r for s, r in per_seed.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
