"""Is this the same run? Resume decisions for the training stages.

A training checkpoint stores the *run signature*: every setting that decides which samples a
step reads and what the update computes (schedule, batch, sequence, optimizer, data, seed, the
source checkpoint, the model or stage-specific settings). Re-running a command with the same
``save=`` compares the signatures before any work starts:

* identical and unfinished: resume exactly where it stopped;
* identical and finished: nothing to do - the stored metrics are printed again and the
  checkpoint (with its ``checkpoint_id``, which importance scores refer to) is left untouched;
* different: one error naming the key and both values. ``resume_override=[key, ...]`` continues
  with the new values on purpose (e.g. a longer ``train.steps``); schedule keys then restart
  Megatron's LR schedule from the new values (``override_opt_param_scheduler``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from minitron_mcore.errors import MinitronError, require

SCHEDULE_KEYS = (
    "train.steps",
    "train.lr",
    "train.min_lr",
    "train.warmup_steps",
    "train.decay_style",
    "train.weight_decay",
)


def _data_entries(entries) -> list:
    """Paths made absolute (the same data written two ways is the same run)."""
    out = []
    for e in entries:
        is_path = isinstance(e, str) and not e.startswith("demo:")
        out.append(os.path.abspath(e) if is_path else e)
    return out


def run_signature(stage: str, train, data, seed: int, dtype: str, **extra: Any) -> dict:
    """The settings that define a training run, as flat ``key: value`` pairs."""
    sig = {
        "stage": stage,
        "seed": seed,
        "train.precision": dtype,
        "data.train": _data_entries(data.train),
        "data.valid": _data_entries(data.valid),
        "data.split": data.split,
    }
    for key in (
        "steps",
        "lr",
        "min_lr",
        "warmup_steps",
        "decay_style",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "clip_grad",
        "global_batch_size",
        "seq_length",
        "hidden_dropout",
        "attention_dropout",
    ):
        sig[f"train.{key}"] = getattr(train, key)
    sig.update(extra)
    return json.loads(json.dumps(sig))  # the form it takes in train_state.json


def _show(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def check_same_run(saved: dict, now: dict, overrides: list, save: str) -> None:
    """One error for the first definitional difference that is not overridden."""
    unknown = sorted(set(overrides) - set(now))
    require(
        not unknown,
        f"resume_override={unknown} names keys that do not define a run; allowed: {sorted(now)}",
    )
    for key in sorted(set(saved) | set(now)):
        if key in overrides or saved.get(key) == now.get(key):
            continue
        raise MinitronError(
            f"save={save} holds a run with {key}={_show(saved.get(key))}, but this command "
            f"has {key}={_show(now.get(key))}; re-run with the original value, choose a new "
            f"save=, or pass resume_override=[{key}] to continue with the new value on purpose"
        )


@dataclass
class ResumePlan:
    source: Optional[str] = None
    """The checkpoint version to resume from (None: start fresh)."""
    finished: Optional[dict] = None
    """Set when the saved run is already complete: its final metrics."""
    override_schedule: bool = False
    """Restart the LR schedule from the new settings instead of the checkpoint's."""


def plan_resume(save: str, resume: str, overwrite: bool, signature: dict, overrides) -> ResumePlan:
    """Decide between resuming, reporting a finished run and starting fresh; refuse to
    clobber outputs. Decided on rank 0 and given to every rank (``parallel.rank0_decides``):
    ranks listing the directory each on their own could pick different versions."""
    from minitron_mcore.parallel import rank0_decides

    require(resume in ("auto", "never"), f"resume={resume!r}: use auto or never")
    return rank0_decides(lambda: _plan(save, resume, overwrite, signature, overrides))


def _plan(save: str, resume: str, overwrite: bool, signature: dict, overrides) -> ResumePlan:
    from minitron_mcore.train.state import read_train_state_at, resume_source

    overrides = [str(k) for k in overrides]
    source = resume_source(save) if resume == "auto" else None
    if source is None:
        require(
            overwrite or not os.path.exists(save),
            f"save={save} already exists and is not a resumable run of this "
            "command; choose a new directory or pass overwrite=true",
        )
        return ResumePlan()
    state = read_train_state_at(source)
    saved = state.get("signature")
    require(
        saved is not None,
        f"save={save} was written by an older version that did not record its settings; "
        "choose a new save= (or pass resume=never overwrite=true to start over)",
    )
    check_same_run(saved, signature, overrides, save)
    require(
        saved.get("train.seq_length") == signature.get("train.seq_length"),
        f"resume_override=[train.seq_length] cannot continue the run in save={save}: its data "
        f"position counts samples of {saved.get('train.seq_length')} tokens, and the samples of "
        f"{signature.get('train.seq_length')} tokens are other ones; start a new run (another "
        "save=, or load= its checkpoint)",
    )
    if state["iteration"] >= signature["train.steps"]:
        metrics = state.get("final_metrics") or {"step": state["iteration"]}
        return ResumePlan(source=source, finished=dict(metrics, already_finished=True))
    return ResumePlan(source=source, override_schedule=bool(set(overrides) & set(SCHEDULE_KEYS)))
