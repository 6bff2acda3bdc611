"""Soak test (issue 11): a 1,000-step distillation on CPU whose resident memory must stay flat
after warm-up (growth below 2 %).

Run from the repository root, in the project's virtualenv::

    python benchmarks/soak_distill.py                  # 1000 steps, ~2 min on 2 cores
    python benchmarks/soak_distill.py --write          # ... and update benchmarks/README.md
    python benchmarks/soak_distill.py --steps 200 --workdir /tmp/soak --keep   # a quick look

Inputs are made locally, no hub: the reliability fixtures (``tests/reliability/faults.py``,
``FaultShared``) write a BPE tokenizer, a tokenized corpus (20 documents of
``demo:stdlib-code``), a tiny Llama teacher trained for 30 steps and a student pruned from it
(hidden 64 -> 48, 4 -> 3 layers), each with the real CLI. Then one real command runs as a
subprocess (``OMP_NUM_THREADS=1``, as the fixtures run)::

    python -m minitron_mcore distill load=STUDENT teacher=TEACHER save=WORK/run \\
        data.train=[CORPUS] train.steps=1000 train.seq_length=64 train.global_batch_size=8 \\
        train.micro_batch_size=2 train.save_interval=250 train.eval_iters=0 ...

Four micro-batches per step (gradient accumulation), a checkpoint every 250 steps (kept: 2, the
default, so old versions are deleted as the run goes), TensorBoard and JSONL logs on (the
defaults), no validation. Every ``--interval`` seconds the script sums the RSS (``VmRSS``, read
by psutil) over the process and its descendants (Megatron's checkpoint writer may start some)
and pairs the sample with the last step the run has logged (``train_log.jsonl``,
one flushed line per step: a sample taken while step s+1 runs is paired with s).

Analysis (:func:`analyse`): warm-up = the first ``--warmup`` steps (default 10 % of the run);
"after warm-up" = the median RSS of the samples paired with the next ``--window`` steps
(default 10 %); "end" = the median of the samples paired with the last ``--window`` steps
before the final step (the final save and the exit are left out; the three saves in between
are not). Growth = end / after warm-up - 1; goal < 2 %. Medians, not means: a sample taken
during a checkpoint write, with a writer process alive, does not move them. Exit status 0 if
the goal is met, 1 if not, 2 if the run failed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
from harness import HERE, ROOT, MiB  # noqa: E402

README = os.path.join(HERE, "README.md")
# The fixtures (imported lazily) and the package, which they import.
sys.path[:0] = [os.path.join(ROOT, "tests", "reliability"), ROOT]
BEGIN, END = "<!-- soak:begin -->", "<!-- soak:end -->"
GOAL = 0.02  # growth after warm-up, as a fraction
TRAIN = [
    "train.seq_length=64",
    "train.global_batch_size=8",
    "train.micro_batch_size=2",
    "train.lr=1e-3",
    "train.warmup_steps=10",
    "train.eval_iters=0",
    "train.precision=fp32",
    "train.log_interval=50",
]


def parse_args(argv=None):
    p = harness.parser(__doc__)
    p.add_argument("--steps", type=int, default=1000, help="distillation steps")
    p.add_argument("--warmup", type=int, help="steps left out at the start (default: 10 %%)")
    p.add_argument("--window", type=int, help="steps per median window (default: 10 %%)")
    p.add_argument("--save-interval", type=int, help="train.save_interval (default: steps/4)")
    p.add_argument("--interval", type=float, default=0.5, help="seconds between RSS samples")
    p.add_argument(
        "--workdir",
        help="inputs and the run (default: a new temporary directory); an existing one is kept "
        "and its inputs are reused",
    )
    p.add_argument("--keep", action="store_true", help="keep a work directory this run created")
    p.add_argument("--write", action="store_true", help="update the README's soak section")
    args = p.parse_args(argv)
    args.warmup = args.steps // 10 if args.warmup is None else args.warmup
    args.window = max(args.steps // 10, 1) if args.window is None else args.window
    args.save_interval = args.save_interval or max(args.steps // 4, 1)
    if args.warmup + args.window > args.steps - args.window:
        p.error("--warmup + 2 x --window must not exceed --steps (the windows would overlap)")
    return args


# ------------------------------------------------------------------------------ analysis


@dataclasses.dataclass
class Sample:
    seconds: float  # since the command started
    step: int  # the last step the run had logged (0: none yet)
    rss: int  # bytes, the process and its descendants
    main_rss: int  # bytes, the training process alone
    procs: int  # processes in the tree


def _median(samples: list[Sample], lo: int, hi: int, key: str = "rss") -> tuple[float, int]:
    """Median of ``key`` over the samples paired with steps in ``[lo, hi)``, and their count."""
    vals = [getattr(s, key) for s in samples if lo <= s.step < hi]
    if not vals:
        raise ValueError(
            f"no RSS sample paired with steps [{lo}, {hi}): run more steps, widen --window "
            "or sample more often (--interval)"
        )
    return statistics.median(vals), len(vals)


def analyse(samples: list[Sample], steps: int, warmup: int, window: int, goal=GOAL) -> dict:
    """RSS after warm-up and at the end of the run (medians of ``window`` steps each), the
    peak, and the growth between them against ``goal``; samples before ``warmup`` steps and
    after the last training step (final save, exit) count only for the peak."""
    start, start_n = _median(samples, warmup, warmup + window)
    end, end_n = _median(samples, steps - window, steps)
    main_start, _ = _median(samples, warmup, warmup + window, "main_rss")
    main_end, _ = _median(samples, steps - window, steps, "main_rss")
    growth = end / start - 1
    tenth = max(steps // 10, 1)
    profile = [  # median RSS per tenth of the run: the shape of the curve
        (lo, statistics.median(v) if v else None)
        for lo in range(0, steps, tenth)
        for v in [[s.rss for s in samples if lo <= s.step < lo + tenth]]
    ]
    return {
        "steps": steps,
        "warmup_steps": warmup,
        "window_steps": window,
        "samples": len(samples),
        "samples_after_warmup": start_n,
        "samples_end": end_n,
        "rss_after_warmup": start,
        "rss_end": end,
        "rss_peak": max(s.rss for s in samples),
        "main_rss_peak": max(s.main_rss for s in samples),
        "main_rss_after_warmup": main_start,
        "main_rss_end": main_end,
        "max_procs": max(s.procs for s in samples),
        "growth": growth,
        "main_growth": main_end / main_start - 1,
        "goal": goal,
        "passed": growth < goal,
        "profile": profile,
    }


# ------------------------------------------------------------------------------ sampling


class StepLog:
    """The last step a run has written to its ``train_log.jsonl`` (read incrementally)."""

    def __init__(self, path: str):
        self.path, self.pos, self.step, self.buf = path, 0, 0, ""

    def last(self) -> int:
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                self.buf += f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return self.step
        *lines, self.buf = self.buf.split("\n")  # keep a partly written line for next time
        for line in lines:
            row = json.loads(line) if line.strip() else {}
            if "train/loss" in row:
                self.step = max(self.step, row["step"])
        return self.step


def run_sampled(cmd: list[str], env: dict, log: StepLog, interval: float, out: str):
    """Run ``cmd`` (stdout/stderr to ``out``.stdout/.stderr) sampling RSS every ``interval`` s.
    Returns (returncode, seconds, samples)."""
    samples = []

    def sample():
        rss = harness.tree_rss(proc.pid)
        if rss:
            t = time.monotonic() - t0
            samples.append(Sample(t, log.last(), sum(rss), rss[0], sum(r > 0 for r in rss)))

    with open(out + ".stdout", "w") as so, open(out + ".stderr", "w") as se:
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=ROOT)
        with harness.Poller(interval, sample):
            proc.wait()
        return proc.returncode, time.monotonic() - t0, [s for s in samples if s.rss > 0]


# ------------------------------------------------------------------------------ the run


def build_inputs(root: str) -> dict:
    """Tokenizer, corpus, teacher and pruned student (built once per work directory)."""
    from faults import FaultShared

    shared = FaultShared(os.path.join(root, "shared"))
    return {name: shared.get(name) for name in ("corpus", "teacher", "student")}


def distill_argv(inputs: dict, save: str, args) -> list[str]:
    return [
        "distill",
        f"load={inputs['student']}",
        f"teacher={inputs['teacher']}",
        f"save={save}",
        f"data.train=[{inputs['corpus']}]",
        f"data.cache_dir={save}.cache",
        f"train.steps={args.steps}",
        f"train.save_interval={args.save_interval}",
        *TRAIN,
    ]


def _mib(x: float) -> str:
    return f"{x / MiB:.1f}"


def table(r: dict, seconds: float, metrics: dict, load: str) -> str:
    verdict = "**pass**" if r["passed"] else "**fail**"
    w, n = r["window_steps"], r["steps"]
    loop = metrics.get("seconds", float("nan"))
    rows = [
        [
            f"after warm-up: median, steps {r['warmup_steps']}-{r['warmup_steps'] + w} "
            f"({r['samples_after_warmup']} samples)",
            _mib(r["rss_after_warmup"]),
            _mib(r["main_rss_after_warmup"]),
        ],
        [
            f"end: median, steps {n - w}-{n} ({r['samples_end']} samples)",
            _mib(r["rss_end"]),
            _mib(r["main_rss_end"]),
        ],
        [
            f"peak, any sample ({r['max_procs']} processes at most)",
            _mib(r["rss_peak"]),
            _mib(r["main_rss_peak"]),
        ],
        [
            f"growth, end / after warm-up - 1 (goal < {r['goal']:.0%})",
            f"{r['growth']:+.2%} {verdict}",
            f"{r['main_growth']:+.2%}",
        ],
    ]
    header = ["RSS (MiB)", "process tree", "training process"]
    lines = [
        f"{n} steps: the command took {seconds:.0f} s, its training loop {loop:.0f} s "
        f"({loop / n * 1000:.0f} ms/step with the saves, "
        f"{metrics.get('tokens_per_s', float('nan')):.0f} tokens/s); {r['samples']} samples; "
        f"{load}. Written by `benchmarks/soak_distill.py --write`.",
        "",
        harness.markdown_table(header, rows, "lrr"),
        "",
        "Median RSS of the tree per tenth of the run (MiB): "
        + ", ".join(f"{lo}: {_mib(v) if v else '-'}" for lo, v in r["profile"])
        + ". A save forks a writer process (Megatron's torch_dist writer) whose pages are the "
        "parent's, copy-on-write: a sample taken then counts them twice (the tree's peak).",
    ]
    return "\n".join(lines)


def write_readme(text: str, path: str = README) -> None:
    """Replace the text between the soak markers of ``path`` with ``text``."""
    harness.replace_section(text, BEGIN, END, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    root = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="minitron-soak-"))
    ours = not args.workdir or not os.path.exists(root)  # only then may it be removed
    try:
        inputs = build_inputs(root)
        save = os.path.join(root, "run")
        for old in (save, save + ".logs", save + ".cache"):  # a previous run would be resumed
            shutil.rmtree(old, ignore_errors=True)
        from catalogue import env  # the fixtures' environment: OMP_NUM_THREADS=1, no RANK

        cmd = [sys.executable, "-m", "minitron_mcore", *distill_argv(inputs, save, args)]
        print("$ python " + " ".join(cmd[1:]), flush=True)
        load = os.getloadavg()[0]
        log = StepLog(os.path.join(save + ".logs", "train_log.jsonl"))
        rc, seconds, samples = run_sampled(cmd, env(), log, args.interval, save)
        if rc != 0:
            with open(save + ".stderr") as f:
                print(f.read()[-3000:], file=sys.stderr)
            print(f"error: the distill command exited {rc}", file=sys.stderr)
            return 2
        with open(os.path.join(root, "samples.json"), "w") as f:
            json.dump([dataclasses.asdict(s) for s in samples], f)
        r = analyse(samples, args.steps, args.warmup, args.window)
        with open(save + ".stdout") as f:  # the command's metrics: its last stdout line
            metrics = harness.last_json_line(f.read()) or {}
        load_txt = f"1-min load {load:.1f} before, {os.getloadavg()[0]:.1f} after"
        text = table(r, seconds, metrics, load_txt)
        print("\n" + text + "\n")
        if args.write:
            when = time.strftime("%Y-%m-%d %H:%M")
            write_readme(f"### Result: {when}, {os.cpu_count()} CPU cores\n\n{text}")
        loop = {"loop_seconds": metrics.get("seconds"), "tokens_per_s": metrics.get("tokens_per_s")}
        print(json.dumps(dict(r, seconds=round(seconds, 2), **loop, command=cmd[3:])))
        return 0 if r["passed"] else 1
    finally:
        if ours and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"kept {root}")


if __name__ == "__main__":
    sys.exit(main())
