"""``minitron <command> [key=value ...]`` - one console script, one command per stage.

    minitron --help
    minitron import-hf load=HF_DIR save=CKPT parallel.tp=2
    torchrun --nproc-per-node 2 -m minitron_mcore import-hf load=HF_DIR save=CKPT parallel.tp=2

Each command has a structured config (a dataclass registered in Hydra's ConfigStore) and a YAML
file ``conf/<command>.yaml`` built on it; overrides are Hydra's ``key=value`` syntax, and a key
the dataclass does not declare is rejected before any work starts.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass

from minitron_mcore.errors import MinitronError, storage_error
from minitron_mcore.utils.config import compose_config


@dataclass(frozen=True)
class Command:
    name: str
    target: str  # "module:function"
    schema: str  # "module:Dataclass"
    help: str

    def resolve(self, which: str) -> Callable:
        module, attr = getattr(self, which).split(":")
        return getattr(importlib.import_module(module), attr)


COMMANDS = {
    c.name: c
    for c in [
        Command(
            "import-hf",
            "minitron_mcore.checkpoint.convert:import_hf",
            "minitron_mcore.checkpoint.convert:ImportHFConfig",
            "Hugging Face model directory -> Megatron checkpoint (at parallel.tp/pp)",
        ),
        Command(
            "preprocess",
            "minitron_mcore.stages.preprocess:preprocess",
            "minitron_mcore.stages.preprocess:PreprocessConfig",
            "text / JSONL -> Megatron indexed dataset (.bin/.idx)",
        ),
        Command(
            "pretrain",
            "minitron_mcore.stages.pretrain:pretrain",
            "minitron_mcore.stages.pretrain:PretrainConfig",
            "train a model of a family from scratch",
        ),
        Command(
            "correct",
            "minitron_mcore.stages.correct:correct",
            "minitron_mcore.stages.correct:CorrectConfig",
            "teacher correction: fine-tune the original model on the distillation data",
        ),
        Command(
            "importance",
            "minitron_mcore.importance.command:importance",
            "minitron_mcore.importance.command:ImportanceCommandConfig",
            "activation-based importance of heads, groups, neurons, channels and layers",
        ),
        Command(
            "prune",
            "minitron_mcore.prune.command:prune",
            "minitron_mcore.prune.command:PruneCommandConfig",
            "structured width/depth pruning of a checkpoint with importance scores",
        ),
        Command(
            "distill",
            "minitron_mcore.stages.distill:distill",
            "minitron_mcore.stages.distill:DistillConfig",
            "retrain a pruned student against a teacher with knowledge distillation",
        ),
        Command(
            "teacher-logits",
            "minitron_mcore.stages.teacher_logits:teacher_logits",
            "minitron_mcore.stages.teacher_logits:TeacherLogitsConfig",
            "store a teacher's top-k predictions for a distillation run (offline KD)",
        ),
        Command(
            "evaluate",
            "minitron_mcore.evaluate:evaluate",
            "minitron_mcore.evaluate:EvaluateConfig",
            "validation loss / perplexity of a checkpoint",
        ),
        Command(
            "pipeline",
            "minitron_mcore.pipeline.runner:run_pipeline",
            "minitron_mcore.pipeline.config:PipelineConfig",
            "the whole method in one resumable run, with report.md",
        ),
        Command(
            "export-hf",
            "minitron_mcore.checkpoint.convert:export_hf",
            "minitron_mcore.checkpoint.convert:ExportHFConfig",
            "Megatron checkpoint -> Hugging Face directory that transformers loads",
        ),
    ]
}


def _usage() -> str:
    lines = [
        "usage: minitron <command> [key=value ...]",
        "",
        "Compress LLMs the Minitron way on Megatron-Core.",
        "",
        "commands:",
    ]
    lines += [f"  {c.name:<12} {c.help}" for c in COMMANDS.values()]
    lines += [
        "",
        "`minitron <command> --help` shows a command's keys and defaults.",
        "Several processes: torchrun --nproc-per-node N -m minitron_mcore <command> ...",
    ]
    return "\n".join(lines)


def compose(command: str, overrides: list[str]):
    """Hydra-compose ``conf/<command>.yaml`` with ``overrides`` into the command's dataclass."""
    return compose_config(command, COMMANDS[command].resolve("schema"), overrides)


def _show_config(command: str) -> str:
    from omegaconf import OmegaConf

    cfg = compose(command, [])
    return f"minitron {command} [key=value ...]\n\n" + OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _output_of(command: str, cfg) -> str | None:
    """The path a command writes (None: it writes nothing, e.g. a pipeline dry run)."""
    if command == "pipeline":
        return None if cfg.pipeline.dry_run else cfg.run_dir or None
    if command == "evaluate":
        return cfg.save or (cfg.load.rstrip("/") + ".eval" if cfg.load else None)
    return getattr(cfg, "save", "") or None


@contextlib.contextmanager
def command_context(command: str, cfg):
    """What every command runs inside: its process group (owned for the whole command, so
    that rank 0 decides what the output directory holds for every rank), the lock on its
    output, taken by rank 0 before any rank reads that directory (one writer per output), and
    a watch that stops a worker whose launcher died (utils/runlock.py)."""
    from minitron_mcore.parallel import fail_together, launcher_ranks, process_group
    from minitron_mcore.utils.runlock import OutputLock, watch_launcher

    if launcher_ranks() is not None:  # a worker of torchrun or of an srun job step
        watch_launcher()
    out = _output_of(command, cfg)
    with process_group(getattr(cfg, "parallel", None)):
        lock = OutputLock(out) if out else None
        if lock is not None:
            fail_together(lock.acquire, rank0_only=True)
        try:
            yield
        finally:
            if lock is not None:
                lock.release()  # (nothing on ranks that did not take it)


TRAINING_COMMANDS = ("pretrain", "correct", "distill")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in TRAINING_COMMANDS:
        from minitron_mcore.train import defer_sigterm  # (signal only: torch is not loaded yet)

        defer_sigterm()  # a preemption during start-up is kept for the first step
    from minitron_mcore.utils.log import quiet_known_warnings

    quiet_known_warnings()
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command, overrides = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise MinitronError(f"unknown command {command!r}; run `minitron --help` for the list")
        if any(a in ("-h", "--help") for a in overrides):
            print(_show_config(command))
            return 0
        cfg = compose(command, overrides)
        try:
            with command_context(command, cfg):
                COMMANDS[command].resolve("target")(cfg)
        except OSError as e:
            raise storage_error(e) from e
        if command in TRAINING_COMMANDS:
            # The run is finished and saved. A SIGTERM from here on (a time limit landing
            # during shutdown) must not turn it into exit -15: CPython's finalisation puts
            # SIG_DFL back for signals with a Python handler, but leaves SIG_IGN in place.
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
    except MinitronError as e:
        # Under torchrun / srun every rank gets here, mostly with the same message: print it
        # once, never dropping a message that only some rank has (the rule and its reasons:
        # minitron_mcore.parallel.should_print_error).  Every rank exits with the same code.
        show = True  # a single process always prints (and needs no torch import to decide)
        if "RANK" in os.environ or "SLURM_PROCID" in os.environ:
            from minitron_mcore.parallel import should_print_error

            show = should_print_error(e)
        if show:
            print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


def entry() -> None:
    sys.exit(main())
