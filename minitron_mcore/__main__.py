"""``python -m minitron_mcore <command> ...`` (and ``torchrun ... -m minitron_mcore``)."""

from minitron_mcore.cli import entry

if __name__ == "__main__":
    entry()
