"""Distillation quality: a pruned student retrained by knowledge distillation from the corrected
teacher, against the same student fine-tuned with plain cross entropy and the same architecture
trained from scratch, for equal token budgets; validation loss on the distillation corpus and on
the teacher's original corpus.

    python benchmarks/distill_quality.py                               # small, one seed (~3 h)
    python benchmarks/distill_quality.py --size tiny                   # ~10 min, used by the test
    python benchmarks/distill_quality.py --seeds 1 2 --epochs 1 4 --work-dir /tmp/dq
    python benchmarks/distill_quality.py --students width --epochs 1 --methods kd ce \\
        --skip-variants --lr 3e-3 --work-dir /tmp/dq                   # an LR sweep point

Steps (all through the ``minitron`` CLI, one subprocess per command):

1. ``pretrain`` a small Llama-shaped teacher on ``demo:stdlib-code`` (the teacher's "original
   data"); ``correct`` it on ``demo:stdlib-docs`` (the "distillation data") for one epoch;
2. ``importance`` on the distillation data, then ``prune`` to about half the parameters by
   width (hidden, ffn, heads) and, separately, by depth (a contiguous block of layers);
3. retrain each student for ``--epochs`` x the distillation corpus's tokens (counted from the
   tokenized corpus's ``.json`` sidecar in ``data.cache_dir``) with (a) ``distill`` from the
   corrected teacher, (b) ``correct`` with ``train.lr`` set (plain LM fine-tuning), (c)
   ``pretrain`` of the student's shape from scratch; KD and CE share the LR schedule;
4. ``evaluate`` every model on held-out documents of both corpora;
5. at the first budget, the width student with each KD loss variant (``distill.*``);
6. with ``--offline``, the width student distilled with the full-vocabulary loss, the online
   top-k loss and from stored top-k predictions (``minitron teacher-logits``, bf16 and int8)
   at k = 8, 64, 256, with the bytes stored per token.

Both corpora are split by document before anything is trained (every 10th module held out), so
validation never sees a training document. The tiny size distils on a subset of the training
documents. Finished runs are reused: training commands through the CLI's finished-run no-op,
evaluations through their ``metrics.json``. Prints markdown tables and a final JSON line.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import sys
import time
from dataclasses import dataclass

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: one thread per process

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import log  # noqa: E402
from prune_quality import SIZES as PRUNE_SIZES  # noqa: E402
from prune_quality import cli, work_and_tokenizer  # noqa: E402

SEQ, GBS = 128, 16  # every training run and evaluation: 16 x 128 tokens per step
HELD_OUT = 10  # every 10th document of each corpus is validation data


@dataclass(frozen=True)
class Size:
    teacher: dict  # model.* of the teacher
    width: dict  # prune.target.* of the width student
    depth: int  # num_layers of the depth student
    pretrain_steps: int  # teacher pretraining on the code corpus
    docs_chars: int  # 0 = every training document of the docs corpus, else a subset
    samples: int  # importance calibration samples
    eval_iters: int  # x 16 held-out sequences per corpus
    lr: float  # peak LR of KD and CE retraining (same schedule)
    pretrain_lr: float = 3e-3  # teacher pretraining and from-scratch training
    correct_epochs: float = 4  # teacher correction on the docs corpus
    correct_lr_fraction: float = 0.2  # its peak LR = pretrain_lr x this (papers: 0.2)


def _width(hidden_size: int, ffn_hidden_size: int, num_attention_heads: int) -> dict:
    return dict(
        hidden_size=hidden_size,
        ffn_hidden_size=ffn_hidden_size,
        num_attention_heads=num_attention_heads,
    )


# Size's fields in order: teacher, width, depth, pretrain_steps, docs_chars, samples, eval_iters, lr
SIZES = {
    # 0.92M-parameter teacher, ~170K-token distillation subset: the test's size
    "tiny": Size(PRUNE_SIZES["tiny"][0], _width(96, 256, 4), 2, 400, 300_000, 128, 8, 2e-3),
    # 4.98M-parameter teacher, the whole docs corpus (0.89M training tokens)
    "small": Size(PRUNE_SIZES["small"][0], _width(192, 512, 4), 3, 2000, 0, 1024, 16, 1e-3),
}

# KD loss variants at the first budget (width student): label -> distill.* overrides
VARIANTS = {
    "forward KL, T=1 (default)": {},
    "forward KL, T=2": {"temperature": 2.0},
    "reverse KL": {"mode": "reverse"},
    "forward KL, top-64": {"top_k": 64},
    "forward KL + 0.5 CE": {"ce_weight": 0.5},
}
# Stored teacher predictions (``--offline``), width student at the first budget: label ->
# distill.* overrides; "offline" rows run ``minitron teacher-logits`` first (same keys)
OFFLINE = {"full vocabulary, online (default)": {}}
for _k in (8, 64, 256):
    OFFLINE[f"top-{_k}, online"] = {"top_k": _k}
    OFFLINE[f"top-{_k}, stored bf16"] = {"top_k": _k, "offline": "bf16"}
    OFFLINE[f"top-{_k}, stored int8"] = {"top_k": _k, "offline": "int8"}
METHODS = {"kd": "KD from corrected teacher", "ce": "CE fine-tuning", "scratch": "from scratch"}
CORPORA = ("docs", "code")  # docs = distillation data, code = the teacher's original data


def timed_cli(*args: str) -> dict:
    t0 = time.time()
    out = cli(*args)
    save = next((a[5:] for a in args if a.startswith("save=")), "")
    log(f"  minitron {args[0]} {save} ({time.time() - t0:.0f} s)")
    return out


def _write_jsonl(path: str, docs: list[str]) -> None:
    if os.path.isfile(path):  # the tokenized cache is keyed by path, size and mtime: keep it
        return
    with open(path + ".partial", "w", encoding="utf-8") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    os.replace(path + ".partial", path)


def split_corpora(work: str, docs_chars: int) -> dict:
    """{code,docs}-{train,valid}.jsonl from the built-in demo corpora, split by document."""
    from minitron_mcore.data.demo import write_demo

    out, files = os.path.join(work, "corpora"), {}
    os.makedirs(out, exist_ok=True)
    for name, demo in (("code", "stdlib-code"), ("docs", "stdlib-docs")):
        with open(write_demo(demo, os.path.join(work, "data", "demo"))) as f:
            docs = [json.loads(line)["text"] for line in f]
        valid = docs[HELD_OUT // 2 :: HELD_OUT]
        train = [d for i, d in enumerate(docs) if i % HELD_OUT != HELD_OUT // 2]
        if name == "docs" and docs_chars:  # a random subset of whole documents
            random.Random(0).shuffle(train)
            keep, n = [], 0
            while train and n < docs_chars:
                keep.append(train.pop())
                n += len(keep[-1])
            train = keep
        for part, chunk in (("train", train), ("valid", valid)):
            files[f"{name}-{part}"] = os.path.join(out, f"{name}-{part}.jsonl")
            _write_jsonl(files[f"{name}-{part}"], chunk)
    return files


def tokenize(files: dict, tokenizer: str, data_dir: str) -> tuple[dict, dict]:
    """``minitron preprocess`` each split once: ({split: prefix}, {split: tokens}); the token
    counts come from the ``.json`` sidecar next to the indexed dataset."""
    prefixes, tokens = {}, {}
    for name, jsonl in files.items():
        prefix = prefixes[name] = os.path.join(data_dir, name)
        if not os.path.isfile(prefix + ".json"):
            # one worker: a worker process costs more to start than these corpora take
            timed_cli(
                "preprocess",
                f"save={prefix}",
                f"input=[{jsonl}]",
                f"tokenizer={tokenizer}",
                "workers=1",
            )
        with open(prefix + ".json") as f:
            tokens[name] = json.load(f)["tokens"]
    return prefixes, tokens


class Study:
    """One seed's runs under ``work``; every directory there is a finished (cached) run."""

    def __init__(self, work: str, data: tuple[dict, dict], tokenizer: str, seed: int, args):
        self.work, self.tok, self.seed, self.args = work, tokenizer, seed, args
        self.size = SIZES[args.size]
        self.prefix, self.tokens = data
        self.cache = os.path.dirname(self.prefix["docs-train"])
        self.steps_per_epoch = self.tokens["docs-train"] / (GBS * SEQ)
        self.common = [
            f"train.seq_length={SEQ}",
            f"train.global_batch_size={GBS}",
            f"train.micro_batch_size={GBS}",
            "train.eval_iters=0",
            f"train.precision={args.precision}",
            f"data.cache_dir={self.cache}",
            f"seed={seed}",
        ]
        self.res: dict = {}
        os.makedirs(work, exist_ok=True)

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    def steps(self, epochs: float) -> int:
        return max(1, round(epochs * self.steps_per_epoch))

    def train_args(self, corpus: str, steps: int, lr: float) -> list[str]:
        """Data and the one schedule of every run: 5 % linear warmup, cosine to lr / 10."""
        return [
            f"data.train=[{self.prefix[corpus + '-train']}]",
            *self.common,
            f"train.steps={steps}",
            f"train.lr={lr:g}",
            f"train.min_lr={lr / 10:g}",
            f"train.warmup_steps={max(5, steps // 20)}",
            "train.decay_style=cosine",
        ]

    def evaluate(self, ckpt: str) -> dict:
        """Held-out loss on both corpora (the same sequences for every model)."""
        res = {}
        for corpus in CORPORA:
            out = f"{ckpt}.eval-{corpus}"
            done = os.path.join(out, "metrics.json")
            if os.path.isfile(done):  # measured by an earlier run on this work dir
                with open(done) as f:
                    res[corpus] = json.load(f)["valid_loss"]
                continue
            res[corpus] = timed_cli(
                "evaluate",
                f"load={ckpt}",
                f"save={out}",
                f"data.valid=[{self.prefix[corpus + '-valid']}]",
                f"data.cache_dir={self.cache}",
                f"seq_length={SEQ}",
                f"iters={self.size.eval_iters}",
                f"global_batch_size={GBS}",
                f"micro_batch_size={GBS}",
            )["valid_loss"]
        return res

    def pretrain_teacher(self) -> None:
        """The teacher: pretrained on code only (its "original data")."""
        s = self.size
        timed_cli(
            "pretrain",
            "model=tiny-llama",
            *[f"model.{k}={v}" for k, v in s.teacher.items()],
            f"tokenizer={self.tok}",
            f"save={self.path('teacher')}",
            *self.train_args("code", s.pretrain_steps, s.pretrain_lr),
        )
        self.res["teacher"] = self.evaluate(self.path("teacher"))

    def correct_teacher(self) -> None:
        """Teacher correction on the docs with the papers' recipe shape (peak LR = the
        original x lr_fraction, the original batch: read from the checkpoint by ``correct``)."""
        s = self.size
        steps = self.steps(s.correct_epochs)
        recipe = [a for a in self.train_args("docs", steps, 0) if "lr=" not in a]
        timed_cli(
            "correct",
            f"load={self.path('teacher')}",
            f"save={self.path('corrected')}",
            f"lr_fraction={s.correct_lr_fraction:g}",
            *recipe,
        )
        self.res["corrected"] = self.evaluate(self.path("corrected"))

    def prune(self) -> dict:
        """{student: checkpoint}: width and depth students pruned from the corrected teacher,
        scored on the distillation data (calibration), as in the papers."""
        s, scores = self.size, self.path("scores")
        drop = s.teacher["num_layers"] - s.depth
        if not os.path.isdir(scores):
            timed_cli(
                "importance",
                f"load={self.path('corrected')}",
                f"save={scores}",
                f"data.train=[{self.prefix['docs-train']}]",
                f"data.cache_dir={self.cache}",
                f"importance.num_samples={s.samples}",
                f"importance.seq_length={SEQ}",
                f"importance.block_sizes=[1,{drop}]",
                f"seed={self.seed}",
            )
        targets = {
            "width": [f"prune.target.{k}={v}" for k, v in s.width.items()],
            "depth": [f"prune.target.num_layers={s.depth}"],
        }
        students = {}
        for name in self.args.students:
            out = students[name] = self.path(f"{name}-pruned")
            if not os.path.isdir(out):
                timed_cli(
                    "prune",
                    f"load={self.path('corrected')}",
                    f"scores={scores}",
                    f"save={out}",
                    *targets[name],
                )
            self.res.setdefault(name, {})["pruned"] = self.evaluate(out)
        return students

    def retrain(self, name: str, ckpt: str, method: str, epochs: float, kd: dict | None = None):
        """One retraining run of a student (cached); its held-out losses go to the results."""
        s, steps = self.size, self.steps(epochs)
        lr = s.pretrain_lr if method == "scratch" else self.args.lr or s.lr
        kd = kd or {}
        tag = "".join(f"-{k}{v:g}" if not isinstance(v, str) else f"-{v}" for k, v in kd.items())
        out = self.path(f"{name}-{method}-e{epochs:g}-lr{lr:g}{tag}")
        train = [f"save={out}", *self.train_args("docs", steps, lr)]
        if method == "kd":
            opts = [f"distill.{k}={v}" for k, v in kd.items() if k != "offline"]
            if "offline" in kd:  # the teacher's top-k stored once (cached), then read
                logits = self.path(f"logits-top{kd['top_k']}-{kd['offline']}")
                if not os.path.isdir(logits):
                    keys = self.train_args("docs", steps, lr)
                    timed_cli(
                        "teacher-logits",
                        f"load={self.path('corrected')}",
                        f"save={logits}",
                        *keys,
                        f"distill.top_k={kd['top_k']}",
                        f"distill.precision={kd['offline']}",
                    )
                opts = [f"teacher_logits={logits}"]
            timed_cli("distill", f"load={ckpt}", f"teacher={self.path('corrected')}", *train, *opts)
        elif method == "ce":  # plain LM fine-tuning: `correct` with the LR set explicitly
            timed_cli("correct", f"load={ckpt}", *train)
        else:
            from minitron_mcore.checkpoint.megatron import read_meta

            arch = read_meta(ckpt).arch
            model = [f"model.{k}={getattr(arch, k)}" for k in s.teacher]
            timed_cli("pretrain", "model=tiny-llama", *model, f"tokenizer={self.tok}", *train)
        return self.evaluate(out)

    def run(self) -> dict:
        log(f"seed {self.seed}: teacher, correction, pruning")
        self.pretrain_teacher()
        self.correct_teacher()
        students = self.prune()
        epochs = sorted(self.args.epochs)
        for i, e in enumerate(epochs):
            for name, ckpt in students.items():
                for method in self.args.methods:
                    log(f"seed {self.seed}: {name} student, {method}, {e:g} epoch(s)")
                    self.res[name][f"{method}-e{e:g}"] = self.retrain(name, ckpt, method, e)
            if i == 0 and not self.args.skip_variants and "width" in students:
                variants = self.res["variants"] = {}
                for label, kd in VARIANTS.items():
                    log(f"seed {self.seed}: width student, KD variant {label}")
                    variants[label] = self.retrain("width", students["width"], "kd", e, kd)
            if i == 0 and self.args.offline and "width" in students:
                stored = self.res["offline"] = {}
                for label, kd in OFFLINE.items():
                    log(f"seed {self.seed}: width student, {label}")
                    stored[label] = self.retrain("width", students["width"], "kd", e, kd)
        return self.res


