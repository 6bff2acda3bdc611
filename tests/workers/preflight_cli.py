"""The CLI on a machine that lacks something a run needs late: ``no-lm-eval`` (the optional
lm-evaluation-harness is not installed) or ``disk-full`` (every file system has 1 MiB free).

    python tests/workers/preflight_cli.py no-lm-eval pipeline run_dir=RUN pipeline.dry_run=true
"""

import shutil
import sys
from collections import namedtuple


def main(mode, argv):
    from minitron_mcore.cli import main as cli_main

    if mode == "no-lm-eval":
        sys.modules["lm_eval"] = None  # what find_spec / import see when it is not installed
    elif mode == "disk-full":
        usage = namedtuple("usage", "total used free")
        shutil.disk_usage = lambda path: usage(2**40, 2**40 - 2**20, 2**20)
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
