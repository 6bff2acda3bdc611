"""The CLI with the creation of process groups counted; writes ``OUT`` (JSON) at exit:
``inits`` - the groups each ``initialize_model_parallel`` call made, ``new_groups`` - every
``torch.distributed.new_group`` call of the run.

    python tests/workers/count_groups.py OUT pipeline run_dir=RUN ...
"""

import json
import sys


def main(out, argv):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from minitron_mcore.cli import main as cli_main

    counts = {"inits": [], "new_groups": 0}
    real_new_group, real_init = dist.new_group, ps.initialize_model_parallel

    def new_group(*args, **kwargs):
        counts["new_groups"] += 1
        return real_new_group(*args, **kwargs)

    def initialize_model_parallel(*args, **kwargs):
        before = counts["new_groups"]
        try:
            return real_init(*args, **kwargs)
        finally:
            counts["inits"].append(counts["new_groups"] - before)

    dist.new_group, ps.initialize_model_parallel = new_group, initialize_model_parallel
    try:
        return cli_main(argv)
    finally:
        with open(out, "w") as f:
            json.dump(counts, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
