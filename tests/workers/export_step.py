"""The pipeline's export step (rank 0 exports and times generation, every rank gets its
metrics) at the launched world size; each rank writes what it got to OUT.rank<r>.json.

    torchrun --nproc-per-node 2 tests/workers/export_step.py CKPT HF_OUT OUT
"""

import json
import sys


def main(ckpt, hf_out, out):
    import torch.distributed as dist

    from minitron_mcore.checkpoint.convert import ExportHFConfig
    from minitron_mcore.parallel import ParallelConfig, parallel_context
    from minitron_mcore.pipeline.steps import _export_and_time

    with parallel_context(ParallelConfig()):
        cfg = ExportHFConfig(load=ckpt, save=hf_out)
        metrics = _export_and_time(cfg, 4)
        again = _export_and_time(cfg, 4)  # a resumed pipeline: already complete, no new work
        with open(f"{out}.rank{dist.get_rank()}.json", "w") as f:
            json.dump({"first": metrics, "again": again}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
