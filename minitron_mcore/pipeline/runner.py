"""``minitron pipeline``: run the planned steps in one process group, resumably.

    minitron pipeline run_dir=runs/pipeline                      # the default run (CPU demo)
    minitron pipeline run_dir=runs/llama teacher=HF_DIR +recipe=minitron-4b-width
    torchrun --nproc-per-node 8 -m minitron_mcore pipeline run_dir=... parallel.tp=8

Each step writes ``stages/<step>.json`` when it finishes: the resolved config it ran with and
its metrics. Re-running the same command skips finished steps and continues inside the first
unfinished one (the training commands resume exactly where they stopped). A finished step whose
config changed is an error naming the step, unless ``pipeline.rerun_from=<stage or step>``
asks to run it and every later step again. A student variant that fails does not stop the
others: its remaining steps are skipped, the report says why, and the command exits non-zero.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import traceback

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.pipeline.config import PipelineConfig
from minitron_mcore.pipeline.markers import (
    forget,
    jsonable,
    read_marker,
    record_failures,
    write_marker,
)
from minitron_mcore.pipeline.plan import plan
from minitron_mcore.pipeline.step import STAGES, Step, flat_from
from minitron_mcore.utils.log import echo_metrics, emit_metrics, human_count, log0


def _first_difference(old: dict, new: dict, prefix: str = "") -> str:
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            d = _first_difference(a, b, f"{prefix}{k}.")
            if d:
                return d
        elif a != b:
            return f"{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}"
    return ""


def _rerun_index(steps: list[Step], rerun_from: str) -> int:
    if not rerun_from:
        return len(steps)
    for i, s in enumerate(steps):
        if rerun_from in (s.id, s.stage):
            return i
    stages = ", ".join(STAGES)
    raise MinitronError(
        f"pipeline.rerun_from={rerun_from!r} names no step of this run; use a stage ({stages}) "
        "or a step id such as prune.width"
    )


def _summary(step: Step, m: dict, seconds: float) -> str:
    bits = [f"{step.id:<34}", f"{seconds:7.1f} s"]
    for key in ("valid_lm_loss", "valid_loss", "params_after", "calibration_loss", "tok_per_s"):
        if key in m and m[key] is not None:
            v = m[key]
            bits.append(f"{key} {human_count(v) if key == 'params_after' else f'{v:.4f}'}")
            break
    return "  ".join(bits)


def teacher_arch(cfg: PipelineConfig):
    """The teacher's shape before anything runs: its config.json, its checkpoint, or the
    model the default run pretrains."""
    from minitron_mcore.checkpoint.convert import model_arch_of

    source = flat_from(cfg.pipeline.from_).get("teacher") or cfg.teacher
    return model_arch_of(source) if source else cfg.pretrain.model


def check_plan(cfg: PipelineConfig, arch) -> None:
    """Fail in seconds, not after hours of correction: every student target and the TP/PP
    layout must fit the teacher (``arch``); what the last steps need must be there (lm-eval
    when tasks are set, a writable run_dir with room for the first training checkpoint)."""
    from minitron_mcore.pipeline.steps import prune_config
    from minitron_mcore.prune.plan import student_shape
    from minitron_mcore.utils import preflight

    tp, pp, ep = cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep
    arch.check_parallel(tp, pp, ep)
    preflight.require_lm_eval(cfg.evaluate.lm_eval_tasks, "evaluate.lm_eval_tasks")
    if not cfg.pipeline.dry_run:
        preflight.require_writable(cfg.run_dir, "run_dir")
        need = preflight.checkpoint_bytes(arch.num_params(), training=True)
        preflight.require_free_disk(cfg.run_dir, need, "the teacher's first checkpoint", "run_dir")
    for v in cfg.students:
        try:
            student_shape(arch, prune_config(v), tp, pp, ep)
        except MinitronError as e:
            raise MinitronError(f"student {v.name!r}: {e}") from e


def dry_run(cfg: PipelineConfig, steps: list[Step]) -> dict:
    """Print every step's command and the token budget; run nothing."""
    from minitron_mcore.pipeline.commands import command_line
    from minitron_mcore.stages.common import describe_schedule

    total = 0
    lines = []
    for s in steps:
        cmd = command_line(s) if s.command else f"(pipeline step: {s.stage})"
        tok = f"  # {human_count(s.tokens)} training tokens" if s.tokens else ""
        lines.append(f"[{s.id}]{tok}\n  {cmd}")
        if s.tokens:
            lines.append(f"  {describe_schedule(s.config)}")
        total += s.tokens
    text = "\n".join(lines)
    print(text)
    print(f"# {len(steps)} steps, {human_count(total)} training tokens in all")
    return {"command": "pipeline", "dry_run": True, "steps": len(steps), "train_tokens": total}


def run_pipeline(cfg: PipelineConfig) -> dict:
    from minitron_mcore.parallel import parallel_context

    require(bool(cfg.run_dir), "run_dir= is empty; pass a directory for the pipeline's outputs")
    cfg = dataclasses.replace(cfg, run_dir=os.path.abspath(cfg.run_dir))
    names = [v.name for v in cfg.students]
    require(len(set(names)) == len(names), f"students have duplicate names: {names}")
    arch = teacher_arch(cfg)
    check_plan(cfg, arch)
    steps = plan(cfg, arch)
    if cfg.pipeline.dry_run:
        return dry_run(cfg, steps)
    rerun_at = _rerun_index(steps, cfg.pipeline.rerun_from)
    os.makedirs(cfg.run_dir, exist_ok=True)
    t_start = time.time()
    failed: dict[str, str] = {}
    with echo_metrics(False), parallel_context(cfg.parallel, cfg.seed):
        for i, step in enumerate(steps):
            if step.variant and step.variant in failed:
                continue
            if i >= rerun_at and step.stage != "report":
                forget(cfg.run_dir, step)
            done = read_marker(cfg.run_dir, step.id)
            if done is not None and step.stage != "report":
                diff = _first_difference(done["config"], jsonable(step.config))
                require(
                    not diff,
                    f"step {step.id} finished with another configuration ({diff}); pass "
                    f"pipeline.rerun_from={step.id} to run it and every later step again",
                )
                log0("done    %s", step.id)
                continue
            t0 = time.time()
            log0("running %s", step.id)
            if step.stage == "report":
                record_failures(cfg.run_dir, failed)
            try:
                metrics = step.run()
            except MinitronError as e:
                if not step.variant:
                    raise
                failed[step.variant] = f"{step.id}: {e}"
                log0("FAILED  %s: %s (the other students go on)", step.id, e)
                continue
            except Exception as e:  # noqa: BLE001 - a bug in one variant must not lose the others
                if not step.variant:
                    raise
                failed[step.variant] = f"{step.id}: {type(e).__name__}: {e}"
                log0("FAILED  %s:\n%s", step.id, traceback.format_exc())
                continue
            write_marker(cfg.run_dir, step, metrics, time.time() - t0)
            log0("%s", _summary(step, metrics, time.time() - t0))
    metrics = {
        "command": "pipeline",
        "run_dir": cfg.run_dir,
        "report": os.path.join(cfg.run_dir, "report.md"),
        "steps": len(steps),
        "failed": failed,
        "seconds": round(time.time() - t_start, 3),
    }
    emit_metrics(metrics, cfg.run_dir)
    if failed:
        raise MinitronError(
            f"student variant(s) {sorted(failed)} failed ({'; '.join(failed.values())}); the "
            "other outputs are complete - fix the cause and re-run the same command"
        )
    return metrics
