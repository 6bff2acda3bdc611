"""Device audit, the tags: a ``TorchFunctionMode`` that knows which tensors a GPU run would have
on the device and which on the host, and records every op that mixes them.

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
``.numpy()`` / ``.pin_memory()`` of a device tensor. (Host tensors through NCCL collectives:
``device_audit_collectives.py``; how each is recorded and reported: ``device_audit_records.py``.)

Backward passes are audited too: autograd is entered with the mode active, so custom
``Function.backward``s and gradient hooks are checked. Limits: the ``.device`` of a neutral
tensor is neutral; ``x[i] = v`` with a host ``v`` is accepted for any index; code that
branches on ``torch.cuda.is_available()``, ``.is_cuda`` or ``.device.type`` takes its CPU
branch (so the audit checks what the GPU branch shares with it, not the GPU branch itself).
"""

from __future__ import annotations

import inspect

import torch
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from minitron_mcore.testing.device_audit_records import audit_stack, op_name, own_frame

HOST, DEVICE = "host", "device"

_TENSOR = torch.Tensor
_DATA = torch._C.TensorBase.__dict__["data"]
_DEVICE = torch._C.TensorBase.__dict__["device"]
# Calls that compare tensors without computing on them (Module._apply asks whether a parameter
# can take the moved tensor as its .data): never a mix.
_QUERIES = {
    torch._has_compatible_shallow_copy_type,
    torch.result_type,
    torch.is_same_size,
    _TENSOR.is_same_size,
    _TENSOR.is_set_to,
}


def tensors_in(args, kwargs) -> list:
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


class DeviceAudit(TorchFunctionMode):
    """Tags tensors ``device`` / ``host`` and records every op that mixes them (module doc).

    ``with DeviceAudit() as audit: ...`` audits ops alone; ``device_audit.install`` adds the
    collective checks and the GPU-like model placement for a whole command."""

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
        stack = audit_stack()
        key = (kind, op, stack[0] if stack else "?", own_frame(stack))
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
            self.violation("op", op_name(func), tensors)
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
        tensors = tensors_in(args, kwargs)
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
        return {self.tags.get(t) for t in tensors_in((index,), {})}

    def _getitem(self, func, args, kwargs):
        x, index = args[0], args[1]
        tag, idx = self.tags.get(x), self._index_tags(index)
        if tag is HOST and DEVICE in idx and x.dim() > 0:
            self.violation("op", "Tensor.__getitem__", [x, *tensors_in((index,), {})])
        out = func(*args, **kwargs)
        tag = tag or (DEVICE if DEVICE in idx else None)
        if tag is not None and isinstance(out, _TENSOR) and out not in self.tags:
            self.tags[out] = tag
        return out

    def _setitem(self, func, args, kwargs):
        x, index = args[0], args[1]
        if self.tags.get(x) is HOST and DEVICE in self._index_tags(index):
            self.violation("op", "Tensor.__setitem__", [x, *tensors_in((index,), {})])
        return func(*args, **kwargs)

    def _host_only(self, func, args, kwargs):
        if self.tags.get(args[0]) is DEVICE:
            self.violation("op", op_name(func), [args[0]], "host-only call on a device tensor")
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
