"""A ``minitron`` command under the device audit (``minitron_mcore/testing/device_audit.py``):
the audit is installed, then the CLI's ``main`` runs with the given argv. Reports go to
``$MINITRON_DEVICE_AUDIT/rank<R>.<pid>.json``; exit 86 when the command succeeded but the audit
found host tensors meeting device ones.

    MINITRON_DEVICE_AUDIT=/tmp/audit python tests/workers/audited.py evaluate load=CKPT ...
    MINITRON_DEVICE_AUDIT=/tmp/audit torchrun --nproc-per-node 4 tests/workers/audited.py \\
        distill load=STUDENT teacher=TEACHER ... parallel.tp=2 parallel.pp=2
"""

import sys

from minitron_mcore.testing.device_audit import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
