"""Device audit: on CPU, find every tensor that a GPU run would have on the wrong device.

On a GPU a tensor left on the host fails at once: a batch built with ``torch.stack`` and fed
to a model whose weights are on ``cuda:N``, a host buffer summed into a GPU activation, a host
tensor sent through an NCCL collective. On CPU, where every test runs, host and "device" are
the same memory and nothing fails. This module makes those mixes visible there.

    MINITRON_DEVICE_AUDIT=/tmp/audit python -m minitron_mcore.testing.device_audit \\
        evaluate load=CKPT data.valid=[DATA] iters=1
    MINITRON_DEVICE_AUDIT=/tmp/audit torchrun --nproc-per-node 4 \\
        -m minitron_mcore.testing.device_audit distill load=S teacher=T ... parallel.pp=2

runs a command (``python -m minitron_mcore`` semantics) under the audit, prints each violation
site on stderr and writes one report per process, ``$MINITRON_DEVICE_AUDIT/rank<R>.<pid>.json``;
the exit status is 86 when the command succeeded but the audit found violations.

The audit is in three parts, each with its own module doc: the tags and the op checks
(:class:`DeviceAudit`, ``device_audit_mode.py``), the collective checks
(:func:`collective_checks`, ``device_audit_collectives.py``) and the violation records and
reports (:func:`write_report`, ``device_audit_records.py``). This module runs a whole command
under them: the models built as on a GPU, then the command.

**Order.** The mode must sit *above* the CPU compat mode (``compat/cpu.py`` rewrites CUDA
devices to the CPU): the top of PyTorch's mode stack sees a call first, with its arguments as
written. :func:`install` therefore wraps the collectives (before Megatron is imported:
``param_and_grad_buffer`` keeps references to ``all_gather_into_tensor`` and
``reduce_scatter_tensor``), activates the compat layer (idempotent, so the process group's own
activation later does nothing), then pushes the audit.

**Overhead.** About 10 us per torch call on top of the compat mode's 3 us (a 64-element add
takes 2.5 us), whatever the tensors' size. The tiny ``minitron pipeline`` of
``tests/test_device_audit.py`` (pretrain, correct, importance, prune, distill, evaluate with
lm-eval, export; 119k torch calls; 2 CPU cores, 3 runs each): its stages take 8.3 s under the
audit against 7.5 s without (1.11x), the whole process 12.6 s of CPU time against 11.9 s
(1.05x). The 4-process TP=2 PP=2 distillation step differs by less than its run-to-run noise.
"""

from __future__ import annotations

import atexit
import functools
import os
import sys

import torch

from minitron_mcore.testing.device_audit_collectives import collective_checks
from minitron_mcore.testing.device_audit_mode import DEVICE, HOST, DeviceAudit
from minitron_mcore.testing.device_audit_records import write_report

__all__ = [
    "DEVICE",
    "ENV",
    "HOST",
    "VIOLATION_EXIT",
    "DeviceAudit",
    "collective_checks",
    "install",
    "main",
    "write_report",
]

ENV = "MINITRON_DEVICE_AUDIT"
VIOLATION_EXIT = 86


# ---------------------------------------------------------------------------- a whole command


def _gpu_placement(audit: DeviceAudit) -> None:
    """Models, ``parallel.device()`` and host arrays as a GPU run has them (the tags of
    ``device_audit_mode.py``'s doc):

    * ``models.build.transformer_config`` (looked up by ``build_model_for_stage`` at call
      time) turns ``use_cpu_initialization`` off, as it is on a GPU;
    * ``parallel.device()`` / ``comm_device()`` return the audit's device object;
    * ``torch.from_numpy`` / ``torch.frombuffer`` give ``host`` and ``nn.Parameter(t)`` is where
      ``t`` is (the mode sees neither).
    """
    from minitron_mcore import parallel
    from minitron_mcore.models import build

    config_fn = build.transformer_config

    @functools.wraps(config_fn)
    def transformer_config(*args, **kwargs):
        config = config_fn(*args, **kwargs)
        config.use_cpu_initialization = False
        return config

    build.transformer_config = transformer_config
    for name in ("device", "comm_device"):
        if hasattr(parallel, name):
            setattr(parallel, name, lambda: audit.device)
    for name in ("from_numpy", "frombuffer"):
        fn = getattr(torch, name)
        setattr(
            torch, name, functools.wraps(fn)(lambda *a, fn=fn, **k: audit.tag(fn(*a, **k), HOST))
        )
    param_new = torch.nn.Parameter.__new__

    def parameter(cls, data=None, requires_grad=True):
        return audit.tag(param_new(cls, data, requires_grad), audit.tag_of(data))

    torch.nn.Parameter.__new__ = staticmethod(parameter)


_ACTIVE: DeviceAudit | None = None


def install() -> DeviceAudit:
    """Audit the rest of this process (collectives, compat layer, then the mode on top; module
    doc). Call once, before Megatron-Core is imported; nothing is undone."""
    global _ACTIVE
    if _ACTIVE is not None:
        return _ACTIVE
    if torch.cuda.is_available():
        raise RuntimeError("the device audit stands in for a GPU on CPU; on a GPU just run")
    if "megatron.core.distributed.param_and_grad_buffer" in sys.modules:
        raise RuntimeError("install the device audit before Megatron-Core is imported")
    audit = DeviceAudit()
    # Kept: a generator context manager that is garbage-collected runs its exit (a restore).
    audit.collective_checks = collective_checks(audit)
    audit.collective_checks.__enter__()
    from minitron_mcore import compat

    compat.activate()
    _gpu_placement(audit)
    audit.__enter__()
    _ACTIVE = audit
    return audit


def main(argv: list[str] | None = None) -> int:
    """``python -m minitron_mcore <command> ...`` under the audit; 86 if it found violations."""
    argv = list(sys.argv[1:] if argv is None else argv)
    audit = install()
    pid = os.getpid()
    # Written however the command ends (an exception, sys.exit), not by forked children.
    atexit.register(lambda: os.getpid() == pid and write_report(audit, argv, os.environ.get(ENV)))
    from minitron_mcore.cli import main as cli_main

    rc = cli_main(argv)
    return rc or (VIOLATION_EXIT if audit.violations else 0)


if __name__ == "__main__":
    sys.exit(main())
