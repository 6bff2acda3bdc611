"""``minitron import-hf`` through the real CLI ``main()``, its work replaced by a MinitronError
raised inside the parallel context on the given ranks (the others wait, as a rank blocked in a
collective would, until the launcher stops them).

    torchrun --nproc-per-node 2 tests/workers/cli_error.py 0,1
"""

import os
import sys
import tempfile
import time


def main(ranks):
    import torch.distributed as dist

    import minitron_mcore.checkpoint.convert as convert
    from minitron_mcore.cli import main as cli_main
    from minitron_mcore.errors import require
    from minitron_mcore.parallel import parallel_context

    failing = {int(r) for r in ranks.split(",")}

    def import_hf(cfg):
        with parallel_context(cfg.parallel, cfg.seed):
            require(dist.get_rank() not in failing, "bad input for this test; fix it")
            time.sleep(60)

    convert.import_hf = import_hf
    # an output in a temporary directory: the command's lock file lies beside it
    save = os.path.join(tempfile.gettempdir(), f"minitron-cli-error-{os.getppid()}", "out")
    return cli_main(["import-hf", "load=unused", f"save={save}"])


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
