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

**Tags.** :class:`DeviceAudit` is a ``TorchFunctionMode`` that tags tensors ``device`` or
``host`` in a ``WeakIdKeyDictionary``. A tensor the mode never saw (a gradient made by autograd's
C++ engine, a tensor unpickled from a file) has no tag: it is *neutral*, never a violation.

* Models are built as on a GPU: the audit turns ``use_cpu_initialization`` off in the configs
  ``models.build`` makes, so Megatron allocates its parallel layers with
  ``device=torch.cuda.current_device()`` (``device``) and plain torch modules (the local spec's
  norms) without a device (``host``), exactly what the project then has to move itself.
  ``nn.Parameter(t)`` is where ``t`` is.
* ``device=`` arguments: an int or a ``"cuda..."`` string (``torch.cuda.current_device()``,
  ``device="cuda"``) and the ``.device`` of a ``device`` tensor or ``parallel.device()`` give
  ``device``; ``"cpu"``, ``torch.device("cpu")`` written out, and the ``.device`` of a host
  tensor give ``host``. (On CPU every ``.device`` is equal, so the audit answers ``.device``
  with one ``torch.device`` object per tag and recognises it by identity.)
* An allocation without a device (``torch.zeros(3)``, ``torch.tensor([..])``,
  ``torch.from_numpy``) is ``host``: on a GPU it would be on the CPU.
* ``Tensor.to(device)`` / ``.cuda()`` give ``device``, ``.to("cpu")`` / ``.cpu()`` ``host``,
  ``.to(tensor)`` / ``type_as`` that tensor's tag, ``.to(dtype)`` keeps the tag. On CPU ``.to``
  returns the tensor itself; when the tag changes the audit returns a view instead, so the
  original keeps its own tag, as on a GPU where ``.to`` copies. ``Module.to`` alike.
* ``dst.copy_(src)`` may mix (host <-> device copies are legal) and keeps ``dst``'s tag;
  ``x[i]`` and ``x[i] = v`` accept a host index and a host ``v`` for a device ``x``.
* Any other op: the output is ``device`` if an input is, else ``host`` if an input is.

**Violations.** An op whose inputs hold a ``device`` tensor and a ``host`` tensor that is not
0-dim (CUDA takes 0-dim CPU tensors as scalars); a device tensor indexing a host one;
``.numpy()`` / ``.pin_memory()`` of a device tensor; a ``host`` tensor through a collective
(``all_reduce``, ``all_gather``, ``all_gather_into_tensor``, ``reduce_scatter_tensor``,
``broadcast``, ``reduce``, ``send`` / ``recv`` / ``isend`` / ``irecv``, ``P2POp`` /
``batch_isend_irecv`` ...) on a group that is NCCL on a GPU. Groups made with an explicit
``backend="gloo"`` are *gloo by design* (Megatron's ``*_GLOO`` groups such as
``get_data_parallel_group_gloo()``: their tensors belong on the host); every other group, the
default (WORLD) group included, is NCCL on a GPU. The ``*_object`` collectives move their data
themselves and are not checked. Each violation is recorded once per (op, innermost frame,
innermost ``minitron_mcore`` frame) with the tags and shapes of its inputs, a short stack of the
frames inside ``minitron_mcore/`` and ``megatron/``, and a count; the run goes on, so one run
lists every site.

Backward passes are audited too: autograd is entered with the mode active, so custom
``Function.backward``s and gradient hooks are checked. Limits: the ``.device`` of a neutral
tensor is neutral; ``x[i] = v`` with a host ``v`` is accepted for any index; code that
branches on ``torch.cuda.is_available()``, ``.is_cuda`` or ``.device.type`` takes its CPU
branch (so the audit checks what the GPU branch shares with it, not the GPU branch itself).

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
import contextlib
import functools
import inspect
import json
import os
import sys

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

HOST, DEVICE = "host", "device"
ENV = "MINITRON_DEVICE_AUDIT"
VIOLATION_EXIT = 86