def mean_tree(trees: list):
    """Leaf-wise mean (and sd over seeds when there are several) of nested result dicts."""
    if isinstance(trees[0], dict):
        return {k: mean_tree([t[k] for t in trees]) for k in trees[0]}
    return statistics.mean(trees)


def cell(vals: list[float]) -> str:
    if len(vals) == 1:
        return f"{vals[0]:.4f}"
    return f"{statistics.mean(vals):.4f} ± {statistics.stdev(vals):.4f}"


def leaf(results: list[dict], *keys: str) -> list[float]:
    out = []
    for r in results:
        for k in keys:
            r = r[k]
        out.append(r)
    return out


def print_tables(results: list[dict], args, meta: dict) -> None:
    size = SIZES[args.size]
    tok = meta["docs_train_tokens"]
    print(f"\n## {args.size}: held-out LM loss (nats), seeds {args.seeds}")
    print(
        f"teacher {meta['params']['teacher'] / 1e6:.2f}M params; distillation data "
        f"{tok / 1e6:.3f}M tokens = 1 epoch ({meta['steps_per_epoch']:.1f} steps of "
        f"{GBS}x{SEQ}); KD/CE peak LR {args.lr or size.lr:g}, scratch {size.pretrain_lr:g}, "
        "5 % warmup, cosine to LR/10"
    )
    corpora = ["docs (distillation)", "code (original)"]
    for name in args.students:
        shape = ", ".join(f"{k} {size.teacher[k]}->{v}" for k, v in size.width.items())
        if name == "depth":
            shape = f"num_layers {size.teacher['num_layers']}->{size.depth}"
        print(f"\n### {name} student ({shape}; {meta['params'][name] / 1e6:.2f}M params)\n")
        rows = [
            ("teacher (code only)", "-", ["teacher"]),
            ("corrected teacher", "-", ["corrected"]),
            ("pruned, not retrained", "0", [name, "pruned"]),
        ]
        for e in sorted(args.epochs):
            for m in args.methods:
                rows.append((METHODS[m], f"{e:g} ep", [name, f"{m}-e{e:g}"]))
        rows = [[a, b] + [cell(leaf(results, *keys, c)) for c in CORPORA] for a, b, keys in rows]
        print(harness.markdown_table(["model", "budget", *corpora], rows, "llrr"))
    if "variants" in results[0]:
        e = min(args.epochs)
        print(f"\n### KD loss variants: width student, {e:g} epoch(s)\n")
        rows = [[v] + [cell(leaf(results, "variants", v, c)) for c in CORPORA] for v in VARIANTS]
        print(harness.markdown_table(["distill loss", *corpora], rows, "lrr"))
        for c in CORPORA:
            best = min(VARIANTS, key=lambda v: statistics.mean(leaf(results, "variants", v, c)))
            print(f"best on {c}: {best}")


