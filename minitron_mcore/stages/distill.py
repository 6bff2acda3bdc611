"""``minitron distill``: retrain a pruned student against a (corrected) teacher with knowledge
distillation (Minitron, arXiv 2407.14679 sec. 2.4; 2408.11796 sec. 3).

    minitron distill load=runs/student teacher=runs/teacher-corrected save=runs/student-kd \\
        data.train=[my.jsonl] train.steps=1000 train.lr=1e-4
    torchrun --nproc-per-node 4 -m minitron_mcore distill load=STUDENT teacher=TEACHER \\
        save=OUT data.train=[DATA] parallel.tp=2 parallel.pp=2

The teacher is loaded from its own checkpoint (any width and depth), frozen, optionally in
lower precision (``distill.teacher_dtype``), and sharded on the student's TP/PP layout; the
loss is the forward KL between their vocab-parallel logits at temperature 1 (the papers'
choice; ``distill.*`` selects reverse KL, top-k, temperature, a CE mix). Training is the engine
``pretrain`` and ``correct`` use: resume, SIGTERM, logs, checkpoints and ``train.*`` keys.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from minitron_mcore.checkpoint.layout import resolve_tokenizer_path
from minitron_mcore.checkpoint.megatron import load_model, read_meta
from minitron_mcore.data.datasets import require_data
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.distill import checks
from minitron_mcore.distill import intermediate as inter
from minitron_mcore.distill.losses import KDSpec
from minitron_mcore.distill.objective import HiddenLoss, kd_objective, offline_kd_objective
from minitron_mcore.errors import require
from minitron_mcore.models.build import dtype_name, resolve_dtype, train_dtype
from minitron_mcore.parallel import fail_together, parallel_context
from minitron_mcore.stages.common import (
    TrainingRunKeys,
    check_room_for_checkpoint,
    finished_run,
    train_job,
)
from minitron_mcore.stages.teacher_logits import open_stores
from minitron_mcore.train import fast_paths
from minitron_mcore.train.config import resolve_train_config
from minitron_mcore.train.loop import Trainer
from minitron_mcore.train.resume import plan_resume, run_signature
from minitron_mcore.train.step import lm_forward_step
from minitron_mcore.utils.log import emit_metrics, human_count, log0


@dataclass
class DistillOptions:
    """``distill.*``: the KD loss and the teacher's precision."""

    temperature: float = 1.0
    """Softmax temperature of both models (the loss is scaled by T^2); the papers use 1."""
    mode: str = "forward"
    """forward: KL(teacher || student), the papers' choice; reverse: KL(student || teacher)."""
    top_k: int = 0
    """> 0: distil only the teacher's k most likely tokens (renormalised; forward mode)."""
    ce_weight: float = 0.0
    """Weight of the student's cross entropy with the data, added to the KD loss."""
    chunk_tokens: int = 1024
    """Tokens per chunk of the loss: both models' logits exist for this many tokens at a time
    (the output layers are applied inside the chunks)."""
    teacher_dtype: str = "auto"
    """auto (the student's training precision), fp32 or bf16."""
    intermediate_weight: float = 0.0
    """Weight of the hidden-state (cosine) losses between student and teacher layers; 0 = off
    (logit-only KD, the papers' choice)."""
    intermediate_layers: list = field(default_factory=list)
    """Student layers (0-based) whose outputs are matched; empty = every student layer on the
    last pipeline stage. Teacher layers come from the prune plan's layer map."""
    intermediate_balance: bool = True
    """Rescale the hidden-state loss to the logit loss's magnitude before weighting."""
    offline_tail: bool = False
    """With ``teacher_logits=``: model the teacher's mass outside its stored top-k as one more
    outcome (temperature 1) instead of renormalising over the k (= the online top-k loss)."""


