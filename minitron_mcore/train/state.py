"""Training checkpoints: weights + optimizer + scheduler + data position + RNG, for exact resume.

A training checkpoint is an ordinary checkpoint directory (see ``checkpoint.megatron``) whose
versions are named ``iter_<step>`` and hold, besides the weights:

    optim/             optimizer state (dist_checkpointing, sharded like the model)
    train_state.json   iteration, consumed samples, scheduler state, run signature
    rng/rank_N.json    every rank's RNG states (Python, NumPy, torch, Megatron tracker)

A version becomes current only once complete (``checkpoint.megatron.save_checkpoint``), so a
crash while saving leaves the previous checkpoint as the latest.
"""

from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from minitron_mcore.checkpoint.layout import (
    META_FILE,
    CheckpointMeta,
    newest_training_version,
    reading_checkpoint,
    resolve_checkpoint,
)
from minitron_mcore.checkpoint.megatron import dist_save, load_weights, save_checkpoint
from minitron_mcore.errors import require
from minitron_mcore.parallel import fail_together, is_rank0
from minitron_mcore.utils.log import log0

OPTIM_DIR = "optim"
# The distributed optimizer's state is stored in the model's (global) layout, so a run can be
# resumed on a different TP/PP/DP layout; Megatron's default format for it needs a flattened
# layout this Megatron version no longer accepts.
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}
TRAIN_STATE = "train_state.json"
RNG_DIR = "rng"


def _resumable(version_dir: str) -> bool:
    return all(os.path.isfile(os.path.join(version_dir, f)) for f in (META_FILE, TRAIN_STATE))


def resume_source(home: str) -> Optional[str]:
    """The version of checkpoint directory ``home`` a run resumes from, or None.

    Read-only, so every rank reaches the same answer before the process group exists: the
    newest complete training version, including one a killed save had finished but not yet
    made current (the next save makes it current, ``checkpoint.megatron.recover_home``)."""
    home = home.rstrip("/")
    if os.path.isfile(os.path.join(home, META_FILE)) and _resumable(home):
        return home  # a single version (an old flat checkpoint, or load=CKPT/iter_N)
    root = home if os.path.isdir(home) else home + ".partial"
    newest = (
        newest_training_version(root, (META_FILE, TRAIN_STATE)) if os.path.isdir(root) else None
    )
    return os.path.join(root, newest[1]) if newest else None


def has_train_state(path: str) -> bool:
    return resume_source(path) is not None


def read_train_state(path: str) -> dict:
    return read_train_state_at(resolve_checkpoint(path))


def read_train_state_at(version_dir: str) -> dict:
    """``train_state.json`` of one checkpoint version directory."""
    with open(os.path.join(version_dir, TRAIN_STATE)) as f:
        return json.load(f)


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    np_state = np.random.get_state()
    tracker = tensor_parallel.get_cuda_rng_tracker().get_states()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *map(float, np_state[2:])],
        "torch": torch.get_rng_state().tolist(),
        "tracker": {
            k: (v.get_state() if isinstance(v, torch.Generator) else v).tolist()
            for k, v in tracker.items()
        },
    }
    if torch.cuda.is_available():  # the default CUDA generator (on CPU it *is* torch's)
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def _set_rng_state(s: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))
    kind, key, pos, has_gauss, cached = s["numpy"]
    np.random.set_state(
        (kind, np.asarray(key, dtype=np.uint32), int(pos), int(has_gauss), float(cached))
    )
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))
    tensor_parallel.get_cuda_rng_tracker().set_states(
        {k: torch.tensor(v, dtype=torch.uint8) for k, v in s["tracker"].items()}
    )


def save_training_checkpoint(
    path: str,
    model,
    optimizer,
    scheduler,
    meta: CheckpointMeta,
    train_state: dict,
    tokenizer_files: list[str],
    keep: int = 2,
) -> None:
    """Collective save of everything needed to resume, as version ``iter_<step>``; the
    ``keep`` newest versions are kept."""

    def extra(tmp: str) -> None:
        # The file operations of single ranks go through fail_together (one rank's failure is
        # every rank's at once); Megatron's optimizer save between them is collective.
        fail_together(lambda: os.makedirs(os.path.join(tmp, OPTIM_DIR), exist_ok=True))
        model_sd = model.sharded_state_dict()
        dist_save(
            optimizer.sharded_state_dict(model_sd, metadata=_OPTIM_METADATA),
            os.path.join(tmp, OPTIM_DIR),
        )

        def own_files():
            os.makedirs(os.path.join(tmp, RNG_DIR), exist_ok=True)
            with open(os.path.join(tmp, RNG_DIR, f"rank_{dist.get_rank()}.json"), "w") as f:
                json.dump(_rng_state(), f)
            if is_rank0():
                state = dict(
                    train_state, scheduler=scheduler.state_dict(), world_size=dist.get_world_size()
                )
                with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
                    json.dump(state, f, indent=2)

        fail_together(own_files)

    tag = f"iter_{int(train_state['iteration']):07d}"
    save_checkpoint(model, path, meta, tokenizer_files, extra=extra, tag=tag, keep=keep)


def load_training_checkpoint(path: str, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and (same world size) RNG state from ``path``."""
    from minitron_mcore.checkpoint.safe_load import dist_load

    load_weights(model, path)
    version = resolve_checkpoint(path)
    train_state = read_train_state_at(version)
    optim_dir = os.path.join(version, OPTIM_DIR)
    require(
        os.path.isdir(optim_dir),
        f"{path} has no optimizer state ({OPTIM_DIR}/); it cannot "
        "be resumed - start a new run with another save=",
    )
    with reading_checkpoint(optim_dir):
        model_sd = model.sharded_state_dict()
        sharded = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPTIM_METADATA)
        state = dist_load(sharded, optim_dir)
    optimizer.load_state_dict(state)
    scheduler.load_state_dict(train_state["scheduler"])
    rng_file = os.path.join(version, RNG_DIR, f"rank_{dist.get_rank()}.json")
    if train_state.get("world_size") == dist.get_world_size() and os.path.isfile(rng_file):
        with open(rng_file) as f:
            _set_rng_state(json.load(f))
    else:
        log0("resume: different world size than the saved run; RNG streams restart from the seed")
    return train_state
