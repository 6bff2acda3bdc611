"""The CLI with every training sample it reads recorded (a hash of its tokens, in order);
written to ``OUT`` (JSON) at exit.

    python tests/workers/record_samples.py OUT correct load=CKPT save=SAVE ...
"""

import hashlib
import json
import sys


def main(out, argv):
    from minitron_mcore.cli import main as cli_main
    from minitron_mcore.data.datasets import GlobalBatches

    seen = []
    plain = GlobalBatches.get_at

    def get_at(self, first):
        micro = plain(self, first)
        for mb in micro:
            seen.extend(hashlib.sha1(row.numpy().tobytes()).hexdigest() for row in mb["tokens"])
        return micro

    GlobalBatches.get_at = get_at
    try:
        return cli_main(argv)
    finally:
        with open(out, "w") as f:
            json.dump(seen, f)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2:]))
