"""One builder per pipeline stage: the single command's config, and the call that runs it.

The pipeline has no stage logic of its own: each step calls the function the command calls
(``correct(CorrectConfig)``, ``distill(DistillConfig)`` ...); this module only decides their
inputs and outputs inside the run directory.
"""

from __future__ import annotations

import os

from minitron_mcore.checkpoint.layout import is_hf_dir
from minitron_mcore.pipeline.config import StudentVariant
from minitron_mcore.pipeline.step import Step, stage_data, train_tokens


def _common(p) -> dict:
    return dict(parallel=p.cfg.parallel, seed=p.cfg.seed)


# ------------------------------------------------------------------------------ the teacher


def _train_demo_tokenizer(out_dir: str, corpora: list, vocab_size: int) -> dict:
    """A byte-level BPE on the original data (the default run has no tokenizer of its own)."""
    from minitron_mcore.data.demo import train_tokenizer
    from minitron_mcore.parallel import fail_together

    fail_together(lambda: train_tokenizer(out_dir, corpora, vocab_size), rank0_only=True)
    return {"command": "tokenizer", "save": out_dir}


def teacher_steps(p):
    """(teacher checkpoint, tokenizer) - imported, pretrained, or given."""
    from minitron_mcore.checkpoint.convert import ImportHFConfig, import_hf
    from minitron_mcore.stages.pretrain import PretrainConfig, pretrain

    cfg = p.cfg
    if cfg.teacher and is_hf_dir(cfg.teacher):
        c = ImportHFConfig(load=cfg.teacher, save=p.path("teacher"), overwrite=True, **_common(p))
        return p.add(Step("teacher", "teacher", "import-hf", c, c.save, lambda: import_hf(c))), ""
    if cfg.teacher:
        return cfg.teacher, ""
    if "teacher" in p.given:  # pipeline.from.teacher: nothing to pretrain, no tokenizer to make
        return p.given["teacher"], ""
    tok = cfg.pretrain.tokenizer
    if not tok:
        out = p.path("tokenizer")
        corpora, vocab = list(cfg.data.original), cfg.pretrain.model.vocab_size
        tok = p.add(
            Step(
                "tokenizer",
                "tokenizer",
                "",
                {"corpora": corpora, "vocab_size": vocab},
                out,
                lambda: _train_demo_tokenizer(out, corpora, vocab),
            )
        )
    c = PretrainConfig(
        save=p.path("teacher"),
        tokenizer=tok,
        model=cfg.pretrain.model,
        data=stage_data(cfg, "original"),
        train=cfg.pretrain.train,
        **_common(p),
    )
    step = Step("teacher", "teacher", "pretrain", c, c.save, lambda: pretrain(c))
    step.tokens = train_tokens(c.train)
    return p.add(step), tok


# ------------------------------------------------------------------------- the compression


def correct_step(p, teacher: str) -> Step:
    from minitron_mcore.stages.correct import CorrectConfig, correct

    cfg = p.cfg
    c = CorrectConfig(
        load=teacher,
        save=p.path("teacher-corrected"),
        original_lr=cfg.correct.original_lr,
        lr_fraction=cfg.correct.lr_fraction,
        data=stage_data(cfg, "distill"),
        train=cfg.correct.train,
        **_common(p),
    )
    step = Step("correct", "correct", "correct", c, c.save, lambda: correct(c))
    step.tokens = train_tokens(c.train)
    return step


def importance_step(p, corrected: str) -> Step:
    import dataclasses

    from minitron_mcore.importance.command import ImportanceCommandConfig, importance
    from minitron_mcore.prune.plan import block_sizes_needed

    cfg = p.cfg
    blocks = {int(b) for b in cfg.importance.block_sizes}
    for v in cfg.students:  # one calibration pass serves every student's depth target
        blocks.update(block_sizes_needed(p.teacher, prune_config(v)))
    icfg = dataclasses.replace(cfg.importance, block_sizes=sorted(blocks))
    c = ImportanceCommandConfig(
        load=corrected,
        save=p.path("scores"),
        data=stage_data(cfg, "distill"),
        importance=icfg,
        overwrite=True,
        **_common(p),
    )
    return Step("importance", "importance", "importance", c, c.save, lambda: importance(c))


def prune_config(v: StudentVariant):
    """The ``prune.*`` keys of student variant ``v``."""
    from minitron_mcore.prune.plan import PruneConfig

    return PruneConfig(
        target=v.target,
        drop_layers=list(v.drop_layers),
        depth_metric=v.depth_metric,
        agg=v.agg,
        expert_metric=v.expert_metric,
        moe_neurons=v.moe_neurons,
    )