_TENSOR = torch.Tensor
_DATA = torch._C.TensorBase.__dict__["data"]
_DEVICE = torch._C.TensorBase.__dict__["device"]
_ROOTS = (os.sep + "minitron_mcore" + os.sep, os.sep + "megatron" + os.sep)
_SELF = os.path.abspath(__file__)
# Calls that compare tensors without computing on them (Module._apply asks whether a parameter
# can take the moved tensor as its .data): never a mix.
_QUERIES = {
    torch._has_compatible_shallow_copy_type,
    torch.result_type,
    torch.is_same_size,
    _TENSOR.is_same_size,
    _TENSOR.is_set_to,
}
_FRAMES = 4  # frames kept per violation and package: the site, and the project code behind it


def _tensors(args, kwargs) -> list:
    """Tensors among the arguments, also inside lists / tuples (two levels: ``cat``, indices)."""
    out = []
    for a in (*args, *kwargs.values()):
        if isinstance(a, _TENSOR):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, _TENSOR):
                    out.append(b)
                elif isinstance(b, (list, tuple)):
                    out += [c for c in b if isinstance(c, _TENSOR)]
    return out


def _outputs(out) -> list:
    if isinstance(out, _TENSOR):
        return [out]
    if isinstance(out, (list, tuple)):
        return [o for o in out if isinstance(o, _TENSOR)]
    return []


def _op_name(func) -> str:
    qual = getattr(func, "__qualname__", None) or getattr(func, "__name__", repr(func))
    head, _, name = qual.rpartition(".")
    if head in ("TensorBase", "Tensor"):
        return f"Tensor.{name}"
    if head == "_VariableFunctionsClass" or not head:
        module = getattr(func, "__module__", None) or "torch"
        return f"{module.replace('torch._C._nn', 'torch.nn.functional')}.{name}"
    return qual


def _stack() -> list[str]:
    """Frames inside megatron/ and minitron_mcore/ (not this file), innermost first, as
    ``path:line function``: up to 4 Megatron frames before the first minitron_mcore one, then
    up to 4 minitron_mcore frames (the project code that led there)."""
    frames, own = [], 0
    f = sys._getframe(1)
    while f is not None and own < _FRAMES:
        path = f.f_code.co_filename
        root = next((r for r in _ROOTS if r in path), None)
        if root is not None and os.path.abspath(path) != _SELF:
            mine = root == _ROOTS[0]
            if mine or (not own and len(frames) < _FRAMES):
                frames.append(f"{path[path.rindex(root) + 1 :]}:{f.f_lineno} {f.f_code.co_name}")
            own += mine
        f = f.f_back
    return frames


def _own_frame(stack: list[str]) -> str:
    return next((s for s in stack if s.startswith("minitron_mcore")), "?")


