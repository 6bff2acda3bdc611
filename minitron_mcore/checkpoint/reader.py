"""Reading parts of a checkpoint's global tensors straight from its files, without a model or a
process group (``prune`` and ``export-hf`` hold one layer at a time)."""

from __future__ import annotations

import math
import os
import warnings
from typing import Optional

import torch

from minitron_mcore.checkpoint.layout import WEIGHTS_DIR, check_checkpoint_dir, reading_checkpoint
from minitron_mcore.errors import require


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