def print_offline(results: list[dict], args, vocab: int) -> None:
    """The stored-predictions table: each loss's held-out losses and bytes stored per token."""
    from minitron_mcore.distill.topk_codec import row_bytes

    e = min(args.epochs)
    print(f"\n### Stored teacher predictions: width student, {e:g} epoch(s)\n")
    rows = []
    for label, kd in OFFLINE.items():
        size = row_bytes(kd["top_k"], vocab, kd["offline"]) if "offline" in kd else "-"
        rows.append([label] + [cell(leaf(results, "offline", label, c)) for c in CORPORA] + [size])
    corpora = ["docs (distillation)", "code (original)"]
    print(harness.markdown_table(["distill loss", *corpora, "bytes/token"], rows, "lrrr"))


def margins(mean: dict, args) -> dict:
    """The differences the study is about (negative = KD better), on the mean results."""
    out = {}
    longest = f"e{max(args.epochs):g}"
    for name in args.students:
        r = mean[name]
        for e in sorted(args.epochs):
            kd = r.get(f"kd-e{e:g}")
            if not kd:
                continue
            for other in ("ce", "scratch"):
                if f"{other}-e{e:g}" in r:
                    for c in CORPORA:
                        out[f"{name}.e{e:g}.kd-{other}.{c}"] = kd[c] - r[f"{other}-e{e:g}"][c]
            out[f"{name}.e{e:g}.kd-corrected.docs"] = kd["docs"] - mean["corrected"]["docs"]
        out[f"{name}.longest"] = longest
    return out


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--work-dir", default="", help="reused: finished runs are not repeated")
    harness.add_seeds(ap)
    ap.add_argument("--epochs", type=float, nargs="+", default=[1, 4], help="budgets, in epochs")
    ap.add_argument("--students", nargs="+", choices=["width", "depth"], default=["width", "depth"])
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--skip-variants", action="store_true", help="no KD loss-variant table")
    ap.add_argument(
        "--offline",
        action="store_true",
        help="the stored-predictions table: full KD vs online vs stored top-k at k=8,64,256",
    )
    ap.add_argument("--lr", type=float, default=0.0, help="KD and CE peak LR (0: the size's)")
    ap.add_argument("--precision", default="bf16", help="training precision (eval is fp32)")
    args = ap.parse_args()
    t0 = time.time()
    work, tok = work_and_tokenizer(args.work_dir, "minitron_distill_quality_")
    from minitron_mcore.checkpoint.megatron import read_meta

    files = split_corpora(work, SIZES[args.size].docs_chars)
    data = tokenize(files, tok, os.path.join(work, "data"))
    per_seed = {}
    for seed in args.seeds:
        study = Study(os.path.join(work, f"seed{seed}"), data, tok, seed, args)
        per_seed[seed] = study.run()
    params = {
        n: read_meta(study.path(p)).arch.num_params()
        for n, p in [("teacher", "teacher")] + [(s, f"{s}-pruned") for s in args.students]
    }
    meta = {
        "docs_train_tokens": data[1]["docs-train"],
        "steps_per_epoch": study.steps_per_epoch,
        "params": params,
    }
    results = [per_seed[s] for s in args.seeds]
    print_tables(results, args, meta)
    if args.offline:
        print_offline(results, args, read_meta(study.path("teacher")).arch.vocab_size)
    mean = mean_tree(results)
    wall = time.time() - t0
    print(f"\nwall time {wall / 60:.1f} min (load average {os.getloadavg()[0]:.2f} at the end)")
    summary = {"work_dir": work, "size": args.size, "seeds": args.seeds, "epochs": args.epochs}
    summary.update(meta, wall_s=round(wall, 1), margins=margins(mean, args), mean=mean)
    summary["results"] = {str(s): r for s, r in per_seed.items()}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
