"""Fault injection (issue 11): kill every stage at random moments, re-run it, compare bitwise.

For each :class:`Stage` (one real CLI command on tiny inputs: the catalogue's shared fixtures)

1. a reference run without faults, with ``MINITRON_FAULT_LOG`` set: its duration, its result
   (every tensor and JSON file that defines the output) and the list of its fault points;
2. each :class:`Kill` runs the identical command in a fresh work directory and stops it:

   * ``time``     SIGKILL of the process group after a random wall-clock delay;
   * ``point``    ``MINITRON_FAULT_AT=k`` (``minitron_mcore/utils/faults.py``), a point drawn
                  from the reference log: the process dies in the middle of a checkpoint write
                  (under torchrun with ``MINITRON_FAULT_RANK``: one rank dies);
   * ``rank``     (torchrun) SIGKILL of one worker process after a random delay;
   * ``launcher`` (torchrun) SIGKILL of the launcher's process group and of every worker's
                  (torchrun starts each worker in its own session) - a node going down;
   * ``launcher-only`` (torchrun) SIGKILL of the launcher alone: its workers, in sessions of
                  their own, must notice and stop by themselves (a checkpoint at the next
                  step for training stages) - a worker still alive 30 s after the launcher
                  is a leftover process, and a problem;
   * ``sigterm``  (training stages) SIGTERM after a random delay, as SLURM preempts: the run
                  must exit 0 with a usable checkpoint;

3. before anything is re-run: whatever the output path presents as complete must be complete
   (a tracker names a readable version; a scores or HF directory that exists loads, and for
   outputs that are final it already equals the reference), and no process of the run is left;
4. the identical command again, to completion: exit 0 and a result bitwise equal to the
   reference. A non-training command killed after its output was complete finds it in place
   (same command, same inputs: ``checkpoint/rerun.py``) and does nothing.

``run_faults.py`` drives it and writes the table in ``tests/reliability/README.md``;
``test_faults.py`` is the CI subset.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from catalogue import ROOT, TRAIN, Ctx, Shared, _check, _fmt, _free_port, cli, env  # noqa: E402

# -------------------------------------------------------------------------- shared inputs


class FaultShared(Shared):
    """The catalogue's shared inputs plus a briefly trained teacher (distillation checks that
    the teacher beats a uniform guess) and a student pruned from it."""

    def _build_teacher(self, path):
        r = cli(
            ["pretrain", "model=tiny-llama", f"tokenizer={self.get('tok')}", f"save={path}"]
            + [f"data.train=[{self.get('corpus')}]", "train.steps=30", "train.seq_length=32"]
            + ["train.global_batch_size=8", "train.micro_batch_size=4", "train.lr=3e-3"]
            + ["train.warmup_steps=3", "train.eval_iters=0", f"data.cache_dir={path}.cache"]
        )
        _check(r, path)

    def _build_teacher_scores(self, path):
        r = cli(
            ["importance", f"load={self.get('teacher')}", f"save={path}"]
            + [f"data.train=[{self.get('corpus')}]", "importance.num_samples=4"]
            + ["importance.seq_length=32", "importance.layer_loss_samples=4"]
        )
        _check(r, path)

    def _build_student(self, path):
        r = cli(
            ["prune", f"load={self.get('teacher')}", f"scores={self.get('teacher_scores')}"]
            + [f"save={path}", "prune.target.hidden_size=48", "prune.target.num_layers=3"]
        )
        _check(r, path)


# -------------------------------------------------------------------------- stages

TRAIN_RUN = [a for a in TRAIN if not a.startswith("train.steps=")] + [
    "train.steps=6",
    "train.save_interval=2",
    "data.cache_dir={w}/cache",
]


@dataclass
class Stage:
    name: str
    argv: Callable[[Ctx], list[str]]  # the output is always {w}/out
    kind: str  # ckpt | scores | hf | pipeline
    nproc: int = 1
    training: bool = False
    needs: tuple = ()  # shared fixtures to build before the reference run is timed

    def kill_kinds(self) -> list[str]:
        return ["rank", "launcher", "launcher-only"] if self.nproc > 1 else ["time"]


PIPELINE = [
    "teacher={teacher}",
    "data.original=[{corpus}]",
    "data.distill=[{corpus}]",
    "correct.train.steps=2",
    "correct.train.warmup_steps=1",
    "correct.train.global_batch_size=4",
    "correct.train.micro_batch_size=2",
    "correct.train.seq_length=32",
    "correct.train.eval_iters=0",
    "correct.original_lr=1e-3",
    "importance.num_samples=4",
    "importance.seq_length=32",
    "importance.micro_batch_size=2",
    "importance.layer_loss_samples=2",
    "students=[{{name:width,target:{{hidden_size:48}}}}]",
    "distill.train.steps=4",
    "distill.train.warmup_steps=1",
    "distill.train.global_batch_size=4",
    "distill.train.micro_batch_size=2",
    "distill.train.seq_length=32",
    "distill.train.eval_iters=0",
    "distill.train.save_interval=2",
    "pipeline.skip=[evaluate]",
]

STAGES: list[Stage] = [
    Stage(
        "import-hf",
        _fmt(["import-hf", "load={hf}", "save={w}/out", "dtype=fp32"]),
        "ckpt",
        needs=("hf",),
    ),
    Stage(
        "import-hf-2ranks",
        _fmt(["import-hf", "load={hf}", "save={w}/out", "dtype=fp32", "parallel.tp=2"]),
        "ckpt",
        nproc=2,
        needs=("hf",),
    ),
    Stage(
        "pretrain",
        _fmt(
            ["pretrain", "model=tiny-llama", "tokenizer={tok}", "save={w}/out"]
            + ["data.train=[{corpus}]", *TRAIN_RUN]
        ),
        "ckpt",
        training=True,
        needs=("tok", "corpus"),
    ),
    Stage(
        "correct",
        _fmt(["correct", "load={ckpt}", "save={w}/out", "data.train=[{corpus}]", *TRAIN_RUN]),
        "ckpt",
        training=True,
        needs=("ckpt", "corpus"),
    ),
    Stage(
        "correct-2ranks",
        _fmt(["correct", "load={ckpt}", "save={w}/out", "data.train=[{corpus}]", *TRAIN_RUN]),
        "ckpt",
        nproc=2,
        training=True,
        needs=("ckpt", "corpus"),
    ),
    Stage(
        "importance",
        _fmt(
            ["importance", "load={ckpt}", "save={w}/out", "data.train=[{corpus}]"]
            + ["importance.num_samples=4", "importance.seq_length=32"]
            + ["importance.layer_loss_samples=4", "data.cache_dir={w}/cache"]
        ),
        "scores",
        needs=("ckpt", "corpus"),
    ),
    Stage(
        "prune",
        _fmt(
            ["prune", "load={ckpt}", "scores={scores}", "save={w}/out"]
            + ["prune.target.hidden_size=48", "prune.target.num_layers=3"]
        ),
        "ckpt",
        needs=("ckpt", "scores"),
    ),
    Stage(
        "distill",
        _fmt(
            ["distill", "load={student}", "teacher={teacher}", "save={w}/out"]
            + ["data.train=[{corpus}]", *TRAIN_RUN]
        ),
        "ckpt",
        training=True,
        needs=("student", "teacher", "corpus"),
    ),
    Stage("export-hf", _fmt(["export-hf", "load={ckpt}", "save={w}/out"]), "hf", needs=("ckpt",)),
    Stage(
        "pipeline",
        _fmt(["pipeline", "run_dir={w}/out", *PIPELINE]),
        "pipeline",
        needs=("teacher", "corpus"),
    ),
]
BY_NAME = {s.name: s for s in STAGES}


# -------------------------------------------------------------------------- reading results


def _ckpt_result(path: str) -> dict:
    """Global tensors of a checkpoint's current version (+ its training step, if any)."""
    from minitron_mcore.checkpoint.megatron import WeightsReader, resolve_checkpoint
    from minitron_mcore.train.state import TRAIN_STATE

    reader = WeightsReader(path)
    out = {f"weights/{k}": v for k, v in reader.read(list(reader.shapes)).items()}
    ts = os.path.join(resolve_checkpoint(path), TRAIN_STATE)
    if os.path.isfile(ts):
        with open(ts) as f:
            out["iteration"] = json.load(f)["iteration"]
    return out


