"""The training engine every training stage uses (pretrain, correct, distill).

Megatron does the heavy lifting (schedules, DDP, optimizer, LR schedule); the engine adds the
data position, validation, logging, checkpoints, exact resume and clean preemption. A stage
hands over a :class:`TrainJob` whose :class:`~minitron_mcore.train.step.Objective` says what is
optimised (the LM loss by default, the KD loss for distillation). The pieces are separate so a
stage can use them one by one (``distill`` validates its teacher between set-up and the loop):

    trainer = Trainer(job)   # set-up: DDP, optimizer, schedule, resume, data, logger
    trainer.validate()       # named validation losses, the same on every rank
    trainer.train_step(i)    # one optimizer step -> named training losses
    trainer.save(i)          # a resumable checkpoint version
    trainer.run()            # the loop: steps, validation, saves, preemption -> final metrics
"""

from __future__ import annotations

import dataclasses
import math
import signal
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from minitron_mcore.checkpoint.megatron import CheckpointMeta
from minitron_mcore.data.datasets import DataConfig, GlobalBatches, build_datasets
from minitron_mcore.data.tokenizer import Tokenizer
from minitron_mcore.errors import MinitronError
from minitron_mcore.parallel import device
from minitron_mcore.train import fast_paths, optim, sigterm_received
from minitron_mcore.train.config import TrainConfig
from minitron_mcore.train.logger import RunLogger
from minitron_mcore.train.state import load_training_checkpoint, save_training_checkpoint
from minitron_mcore.train.step import (
    LM,
    Objective,
    lm_forward_step,
    lm_objective,
    reduce_reports,
    run_schedule,
    train_step,
)
from minitron_mcore.utils.log import log0


@dataclass
class TrainJob:
    """Everything a stage hands to the engine."""

    stage: str
    model: torch.nn.Module  # this rank's GPTModel (already holding initial weights)
    meta: CheckpointMeta
    tokenizer: Tokenizer
    train: TrainConfig
    data: DataConfig
    save: str
    seed: int
    objective: Optional[Objective] = None  # default: the language-model loss
    resume_from: Optional[str] = None  # a training checkpoint (version) to continue
    signature: dict = field(default_factory=dict)  # what defines the run (train/resume.py)
    override_schedule: bool = False  # resume with new schedule settings (resume_override)
    extra_metrics: dict = field(default_factory=dict)


class _Preemption:
    """SIGTERM (SLURM preemption / time limit) asks for a checkpoint at the next step. The
    flag travels with the step's loss reports (:func:`share_reports`): one collective a step
    tells every rank both."""

    def __init__(self):
        self.requested = sigterm_received()  # one that came before the loop ran
        self._old = signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._old)


