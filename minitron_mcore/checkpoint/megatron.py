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

import contextlib
import dataclasses
import glob
import json
import math
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

from minitron_mcore.errors import MinitronError, require
from minitron_mcore.models.arch import ModelArch
from minitron_mcore.parallel import fail_together, is_rank0
from minitron_mcore.utils.faults import fault_point
from minitron_mcore.utils.log import log0

META_FILE = "minitron.json"
WEIGHTS_DIR = "weights"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1


@dataclass
class CheckpointMeta:
    """Everything next to the weights that makes a checkpoint describe itself."""

    arch: ModelArch
    dtype: str = "fp32"
    vocab_multiple: int = 128
    saved_tp: int = 1
    saved_pp: int = 1
    hf_config: Optional[dict] = None
    hf_generation_config: Optional[dict] = None
    prune_plan: Optional[dict] = None
    provenance: list = field(default_factory=list)
    train_state: Optional[dict] = None
    checkpoint_id: str = ""
    """A fresh id for every save: importance scores record it, so pruning can refuse scores
    computed on a different checkpoint."""
    format_version: int = FORMAT_VERSION
    version: str = ""
    """Set in a checkpoint directory's tracker only: the subdirectory of the current version."""

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch.to_dict()
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        d = json.loads(text)
        d["arch"] = ModelArch.from_dict(d["arch"])
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_step(self, stage: str, **info) -> CheckpointMeta:
        """A copy with one more provenance entry (stage name, time, details)."""
        entry = {"stage": stage, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
        return dataclasses.replace(self, provenance=list(self.provenance) + [entry])


def _not_a_checkpoint(path: str) -> MinitronError:
    hint = (
        f"it looks like a Hugging Face model: run `minitron import-hf load={path} save=CKPT`"
        if os.path.isfile(os.path.join(path, "config.json"))
        else "point load= at a directory written by minitron"
    )
    return MinitronError(f"{path} is not a minitron checkpoint (no {META_FILE}); {hint}")


def _read_json_meta(path: str) -> CheckpointMeta:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            return CheckpointMeta.from_json(f.read())
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise MinitronError(f"{path}/{META_FILE} is corrupt ({e}); re-create the checkpoint") from e


def resolve_checkpoint(path: str) -> str:
    """The directory that holds the current version's files: ``path/<version>`` for a
    checkpoint directory with a tracker, ``path`` itself for one version (or an old flat
    checkpoint)."""
    require(bool(path), "load= is empty; pass the checkpoint directory, e.g. load=runs/ckpt")
    require(os.path.isdir(path), f"checkpoint directory {path} does not exist; check load=")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        raise _not_a_checkpoint(path)
    version = _read_json_meta(path).version
    if not version:
        return path
    inner = os.path.join(path, version)
    require(
        os.path.isfile(os.path.join(inner, META_FILE)),
        f"checkpoint {path} names version {version}, which is missing; the directory was "
        "damaged - restore it or re-create the checkpoint",
    )
    return inner


def check_checkpoint_dir(path: str) -> str:
    """Validate ``path`` and return the directory holding its current version's files."""
    inner = resolve_checkpoint(path)
    require(
        os.path.isdir(os.path.join(inner, WEIGHTS_DIR)),
        f"checkpoint {path} has no {WEIGHTS_DIR}/ directory; it is incomplete, re-create it",
    )
    return inner


def read_meta(path: str) -> CheckpointMeta:
    """The current version's sidecar (``version`` cleared: it describes the model)."""
    return dataclasses.replace(_read_json_meta(check_checkpoint_dir(path)), version="")


def check_save_target(path: str, overwrite: bool) -> None:
    """Refuse, before any work is done, to replace an existing output without overwrite=true."""
    require(bool(path), "save= is empty; pass an output directory, e.g. save=runs/ckpt")
    require(
        overwrite or not os.path.exists(path),
        f"save={path} already exists; choose a new directory or pass overwrite=true",
    )
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):  # the first existing ancestor is where mkdir starts
        parent = os.path.dirname(parent)
    require(
        os.access(parent, os.W_OK),
        f"save={path}: {parent} is not writable (read-only or immutable); choose a writable "
        "directory for save=",
    )


# ---------------------------------------------------------------------------- sharded tensors


