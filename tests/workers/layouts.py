"""Several commands' parallel contexts in one process group, as ``minitron pipeline`` runs
them, over layouts that change: each context's groups must work (an all-reduce over its TP and
PP groups), a repeated layout must not make new groups, and a changed one must free the old
groups. Rank 0 writes ``OUT`` (JSON): per context, (tp, pp, groups made, TP sum, PP sum).

    torchrun --nproc-per-node 2 tests/workers/layouts.py OUT
"""

import json
import sys


def main(out):
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from minitron_mcore.parallel import ParallelConfig, device, parallel_context

    made, destroyed = [0], [0]
    real_new, real_destroy = dist.new_group, dist.destroy_process_group

    def new_group(*a, **k):
        made[0] += 1
        return real_new(*a, **k)

    def destroy(group=None):
        destroyed[0] += group is not None
        return real_destroy(group)

    dist.new_group, dist.destroy_process_group = new_group, destroy
    rows = []
    with parallel_context(ParallelConfig()):
        for tp, pp in [(1, 1), (2, 1), (2, 1), (1, 2), (1, 1)]:
            before = made[0], destroyed[0]
            with parallel_context(ParallelConfig(tp=tp, pp=pp)):
                x = torch.ones(1, device=device())
                dist.all_reduce(x, group=ps.get_tensor_model_parallel_group())
                y = torch.ones(1, device=device())
                dist.all_reduce(y, group=ps.get_pipeline_model_parallel_group())
                row = [tp, pp, made[0] - before[0], destroyed[0] - before[1], x.item(), y.item()]
                rows.append(row)
        rank = dist.get_rank()
    if rank == 0:
        with open(out, "w") as f:
            json.dump(rows, f)


if __name__ == "__main__":
    main(sys.argv[1])