class DeviceAudit(TorchFunctionMode):
    """Tags tensors ``device`` / ``host`` and records every op that mixes them (module doc).

    ``with DeviceAudit() as audit: ...`` audits ops alone; :func:`install` adds the collective
    checks and the GPU-like model placement for a whole command."""

    def __init__(self):
        super().__init__()
        self.tags = WeakIdKeyDictionary()
        self.violations: dict[tuple, dict] = {}
        self.calls = 0  # torch calls seen
        self.collectives: dict[str, int] = {}  # collectives checked, by name
        # torch.device objects cannot be tagged (no weakref), and on CPU every tensor's .device
        # is equal: .device is answered with one object per tag, known again by identity.
        self.devices = {tag: torch.device("cpu") for tag in (DEVICE, HOST, None)}
        self.device = self.devices[DEVICE]
        self._special = {
            _TENSOR.to: self._to,
            _TENSOR.cuda: lambda f, a, k: self._move(f, a, k, DEVICE),
            _TENSOR.cpu: lambda f, a, k: self._move(f, a, k, HOST),
            _TENSOR.type_as: self._type_as,
            _TENSOR.copy_: self._copy,
            _TENSOR.__getitem__: self._getitem,
            _TENSOR.__setitem__: self._setitem,
            _TENSOR.numpy: self._host_only,
            _TENSOR.__array__: self._host_only,
            _TENSOR.pin_memory: self._host_only,
            _TENSOR.backward: self._backward,
            torch.autograd.backward: self._backward,
            torch._C._nn._parse_to: self._parse_to,
        }

    # ------------------------------------------------------------------ tags

    def tag(self, t, kind: str | None):
        """``t`` tagged ``kind`` (None: left as it is); returns ``t``."""
        if kind is not None and isinstance(t, _TENSOR):
            self.tags[t] = kind
        return t

    def tag_of(self, t) -> str | None:
        return self.tags.get(t) if isinstance(t, _TENSOR) else None

    def tag_model(self, model) -> None:
        """Put a whole model on the device: parameters, buffers, plain tensor attributes."""
        for m in model.modules():
            for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
                self.tags[t] = DEVICE
            for v in vars(m).values():
                self.tag(v, DEVICE)

    def classify(self, dev) -> str | None:
        """The tag a ``device=`` argument gives (module doc)."""
        if isinstance(dev, torch.device):
            for tag, known in self.devices.items():
                if dev is known:
                    return tag
            return DEVICE if dev.type == "cuda" else None if dev.type == "meta" else HOST
        if isinstance(dev, str):
            return DEVICE if dev.startswith("cuda") else None if dev == "meta" else HOST
        if isinstance(dev, int) and not isinstance(dev, bool):
            return DEVICE
        return None

    # ------------------------------------------------------------------ violations

    def violation(self, kind: str, op: str, tensors, note: str = "") -> None:
        stack = _stack()
        key = (kind, op, stack[0] if stack else "?", _own_frame(stack))
        if key in self.violations:
            self.violations[key]["count"] += 1
            return
        shapes = " ".join(f"{self.tags.get(t, 'neutral')}{list(t.shape)}" for t in tensors)
        self.violations[key] = {
            "kind": kind,
            "op": op,
            "inputs": shapes + (f" ({note})" if note else ""),
            "site": stack[0] if stack else "?",
            "stack": stack,
            "count": 1,
        }

    def report(self) -> list[dict]:
        return sorted(self.violations.values(), key=lambda v: (v["site"], v["op"]))

    def _check_mix(self, func, tensors) -> str | None:
        """The merged tag of ``tensors``; records a violation where device meets host."""
        device = host = big_host = False
        for t in tensors:
            tag = self.tags.get(t)
            if tag is DEVICE:
                device = True
            elif tag is HOST:
                host = True
                big_host = big_host or t.dim() > 0
        if device and big_host:
            self.violation("op", _op_name(func), tensors)
        return DEVICE if device else HOST if host else None

    # ------------------------------------------------------------------ dispatch

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls += 1
        name = getattr(func, "__name__", "")
        if name == "__get__":
            return self._getter(func, args)
        if name == "__set__":
            if func.__self__ is _DATA and self.tag_of(args[1]) is not None:
                self.tags[args[0]] = self.tags[args[1]]  # p.data = x: p is now where x is
            return func(*args, **kwargs)
        special = self._special.get(func)
        if special is not None:
            return special(func, args, kwargs)
        if func in _QUERIES:
            return func(*args, **kwargs)
        return self._generic(func, args, kwargs)

    def _generic(self, func, args, kwargs):
        tensors = _tensors(args, kwargs)
        if kwargs.get("device") is not None:
            tag = self.classify(kwargs["device"])
        elif tensors:
            tag = self._check_mix(func, tensors)
        else:
            tag = HOST  # an allocation without a device: on a GPU it is on the CPU
        out = func(*args, **kwargs)
        if tag is not None:
            for o in _outputs(out):
                if o not in self.tags:  # an input returned as it is keeps its own tag
                    self.tags[o] = tag
        return out

    def _getter(self, func, args):
        out = func(*args)
        src = self.tag_of(args[0]) if args else None
        if isinstance(out, torch.device):
            return self.devices[src] if func.__self__ is _DEVICE and out.type == "cpu" else out
        if src is not None and isinstance(out, _TENSOR) and out not in self.tags:
            self.tags[out] = src  # .data, .grad, .T ... live where their tensor does
        return out

    # ------------------------------------------------------------------ moves

    def _retagged(self, src, out, tag):
        """``out`` tagged ``tag``; when ``.to`` returned ``src`` itself (on CPU it is "already
        there") and the tag changes, a view instead, so ``src`` keeps its own tag."""
        if tag is None or not isinstance(out, _TENSOR):
            return out
        if out is src and self.tags.get(src) not in (None, tag):
            out = src.view_as(src)
        self.tags[out] = tag
        return out

    def _to(self, func, args, kwargs):
        tag = self.classify(kwargs["device"]) if kwargs.get("device") is not None else None
        for a in args[1:]:
            if isinstance(a, _TENSOR):
                tag = self.tags.get(a)
            elif isinstance(a, (torch.device, str, int)) and not isinstance(a, bool):
                tag = self.classify(a)
        out = func(*args, **kwargs)
        return self._retagged(args[0], out, tag or self.tags.get(args[0]))

    def _move(self, func, args, kwargs, tag):
        return self._retagged(args[0], func(*args, **kwargs), tag)

    def _type_as(self, func, args, kwargs):
        return self._retagged(args[0], func(*args, **kwargs), self.tag_of(args[1]))

    def _parse_to(self, func, args, kwargs):
        """``Module.to(...)`` parses its arguments into a new ``torch.device``: give back the
        audit's object for the tag of what was passed (``model.to(parallel.device())``)."""
        out = func(*args, **kwargs)
        if out[0] is None or out[0].type != "cpu":
            return out
        target = kwargs.get("device", args[0] if args else None)
        tag = self.tag_of(target) if isinstance(target, _TENSOR) else self.classify(target)
        return (self.devices[tag], *out[1:])

    # ------------------------------------------------------------------ legal mixes

    def _copy(self, func, args, kwargs):
        dst, src = args[0], args[1]
        if dst not in self.tags and self.tag_of(src) is not None:
            self.tags[dst] = self.tags[src]
        return func(*args, **kwargs)

    def _index_tags(self, index) -> set:
        return {self.tags.get(t) for t in _tensors((index,), {})}

    def _getitem(self, func, args, kwargs):
        x, index = args[0], args[1]
        tag, idx = self.tags.get(x), self._index_tags(index)
        if tag is HOST and DEVICE in idx and x.dim() > 0:
            self.violation("op", "Tensor.__getitem__", [x, *_tensors((index,), {})])
        out = func(*args, **kwargs)
        tag = tag or (DEVICE if DEVICE in idx else None)
        if tag is not None and isinstance(out, _TENSOR) and out not in self.tags:
            self.tags[out] = tag
        return out

    def _setitem(self, func, args, kwargs):
        x, index = args[0], args[1]
        if self.tags.get(x) is HOST and DEVICE in self._index_tags(index):
            self.violation("op", "Tensor.__setitem__", [x, *_tensors((index,), {})])
        return func(*args, **kwargs)

    def _host_only(self, func, args, kwargs):
        if self.tags.get(args[0]) is DEVICE:
            self.violation("op", _op_name(func), [args[0]], "host-only call on a device tensor")
        return self._generic(func, args, kwargs)

    def _backward(self, func, args, kwargs):
        """Autograd with the audit active: while PyTorch hands this call to the mode, the mode
        is off the stack, and every backward function would run unaudited. (What
        ``torch.autograd.backward`` does, minus its dispatch to the mode.)"""
        from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
        from torch.autograd.graph import _engine_run_backward

        a = inspect.signature(func).bind(*args, **kwargs).arguments
        roots = a.get("self", a.get("tensors"))
        roots = (roots,) if isinstance(roots, _TENSOR) else tuple(roots)
        grads = a.get("gradient", a.get("grad_tensors"))
        grads = _make_grads(roots, _tensor_or_tensors_to_tuple(grads, len(roots)), False)
        inputs = a.get("inputs")
        inputs = (inputs,) if isinstance(inputs, _TENSOR) else tuple(inputs or ())
        create = bool(a.get("create_graph", False))
        retain = a.get("retain_graph")
        with self:
            _engine_run_backward(
                roots,
                grads,
                create if retain is None else retain,
                create,
                inputs,
                allow_unreachable=True,
                accumulate_grad=True,
            )


# ---------------------------------------------------------------------------- collectives

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
    tensors = _tensors([v for k, v in bound.items() if k != "group"], {})
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


# ---------------------------------------------------------------------------- a whole command


def _gpu_placement(audit: DeviceAudit) -> None:
    """Models, ``parallel.device()`` and host arrays as a GPU run has them (module doc):

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


def write_report(audit: DeviceAudit, argv: list[str], out_dir: str | None) -> str | None:
    """Each violation on stderr; ``rank<R>.<pid>.json`` under ``out_dir`` (if given)."""
    import minitron_mcore

    found = audit.report()
    rank = os.environ.get("RANK", "0")
    for v in found:
        own = _own_frame(v["stack"])
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
