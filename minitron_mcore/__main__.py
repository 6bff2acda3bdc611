"""``python -m minitron_mcore <command> ...`` (and ``torchrun ... -m minitron_mcore``)."""

import sys

if sys.argv[1:2] and sys.argv[1] in ("pretrain", "correct", "distill"):
    # Before any heavy import (torch takes seconds to load on a busy node): a preemption's
    # SIGTERM from here on is kept for the first training step (minitron_mcore.train).
    from minitron_mcore.train import defer_sigterm

    defer_sigterm()

from minitron_mcore.cli import entry  # noqa: E402

if __name__ == "__main__":
    entry()
