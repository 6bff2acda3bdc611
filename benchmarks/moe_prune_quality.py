"""Expert pruning quality on a small mixture-of-experts model trained here: the project's expert
importance against random expert dropping and dropping by routing frequency (or router
probability mass) alone, by validation loss before any retraining, on both corpora.

    python benchmarks/moe_prune_quality.py                   # ~10 min on 2 CPU cores
    python benchmarks/moe_prune_quality.py --seeds 1 2 3 --work-dir /tmp/mq

Steps (all through the ``minitron`` CLI): pretrain a small Qwen3-MoE (8 experts, 2 per token,
load-balancing loss on) on a blend of two corpora (``demo:stdlib-code``: Python source,
``demo:stdlib-docs``: English docstrings), so that experts specialise; estimate importance on
calibration samples of the same blend; prune to 4 experts per layer with each expert ranking
(``prune.expert_metric``: score = router probability x expert output norm, prob, frequency)
and with random scores; also prune every expert's width (``prune.target.moe_ffn_hidden_size``)
with per-expert and shared neuron rankings; evaluate each pruned model on held-out samples of
each corpus. Prints one table and a final JSON line.
"""

from __future__ import annotations

import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import prune_quality  # noqa: E402

MODEL = {  # 2.1M parameters, 0.6M active per token
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "kv_channels": 32,
    "num_layers": 4,
    "num_moe_experts": 8,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": 128,
    "moe_aux_loss_coeff": 0.01,
}
CORPORA = ("stdlib-code", "stdlib-docs")
# name -> (prune.target, other prune keys, score directory: "scores" or "random{r}")
EXPERTS = {"num_moe_experts": 4}
WIDTH = {"moe_ffn_hidden_size": 64}


def variants(random_seeds: int) -> dict:
    out = {
        "experts: score": (EXPERTS, ["prune.expert_metric=score"], "scores"),
        "experts: prob": (EXPERTS, ["prune.expert_metric=prob"], "scores"),
        "experts: frequency": (EXPERTS, ["prune.expert_metric=frequency"], "scores"),
    }
    for r in range(random_seeds):
        out[f"experts: random{r}"] = (EXPERTS, [], f"random{r}")
    out["width: per_expert"] = (WIDTH, ["prune.moe_neurons=per_expert"], "scores")
    out["width: shared"] = (WIDTH, ["prune.moe_neurons=shared"], "scores")
    for r in range(random_seeds):
        out[f"width: random{r}"] = (WIDTH, [], f"random{r}")
    return out


def run(work, tokenizer, steps, samples, random_seeds, seed, eval_iters, log) -> dict:
    cli = prune_quality.cli
    blend = f"data.train=[1,demo:{CORPORA[0]},1,demo:{CORPORA[1]}]"
    data = [blend, f"data.cache_dir={work}/data", f"seed={seed}"]
    base = f"{work}/base"
    if not os.path.isdir(base):
        log(f"pretrain the MoE, {steps} steps")
        cli(
            "pretrain",
            "model=tiny-qwen3-moe",
            *[f"model.{k}={v}" for k, v in MODEL.items()],
            f"tokenizer={tokenizer}",
            f"save={base}",
            *data,
            f"train.steps={steps}",
            "train.seq_length=128",
            "train.global_batch_size=16",
            "train.micro_batch_size=8",
            "train.lr=3e-3",
            f"train.warmup_steps={max(10, steps // 20)}",
            "train.eval_iters=0",
        )

    def losses(ckpt: str) -> dict:
        out = {}
        for corpus in CORPORA:
            save = f"{ckpt}.eval.{corpus}"
            metrics = f"{save}/metrics.json"
            if os.path.isfile(metrics):  # measured by an earlier run on the same work dir
                with open(metrics) as f:
                    out[corpus] = json.load(f)["valid_loss"]
                continue
            out[corpus] = cli(
                "evaluate",
                f"load={ckpt}",
                f"save={save}",
                f"data.valid=[demo:{corpus}]",
                f"data.cache_dir={work}/data",
                "seq_length=128",
                f"iters={eval_iters}",
                "global_batch_size=16",
                "micro_batch_size=8",
            )["valid_loss"]
        return out

    scores = f"{work}/scores"
    if not os.path.isdir(scores):
        log(f"importance on {samples} calibration samples")
        cli(
            "importance",
            f"load={base}",
            f"save={scores}",
            *data,
            f"importance.num_samples={samples}",
            "importance.seq_length=128",
            "importance.layer_loss_samples=0",
        )
    for r in range(random_seeds):
        if not os.path.isdir(f"{work}/random{r}"):
            prune_quality.random_scores(scores, f"{work}/random{r}", r)
    results = {"unpruned": losses(base)}
    for name, (target, extra, score_dir) in variants(random_seeds).items():
        out = f"{work}/pruned_{name.replace(': ', '_')}"
        if not os.path.isdir(out):
            cli(
                "prune",
                f"load={base}",
                f"scores={work}/{score_dir}",
                f"save={out}",
                *[f"prune.target.{k}={v}" for k, v in target.items()],
                *extra,
            )
        results[name] = losses(out)
        log(f"  {name:<20} " + " ".join(f"{results[name][c]:.4f}" for c in CORPORA))
    return results