def _scores_result(path: str) -> dict:
    from safetensors.torch import load_file

    from minitron_mcore.importance.scores import INFO, TENSORS

    out = {f"scores/{k}": v for k, v in load_file(os.path.join(path, TENSORS)).items()}
    with open(os.path.join(path, INFO)) as f:
        out["scores.json"] = json.load(f)
    return out


def _hf_result(path: str) -> dict:
    from safetensors.torch import load_file

    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not names:
        raise RuntimeError(f"{path} holds no safetensors file")
    out = {}
    for n in names:
        out.update({f"hf/{k}": v for k, v in load_file(os.path.join(path, n)).items()})
    index = os.path.join(path, "model.safetensors.index.json")
    if len(names) > 1 or os.path.exists(index):
        with open(index) as f:
            missing = set(json.load(f)["weight_map"]) - {k[3:] for k in out}
        if missing:
            raise RuntimeError(f"{path}: tensors missing from the shards: {sorted(missing)[:3]}")
    with open(os.path.join(path, "config.json")) as f:
        out["config.json"] = json.load(f)
    return out


def _pipeline_outputs(run_dir: str) -> dict[str, tuple[str, str]]:
    """name -> (kind, path) of every output a finished tiny pipeline run has."""
    out = {"scores": ("scores", os.path.join(run_dir, "scores"))}
    out["teacher-corrected"] = ("ckpt", os.path.join(run_dir, "teacher-corrected"))
    students = os.path.join(run_dir, "students")
    for v in sorted(os.listdir(students)) if os.path.isdir(students) else []:
        for what in ("pruned", "distilled"):
            out[f"{v}.{what}"] = ("ckpt", os.path.join(students, v, what))
    hf = os.path.join(run_dir, "hf")
    for v in sorted(os.listdir(hf)) if os.path.isdir(hf) else []:
        if not v.endswith(".partial") and os.path.isdir(os.path.join(hf, v)):
            out[f"hf.{v}"] = ("hf", os.path.join(hf, v))
    return out