def _sharded_tensors(model):
    """This rank's ShardedTensors for ``model``, with factories applied, so each tensor's
    ``data`` is a view of (part of) a parameter."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories

    sd = model.sharded_state_dict()
    apply_factories(sd)
    # An explicit stack, not a recursive closure: the closure's self-reference forms a cycle
    # that kept every ShardedTensor (and the parameter views they hold) alive until the next
    # cyclic GC - prune could not free source layers (benchmarks/README.md, bench_prune).
    out, stack = [], [sd]
    while stack:
        x = stack.pop()
        if isinstance(x, ShardedTensor):
            out.append(x)
        elif isinstance(x, dict):
            stack.extend(reversed(list(x.values())))
        elif isinstance(x, (list, tuple)):
            stack.extend(reversed(x))
    return out


def _local_slice(sh, global_tensor: torch.Tensor) -> torch.Tensor:
    """The part of a (per-layer) global tensor that ShardedTensor ``sh`` holds."""
    offsets = sh.global_offset[sh.prepend_axis_num :]
    idx = tuple(slice(o, o + n) for o, n in zip(offsets, sh.local_shape))
    return global_tensor[idx]


def layer_of(sh) -> Optional[int]:
    """Global layer index of a per-layer ShardedTensor, ``None`` for embeddings etc."""
    return sh.global_offset[0] if sh.prepend_axis_num == 1 else None


LayerFn = Callable[[int], dict[str, torch.Tensor]]


def shards_by_layer(model) -> dict[Optional[int], list]:
    """This rank's ShardedTensors grouped by global layer (``None``: embeddings, final norm,
    output layer)."""
    by_layer: dict[Optional[int], list] = {}
    for sh in _sharded_tensors(model):
        by_layer.setdefault(layer_of(sh), []).append(sh)
    return by_layer


@torch.no_grad()
def copy_into_shards(shards: list, canon: dict[str, torch.Tensor]) -> None:
    """Copy global (per-layer) tensors into the local parameter slices described by ``shards``."""
    for sh in shards:
        require(sh.key in canon, f"no source tensor for {sh.key}")
        src = _local_slice(sh, canon[sh.key])
        require(
            tuple(src.shape) == tuple(sh.data.shape),
            f"shape mismatch for {sh.key}: source {tuple(src.shape)} vs model "
            f"{tuple(sh.data.shape)}",
        )
        sh.data.copy_(src)


def fill_model(
    model,
    layer_fn: LayerFn,
    global_fn: Callable[[], dict[str, torch.Tensor]],
    desc: str = "loading",
):
    """Copy canonical global tensors into this rank's shards of ``model``.

    ``layer_fn(i)`` returns layer ``i``'s canonical tensors, ``global_fn()`` the others.  Layers are
    converted one at a time, so memory stays near the local model plus one global layer.
    """
    from minitron_mcore.utils.log import progress

    by_layer = shards_by_layer(model)
    order = sorted(by_layer, key=lambda x: -1 if x is None else x)
    for layer in progress(order, desc=desc, unit="layer"):
        copy_into_shards(by_layer[layer], global_fn() if layer is None else layer_fn(layer))


# ---------------------------------------------------------------------------- save / load


@contextlib.contextmanager
def reading_checkpoint(path: str):
    """Turn the many exception types a damaged checkpoint raises into one clear error.
    (torch DCP's CheckpointException derives from BaseException, hence the wide net.)"""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, MinitronError):
        raise
    except BaseException as e:
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise MinitronError(
            f"cannot read checkpoint weights in {path} ({type(e).__name__}: {msg}); "
            "the checkpoint is corrupt or incomplete, re-create it"
        ) from e


def _exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or filesystem cannot (then the caller falls back to two renames)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    ok = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
    return ok


def atomic_swap(tmp: str, path: str) -> None:
    """Put the complete directory ``tmp`` at ``path``, replacing what is there.

    With an existing ``path`` the two are exchanged in one atomic step where the filesystem
    supports it (Linux local filesystems), so ``path`` is never missing; elsewhere the old
    directory is renamed to ``path.old-<time>`` first and removed after."""
    if not os.path.exists(path):
        os.rename(tmp, path)
        return
    if _exchange(tmp, path):
        fault_point("swap:exchanged")
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    old = f"{path}.old-{int(time.time())}"
    os.rename(path, old)
    fault_point("swap:old-moved")
    os.rename(tmp, path)
    fault_point("swap:new-in-place")
    shutil.rmtree(old, ignore_errors=True)


def tokenizer_files_of(ckpt: str) -> list[str]:
    """The tokenizer files stored in checkpoint ``ckpt`` (to carry them into a new one)."""
    d = os.path.join(resolve_checkpoint(ckpt), TOKENIZER_DIR)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


_VERSION_RE = re.compile(r"^(iter_(\d{7,})|release-[0-9a-f]{8})$")


def _write_json(path: str, text: str) -> None:
    """Write a small file so that readers see the old or the new content, never a mix."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    fault_point("tracker:written")
    os.replace(tmp, path)
    fault_point("tracker:replaced")
    dfd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def current_version(home: str) -> Optional[str]:
    """The version a checkpoint directory's tracker names (None: none or a flat checkpoint)."""
    if not os.path.isfile(os.path.join(home, META_FILE)):
        return None
    return _read_json_meta(home).version or None


def _complete_home(home: str) -> bool:
    """A checkpoint directory whose tracker names a version that is fully present."""
    version = current_version(home) if os.path.isdir(home) else None
    return bool(version) and os.path.isfile(os.path.join(home, version, META_FILE))


def _newest_training_version(d: str) -> Optional[tuple[int, str]]:
    """(step, name) of the newest complete ``iter_N`` version inside ``d``, or None."""
    found = []
    for x in os.listdir(d):
        m = _VERSION_RE.match(x)
        if m and m.group(2) and os.path.isfile(os.path.join(d, x, META_FILE)):
            found.append((int(m.group(2)), x))
    return max(found) if found else None


def _make_current(d: str, version: str) -> None:
    meta = dataclasses.replace(_read_json_meta(os.path.join(d, version)), version=version)
    _write_json(os.path.join(d, META_FILE), meta.to_json())


def recover_home(home: str) -> None:
    """Finish what a save that was killed had completed (writer start-up, and a re-run that
    finds its run finished).

    * ``home`` missing and ``home.partial`` holding a complete version (killed while building a
      new checkpoint directory beside its target, after the version was in it): name the newest
      training version if the staged tracker was not written yet, and rename it into place;
    * the tracker behind the newest complete training version (killed between renaming a
      version into place and replacing the tracker): name that version."""
    staged = home + ".partial"
    if not os.path.exists(home) and os.path.isdir(staged):
        newest = _newest_training_version(staged)
        if newest and not _complete_home(staged):
            _make_current(staged, newest[1])
        if _complete_home(staged):
            os.rename(staged, home)
            log0("recovered %s from an interrupted save", home)
    if not os.path.isdir(home):
        return
    cur = current_version(home)
    if cur is None:
        return  # not a checkpoint directory, or an old flat checkpoint: nothing to recover
    newest = _newest_training_version(home)
    m = _VERSION_RE.match(cur)
    cur_it = int(m.group(2)) if m and m.group(2) else -1
    if newest and newest[0] > cur_it:
        _make_current(home, newest[1])
        log0("recovered %s: its newest complete version %s is now current", home, newest[1])


def _collect_garbage(home: str, keep: int) -> None:
    """Delete versions beyond the ``keep`` newest training versions (the current one is always
    kept), other versions that are not current, and partial writes."""
    cur = current_version(home)
    entries = sorted(os.listdir(home))
    iters = sorted(
        ((int(m.group(2)), d) for d in entries if (m := _VERSION_RE.match(d)) and m.group(2)),
        reverse=True,
    )
    cur_it = next((it for it, d in iters if d == cur), None)
    kept = {cur}
    if cur_it is not None:
        kept |= set([d for it, d in iters if it < cur_it][: max(keep - 1, 0)])
    for d in entries:
        if (_VERSION_RE.match(d) and d not in kept) or d.endswith(".partial"):
            shutil.rmtree(os.path.join(home, d), ignore_errors=True)
            fault_point("gc:removed")


def _commit_version(tmp: str, home: str, tag: str, meta: CheckpointMeta, keep: int) -> None:
    """Rank 0, after every rank's files are in ``tmp``: make ``tmp`` version ``tag`` of
    ``home`` and the current one. Each step leaves a loadable checkpoint behind."""
    tracker = dataclasses.replace(meta, version=tag).to_json()
    if current_version(home) is None:
        # A new checkpoint directory (or a non-checkpoint one being overwritten): build it
        # whole beside the target and put it in place in one step.
        staged = home.rstrip("/") + ".partial"
        shutil.rmtree(staged, ignore_errors=True)
        os.makedirs(staged)
        os.rename(tmp, os.path.join(staged, tag))
        _write_json(os.path.join(staged, META_FILE), tracker)
        fault_point("save:staged")
        atomic_swap(staged, home)
        fault_point("save:home-in-place")
        return
    dest = os.path.join(home, tag)
    if os.path.exists(dest):  # left by a save that died before its tracker update
        shutil.rmtree(dest)
        fault_point("save:stale-removed")
    os.rename(tmp, dest)
    fault_point("save:version-in-place")
    _write_json(os.path.join(home, META_FILE), tracker)
    _collect_garbage(home, keep)


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
    require(_VERSION_RE.match(tag) is not None, f"bad checkpoint version name {tag!r}")
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
        _commit_version(tmp, home, tag, meta, keep)
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


class _RegionPlanner:
    """A torch DCP load planner that reads given regions of global tensors into given buffers.

    Written here because neither Megatron's ``dist_checkpointing.load`` nor DCP's default planner
    can read part of a global tensor: both go through torch ``ShardedTensor`` metadata, which
    must cover the whole tensor. DCP's public planner interface does the rest (which chunks of
    which files overlap the region, the reads, the copies)."""

    def __init__(self, regions: dict[str, tuple[torch.Tensor, tuple]]):
        self.regions = regions  # key -> (buffer, global offsets of the buffer)
        self.metadata = None

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False) -> None:
        self.metadata = metadata

    def create_local_plan(self):
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        items = []
        for key, (buf, offsets) in self.regions.items():
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=buf.shape)
            md = self.metadata.state_dict_metadata[key]
            reads = create_read_items_for_chunk_list(key, md, [chunk])
            covered = sum(math.prod(r.lengths) for r in reads)
            require(
                covered == buf.numel(),
                f"the checkpoint's saved pieces of {key} cover {covered} of the {buf.numel()} "
                "values requested; it is incomplete, re-create it",
            )
            items += reads
        return LoadPlan(items)

    def create_global_plan(self, plans):
        return plans

    def finish_plan(self, plan):
        return plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are planned")

    def resolve_tensor(self, read_item) -> torch.Tensor:
        buf = self.regions[read_item.dest_index.fqn][0]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            buf = buf.narrow(dim, start, length)
        return buf

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # the storage reader copied into the view resolve_tensor returned


