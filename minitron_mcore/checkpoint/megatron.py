"""Megatron checkpoints: ``dist_checkpointing`` weights + a JSON sidecar + the tokenizer.

A checkpoint directory ``CKPT`` (what ``save=`` names and ``load=`` reads) holds one or more
complete *versions* and a tracker naming the current one::

    CKPT/minitron.json            the tracker: the current version's sidecar + ``"version"``
    CKPT/iter_0000010/            a complete, self-contained version (any one can be loaded):
        minitron.json             model arch, dtype, prune plan, provenance, training state
        weights/                  Megatron dist_checkpointing (torch_dist): global tensors
        tokenizer/                the Hugging Face tokenizer files
        optim/ rng/ train_state.json   (training runs: what exact resume needs)
    CKPT/iter_0000005/            an older version (``train.keep_checkpoints``)

A save writes the new version into ``CKPT/<version>.partial``, renames it to ``CKPT/<version>``
once every rank has finished, and then replaces the tracker in one atomic file rename; only
after that are versions beyond ``keep`` deleted. So at every instant ``CKPT/minitron.json``
names a complete version, and a crash anywhere (see :func:`save_checkpoint` and the kill test in
tests/test_checkpoint_safety.py) leaves either the previous or the new checkpoint loadable.
The first save of a new ``CKPT`` builds the whole directory as ``CKPT.partial`` and renames it.
(Megatron-LM uses iteration directories and a tracker file the same way; a flat directory with
``minitron.json`` and ``weights/`` at its top, as written by earlier versions, still loads.)

The weights are global tensors, so a checkpoint saved at one TP/PP loads at any other (Megatron
reshards on load). Loading goes through :mod:`.safe_load`: no code stored in a checkpoint runs.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import shutil
import uuid
from typing import Optional

import torch

# The public names of a checkpoint's layout and parts, importable from here as they always were
# (tests, benchmarks, examples); the package imports them from their own modules.
from minitron_mcore.checkpoint.commit import atomic_swap, commit_version, recover_home  # noqa: F401
from minitron_mcore.checkpoint.layout import (  # noqa: F401
    META_FILE,
    TOKENIZER_DIR,
    VERSION_RE,
    WEIGHTS_DIR,
    CheckpointMeta,
    check_checkpoint_dir,
    check_save_target,
    current_version,
    read_meta,
    reading_checkpoint,
    resolve_checkpoint,
    tokenizer_files_of,
)
from minitron_mcore.checkpoint.reader import WeightsReader  # noqa: F401
from minitron_mcore.checkpoint.shards import copy_into_shards, fill_model, shards_by_layer  # noqa: F401
from minitron_mcore.errors import require
from minitron_mcore.parallel import fail_together, is_rank0
from minitron_mcore.utils.faults import fault_point
from minitron_mcore.utils.log import log0


def _in_process_write_results() -> None:
    """Megatron's torch_dist writer collects write results in a multiprocessing Manager queue,
    a server process meant for asynchronous saves that outlives a SIGKILLed run (one orphan per
    killed process). Saves here are synchronous: an in-process queue does the same job."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    model,
    path: str,
    meta: CheckpointMeta,
    tokenizer_files=(),
    extra=None,
    tag: Optional[str] = None,
    keep: int = 1,
) -> None:
    """Collective: every rank writes its shards; rank 0 writes the sidecar and commits.

    ``tokenizer_files`` are copied into ``tokenizer/`` (see :func:`tokenizer_files_of`).
    ``extra(tmp_dir)``, if given, is called on every rank to add more files (training state)
    before the version is committed. ``tag`` names the version (``iter_0000010`` for training;
    default a fresh ``release-<id>``); ``keep`` training versions are kept (the module
    docstring describes the layout and why every instant of a save is safe)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    _in_process_write_results()
    ident = [uuid.uuid4().hex]  # one id for all ranks: it names the version's directory
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(ident, src=0)
    meta = dataclasses.replace(
        meta,
        checkpoint_id=ident[0],
        saved_tp=ps.get_tensor_model_parallel_world_size(),
        saved_pp=ps.get_pipeline_model_parallel_world_size(),
        version="",
    )
    tag = tag or f"release-{meta.checkpoint_id[:8]}"
    require(VERSION_RE.match(tag) is not None, f"bad checkpoint version name {tag!r}")
    home = path.rstrip("/")

    # Rank 0's file operations go through fail_together: should one fail (a full disk), every
    # rank raises at once instead of waiting for rank 0 at a barrier until the timeout.
    def recover():
        recover_home(home)
        if not os.path.exists(home):  # partial writes of earlier first saves
            for stale in glob.glob(glob.escape(home) + ".*.partial"):
                shutil.rmtree(stale, ignore_errors=True)

    fail_together(recover, rank0_only=True)
    # The version is written inside an existing checkpoint directory, or beside a new one.
    inside = current_version(home) is not None
    tmp = os.path.join(home, tag + ".partial") if inside else f"{home}.{tag}.partial"

    def make_tmp():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
        fault_point("save:tmp-created")

    def rank_files():  # after Megatron's collective save: this rank's own additions
        fault_point("save:weights-written")
        if extra is not None:
            extra(tmp)
            fault_point("save:extra-written")

    def commit():
        with open(os.path.join(tmp, META_FILE), "w") as f:
            f.write(meta.to_json())
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        for f in tokenizer_files:
            shutil.copy2(f, os.path.join(tmp, TOKENIZER_DIR))
        fault_point("save:sidecar-written")
        commit_version(tmp, home, tag, meta, keep)
        log0("saved checkpoint %s (%s)", home, tag)

    fail_together(make_tmp, rank0_only=True)
    try:
        dist_save(model.sharded_state_dict(), os.path.join(tmp, WEIGHTS_DIR))
        fail_together(rank_files)
        fail_together(commit, rank0_only=True)
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def dist_save(sharded_state_dict, directory: str) -> None:
    """``dist_checkpointing.save``, fully parallel over data-parallel replicas: the tensors
    every replica holds are written by one replica each, spread evenly over them (Megatron-LM's
    ``--ckpt-fully-parallel-save``), instead of all by the first replica."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.serialization import get_default_save_sharded_strategy
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelSaveStrategyWrapper,
    )

    from minitron_mcore.checkpoint.safe_load import replica_group

    strategy, group = None, replica_group()
    if group is not None:
        strategy = FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)
    dist_checkpointing.save(sharded_state_dict, directory, sharded_strategy=strategy)