@dataclass
class DistillConfig(TrainingRunKeys):
    """``minitron distill``: knowledge distillation of a student from a teacher."""

    load: str = ""
    """The student checkpoint (typically written by ``minitron prune``)."""
    teacher: str = ""
    """The teacher checkpoint (typically the corrected one the student was pruned from)."""
    save: str = ""
    """Output checkpoint (resumed automatically if it holds this run's state)."""
    distill: DistillOptions = field(default_factory=DistillOptions)
    teacher_logits: str = ""
    """Stored teacher predictions (``minitron teacher-logits`` with this run's keys): the KD
    loss reads them and the teacher is not loaded (``teacher=`` still names it: the checks
    compare its tokenizer and the predictions' fingerprint)."""


def _spec(opts: DistillOptions, vocab_size: int) -> KDSpec:
    """The loss's spec (``KDSpec`` checks its keys) once the chunking is checked."""
    require(opts.chunk_tokens > 0, "distill.chunk_tokens must be positive")
    return KDSpec(vocab_size, opts.temperature, opts.mode, opts.top_k, opts.ce_weight)


def _teacher_dtype(opts: DistillOptions, student_dtype):
    if opts.teacher_dtype == "auto":
        return student_dtype
    require(
        opts.teacher_dtype in ("fp32", "bf16"),
        f"distill.teacher_dtype={opts.teacher_dtype!r}: use auto, fp32 or bf16",
    )
    return resolve_dtype(opts.teacher_dtype)


def _check_teacher(trainer: Trainer, teacher, teacher_path: str, vocab: int) -> dict:
    """The teacher's LM loss on the first validation batch (the load check) and on the whole
    validation set (logged once)."""
    batches = trainer.eval_batches or [trainer.batches.get(0)]
    step = lm_forward_step(vocab)
    first = trainer.validate(forward_step=step, batches=batches[:1], model=teacher)["lm loss"]
    checks.check_teacher_loss(first, vocab, teacher_path)
    full = trainer.validate(forward_step=step, batches=batches, model=teacher)["lm loss"]
    log0("teacher %s: validation loss %.4f (first batch %.4f)", teacher_path, full, first)
    trainer.logger.scalars(trainer.start, {"valid/teacher_lm_loss": full})
    return {"teacher_first_batch_loss": first, "teacher_valid_loss": full}


def _hidden_loss(opts: DistillOptions, student, teacher, smeta, tmeta) -> Optional[HiddenLoss]:
    """The intermediate losses of this rank (last pipeline stage only), projections attached
    to the student before DDP wraps it."""
    from megatron.core import parallel_state as ps

    if not opts.intermediate_weight:
        return None
    require(opts.intermediate_weight > 0, "distill.intermediate_weight must be >= 0")
    layers = [int(j) for j in opts.intermediate_layers]
    if not layers and ps.is_pipeline_last_stage():
        layers = sorted(inter.local_layers(student))
    pairs = []

    def check():  # the pairs live on the last stage; every rank learns the verdict at once
        if ps.is_pipeline_last_stage():
            arch_s, arch_t = smeta.arch, tmeta.arch
            pairs.extend(
                inter.layer_pairs(arch_s.num_layers, arch_t.num_layers, smeta.prune_plan, layers)
            )
            inter.check_on_stage(pairs, student, teacher)

    # Not on the last stage alone: its ranks would raise while the others wait in the next
    # collective until the process-group timeout (30 minutes under NCCL).
    fail_together(check)
    if not ps.is_pipeline_last_stage():
        return None
    hidden_kept = (smeta.prune_plan or {}).get("hidden")
    h_s, h_t = smeta.arch.hidden_size, tmeta.arch.hidden_size
    inter.attach_projections(student, pairs, h_s, h_t, hidden_kept)
    s_layers, t_layers = inter.local_layers(student), inter.local_layers(teacher)
    return HiddenLoss(
        pairs,
        inter.LayerOutputs(s_layers, [j for j, _ in pairs]),
        inter.LayerOutputs(t_layers, [i for _, i in pairs]),
        opts.intermediate_weight,
        opts.intermediate_balance,
    )