class WeightsReader:
    """Reads whole global tensors, or one layer of the stacked per-layer tensors, straight from
    a checkpoint's files: no model, no process group, any process, any saved TP/PP.

    ``read(keys, layer=i)`` holds one layer of those keys in memory, which is what lets
    ``prune`` and ``export-hf`` stay near one model (or one layer) of memory."""

    def __init__(self, path: str):
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        from minitron_mcore.checkpoint.safe_load import SafeFileSystemReader

        self.path, self.dir = path, os.path.join(check_checkpoint_dir(path), WEIGHTS_DIR)
        with reading_checkpoint(self.dir):
            self._storage = SafeFileSystemReader(self.dir)
            md = self._storage.read_metadata()
        self._md = {
            k: v for k, v in md.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }
        self.shapes = {k: tuple(v.size) for k, v in self._md.items()}

    def read(self, keys, layer: Optional[int] = None) -> dict[str, torch.Tensor]:
        """``{key: tensor}``; with ``layer``, per-layer keys give that layer's slice."""
        from torch.distributed.checkpoint import load

        regions = {}
        for key in keys:
            require(
                key in self._md,
                f"checkpoint {self.path} has no tensor {key}; it is incomplete or not the "
                "model its minitron.json describes, re-create it",
            )
            shape, dtype = self.shapes[key], self._md[key].properties.dtype
            if layer is None:
                regions[key] = (torch.empty(shape, dtype=dtype), (0,) * len(shape))
            else:
                require(0 <= layer < shape[0], f"{key} has no layer {layer} in {self.path}")
                buf = torch.empty((1, *shape[1:]), dtype=dtype)
                regions[key] = (buf, (layer,) + (0,) * (len(shape) - 1))
        with reading_checkpoint(self.dir), warnings.catch_warnings():
            # no_dist: every process reads for itself; DCP warns when no group is initialized
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            load({}, storage_reader=self._storage, planner=_RegionPlanner(regions), no_dist=True)
        return {k: buf if layer is None else buf[0] for k, (buf, _) in regions.items()}
