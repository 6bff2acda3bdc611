"""Megatron checkpoints: ``dist_checkpointing`` weights + a JSON sidecar + the tokenizer.

Layout of a checkpoint directory ``CKPT``::

    CKPT/minitron.json   model arch, dtype, prune plan, provenance, training state (the sidecar)
    CKPT/weights/        Megatron dist_checkpointing (torch_dist): global tensors, any TP/PP
    CKPT/tokenizer/      the Hugging Face tokenizer files

Writes go to ``CKPT.partial`` and are renamed into place when complete, so a crash never leaves
a half-written directory under the final name.  The weights are stored as global tensors, so a
checkpoint saved at one TP/PP loads at any other (Megatron reshards on load).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
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
from minitron_mcore.parallel import barrier, is_rank0
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


def check_checkpoint_dir(path: str) -> None:
    require(bool(path), "load= is empty; pass the checkpoint directory, e.g. load=runs/ckpt")
    require(os.path.isdir(path), f"checkpoint directory {path} does not exist; check load=")
    if not os.path.isfile(os.path.join(path, META_FILE)):
        hint = (
            "it looks like a Hugging Face model: run `minitron import-hf load="
            + path
            + " save=CKPT`"
            if os.path.isfile(os.path.join(path, "config.json"))
            else "point load= at a directory written by minitron"
        )
        raise MinitronError(f"{path} is not a minitron checkpoint (no {META_FILE}); {hint}")
    require(
        os.path.isdir(os.path.join(path, WEIGHTS_DIR)),
        f"checkpoint {path} has no {WEIGHTS_DIR}/ directory; it is incomplete, re-create it",
    )


def read_meta(path: str) -> CheckpointMeta:
    check_checkpoint_dir(path)
    try:
        with open(os.path.join(path, META_FILE)) as f:
            return CheckpointMeta.from_json(f.read())
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise MinitronError(f"{path}/{META_FILE} is corrupt ({e}); re-create the checkpoint") from e


def check_save_target(path: str, overwrite: bool) -> None:
    """Refuse, before any work is done, to replace an existing output without overwrite=true."""
    require(bool(path), "save= is empty; pass an output directory, e.g. save=runs/ckpt")
    require(
        overwrite or not os.path.exists(path),
        f"save={path} already exists; choose a new directory or pass overwrite=true",
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


def atomic_swap(tmp: str, path: str) -> None:
    old = None
    if os.path.exists(path):
        old = f"{path}.old-{int(time.time())}"
        os.rename(path, old)
    os.rename(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def tokenizer_files_of(ckpt: str) -> list[str]:
    """The tokenizer files stored in checkpoint ``ckpt`` (to carry them into a new one)."""
    d = os.path.join(ckpt, TOKENIZER_DIR)
    return sorted(os.path.join(d, f) for f in os.listdir(d)) if os.path.isdir(d) else []


def save_checkpoint(model, path: str, meta: CheckpointMeta, tokenizer_files=(), extra=None) -> None:
    """Collective: every rank writes its shards; rank 0 writes the sidecar and renames.

    ``tokenizer_files`` are copied into ``tokenizer/`` (see :func:`tokenizer_files_of`).
    ``extra(tmp_dir)``, if given, is called on every rank to add more files (training state)
    before the directory is renamed into place."""
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps

    tmp = path.rstrip("/") + ".partial"
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(os.path.join(tmp, WEIGHTS_DIR))
    barrier()
    try:
        dist_checkpointing.save(model.sharded_state_dict(), os.path.join(tmp, WEIGHTS_DIR))
        if extra is not None:
            extra(tmp)
        barrier()
        if is_rank0():
            meta = dataclasses.replace(
                meta,
                checkpoint_id=uuid.uuid4().hex,
                saved_tp=ps.get_tensor_model_parallel_world_size(),
                saved_pp=ps.get_pipeline_model_parallel_world_size(),
            )
            with open(os.path.join(tmp, META_FILE), "w") as f:
                f.write(meta.to_json())
            os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
            for f in tokenizer_files:
                shutil.copy2(f, os.path.join(tmp, TOKENIZER_DIR))
            atomic_swap(tmp, path)
            log0("saved checkpoint %s", path)
    except BaseException:
        if is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    barrier()


def load_weights(model, path: str) -> None:
    """Load ``path``'s weights into ``model`` (any TP/PP; Megatron reshards)."""
    from megatron.core import dist_checkpointing

    weights = os.path.join(path, WEIGHTS_DIR)
    with reading_checkpoint(weights):
        state = dist_checkpointing.load(model.sharded_state_dict(), weights)
    model.load_state_dict(state, strict=True)


def load_model(path: str, dtype: Optional[torch.dtype] = None, use_te=None, **config_kw):
    """Build this rank's stage of the checkpoint's model and load its weights.

    ``use_te=False`` forces the local layer spec (separate norm modules, for activation hooks)."""
    from minitron_mcore.models.build import build_model_for_stage, resolve_dtype

    meta = read_meta(path)
    dtype = dtype or resolve_dtype(meta.dtype)
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
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        check_checkpoint_dir(path)
        self.path, self.dir = path, os.path.join(path, WEIGHTS_DIR)
        with reading_checkpoint(self.dir):
            self._storage = FileSystemReader(self.dir)
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
