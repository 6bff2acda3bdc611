"""The CLI with every all-reduce over the default (WORLD) group counted; the count is written
to ``OUT`` at exit. The training loop's per-step agreement (loss reports, preemption flag) is
the only WORLD all-reduce of a step, so runs of N and N+k steps differ by k.

    python tests/workers/count_world_collectives.py OUT correct load=CKPT save=SAVE ...
"""

import sys


def main(out, argv):
    import torch.distributed as dist

    from minitron_mcore.cli import main as cli_main

    count = [0]
    real = dist.all_reduce

    def all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        if group is None or group is dist.group.WORLD:
            count[0] += 1
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = all_reduce
    try:
        return cli_main(argv)
    finally:
        with open(out, "w") as f:
            f.write(str(count[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