READERS = {"ckpt": _ckpt_result, "scores": _scores_result, "hf": _hf_result}


def read_result(kind: str, path: str) -> dict:
    """The result of a stage's output ``path``; paths inside its JSON files are made relative
    to the run's work directory (every case runs in its own)."""
    if kind != "pipeline":
        out = READERS[kind](path)
    else:
        out = {}
        for name, (k, p) in _pipeline_outputs(path).items():
            out.update({f"{name}/{key}": v for key, v in READERS[k](p).items()})
        with open(os.path.join(path, "report.md")) as f:
            out["report"] = bool(f.read())
    work = os.path.dirname(os.path.abspath(path))
    return {k: v if isinstance(v, torch.Tensor) else _relative(v, work) for k, v in out.items()}


def _relative(x, work: str):
    if isinstance(x, str):
        return x.replace(work, "$W")
    if isinstance(x, dict):
        return {k: _relative(v, work) for k, v in x.items()}
    if isinstance(x, list):
        return [_relative(v, work) for v in x]
    return x


# Provenance that differs from run to run by design (ids, fingerprints made of ids, wall-clock
# times).
_VOLATILE = {"checkpoint_id", "fingerprint", "seconds", "created", "time", "timestamp"}


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in _VOLATILE}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


def differences(ref: dict, got: dict) -> list[str]:
    """Keys whose values are not bitwise equal (tensors: torch.equal, dtype included)."""
    diff = sorted(set(ref) ^ set(got))
    for k in sorted(set(ref) & set(got)):
        a, b = ref[k], got[k]
        if isinstance(a, torch.Tensor):
            same = isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        else:
            same = _strip(a) == _strip(b)
        if not same:
            diff.append(k)
    return diff


# -------------------------------------------------------------------------- "complete" outputs


def _exists(path: str) -> bool:
    return os.path.lexists(path)


def presented_complete(stage: Stage, out: str, ref: dict) -> tuple[bool, list[str]]:
    """After a kill: does ``out`` present itself as complete, and is all that it presents
    really complete? (complete?, problems)"""
    problems: list[str] = []
    if stage.kind == "pipeline":
        return _pipeline_presented(out, ref, problems), problems
    if stage.kind == "ckpt":
        from minitron_mcore.checkpoint.megatron import META_FILE

        if not os.path.isfile(os.path.join(out, META_FILE)):
            return False, problems  # no tracker: not a checkpoint (load= refuses it)
    elif not _exists(out):
        return False, problems
    try:
        got = read_result(stage.kind, out)
    except Exception as e:  # noqa: BLE001
        problems.append(f"{out} is presented as complete but does not read: {e}"[:300])
        return True, problems
    if not stage.training:  # a final output: complete means equal to the reference
        d = differences(ref, got)
        if d:
            problems.append(f"{out} is presented as complete but differs: {d[:3]}")
    return True, problems


