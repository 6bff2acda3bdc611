"""Device audit, the violation records: where a violation happened and how it is reported.

A violation is recorded once per (op, innermost frame, innermost ``minitron_mcore`` frame) with
the tags and shapes of its inputs, a short stack of the frames inside ``minitron_mcore/`` and
``megatron/`` (:func:`audit_stack`) and a count. :func:`write_report` prints each one on stderr
and writes them, with the run's counts, to ``rank<R>.<pid>.json``. The tags and the checks are
in ``device_audit_mode.py`` and ``device_audit_collectives.py``, the command in
``device_audit.py``.
"""

from __future__ import annotations

import json
import os
import sys

ROOTS = (os.sep + "minitron_mcore" + os.sep, os.sep + "megatron" + os.sep)
# The audit's own modules: their frames are the audit at work, never part of a violation's stack.
_HERE = os.path.dirname(os.path.abspath(__file__))
AUDIT_FILES = frozenset(
    os.path.join(_HERE, f"{name}.py")
    for name in (
        "device_audit",
        "device_audit_mode",
        "device_audit_collectives",
        "device_audit_records",
    )
)
FRAMES = 4  # frames kept per violation and package: the site, and the project code behind it


def op_name(func) -> str:
    """A torch callable as a violation names it (``Tensor.add``, ``torch.nn.functional.relu``)."""
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    head, _, name = qual.rpartition(".")
    if head in ("TensorBase", "Tensor"):
        return f"Tensor.{name}"
    if head == "_VariableFunctionsClass" or not head:
        module = getattr(func, "__module__", None) or "torch"
        return f"{module.replace('torch._C._nn', 'torch.nn.functional')}.{name}"
    return qual


def audit_stack() -> list[str]:
    """Frames inside megatron/ and minitron_mcore/ (not the audit's own files), innermost first,
    as ``path:line function``: up to 4 Megatron frames before the first minitron_mcore one, then
    up to 4 minitron_mcore frames (the project code that led there)."""
    frames, own = [], 0
    f = sys._getframe(1)
    while f is not None and own < FRAMES:
        path = f.f_code.co_filename
        root = next((r for r in ROOTS if r in path), None)
        if root is not None and os.path.abspath(path) not in AUDIT_FILES:
            mine = root == ROOTS[0]
            if mine or (not own and len(frames) < FRAMES):
                frames.append(f"{path[path.rindex(root) + 1 :]}:{f.f_lineno} {f.f_code.co_name}")
            own += mine
        f = f.f_back
    return frames


def own_frame(stack: list[str]) -> str:
    """The innermost ``minitron_mcore`` frame of a stack, ``?`` where it has none."""
    return next((s for s in stack if s.startswith("minitron_mcore")), "?")


def write_report(audit, argv: list[str], out_dir: str | None) -> str | None:
    """Each violation of ``audit`` (a ``DeviceAudit``) on stderr; ``rank<R>.<pid>.json`` under
    ``out_dir`` (if given)."""
    import minitron_mcore

    found = audit.report()
    rank = os.environ.get("RANK", "0")
    for v in found:
        own = own_frame(v["stack"])
        print(
            f"device audit (rank {rank}): {v['kind']} {v['op']} [{v['inputs']}] x{v['count']} "
            f"at {v['site']}" + ("" if own == v["site"] else f" (from {own})"),
            file=sys.stderr,
        )
    if not out_dir:
        return None
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"rank{rank}.{os.getpid()}.json")
    body = {
        "rank": int(rank),
        "argv": argv,
        "package": os.path.dirname(os.path.abspath(minitron_mcore.__file__)),
        "torch_calls": audit.calls,
        "collectives": audit.collectives,
        "violations": found,
    }
    with open(path, "w") as f:
        json.dump(body, f, indent=1)
    return path