def summarise(res: dict) -> dict:
    """Per seed: the random rows replaced by their mean, and the loss averaged over both
    corpora."""
    rows = {}
    for group in ("experts", "width"):
        mine = {k: v for k, v in res.items() if k.startswith(f"{group}: ")}
        rows.update({k: v for k, v in mine.items() if "random" not in k})
        rand = [v for k, v in mine.items() if "random" in k]
        if rand:
            rows[f"{group}: random (mean)"] = {
                c: statistics.mean(r[c] for r in rand) for c in CORPORA
            }
    rows = {"unpruned": res["unpruned"], **rows}
    return {k: dict(v, both=statistics.mean(v[c] for c in CORPORA)) for k, v in rows.items()}


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--work-dir", default="", help="reused: finished steps are skipped")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--samples", type=int, default=256, help="calibration samples")
    ap.add_argument("--eval-iters", type=int, default=8, help="x 16 sequences per corpus")
    ap.add_argument("--random-seeds", type=int, default=3)
    harness.add_seeds(ap, "pretraining/calibration seeds; one model per seed")
    args = ap.parse_args()
    work, tok = prune_quality.work_and_tokenizer(args.work_dir, "minitron_moe_quality_")
    per_seed = {}
    for seed in args.seeds:
        harness.log(f"seed {seed}")
        raw = run(
            os.path.join(work, f"seed{seed}"),
            tok,
            args.steps,
            args.samples,
            args.random_seeds,
            seed,
            args.eval_iters,
            harness.log,
        )
        per_seed[seed] = summarise(raw)
    rows = list(per_seed[args.seeds[0]])
    print(
        f"\nvalidation loss, {MODEL['num_moe_experts']} experts -> {EXPERTS['num_moe_experts']} "
        f"per layer (top-{MODEL['moe_router_topk']} kept) and expert width "
        f"{MODEL['moe_ffn_hidden_size']} -> {WIDTH['moe_ffn_hidden_size']}, before retraining"
    )
    print(f"{'pruning':<26}{'code':>9}{'docs':>9}{'both':>9}  (mean over seeds {args.seeds})")
    for row in rows:
        vals = {
            c: statistics.mean(per_seed[s][row][c] for s in args.seeds)
            for c in per_seed[args.seeds[0]][row]
        }
        print(f"{row:<26}{vals[CORPORA[0]]:>9.4f}{vals[CORPORA[1]]:>9.4f}{vals['both']:>9.4f}")
    print(json.dumps({"work_dir": work, "results": {str(s): r for s, r in per_seed.items()}}))


if __name__ == "__main__":
    main()