def _pipeline_presented(run_dir: str, ref: dict, problems: list[str]) -> bool:
    """Every output the pipeline's done-markers vouch for reads, and a finished step's output
    equals the reference's."""
    stages = os.path.join(run_dir, "stages")
    done = (
        sorted(n[:-5] for n in os.listdir(stages) if n.endswith(".json"))
        if os.path.isdir(stages)
        else []
    )
    outputs = _pipeline_outputs(run_dir)
    for step in done:
        with open(os.path.join(stages, step + ".json")) as f:
            marker = json.load(f)
        paths = [p for p in _strings(marker) if p.startswith(run_dir + os.sep)]
        for name, (kind, path) in outputs.items():
            if path not in paths:
                continue
            if kind == "ckpt" and not os.path.isfile(os.path.join(path, "minitron.json")):
                problems.append(f"step {step} is done but {path} is not a checkpoint")
                continue
            if kind != "ckpt" and not os.path.isdir(path):
                problems.append(f"step {step} is done but {path} is missing")
                continue
            try:  # paths in its JSON relative to the work directory, as read_result's
                work = os.path.dirname(os.path.abspath(run_dir))
                got = {k: _relative(v, work) for k, v in READERS[kind](path).items()}
            except Exception as e:  # noqa: BLE001
                problems.append(f"step {step} is done but {path} does not read: {e}"[:300])
                continue
            mine = {k[len(name) + 1 :]: v for k, v in ref.items() if k.startswith(name + "/")}
            d = differences(mine, got)
            if d:
                problems.append(f"step {step} is done but {path} differs: {d[:3]}")
    return os.path.isfile(os.path.join(run_dir, "report.md"))


def _strings(x) -> list[str]:
    if isinstance(x, str):
        return [os.path.normpath(x)]
    if isinstance(x, dict):
        return [s for v in x.values() for s in _strings(v)]
    if isinstance(x, list):
        return [s for v in x for s in _strings(v)]
    return []


# -------------------------------------------------------------------------- processes


