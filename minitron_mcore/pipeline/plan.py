"""The pipeline as a list of steps: each one a single command's config, its output, and the
command's own function. :func:`plan` turns a ``PipelineConfig`` (and the teacher's shape, read
once by the runner) into steps, reading nothing but whether the teacher is a Hugging Face
directory, so a dry run, the runner and the report all see the same commands.

Layout of the run directory::

    tokenizer/                  the default run's tokenizer (BPE trained on the original data)
    teacher/                    the imported (or pretrained) teacher
    teacher-corrected/          after teacher correction
    scores/                     importance scores
    teacher-logits/             the corrected teacher's stored top-k (pipeline.offline_logits)
    students/<name>/pruned/     each student variant, pruned ...
    students/<name>/distilled/  ... and distilled
    eval/<model>.<corpus>/      validation metrics of every model on both corpora
    hf/<model>/                 Hugging Face exports (the corrected teacher and the students)
    stages/<step>.json          done-markers: the resolved config it ran with + metrics
    report.md, plots/           the report
"""

from __future__ import annotations

from minitron_mcore.pipeline import steps as S
from minitron_mcore.pipeline.config import PipelineConfig
from minitron_mcore.pipeline.step import Planner, Step


def plan(cfg: PipelineConfig, teacher) -> list[Step]:
    """Every step of the run, in order; ``teacher``: the teacher's ``ModelArch``."""
    p = Planner(cfg, teacher)
    teacher, _tokenizer = S.teacher_steps(p)
    corrected = p.add(S.correct_step(p, teacher), passthrough=teacher)
    scores = p.add(S.importance_step(p, corrected))
    models = {"teacher": teacher}
    if corrected != teacher:
        models["teacher-corrected"] = corrected
    students = {}
    logits = ""
    if cfg.pipeline.offline_logits and cfg.students:  # once, shared by every student
        logits = p.add(S.teacher_logits_step(p, corrected))
    for v in cfg.students:
        pruned = p.add(S.prune_step(p, v, corrected, scores))
        distilled = p.add(S.distill_step(p, v, pruned, corrected, logits), passthrough=pruned)
        models[f"{v.name}.pruned"] = pruned
        if distilled != pruned:
            models[f"{v.name}.distilled"] = distilled
        students[v.name] = distilled
    for name, ckpt in models.items():
        for corpus in ("distill", "original"):
            p.add(S.evaluate_step(p, name, ckpt, corpus))
    for name, ckpt in [("teacher", corrected)] + list(students.items()):
        p.add(S.export_step(p, name, ckpt))
    p.add(S.report_step(p))
    return p.steps
