"""The CLI, with rank 1 seeing another state of ``save=`` than rank 0 (as when the ranks list a
directory at different moments while an old run rotates its checkpoints): on rank 1 the
newest resumable version is reported missing. A command must decide what to resume on rank
0 alone, so this changes nothing; a rank that looked on its own would start fresh.

    torchrun --nproc-per-node 2 tests/workers/rank1_sees_another_directory.py correct ...
"""

import os
import sys


def main(argv):
    from minitron_mcore.cli import main as cli_main
    from minitron_mcore.train import state

    if os.environ.get("RANK") == "1":
        state.resume_source = lambda home: None
    return cli_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