def command(stage: Stage, argv: list[str]) -> list[str]:
    if stage.nproc > 1:
        return [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(stage.nproc),
            "--master-port",
            str(_free_port()),
            "-m",
            "minitron_mcore",
            *argv,
        ]
    return [sys.executable, "-m", "minitron_mcore", *argv]


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = [int(x) for x in f.read().split()]
        except OSError:
            kids = []
        out += kids
        todo += kids
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _ours(pid: int, marker: bytes) -> bool:
    """Whether ``pid`` still is a process of this run: every process of a run inherits its
    ``MINITRON_FAULT_RUN`` marker. A pid seen earlier in the run may since have exited and been
    reused by an unrelated process (pid_max is often 32768), which must not be signalled."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            return marker in f.read().split(b"\0")
    except OSError:
        return False


def _kill_tree(pids: list[int], sig=signal.SIGKILL, marker: bytes = b"") -> None:
    for p in pids:
        if marker and not _ours(p, marker):
            continue
        try:
            os.killpg(os.getpgid(p), sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


@dataclass
class Run:
    returncode: int
    seconds: float
    stderr: str
    signal_sent: bool = True  # False: the run ended before the moment came
    orphans: list[int] = field(default_factory=list)


def run_cmd(stage: Stage, argv: list[str], work: str, extra_env=None, kill=None, timeout=900):
    """Run the stage's command; ``kill(proc, t0)`` (in a thread-free poll loop) may stop it.
    Returns a :class:`Run`; afterwards no process of the run may remain."""
    e = dict(env(), **(extra_env or {}))
    e["MINITRON_FAULT_RUN"] = run_id = f"{os.getpid()}-{time.time_ns()}"
    marker = f"MINITRON_FAULT_RUN={run_id}".encode()
    err_path = os.path.join(work, f"stderr-{time.time_ns()}.txt")
    t0 = time.time()
    with open(err_path, "w") as err:
        proc = subprocess.Popen(
            command(stage, argv),
            env=e,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            start_new_session=True,
        )
        sent, tree = kill is None, []
        while proc.poll() is None:
            tree = sorted(set(tree) | set(_children(proc.pid)))
            if kill is not None and not sent and kill.due(time.time() - t0):
                sent = kill.fire(proc, tree, marker)
            if time.time() - t0 > timeout:
                _kill_tree([proc.pid, *tree], marker=marker)
                proc.wait()
                raise TimeoutError(f"{' '.join(argv[:1])} ran over {timeout} s")
            time.sleep(0.01)
        seconds = time.time() - t0
        # torchrun's workers live in their own sessions: give them a moment, then any left
        # is an orphan (killed here so that the next run starts clean).
        deadline = time.time() + 30
        while any(_alive(p) and _ours(p, marker) for p in tree) and time.time() < deadline:
            time.sleep(0.05)
        orphans = [p for p in tree if _alive(p) and _ours(p, marker)]
        _kill_tree(orphans, marker=marker)
    with open(err_path) as f:
        stderr = f.read()
    return Run(proc.returncode, seconds, stderr, sent, orphans)


# -------------------------------------------------------------------------- kills


@dataclass
class Kill:
    stage: str
    kind: str  # time | point | rank | launcher | launcher-only | sigterm
    delay: float = 0.0  # seconds after the start (time, rank, launcher, sigterm)
    point: int = 0  # fault point (point)
    point_name: str = ""
    rank: int = 0  # the rank that dies (point, rank)

    @property
    def moment(self) -> str:
        if self.kind == "point":
            where = f" of rank {self.rank}" if BY_NAME[self.stage].nproc > 1 else ""
            return f"fault point {self.point}{where} (`{self.point_name}`)"
        what = f"rank {self.rank}'s worker, " if self.kind == "rank" else ""
        return f"{what}{self.delay:.2f} s"

    def env(self) -> dict:
        if self.kind != "point":
            return {}
        e = {"MINITRON_FAULT_AT": str(self.point)}
        if BY_NAME[self.stage].nproc > 1:
            e["MINITRON_FAULT_RANK"] = str(self.rank)
        return e

    def due(self, elapsed: float) -> bool:
        return self.kind != "point" and elapsed >= self.delay

    def fire(self, proc, tree: list[int], marker: bytes) -> bool:
        if self.kind == "sigterm":  # to every worker under torchrun, as SLURM signals tasks
            targets = [proc.pid] if BY_NAME[self.stage].nproc == 1 else _workers(proc.pid)
            if not targets:
                return False  # not started yet: try again on the next poll
            for p in targets:
                _signal(p, signal.SIGTERM)
            return True
        if self.kind == "rank":
            workers = _workers(proc.pid)
            if len(workers) <= self.rank:
                return False
            _signal(workers[self.rank], signal.SIGKILL)
            return True
        if self.kind == "launcher-only":  # the workers are left to notice on their own
            _signal(proc.pid, signal.SIGKILL)
            return True
        # time / launcher: the whole run dies at once (a node failure)
        _kill_tree([proc.pid, *tree, *_children(proc.pid)], marker=marker)
        return True


def _signal(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass  # it ended on its own a moment ago


def _workers(launcher: int) -> list[int]:
    """torchrun's worker processes, ordered by their RANK."""
    found = []
    for p in _children(launcher):
        try:
            with open(f"/proc/{p}/environ", "rb") as f:
                envs = dict(kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv)
            with open(f"/proc/{p}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"RANK" in envs and b"minitron_mcore" in cmd:
            found.append((int(envs[b"RANK"]), p))
    return [p for _, p in sorted(found)]


def draw_kills(stage: Stage, ref: Reference, n: int, n_term: int, seed: int) -> list[Kill]:
    """``n`` SIGKILL cases (about half at a fault point of the reference run, the others at a
    random moment of its duration) and, for training stages, ``n_term`` SIGTERM cases.
    Seeded per stage: ``--only`` draws the same cases."""
    rng = random.Random(f"{seed}:{stage.name}")
    kinds = stage.kill_kinds()
    lo, hi = 0.2 * ref.seconds, ref.seconds  # the first fifth is interpreter start-up
    kills = []
    for i in range(n):
        if ref.points and i % 2 == 0:
            k = rng.randint(1, len(ref.points))
            rank, name = ref.points[k - 1]
            if stage.nproc > 1:
                rank = rng.randrange(stage.nproc)
                mine = [nm for r, nm in ref.points if r == rank]
                k = rng.randint(1, len(mine))
                name = mine[k - 1]
            kills.append(Kill(stage.name, "point", point=k, point_name=name, rank=rank))
        else:
            kind = kinds[(i // 2 + 1) % len(kinds)]  # torchrun: the launcher first
            rank = rng.randrange(stage.nproc) if kind == "rank" else 0
            kills.append(Kill(stage.name, kind, delay=rng.uniform(lo, hi), rank=rank))
    if stage.training:
        for _ in range(n_term):
            kills.append(Kill(stage.name, "sigterm", delay=rng.uniform(lo, hi)))
    return kills


# -------------------------------------------------------------------------- reference + cases


@dataclass
class Reference:
    stage: Stage
    seconds: float
    result: dict
    points: list[tuple[int, str]]  # (rank, name) in order


def reference(stage: Stage, shared: FaultShared, work: str) -> Reference:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    for name in stage.needs:
        shared.get(name)
    ctx = Ctx(shared, work)
    log = os.path.join(work, "faults.log")
    r = run_cmd(stage, stage.argv(ctx), work, {"MINITRON_FAULT_LOG": log})
    if r.returncode != 0:
        raise RuntimeError(f"reference run of {stage.name} failed:\n{r.stderr[-3000:]}")
    points = []
    if os.path.exists(log):
        with open(log) as f:
            points = [(int(a), c) for a, _, c in (line.split() for line in f)]
    return Reference(stage, r.seconds, read_result(stage.kind, os.path.join(work, "out")), points)


@dataclass
class Outcome:
    kill: Kill
    killed_code: int
    complete_after_kill: bool
    incomplete_ok: bool  # nothing incomplete presented as complete
    rerun_code: int | None
    rerun_note: str
    equal: bool
    problems: list[str]
    seconds: float
    known: str = ""

    @property
    def ok(self) -> bool:
        return not self.problems


def run_kill(stage: Stage, ref: Reference, kill: Kill, shared: FaultShared, work: str) -> Outcome:
    import shutil

    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    t0 = time.time()
    ctx = Ctx(shared, work)
    argv, out = stage.argv(ctx), os.path.join(work, "out")
    problems: list[str] = []
    r = run_cmd(stage, argv, work, kill.env(), kill=kill)
    if r.orphans:
        problems.append(f"processes left after the kill: {r.orphans}")
    complete, p = presented_complete(stage, out, ref.result)
    problems += p
    incomplete_ok = not p
    if kill.kind == "sigterm":
        problems += _check_sigterm(stage, r, out)
    elif r.returncode == 0 and r.signal_sent and kill.kind != "point":
        pass  # the signal came as the run was ending; nothing to check beyond the result
    rerun = run_cmd(stage, argv, work)
    note = ""
    if rerun.returncode != 0:
        problems.append(f"re-run exit {rerun.returncode}: {_last_error(rerun.stderr)}")
    elif "nothing to do" in rerun.stderr:
        note = "no-op: output already complete"
    equal = False
    if not problems:
        try:
            d = differences(ref.result, read_result(stage.kind, out))
            equal = not d
            if d:
                problems.append(f"differs from the reference: {d[:3]}")
        except Exception as e:  # noqa: BLE001
            problems.append(f"result does not read: {e}"[:300])
    if rerun.orphans:
        problems.append(f"processes left after the re-run: {rerun.orphans}")
    return Outcome(
        kill,
        r.returncode,
        complete,
        incomplete_ok,
        rerun.returncode,
        note,
        equal,
        problems,
        time.time() - t0,
    )


def _check_sigterm(stage: Stage, r: Run, out: str) -> list[str]:
    """SIGTERM: exit 0 with a usable checkpoint (readable, a training step)."""
    if not r.signal_sent:
        return []
    problems = []
    if r.returncode != 0:
        problems.append(f"SIGTERM: exit {r.returncode} ({_last_error(r.stderr)})")
        return problems
    try:
        got = _ckpt_result(out)
        if not got.get("iteration"):
            problems.append("SIGTERM: the checkpoint holds no training step")
    except Exception as e:  # noqa: BLE001
        problems.append(f"SIGTERM: no usable checkpoint ({e})"[:300])
    return problems


def _last_error(stderr: str) -> str:
    lines = [x for x in stderr.splitlines() if x.startswith("error:")]
    if lines:
        return lines[-1][:200]
    tail = [x for x in stderr.strip().splitlines() if x.strip()]
    return tail[-1][:200] if tail else "(no output)"
