"""Load a checkpoint on data-parallel replicas (tp = pp = 1, one replica per rank) while
counting the tensor regions each rank reads from the files; rank 0 writes ``OUT`` (JSON):
per rank, the regions read and the float64 sum of every loaded weight.

    torchrun --nproc-per-node 2 tests/workers/parallel_load.py CKPT OUT
"""

import json
import sys


def main(ckpt, out):
    import torch.distributed as dist

    from minitron_mcore.checkpoint import safe_load
    from minitron_mcore.checkpoint.megatron import load_model
    from minitron_mcore.parallel import ParallelConfig, parallel_context

    reads = [0]
    plain = safe_load.SafeFileSystemReader.read_data

    def read_data(self, plan, planner):
        reads[0] += len(plan.items)
        return plain(self, plan, planner)

    safe_load.SafeFileSystemReader.read_data = read_data
    with parallel_context(ParallelConfig()):
        model, _ = load_model(ckpt)
        sums = {n: p.double().sum().item() for n, p in model.named_parameters()}
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, {"reads": reads[0], "sums": sums})
        if dist.get_rank() == 0:
            with open(out, "w") as f:
                json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