def distill(cfg: DistillConfig) -> dict:
    require(bool(cfg.teacher), "teacher= is empty; pass the teacher checkpoint directory")
    smeta, tmeta = read_meta(cfg.load), read_meta(cfg.teacher)
    checks.check_layout(smeta.arch, tmeta.arch, cfg.parallel.tp, cfg.parallel.pp)
    train = resolve_train_config(cfg.train, smeta.arch.max_position_embeddings, cfg.parallel)
    require(
        train.seq_length <= tmeta.arch.max_position_embeddings,
        f"train.seq_length={train.seq_length} exceeds the teacher's maximum sequence length",
    )
    require_data(cfg.data)
    tokenizer = Tokenizer(resolve_tokenizer_path(cfg.load))
    teacher_tok = Tokenizer(resolve_tokenizer_path(cfg.teacher))
    checks.check_tokenizers(tokenizer, teacher_tok, smeta.arch, tmeta.arch)
    spec = _spec(cfg.distill, tokenizer.vocab_size)  # the KD runs over the tokenizer's ids
    dtype = train_dtype(train.precision)
    teacher_dtype = _teacher_dtype(cfg.distill, dtype)
    signature = run_signature(
        "distill",
        train,
        cfg.data,
        cfg.seed,
        dtype_name(dtype),
        load=smeta.checkpoint_id,
        teacher=tmeta.checkpoint_id,
        # (offline_tail only where it is read: online runs keep their signature)
        distill={
            k: v
            for k, v in dataclasses.asdict(cfg.distill).items()
            if k != "offline_tail" or cfg.teacher_logits
        },
    )
    stores = None
    if cfg.teacher_logits:
        stores = open_stores(cfg.teacher_logits, cfg.teacher, cfg.data, train, cfg.seed)
        require(
            not cfg.distill.intermediate_weight,
            "distill.intermediate_weight needs the teacher's hidden states; stored predictions "
            "hold its logits only (drop teacher_logits= or the hidden-state loss)",
        )
        signature["teacher_logits"] = stores[0].info.fingerprint
    plan = plan_resume(cfg.save, cfg.resume, cfg.overwrite, signature, cfg.resume_override)
    if plan.finished:
        return finished_run(plan, cfg.save)
    check_room_for_checkpoint(cfg.save, smeta.arch)
    pruned_from_teacher = checks.check_provenance(smeta, tmeta, cfg.teacher)
    with parallel_context(cfg.parallel, cfg.seed):
        log0(
            "distill: student %s (%s params) <- teacher %s (%s params, %s), %s KL, T=%g",
            cfg.load,
            human_count(smeta.arch.num_params()),
            cfg.teacher,
            human_count(tmeta.arch.num_params()),
            dtype_name(teacher_dtype),
            spec.mode,
            spec.temperature,
        )
        student, _ = load_model(cfg.load, dtype, **fast_paths.model_kwargs(train, cfg.parallel))
        if stores is not None:  # no teacher in memory
            teacher = None
            objective = offline_kd_objective(*stores, spec, cfg.distill.offline_tail)
        else:
            # The teacher runs in the student's schedule: the same sequence split between stages.
            sp = student.config.sequence_parallel
            teacher, _ = load_model(cfg.teacher, teacher_dtype, sequence_parallel=sp)
            hidden = _hidden_loss(cfg.distill, student, teacher, smeta, tmeta)
            objective = kd_objective(teacher, spec, cfg.distill.chunk_tokens, hidden)
        job = train_job(
            "distill",
            cfg,
            plan,
            signature,
            student,
            dataclasses.replace(smeta, dtype=dtype_name(dtype)),
            tokenizer,
            train,
            objective=objective,
            extra_metrics={
                "teacher": cfg.teacher,
                "pruned_from_teacher": pruned_from_teacher,
                "teacher_logits": cfg.teacher_logits or None,
            },
        )
        trainer = Trainer(job)
        if teacher is not None:
            job.extra_metrics.update(_check_teacher(trainer, teacher, cfg.teacher, spec.vocab_size))
        metrics = trainer.run()
    emit_metrics(metrics, cfg.save)
    return metrics