def share_reports(reports: dict[str, float], names, flag: bool = False):
    """Reports live on the last pipeline stage; give every rank the same values (NaN is
    carried as +inf, so a diverged loss is seen everywhere), and OR ``flag`` (a rank's
    preemption request) over all ranks in the same all-reduce - one collective and one host
    sync per step. Returns ``({name: value}, any rank's flag)``."""
    vals = [reports.get(n, -math.inf) for n in names]
    vals = [math.inf if math.isnan(v) else v for v in vals] + [1.0 if flag else 0.0]
    t = torch.tensor(vals, dtype=torch.float64, device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    out = t.tolist()
    return dict(zip(names, out[:-1])), out[-1] > 0


@torch.no_grad()
def validate(model, forward_step, batches, seq_length: int, shapes_fn=None) -> dict:
    """Token-mean validation losses ``{name: value}`` over fixed batches, on every rank (the
    model's train/eval mode is restored afterwards)."""
    from megatron.core import parallel_state as ps

    was_training = model.training
    model.eval()
    losses = []
    for mbs in batches:
        losses += run_schedule(model, forward_step, mbs, seq_length, True, shapes_fn)
    reports = {}
    if ps.is_pipeline_last_stage():
        reports = reduce_reports(losses, ps.get_data_parallel_group())
    names = [None]
    if dist.get_rank() == dist.get_world_size() - 1:  # the last rank is on the last stage
        names = [sorted(reports)]
    dist.broadcast_object_list(names, src=dist.get_world_size() - 1)
    model.train(was_training)
    return share_reports(reports, names[0])[0]


def evaluate(model, forward_step, batches: list[list[dict]], seq_length: int) -> float:
    """The mean LM loss over fixed batches (every rank returns the same number)."""
    return validate(model, forward_step, batches, seq_length)[LM]


class Diverged(MinitronError):
    """The optimised loss of step ``step`` is not finite; that step was not applied."""

    def __init__(self, step: int, what: str, saved: str = ""):
        self.step, self.what = step, what
        super().__init__(
            f"training diverged at step {step} ({what}); the step was not applied"
            + (f" and the last good step {step - 1} is saved in {saved}" if saved else "")
            + "; lower train.lr or check the data and the weights for NaN/Inf"
        )


def _log_name(name: str) -> str:
    return name.replace(" ", "_")


class Trainer:
    """Set-up happens in the constructor; see the module docstring for the pieces."""

    def __init__(self, job: TrainJob):
        from megatron.core import parallel_state as ps

        self.job, cfg = job, job.train
        self.objective = job.objective or lm_objective(job.meta.arch.vocab_size)
        use_dist_opt = fast_paths.use_distributed_optimizer(cfg)
        self.ddp = optim.wrap_ddp(job.model, job.model.config, use_dist_opt, cfg)
        self.opt = optim.build_optimizer(self.ddp, cfg, job.model.config, use_dist_opt)
        self.sched = optim.build_scheduler(self.opt, cfg, cfg.steps, job.override_schedule)
        optim.attach_to_config(job.model.config, self.ddp, self.opt)
        self.model = self.objective.schedule_model(self.ddp)
        self.start = self.consumed = 0  # steps done, samples consumed (Megatron-LM's
        # consumed_train_samples: with resume_override=[train.global_batch_size] the two differ)
        if job.resume_from:
            # Weights go through the unwrapped model: DDP's names carry a 'module.' prefix.
            state = load_training_checkpoint(job.resume_from, job.model, self.opt, self.sched)
            self.start = state["iteration"]
            self.consumed = int(state.get("consumed_samples", self.start * cfg.global_batch_size))
            log0(
                "resumed %s at step %d/%d (%d samples consumed)",
                job.resume_from,
                self.start,
                cfg.steps,
                self.consumed,
            )
        self._build_data(ps.get_data_parallel_rank(), ps.get_data_parallel_world_size())
        self.log_dir = cfg.log_dir or job.save.rstrip("/") + ".logs"
        self.logger = RunLogger(
            self.log_dir,
            cfg.steps,
            self.start,
            cfg.global_batch_size * cfg.seq_length,
            cfg.tensorboard,
            cfg.wandb,
            cfg.wandb_project,
            job.stage,
            cfg.log_interval,
            config=dataclasses.asdict(cfg),
        )
        self.tok_files = job.tokenizer.files()
        self._preempt: Optional[_Preemption] = None  # SIGTERM handling while run() runs
        self.stop_requested = False  # a rank asked to stop (set by each train_step)

    def _build_data(self, dp_rank: int, dp: int) -> None:
        cfg = self.job.train
        train_ds, valid_ds = build_datasets(
            self.job.data,
            self.job.tokenizer,
            cfg.seq_length,
            self.job.seed,
            train_samples=self.consumed + (cfg.steps - self.start) * cfg.global_batch_size,
            valid_samples=cfg.eval_iters * cfg.global_batch_size,
        )
        gbs, mbs = cfg.global_batch_size, cfg.micro_batch_size
        self.batches = GlobalBatches(train_ds, gbs, mbs, dp_rank, dp)
        self.eval_batches = []
        if valid_ds is not None and cfg.eval_iters > 0:
            vb = GlobalBatches(valid_ds, gbs, mbs, dp_rank, dp)
            self.eval_batches = [vb.get(i) for i in range(cfg.eval_iters)]

    # -- the pieces
    def validate(self, forward_step=None, batches=None, model=None) -> dict:
        """Named validation losses (``forward_step`` default: the objective's; ``model``
        default: what training runs - another one, e.g. the teacher alone, runs unwidened)."""
        obj = self.objective
        step_fn = forward_step or obj.eval_step or obj.forward_step
        with optim.synced_params(self.ddp):
            return validate(
                self.model if model is None else model,
                step_fn,
                self.eval_batches if batches is None else batches,
                self.job.train.seq_length,
                obj.adjust_tensor_shapes_fn if model is None else None,
            )

    def train_step(self, step: int) -> dict:
        """Optimizer step ``step`` (1-based): ``{name: value}`` plus ``lr`` and ``grad_norm``,
        the same on every rank; one error if the optimised loss is not finite."""
        obj, values = self.objective, {}

        def finite(reports):  # checked before the update: a NaN loss never reaches the weights
            names = sorted(reports) if reports else None
            asked = self._preempt is not None and self._preempt.requested  # as late as can be
            shared, self.stop_requested = share_reports(reports, self._report_names(names), asked)
            values.update(shared)
            return math.isfinite(values[obj.primary])

        reports, grad_norm, lr = train_step(
            self.model,
            self.opt,
            self.sched,
            obj.forward_step,
            self.batches.get_at(self.consumed),
            self.job.train.seq_length,
            obj.adjust_tensor_shapes_fn,
            accept=finite,
        )
        if not math.isfinite(values[obj.primary]):
            raise Diverged(step, f"{obj.primary} {values[obj.primary]}")
        self.consumed += self.job.train.global_batch_size
        return dict(values, lr=lr, grad_norm=float(grad_norm or 0.0))

    def _report_names(self, local: Optional[list]) -> list:
        """The training report names (known on the last stage) shared once with every rank."""
        if getattr(self, "_names", None) is None:
            names = [local]
            dist.broadcast_object_list(names, src=dist.get_world_size() - 1)
            self._names = names[0]
        return self._names

    def save(self, step: int, final_metrics: Optional[dict] = None) -> None:
        job, cfg = self.job, self.job.train
        train_state = {
            "iteration": step,
            "consumed_samples": self.consumed,
            "stage": job.stage,
            "steps": cfg.steps,
            "lr": cfg.lr,
            "min_lr": cfg.min_lr,
            "global_batch_size": cfg.global_batch_size,
            "seq_length": cfg.seq_length,
            "seed": job.seed,
            "signature": job.signature,
        }
        if final_metrics is not None:
            train_state["final_metrics"] = final_metrics
        meta = job.meta.with_step(job.stage, iteration=step, steps=cfg.steps)
        meta = dataclasses.replace(meta, train_state=train_state)
        with optim.synced_params(self.ddp):  # the weights of this step on every rank
            save_training_checkpoint(
                job.save,
                job.model,
                self.opt,
                self.sched,
                meta,
                train_state,
                self.tok_files,
                cfg.keep_checkpoints,
            )

    def _validate_and_log(self, step: int, val: dict) -> None:
        val[step] = self.validate()
        primary = self.objective.primary
        row = {"valid/loss": val[step][primary]}
        row.update({f"valid/{_log_name(k)}": v for k, v in val[step].items() if k != primary})
        self.logger.scalars(step, row)
        log0("step %d validation %s", step, ", ".join(f"{k} {v:.4f}" for k, v in val[step].items()))

    def run(self) -> dict:
        """Train to ``train.steps`` (from the resumed step); final metrics."""
        cfg, primary = self.job.train, self.objective.primary
        val, first, last = {}, None, None
        if self.eval_batches and self.start == 0:
            self._validate_and_log(0, val)
        preempt = self._preempt = _Preemption()
        t0, step, preempted = time.time(), self.start, False
        saved = self.start  # the last step with a checkpoint
        try:
            for step in range(self.start + 1, cfg.steps + 1):
                try:
                    values = self.train_step(step)
                except Diverged as e:  # stop, with a checkpoint of the last good step
                    if step - 1 > saved:
                        self.save(step - 1)
                    if step > 1:
                        raise Diverged(e.step, e.what, self.job.save) from e
                    raise
                first, last = first or values, values
                self.logger.step(step, values, primary)
                if self.eval_batches and cfg.eval_interval and step % cfg.eval_interval == 0:
                    self._validate_and_log(step, val)
                if self.stop_requested:  # agreed on in the step's report all-reduce
                    log0("SIGTERM: saving a checkpoint at step %d and exiting", step)
                    self.save(step)
                    preempted = True
                    break
                if step < cfg.steps and cfg.save_interval and step % cfg.save_interval == 0:
                    self.save(step)
                    saved = step
            if not preempted:
                if self.eval_batches and step not in val:
                    self._validate_and_log(step, val)
                metrics = self._metrics(step, preempted, first, last, val, t0)
                self.save(step, final_metrics=metrics)
        finally:
            preempt.restore()
            self._preempt = None
            self.logger.close()
        if preempted:
            metrics = self._metrics(step, preempted, first, last, val, t0)
        return metrics

    def _metrics(self, step, preempted, first, last, val, t0) -> dict:
        cfg, primary = self.job.train, self.objective.primary
        elapsed = time.time() - t0
        done = max(step - self.start, 0)
        m = {
            "command": self.job.stage,
            "save": self.job.save,
            "step": step,
            "steps": cfg.steps,
            "preempted": preempted,
            "first_train_loss": first[primary] if first else math.nan,
            "train_loss": last[primary] if last else math.nan,
            "tokens_per_s": done * cfg.global_batch_size * cfg.seq_length / max(elapsed, 1e-9),
            "seconds": round(elapsed, 3),
            "lr": cfg.lr,
            "min_lr": cfg.min_lr,
            "warmup_steps": cfg.warmup_steps,
            "global_batch_size": cfg.global_batch_size,
            "log_dir": self.log_dir,
            **self.job.extra_metrics,
        }
        if last:
            m.update({f"train_{_log_name(k)}": v for k, v in last.items() if k in self._names})
        if val:
            final = val[max(val)]
            m["initial_valid_loss"] = val.get(0, val[min(val)])[primary]
            m["valid_loss"] = final[primary]
            m["valid_ppl"] = math.exp(min(final.get(LM, final[primary]), 50.0))
            m.update({f"valid_{_log_name(k)}": v for k, v in final.items()})
        return m


def run_training(job: TrainJob) -> dict:
    """Train ``job.model`` for ``job.train.steps`` steps; resumable; returns final metrics."""
    return Trainer(job).run()


__all__ = [
    "TrainJob",
    "Trainer",
    "evaluate",
    "lm_forward_step",
    "run_training",
    "validate",
]
