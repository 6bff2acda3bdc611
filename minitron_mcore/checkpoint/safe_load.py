"""Reading Megatron / torch-DCP checkpoints without running code stored in them.

torch's distributed-checkpoint reader unpickles ``.metadata`` with plain ``pickle.load`` and the
byte items of a checkpoint (Megatron's ``ShardedObject``s, e.g. ``_extra_state``) with
``torch.load(weights_only=False)``; Megatron's ``dist_checkpointing.load`` goes through both. A
planted file would run arbitrary code before any error is raised. Neither torch nor Megatron
offers a restricted mode for these two reads, so this module provides one, written here:

* :class:`MetadataUnpickler` admits only what torch DCP itself writes into ``.metadata``: the
  dataclasses and enums of ``torch.distributed.checkpoint.{metadata,planner,filesystem}``,
  ``torch.Size``, dtypes and layouts. Anything else (``os.system``, ``builtins.eval`` ...) is
  refused before it is called.
* byte items are checked with ``torch.load(weights_only=True)`` before torch DCP deserialises
  them.
* ``common.pt`` is read with ``weights_only=True`` explicitly (not through torch's default,
  which an environment variable can turn off).

:func:`dist_load` is Megatron's ``dist_checkpointing.load`` with these strategies plugged in
through its own ``sharded_strategy`` / ``common_strategy`` arguments (no patching).
"""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle

import torch
from megatron.core.dist_checkpointing.strategies.common import TorchCommonLoadStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    TorchDistLoadShardedStrategy,
)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import StorageMeta

from minitron_mcore.errors import MinitronError

_DCP_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)


class UnsafeCheckpointError(MinitronError):
    """A checkpoint file asks to load something a checkpoint never holds."""