def prune_step(p, v: StudentVariant, corrected: str, scores: str) -> Step:
    from minitron_mcore.prune.command import PruneCommandConfig, prune

    c = PruneCommandConfig(
        load=corrected,
        scores=scores,
        save=p.path("students", v.name, "pruned"),
        prune=prune_config(v),
        overwrite=True,
        **_common(p),
    )
    return Step(f"prune.{v.name}", "prune", "prune", c, c.save, lambda: prune(c), v.name)


def teacher_logits_step(p, teacher: str) -> Step:
    """The teacher's stored top-k over the distillation data, in the students' sample order
    (the same data, ``distill.train`` and seed keys as their runs)."""
    from minitron_mcore.stages.teacher_logits import StoredKD, TeacherLogitsConfig, teacher_logits

    cfg = p.cfg
    c = TeacherLogitsConfig(
        load=teacher,
        save=p.path("teacher-logits"),
        data=stage_data(cfg, "distill"),
        train=cfg.distill.train,
        distill=StoredKD(
            top_k=cfg.pipeline.offline_top_k, precision=cfg.pipeline.offline_precision
        ),
        **_common(p),  # (no overwrite: a killed run's complete shards are kept)
    )
    return Step(
        "teacher-logits", "teacher-logits", "teacher-logits", c, c.save, lambda: teacher_logits(c)
    )


def distill_step(p, v: StudentVariant, pruned: str, teacher: str, logits: str = "") -> Step:
    from minitron_mcore.stages.distill import DistillConfig, distill

    cfg = p.cfg
    c = DistillConfig(
        load=pruned,
        teacher=teacher,
        save=p.path("students", v.name, "distilled"),
        distill=cfg.distill.distill,
        data=stage_data(cfg, "distill"),
        train=cfg.distill.train,
        teacher_logits=logits,
        **_common(p),
    )
    step = Step(f"distill.{v.name}", "distill", "distill", c, c.save, lambda: distill(c), v.name)
    step.tokens = train_tokens(c.train)
    return step


# ------------------------------------------------------------------------- measuring


def _lm_eval_include(e) -> list:
    if e.lm_eval_include:
        return list(e.lm_eval_include)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    bundled = os.path.join(here, "examples", "lm_eval_tasks")
    return [bundled] if os.path.isdir(bundled) else []


def evaluate_step(p, name: str, ckpt: str, corpus: str) -> Step:
    from minitron_mcore.evaluate import EvaluateConfig, evaluate

    e = p.cfg.evaluate
    tasks = list(e.lm_eval_tasks) if corpus == "distill" else []
    c = EvaluateConfig(
        load=ckpt,
        save=p.path("eval", f"{name}.{corpus}"),
        data=stage_data(p.cfg, corpus),
        seq_length=e.seq_length,
        global_batch_size=e.global_batch_size,
        micro_batch_size=e.micro_batch_size,
        iters=e.iters,
        held_out=True,
        lm_eval_tasks=tasks,
        lm_eval_include=_lm_eval_include(e) if tasks else [],
        lm_eval_limit=e.lm_eval_limit,
        **_common(p),
    )
    variant = name.split(".")[0] if "." in name else ""
    step = Step(f"evaluate.{name}.{corpus}", "evaluate", "evaluate", c, c.save, None, variant)
    step.run = lambda: dict(evaluate(c), model=name, corpus=corpus)
    return step


def _export_and_time(c, new_tokens: int) -> dict:
    """Rank 0 exports (one process writes the HF directory) and times greedy generation with
    stock transformers; every rank returns the same metrics."""
    import torch.distributed as dist

    from minitron_mcore.checkpoint.convert import write_hf_export
    from minitron_mcore.evaluate.speed import generation_speed
    from minitron_mcore.parallel import fail_together

    out = [None]

    def work():
        m = write_hf_export(c)
        m.update(generation_speed(c.save, new_tokens))
        out[0] = m

    fail_together(work, rank0_only=True)  # a failure on rank 0 reaches every rank at once
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(out, src=0)
    return out[0]


def export_step(p, name: str, ckpt: str) -> Step:
    from minitron_mcore.checkpoint.convert import ExportHFConfig

    c = ExportHFConfig(load=ckpt, save=p.path("hf", name), dtype=p.cfg.export_dtype, overwrite=True)
    tokens = p.cfg.evaluate.generate_tokens
    variant = "" if name == "teacher" else name
    return Step(
        f"export.{name}",
        "export",
        "export-hf",
        c,
        c.save,
        lambda: _export_and_time(c, tokens),
        variant,
    )


def report_step(p) -> Step:
    from minitron_mcore.pipeline.report import write_report

    out = os.path.join(p.run, "report.md")
    cfg, steps = p.cfg, p.steps  # (the planner's list: every step by the time it runs)
    return Step(
        "report",
        "report",
        "",
        {"run_dir": p.run},
        out,
        lambda: write_report(cfg, steps),
        owned=[out, os.path.join(p.run, "plots")],
    )