def load_weights(model, path: str) -> None:
    """Load ``path``'s weights into ``model`` (any TP/PP; Megatron reshards)."""
    from minitron_mcore.checkpoint.safe_load import dist_load

    weights = os.path.join(check_checkpoint_dir(path), WEIGHTS_DIR)
    with reading_checkpoint(weights):
        state = dist_load(model.sharded_state_dict(), weights)
    load_loaded_state(model, state, path)
    _require_finite(model, path)


def load_loaded_state(model, state: dict, path: str) -> None:
    """``model.load_state_dict(state)``, strict except for Transformer Engine's ``_extra_state``
    entries: TE modules list one in ``state_dict()`` that Megatron leaves out of
    ``sharded_state_dict()`` where it holds nothing (TE's attention without FP8), so the loaded
    state cannot have it (Megatron-LM retries such loads with ``strict=False``). Every weight
    must still be there, and nothing else may be."""
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
    require(
        not missing and not result.unexpected_keys,
        f"the weights in {path} do not fit the model built from its config.json (missing "
        f"{missing[:3]}, unexpected {result.unexpected_keys[:3]}); re-create the checkpoint",
    )


def _require_finite(model, path: str) -> None:
    """NaN/Inf weights would train or evaluate to NaN silently: refuse them (on every rank
    alike, whichever rank holds the damaged shard)."""
    import torch.distributed as dist

    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    flag = torch.tensor([1.0 if bad else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        from minitron_mcore.parallel import comm_device

        flag = flag.to(comm_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    require(
        flag.item() == 0,
        f"the weights in {path} hold values that are not finite (NaN or Inf); the "
        "checkpoint is damaged or came from a diverged run: load an earlier checkpoint",
    )


def load_model(path: str, dtype: Optional[torch.dtype] = None, use_te=None, **config_kw):
    """Build this rank's stage of the checkpoint's model and load its weights.

    ``use_te=False`` forces the local layer spec (separate norm modules, for activation hooks).
    The weights are not drawn at random before the load overwrites them
    (:func:`~minitron_mcore.models.build.loaded_weights_kwargs`)."""
    from minitron_mcore.models.build import (
        build_model_for_stage,
        loaded_weights_kwargs,
        resolve_dtype,
    )

    meta = read_meta(path)
    dtype = dtype or resolve_dtype(meta.dtype)
    config_kw = {**loaded_weights_kwargs(), **config_kw}
    model = build_model_for_stage(meta.arch, dtype, use_te=use_te, **config_kw)
    load_weights(model, path)
    return model, meta