class MetadataUnpickler(pickle.Unpickler):
    """An unpickler for torch DCP ``.metadata`` files that refuses every other global."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        obj = None
        if module in _DCP_MODULES:
            obj = getattr(__import__(module, fromlist=[name]), name, None)
            ok = isinstance(obj, type) and (
                dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)
            )
        elif module == "torch" and name == "Size":
            obj, ok = torch.Size, True
        elif module == "torch":
            obj = getattr(torch, name, None)
            ok = isinstance(obj, (torch.dtype, torch.layout, torch.memory_format))
        elif (module, name) == ("torch.serialization", "_get_layout"):
            obj, ok = torch.serialization._get_layout, True  # maps a name to a torch.layout
        elif (module, name) == ("collections", "OrderedDict"):
            import collections

            obj, ok = collections.OrderedDict, True
        else:
            ok = False
        if not ok:
            raise UnsafeCheckpointError(
                f"refusing to load {self.path}: it references {module}.{name}, which torch "
                "checkpoint metadata never holds (the file was planted or damaged); nothing from "
                "it was run - re-create the checkpoint from a source you trust"
            )
        return obj


def read_dcp_metadata(reader: FileSystemReader, path: str):
    """torch DCP ``Metadata`` of ``reader``'s checkpoint, through :class:`MetadataUnpickler`."""
    meta_path = reader._get_metadata_path(None)
    with reader.fs.create_stream(meta_path, "rb") as f:
        try:
            metadata = MetadataUnpickler(f, os.path.join(path, ".metadata")).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise MinitronError(
                f"cannot read {path}/.metadata ({type(e).__name__}: {e}); the checkpoint is "
                "corrupt or incomplete, re-create it"
            ) from e
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    metadata.storage_meta.load_id = reader.load_id
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's file reader with the restricted metadata unpickler (cached: DCP and Megatron
    ask for the metadata several times per load)."""

    def __init__(self, path):
        super().__init__(path)
        self._safe_path = str(path)
        self._metadata = None

    def read_metadata(self, *args, **kwargs):
        if kwargs.get("rank") is not None:  # per-rank metadata files are never written by us
            raise MinitronError(f"{self._safe_path} uses per-rank metadata; not supported")
        if self._metadata is None:
            self._metadata = read_dcp_metadata(self, self._safe_path)
        return self._metadata


def _reason(e: pickle.UnpicklingError) -> str:
    """torch's weights-only refusal in one line: what it refused, without its several lines of
    advice (which include re-running with ``weights_only=False``)."""
    text = str(e)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    else:
        paragraphs = text.split("\n\n")
        text = " ".join(p for p in paragraphs if not p.startswith("Weights only load failed"))
    text = " ".join(text.split("Check the documentation")[0].split())
    return text.split(". ")[0].rstrip(".") or "not plain data"


def check_bytes_item(value: io.BytesIO, where: str) -> None:
    """Refuse a checkpoint byte item that is more than tensors and plain containers."""
    try:
        torch.load(value, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(
            f"refusing to load an object stored in {where}: it is not plain data ({_reason(e)}); "
            "nothing from it was run - re-create the checkpoint from a source you trust"
        ) from e
    finally:
        value.seek(0)


class _SafeLoadPlanner(MCoreLoadPlanner):
    """Megatron's load planner, with byte items checked before DCP unpickles them."""

    def __init__(self, *args, checkpoint_dir: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._where = checkpoint_dir

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        check_bytes_item(value, self._where)
        super().load_bytes(read_item, value)


class SafeTorchDistLoadStrategy(TorchDistLoadShardedStrategy):
    """Megatron's ``torch_dist`` load strategy, reading through :class:`SafeFileSystemReader`
    and :class:`_SafeLoadPlanner`. The steps are Megatron's own helpers, in Megatron's order;
    only the reader and the planner differ (Megatron builds both inside ``load``)."""

    def load(self, sharded_state_dict, checkpoint_dir):
        from megatron.core.dist_checkpointing.dict_utils import nested_values
        from megatron.core.dist_checkpointing.mapping import ShardedTensor
        from megatron.core.dist_checkpointing.strategies import torch as mst
        from torch.distributed import checkpoint as dcp

        tensors = [x for x in nested_values(sharded_state_dict) if isinstance(x, ShardedTensor)]
        strict_shapes = [t for t in tensors if not t.allow_shape_mismatch]
        loose_shapes = {t.key: t for t in tensors if t.allow_shape_mismatch}
        original = sharded_state_dict
        flat, flat_map, rename_map = mst._replace_state_dict_keys_with_sharded_keys(original)
        pyt_state_dict = mst.mcore_to_pyt_state_dict(flat, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        reader.read_metadata()  # first, outside DCP: a refused file fails with our message
        planner = _SafeLoadPlanner(
            shapes_validation_sharded_tensors=strict_shapes,
            allow_shape_mismatch_sharded_tensors=loose_shapes,
            checkpoint_dir=str(checkpoint_dir),
        )
        dcp.load(pyt_state_dict, storage_reader=reader, planner=planner)
        self.cached_global_metadata = reader.read_metadata()
        loaded = {k: mst._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        loaded = mst._replace_sharded_keys_with_state_dict_keys(loaded, flat_map, rename_map)
        mst._restore_dict_types(loaded, original)
        return loaded


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` with ``weights_only=True`` whatever the environment says."""

    def load_common(self, checkpoint_dir):
        path = os.path.join(checkpoint_dir, "common.pt")
        if not os.path.isfile(path):
            raise MinitronError(f"{path} is missing; the checkpoint is incomplete, re-create it")
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it holds more than plain data ({_reason(e)}); "
                "nothing from it was run - re-create the checkpoint from a source you trust"
            ) from e

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        raise MinitronError("sharded objects outside torch_dist files are not supported")


def dist_load(sharded_state_dict, checkpoint_dir: str):
    """``megatron.core.dist_checkpointing.load`` with the restricted readers above, fully
    parallel over data-parallel replicas (:func:`replica_group`): each replica reads its share of
    the tensors they all need and the shares are exchanged, instead of every replica reading the
    whole checkpoint (Megatron-LM's ``--ckpt-fully-parallel-load``)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.strategies.fully_parallel import (
        FullyParallelLoadStrategyWrapper,
    )

    strategy = SafeTorchDistLoadStrategy()
    group = replica_group()
    if group is not None:
        strategy = FullyParallelLoadStrategyWrapper(strategy, group)
    return dist_checkpointing.load(
        sharded_state_dict,
        checkpoint_dir,
        sharded_strategy=strategy,
        common_strategy=SafeCommonLoadStrategy(),
    )


def replica_group():
    """The data-parallel group (context parallelism included) whose ranks hold the same model
    shards - the group Megatron-LM spreads checkpoint reads and writes over; None when there
    is no such group of more than one rank."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    if not (dist.is_initialized() and ps.model_parallel_is_initialized()):
        return None
    group = ps.get_data_parallel_group(with_context_parallel=True)
    return group if dist.get_world_size(group) > 1 else None
