"""Device audit, the collectives: a ``host`` tensor through a collective on a group that is NCCL
on a GPU is a violation.

The checked collectives: ``all_reduce``, ``all_gather``, ``all_gather_into_tensor``,
``reduce_scatter_tensor``, ``broadcast``, ``reduce``, ``send`` / ``recv`` / ``isend`` /
``irecv``, ``P2POp`` / ``batch_isend_irecv`` ... Groups made with an explicit
``backend="gloo"`` are *gloo by design* (Megatron's ``*_GLOO`` groups such as
``get_data_parallel_group_gloo()``: their tensors belong on the host); every other group, the
default (WORLD) group included, is NCCL on a GPU. The ``*_object`` collectives move their data
themselves and are not checked. The tags are ``device_audit_mode.py``'s.
"""

from __future__ import annotations

import contextlib
import functools
import inspect

import torch.distributed as dist

from minitron_mcore.testing.device_audit_mode import HOST, DeviceAudit, tensors_in

_COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "_all_gather_base",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "_reduce_scatter_base",
    "all_to_all",
    "all_to_all_single",
    "broadcast",
    "reduce",
    "gather",
    "scatter",
    "send",
    "recv",
    "isend",
    "irecv",
    "batch_isend_irecv",
)


class _Groups:
    """Process groups by what they would be on a GPU: gloo when made with ``backend="gloo"``
    (Megatron's ``*_GLOO`` groups), NCCL otherwise (the default group included)."""

    def __init__(self):
        self.gloo: list = []  # the group objects themselves: a ProcessGroup has no weakref
        self.names: dict[int, str] = {}

    def created(self, group, backend, desc) -> None:
        if group is None or isinstance(group, int):  # this rank is not a member
            return
        self.names[id(group)] = str(desc or f"group{len(self.names)}")
        if str(backend or "").lower() == "gloo":
            self.gloo.append(group)

    def is_gloo(self, group) -> bool:
        return group is not None and any(g is group for g in self.gloo)

    def name(self, group) -> str:
        return "WORLD" if group is None else self.names.get(id(group), "an unnamed group")


def _check_collective(audit: DeviceAudit, groups: _Groups, op: str, bound: dict) -> None:
    if op == "batch_isend_irecv":
        for p in bound.get("p2p_op_list") or ():
            _check_collective(audit, groups, "P2POp", {"tensor": p.tensor, "group": p.group})
        return
    audit.collectives[op] = audit.collectives.get(op, 0) + 1
    group = bound.get("group")
    if groups.is_gloo(group):
        return
    tensors = tensors_in([v for k, v in bound.items() if k != "group"], {})
    if any(audit.tags.get(t) is HOST for t in tensors):
        note = f"host tensor through group {groups.name(group)}, NCCL on a GPU"
        audit.violation("collective", f"torch.distributed.{op}", tensors, note)


def _wrap_collective(audit, groups, name, fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def collective(*args, **kwargs):
        try:
            bound = sig.bind(*args, **kwargs).arguments
        except TypeError:  # the real function raises its own error
            bound = {}
        _check_collective(audit, groups, name, bound)
        return fn(*args, **kwargs)

    collective._audit_original = fn
    return collective


def _wrap_new_group(groups, fn):
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def new_group(*args, **kwargs):
        group = fn(*args, **kwargs)
        a = sig.bind(*args, **kwargs).arguments
        groups.created(group, a.get("backend"), a.get("group_desc"))
        return group

    return new_group


def _audited_p2pop(audit, groups):
    base = dist.P2POp

    def original(op):
        return getattr(op, "_audit_original", op)  # P2POp insists on dist's own isend/irecv

    class P2POp(base):
        def __new__(cls, op, tensor, *args, **kwargs):
            return super().__new__(cls, original(op), tensor, *args, **kwargs)

        def __init__(self, op, tensor, *args, **kwargs):
            super().__init__(original(op), tensor, *args, **kwargs)
            _check_collective(audit, groups, "P2POp", {"tensor": tensor, "group": self.group})

    return P2POp


@contextlib.contextmanager
def collective_checks(audit: DeviceAudit):
    """While active, ``torch.distributed``'s collectives, ``new_group`` and ``P2POp`` check
    their tensors with ``audit`` (module doc). Restored on exit."""
    groups = _Groups()
    saved = {n: getattr(dist, n) for n in (*_COLLECTIVES, "new_group", "P2POp") if hasattr(dist, n)}
    for name in _COLLECTIVES:
        if name in saved:
            setattr(dist, name, _wrap_collective(audit, groups, name, saved[name]))
    dist.new_group = _wrap_new_group(groups, saved["new_group"])
    dist.P2POp = _audited_p2pop(audit, groups)
    try:
        yield groups
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)
