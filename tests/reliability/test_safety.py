"""Safety (issue 11, point 3): nothing minitron reads can run code stored in it.

(a) ``torch.load`` is always called with ``weights_only=True``;
(b) Hugging Face weights are read only from safetensors: a directory holding only
    ``pytorch_model.bin`` is refused with one ``error:`` line naming the fix, never unpickled;
(c) no ``trust_remote_code`` anywhere, and every ``from_pretrained`` of the package passes
    ``local_files_only=True`` (model loads also ``use_safetensors=True``);
(d) every checkpoint read goes through the restricted reader of ``checkpoint/safe_load.py``
    (``MetadataUnpickler`` for ``.metadata``, byte items checked with ``weights_only=True``,
    ``common.pt`` with ``weights_only=True``), including distillation's student and teacher and
    the pipeline's steps and its resume.

Proved three ways:

* a static audit of the package source (``ast``): offenders are reported as ``file:line``;
  each rule is also run on a small source string that breaks it, so the audit can fail;
* a runtime audit: real CLI commands run with a ``sitecustomize.py`` on ``PYTHONPATH`` that
  logs every ``torch.load`` and every unpickling (``pickle.load``/``loads``/``Unpickler.load``,
  with the unpickler's class and the call stack); each logged call must be one of the safe
  kinds of :func:`judge` (a planted violation is caught, see ``test_runtime_audit_can_fail``);
* planted files: a pickle that would ``touch`` a marker file, placed where distillation and the
  pipeline read (``test_checkpoint_safety.py`` covers ``correct``'s resume, ``export-hf`` and
  ``evaluate``), must be refused with one ``error:`` line while the marker never appears.

    python3 -m pytest -q tests/reliability/test_safety.py -p no:cacheprovider           # ~1 min
    python3 -m pytest -q tests/reliability/test_safety.py -p no:cacheprovider -m slow   # ~2.5-3 min
"""

from __future__ import annotations

import ast
import collections
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from catalogue import ROOT, TRAIN, Shared, cli, env  # noqa: E402
from test_checkpoint_safety import _one_error, _plant  # noqa: E402

PACKAGE = os.path.join(ROOT, "minitron_mcore")
SAFE_LOAD = "minitron_mcore/checkpoint/safe_load.py"
# Text outside the package that configures what minitron runs (lm-eval task YAMLs, configs,
# launchers): trust_remote_code must not appear there either.
CONFIG_DIRS = ("conf", "examples", "launch")


# ============================================================================ static audit


def _aliases(tree: ast.AST) -> dict[str, str]:
    """Local name -> dotted name it was imported as (``import torch as T`` -> ``T: torch``).

    Imports anywhere in the module count (the package imports lazily inside functions);
    shadowing is ignored, which can only make the audit stricter."""
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    out[a.asname] = a.name
                else:
                    top = a.name.split(".")[0]
                    out[top] = top
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST, aliases: dict[str, str]) -> str:
    """``torch.serialization.load`` for the expression ``torch.serialization.load`` (through the
    module's import aliases); "" when it is not a plain dotted name."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id, "")
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value, aliases)
        return f"{base}.{node.attr}" if base else ""
    return ""


def _kw(call: ast.Call, name: str):
    """The keyword argument ``name`` of ``call``, or None."""
    return next((k for k in call.keywords if k.arg == name), None)


def _is_true(kw) -> bool:
    return kw is not None and isinstance(kw.value, ast.Constant) and kw.value.value is True


def _references(tree: ast.AST, aliases: dict[str, str], names: set[str]):
    """(node, dotted name) for every expression naming one of ``names``, called or not."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.Name, ast.Attribute)):
            name = _dotted(node, aliases)
            if name in names:
                yield node, name


def _calls(tree: ast.AST) -> dict[int, ast.Call]:
    """id(func expression) -> the Call it is the callee of."""
    return {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}


TORCH_LOADS = {"torch.load", "torch.serialization.load"}


def torch_load_offenders(source: str, path: str) -> list[str]:
    """(a) Every ``torch.load`` is a direct call with the literal ``weights_only=True`` (not a
    variable, not ``**kwargs``, not torch's default, which an environment variable can turn
    off); ``torch.load`` is never passed around, where its arguments cannot be checked."""
    tree = ast.parse(source, path)
    aliases, calls, out = _aliases(tree), _calls(tree), []
    for node, name in _references(tree, aliases, TORCH_LOADS):
        call = calls.get(id(node))
        if call is None:
            out.append(f"{path}:{node.lineno}: {name} used other than as a direct call")
        elif not _is_true(_kw(call, "weights_only")):
            out.append(f"{path}:{node.lineno}: {name}(...) without weights_only=True")
    return out


# Readers that unpickle (run code from) what they read. pickle.Unpickler is admitted only as
# the base class of safe_load's restricted MetadataUnpickler.
PICKLE_READERS = {
    f"{m}.{f}"
    for m in ("pickle", "_pickle", "cPickle", "dill", "cloudpickle")
    for f in ("load", "loads", "Unpickler")
} | {
    "marshal.load",
    "marshal.loads",
    "shelve.open",
    "joblib.load",
    "pandas.read_pickle",
    "torch.jit.load",
    "torch.package.PackageImporter",
    "torch.serialization._load",
    "torch.serialization._legacy_load",
}


def _restricted_unpickler_bases(tree: ast.AST, path: str) -> set[int]:
    if path != SAFE_LOAD:
        return set()
    return {
        id(b)
        for n in ast.walk(tree)
        if isinstance(n, ast.ClassDef) and n.name == "MetadataUnpickler"
        for b in n.bases
    }


def pickle_offenders(source: str, path: str) -> list[str]:
    """(d) No unpickling outside safe_load's restricted unpickler (and no ``numpy.load`` with
    ``allow_pickle=True``)."""
    tree = ast.parse(source, path)
    aliases, calls, out = _aliases(tree), _calls(tree), []
    allowed = _restricted_unpickler_bases(tree, path)
    for node, name in _references(tree, aliases, PICKLE_READERS):
        if id(node) not in allowed:
            out.append(f"{path}:{node.lineno}: {name} (unpickles what it reads)")
    for node, name in _references(tree, aliases, {"numpy.load"}):
        call = calls.get(id(node))
        kw = _kw(call, "allow_pickle") if call else None
        if call is None or (kw is not None and not _is_false(kw)):
            out.append(f"{path}:{node.lineno}: {name} that may allow pickles")
    return out


def _is_false(kw) -> bool:
    return isinstance(kw.value, ast.Constant) and kw.value.value is False


def remote_code_offenders(source: str, path: str) -> list[str]:
    """(c) ``trust_remote_code`` nowhere: no keyword, no string, no name."""
    tree = ast.parse(source, path)
    out = []
    for node in ast.walk(tree):
        hit = (
            (isinstance(node, ast.keyword) and node.arg == "trust_remote_code")
            or (isinstance(node, ast.Constant) and "trust_remote_code" in str(node.value))
            or (isinstance(node, ast.Name) and node.id == "trust_remote_code")
            or (isinstance(node, ast.Attribute) and node.attr == "trust_remote_code")
            or (isinstance(node, ast.arg) and node.arg == "trust_remote_code")
        )
        if hit:
            out.append(f"{path}:{getattr(node, 'lineno', '?')}: trust_remote_code")
    return out


HUB_DOWNLOADS = {
    "huggingface_hub.hf_hub_download",
    "huggingface_hub.snapshot_download",
    "transformers.utils.hub.cached_file",
}


def from_pretrained_offenders(source: str, path: str) -> list[str]:
    """(c) Every ``X.from_pretrained(...)`` passes ``local_files_only=True`` (nothing comes
    from the Hub), and for a model (``X`` names a ``*Model*`` class) also
    ``use_safetensors=True`` (b: never a pickled ``pytorch_model.bin``); no Hub downloads."""
    tree = ast.parse(source, path)
    aliases, out = _aliases(tree), []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        if node.func.attr != "from_pretrained":
            continue
        where = f"{path}:{node.lineno}: {ast.unparse(node.func)}(...)"
        if not _is_true(_kw(node, "local_files_only")):
            out.append(f"{where} without local_files_only=True")
        owner = _dotted(node.func.value, aliases) or ast.unparse(node.func.value)
        if "Model" in owner.split(".")[-1] and not _is_true(_kw(node, "use_safetensors")):
            out.append(f"{where} without use_safetensors=True")
    for node, name in _references(tree, aliases, HUB_DOWNLOADS):
        out.append(f"{path}:{node.lineno}: {name} (downloads from the Hub)")
    return out


_MCORE = "megatron.core.dist_checkpointing"
_DCP = "torch.distributed.checkpoint"
# Checkpoint readers that unpickle .metadata / byte items / common.pt with torch's defaults:
# only safe_load.py builds on them (Megatron's load with its restricted strategies).
RAW_CHECKPOINT_READERS = {
    f"{m}.{f}"
    for m in (_MCORE, f"{_MCORE}.serialization")
    for f in (
        "load",
        "load_common_state_dict",
        "load_tensors_metadata",
        "load_sharded_metadata",
        "load_plain_tensors",
        "load_content_metadata",
    )
} | {
    f"{_DCP}.FileSystemReader",
    f"{_DCP}.filesystem.FileSystemReader",
    f"{_DCP}.load_state_dict",
    f"{_DCP}.state_dict_loader.load_state_dict",
}
DCP_LOADS = {f"{_DCP}.load", f"{_DCP}.state_dict_loader.load"}


def checkpoint_reader_offenders(source: str, path: str) -> list[str]:
    """(d) Megatron's and torch DCP's checkpoint readers are used only by safe_load.py, and
    Megatron's ``load`` there only with both restricted strategies; a DCP ``load`` elsewhere
    names its storage reader and its planner (DCP's defaults read ``.metadata`` with plain
    pickle and byte items with ``weights_only=False``)."""
    tree = ast.parse(source, path)
    aliases, calls, out = _aliases(tree), _calls(tree), []
    for node, name in _references(tree, aliases, RAW_CHECKPOINT_READERS):
        call = calls.get(id(node))
        strategies = call is not None and all(
            _kw(call, k) for k in ("sharded_strategy", "common_strategy")
        )
        if path != SAFE_LOAD or (name.endswith(".load") and not strategies):
            out.append(f"{path}:{node.lineno}: {name} outside safe_load's restricted reader")
    for node, name in _references(tree, aliases, DCP_LOADS):
        call = calls.get(id(node))
        if call is None or not (_kw(call, "storage_reader") and _kw(call, "planner")):
            out.append(f"{path}:{node.lineno}: {name} without storage_reader= and planner=")
    return out


RULES = {
    "checkpoint readers": checkpoint_reader_offenders,
    "torch.load": torch_load_offenders,
    "pickle": pickle_offenders,
    "trust_remote_code": remote_code_offenders,
    "from_pretrained": from_pretrained_offenders,
}


def package_sources() -> list[tuple[str, str]]:
    """(path relative to the repository, source) of every module of the package.

    ``minitron_mcore/testing/`` is in scope: it ships with the package (importable by users,
    used by every test fixture), and its ``from_pretrained`` calls read directories it has
    just written, so ``local_files_only=True`` costs it nothing."""
    out = []
    for p in sorted(glob.glob(os.path.join(PACKAGE, "**", "*.py"), recursive=True)):
        with open(p, encoding="utf-8") as f:
            out.append((os.path.relpath(p, ROOT), f.read()))
    return out


def _line(offender: str) -> int:
    return int(offender.split(":")[1])


@pytest.mark.parametrize("rule", sorted(RULES))
def test_package_source_audit(rule):
    sources = package_sources()
    assert len(sources) > 40 and any(p == SAFE_LOAD for p, _ in sources)
    offenders = [o for path, src in sources for o in sorted(RULES[rule](src, path), key=_line)]
    assert not offenders, f"{rule}:\n" + "\n".join(offenders)


def test_no_trust_remote_code_in_configs():
    """Task YAMLs (lm-eval's ``dataset_kwargs``), configs and launchers do not turn it on."""
    offenders = []
    for d in CONFIG_DIRS:
        for p in sorted(glob.glob(os.path.join(ROOT, d, "**", "*"), recursive=True)):
            if not os.path.isfile(p):
                continue
            try:
                with open(p, encoding="utf-8") as f:
                    lines = f.readlines()
            except UnicodeDecodeError:
                continue
            rel = os.path.relpath(p, ROOT)
            offenders += [f"{rel}:{i}" for i, x in enumerate(lines, 1) if "trust_remote_code" in x]
    assert not offenders, "\n".join(offenders)


# Each rule on code that breaks it (the line of the offence is the last line of each snippet).
VIOLATIONS = {
    "torch.load": [
        "import torch\ntorch.load(p)",
        "import torch\ntorch.load(p, weights_only=False)",
        "import torch\nw = True\ntorch.load(p, weights_only=w)",
        "import torch\ntorch.load(p, **kw)",
        "from torch import load as L\nL(p, map_location='cpu')",
        "import torch.serialization as s\ns.load(p)",
        "import torch\nf = torch.load",
    ],
    "pickle": [
        "import pickle\npickle.load(f)",
        "import pickle as p\np.loads(b)",
        "from pickle import Unpickler\nUnpickler(f).load()",
        "import pickle\nclass MetadataUnpickler(pickle.Unpickler): pass",  # not in safe_load
        "import _pickle\n_pickle.loads(b)",
        "import numpy as np\nnp.load(p, allow_pickle=True)",
        "import torch\ntorch.jit.load(p)",
    ],
    "trust_remote_code": [
        "from transformers import AutoModel\nAutoModel.from_pretrained(p, trust_remote_code=True)",
        "kw = {'trust_remote_code': True}",
        "def f(trust_remote_code=False): pass",
    ],
    "from_pretrained": [
        "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(p)",
        "from transformers import AutoTokenizer\nAutoTokenizer.from_pretrained(p, "
        "local_files_only=False)",
        "import transformers as t\nt.AutoModelForCausalLM.from_pretrained(p, "
        "local_files_only=True)",  # no use_safetensors=True
        "from huggingface_hub import snapshot_download\nsnapshot_download('x/y')",
    ],
    "checkpoint readers": [
        "from megatron.core import dist_checkpointing\ndist_checkpointing.load(sd, d)",
        "from torch.distributed.checkpoint import FileSystemReader\nr = FileSystemReader(d)",
        "import torch.distributed.checkpoint as dcp\ndcp.load(sd, checkpoint_id=d)",
        "from torch.distributed.checkpoint import load\nload(sd, storage_reader=r)",
    ],
}
CLEAN = {
    "torch.load": "import torch\ntorch.load(p, map_location='cpu', weights_only=True)",
    "pickle": "import pickle\npickle.dumps(x)\nraise pickle.UnpicklingError('x')",
    "trust_remote_code": "x = 'remote'",
    "from_pretrained": "from transformers import AutoModelForCausalLM as M\n"
    "M.from_pretrained(p, local_files_only=True, use_safetensors=True)",
    "checkpoint readers": "from torch.distributed.checkpoint import load\n"
    "load({}, storage_reader=SafeFileSystemReader(d), planner=_RegionPlanner(r))",
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_audit_catches_violations(rule):
    """Every rule fails on code that breaks it, naming the file and the line; it passes clean
    code."""
    for src in VIOLATIONS[rule]:
        found = RULES[rule](src, "pkg/x.py")
        line = len(src.splitlines())
        assert any(o.startswith(f"pkg/x.py:{line}:") for o in found), (src, found)
    assert RULES[rule](CLEAN[rule], "pkg/x.py") == []


def test_safe_load_exemptions_are_narrow():
    """safe_load.py may subclass pickle.Unpickler (only as MetadataUnpickler) and call
    Megatron's load (only with both restricted strategies); no other file may."""
    src = "import pickle\nclass MetadataUnpickler(pickle.Unpickler): pass"
    assert pickle_offenders(src, SAFE_LOAD) == []
    assert pickle_offenders(src, "minitron_mcore/other.py")
    assert pickle_offenders(src.replace("Metadata", "Other"), SAFE_LOAD)
    src = "from megatron.core import dist_checkpointing\ndist_checkpointing.load(sd, d)"
    assert checkpoint_reader_offenders(src, SAFE_LOAD)
    src = src.replace("d)", "d, sharded_strategy=s, common_strategy=c)")
    assert checkpoint_reader_offenders(src, SAFE_LOAD) == []
    assert checkpoint_reader_offenders(src, "minitron_mcore/other.py")


# ============================================================================ runtime audit

# Logs every torch.load and every unpickling of the process (and of its children, which
# inherit PYTHONPATH) as one JSON line: what was called, weights_only, what it read, the
# unpickler's class, the call stack (innermost first) and the command's tag. pickle is
# patched before anything imports it; torch.serialization.load right after torch.serialization
# runs, before ``torch/__init__`` binds it as ``torch.load``.
SITECUSTOMIZE = r"""
import importlib.machinery, json, os, pickle, sys

_LOG = os.environ.get("MINITRON_SAFETY_AUDIT_LOG")
_TAG = os.environ.get("MINITRON_SAFETY_AUDIT_TAG", "")
_HERE = os.path.abspath(__file__)


def _stack():
    f, out = sys._getframe(1), []
    while f is not None and len(out) < 60:
        if os.path.abspath(f.f_code.co_filename) != _HERE:
            out.append([f.f_code.co_filename, f.f_lineno, f.f_code.co_qualname])
        f = f.f_back
    return out


def _log(**rec):
    if _LOG:
        rec.update(pid=os.getpid(), tag=_TAG, stack=_stack())
        with open(_LOG, "a") as f:
            f.write(json.dumps(rec, default=str) + "\n")


def _source(f):
    return os.fspath(f) if isinstance(f, (str, os.PathLike)) else f"<{type(f).__name__} {id(f):x}>"


_load, _loads, _Unpickler = pickle.load, pickle.loads, pickle.Unpickler


def load(file, *a, **k):
    _log(fn="pickle.load", source=_source(file))
    return _load(file, *a, **k)


def loads(data, *a, **k):
    _log(fn="pickle.loads")
    return _loads(data, *a, **k)


class Unpickler(_Unpickler):
    def load(self):
        c = type(self)
        _log(fn="Unpickler.load", cls=f"{c.__module__}.{c.__qualname__}")
        return super().load()


pickle.load, pickle.loads, pickle.Unpickler = load, loads, Unpickler


def _patch(mod):
    real = mod.load

    def load(f, *a, **k):
        _log(fn="torch.load", weights_only=k.get("weights_only", "default"), source=_source(f))
        return real(f, *a, **k)

    mod.load = load


class _Finder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "torch.serialization":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _Finder)
"""


def _frame(stack, file_suffix: str, qualname: str) -> bool:
    return any(f.endswith(file_suffix) and q == qualname for f, _, q in stack)


def _kind(r: dict, previous_load: dict | None) -> str | None:
    """What made this logged load safe, or None (a violation)."""
    st = r["stack"]
    if _frame(st, "torch/distributed/distributed_c10d.py", "_tensor_to_object"):
        # all_gather_object / broadcast_object_list: objects this job's own ranks pickled,
        # in memory (never a file); torch unpickles tensors in them with storage's own loader.
        return "objects exchanged between the job's ranks (in memory)"
    if st and "/multiprocessing/" in st[0][0] and r["fn"] != "torch.load":
        # Megatron's checkpoint writer reports back from its worker process over a queue (only
        # multiprocessing's own reads count: a child process's other loads are judged as usual).
        return "messages between the job's processes (in memory)"
    if r["fn"] == "Unpickler.load" and r["cls"] == (
        "minitron_mcore.checkpoint.safe_load.MetadataUnpickler"
    ):
        return "restricted metadata unpickler"
    if r["fn"] == "torch.load" and r["weights_only"] is True:
        return "torch.load(weights_only=True)"
    in_byte_item = _frame(st, SAFE_LOAD, "_SafeLoadPlanner.load_bytes") and _frame(
        st, "torch/distributed/checkpoint/default_planner.py", "DefaultLoadPlanner.load_bytes"
    )
    if in_byte_item and r["fn"] == "torch.load" and r["weights_only"] is False:
        # torch DCP deserialises a byte item with weights_only=False; it must be the stream
        # check_bytes_item has just read with weights_only=True.
        ok = (
            previous_load is not None
            and previous_load["source"] == r["source"]
            and previous_load["weights_only"] is True
            and _frame(previous_load["stack"][:1], SAFE_LOAD, "check_bytes_item")
        )
        return "byte item, checked with weights_only=True first" if ok else None
    if in_byte_item and r["fn"] == "Unpickler.load" and r["cls"].startswith("torch.serialization."):
        return "byte item, checked with weights_only=True first"  # the torch.load above
    return None


def read_audit(path: str) -> list[dict]:
    """The logged calls; a last line cut short by a SIGKILL (no newline yet) is dropped."""
    with open(path) as f:
        lines = f.read().split("\n")
    return [json.loads(x) for x in lines[:-1] if x.strip()]


def judge(records: list[dict]) -> tuple[list[str], dict]:
    """(violations as ``tag: what, file:line (package frame)``, tag -> Counter of safe kinds)."""
    problems, kinds = [], collections.defaultdict(collections.Counter)
    previous = {}  # pid -> the last torch.load record
    for r in records:
        kind = _kind(r, previous.get(r["pid"]))
        if r["fn"] == "torch.load":
            previous[r["pid"]] = r
        if kind:
            kinds[r["tag"]][kind] += 1
            continue
        f, line, _ = r["stack"][0] if r["stack"] else ("?", 0, "")
        pkg = next((s for s in r["stack"] if f"{os.sep}minitron_mcore{os.sep}" in s[0]), None)
        what = r["fn"] + (f" weights_only={r.get('weights_only')}" if "weights_only" in r else "")
        what += f" {r['cls']}" if r.get("cls") else ""
        where = f"{f}:{line}" + (f" (from {pkg[0]}:{pkg[1]})" if pkg else "")
        problems.append(f"{r['tag']}: {what} at {where} reading {r.get('source', '?')}")
    return problems, kinds


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    d = tmp_path_factory.mktemp("audit-site")
    (d / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return str(d)


def _audit_env(site: str, log: str, tag: str) -> dict:
    return {
        "PYTHONPATH": os.pathsep.join([site, env()["PYTHONPATH"]]),
        "MINITRON_SAFETY_AUDIT_LOG": log,
        "MINITRON_SAFETY_AUDIT_TAG": tag,
    }


class Audited:
    """Runs CLI commands under the audit, all logging into one file."""

    def __init__(self, site: str, log: str):
        self.site, self.log, self.seconds = site, log, {}

    def __call__(self, tag: str, argv: list[str], ok: bool = True, nproc: int = 1):
        t0 = time.time()
        r = cli(argv, nproc=nproc, extra_env=_audit_env(self.site, self.log, tag))
        self.seconds[tag] = round(time.time() - t0, 1)
        if ok:
            assert r.returncode == 0, f"{tag} failed ({r.returncode}):\n{r.stderr[-3000:]}"
        return r

    def check(self, must_use_restricted: set[str]) -> dict:
        problems, kinds = judge(read_audit(self.log))
        assert not problems, "unsafe loads:\n" + "\n".join(problems[:40])
        for tag in must_use_restricted:  # the hook saw the checkpoint reads it should see
            assert kinds[tag]["restricted metadata unpickler"] > 0, (tag, dict(kinds[tag]))
        return kinds


def test_runtime_audit_can_fail(site, tmp_path):
    """The hook sees unsafe loads in a child process and judge() reports them."""
    log = str(tmp_path / "audit.jsonl")
    code = (
        "import io, pickle, torch\n"
        "b = io.BytesIO(); torch.save({'t': torch.ones(1)}, b)\n"
        "b.seek(0); torch.load(b, weights_only=False)\n"
        "b.seek(0); torch.load(b)\n"
        "pickle.loads(pickle.dumps(1))\n"
        "b.seek(0); torch.load(b, weights_only=True)\n"
        "class U(pickle.Unpickler): pass\n"
        "U(io.BytesIO(pickle.dumps(1))).load()\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        env=dict(env(), **_audit_env(site, log, "selftest")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    problems, kinds = judge(read_audit(log))
    text = "\n".join(problems)
    assert "torch.load weights_only=False at <string>:3" in text, text
    assert "torch.load weights_only=default at <string>:4" in text, text
    assert "pickle.loads at <string>:5" in text, text
    assert "Unpickler.load __main__.U at <string>:8" in text, text
    assert kinds["selftest"]["torch.load(weights_only=True)"] == 1


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """The catalogue's tiny inputs: tokenizer, HF Llama, its checkpoint, corpus, scores."""
    return Shared(str(tmp_path_factory.mktemp("safety-shared")))


def _train_args(steps: int, w: str, *extra: str) -> list[str]:
    return [a for a in TRAIN if not a.startswith("train.steps=")] + [
        f"train.steps={steps}",
        f"data.cache_dir={w}/cache",
        *extra,
    ]


RESUME = "resume_override=[train.steps]"


def _correct_then_distill(run: Audited, shared: Shared, w: str, student: str) -> None:
    """correct 2 steps, resume it to 4 (weights, optimizer state, common.pt, byte items),
    then distill ``student`` from the corrected teacher (a random model is no teacher: the
    distill load check wants a loss below log(vocab))."""
    data = f"data.train=[{shared.get('corpus')}]"
    run("correct", _correct(shared, w) + _train_args(2, w))
    run("correct-resume", _correct(shared, w) + _train_args(4, w, RESUME))
    distill = ["distill", f"load={student}", f"teacher={w}/corrected", f"save={w}/kd", data]
    run("distill", distill + _train_args(2, w))


def _correct(shared: Shared, w: str) -> list[str]:
    data = f"data.train=[{shared.get('corpus')}]"
    return ["correct", f"load={shared.get('ckpt')}", f"save={w}/corrected", data]


def test_runtime_training_and_distill_load_safely(site, shared, tmp_path):
    """correct, its resume and distill (student + teacher): every torch.load has
    weights_only=True and every checkpoint unpickling is the restricted one."""
    w, log = str(tmp_path), str(tmp_path / "audit.jsonl")
    run = Audited(site, log)
    _correct_then_distill(run, shared, w, student=shared.get("ckpt"))
    kinds = run.check({"correct", "correct-resume", "distill"})
    # resume reads weights and optimizer state; distill reads student and teacher
    assert kinds["correct-resume"]["restricted metadata unpickler"] >= 2, dict(kinds)
    assert kinds["distill"]["restricted metadata unpickler"] >= 2, dict(kinds)
    assert kinds["correct-resume"]["byte item, checked with weights_only=True first"] > 0


PIPELINE = [
    "correct.train.steps=3",
    "correct.train.warmup_steps=1",
    "correct.train.global_batch_size=4",
    "correct.train.micro_batch_size=2",
    "correct.train.seq_length=32",
    "correct.train.eval_iters=0",
    "correct.original_lr=3e-3",
    "correct.lr_fraction=1.0",  # the random HF teacher must beat a uniform guess after this
    "importance.num_samples=4",
    "importance.seq_length=32",
    "importance.micro_batch_size=2",
    "importance.layer_loss_samples=2",
    "students=[{name:width,target:{hidden_size:48}}]",
    "distill.train.steps=6",
    "distill.train.warmup_steps=1",
    "distill.train.global_batch_size=4",
    "distill.train.micro_batch_size=2",
    "distill.train.seq_length=32",
    "distill.train.eval_iters=0",
    "distill.train.save_interval=2",
    "evaluate.generate_tokens=4",
    "pipeline.skip=[evaluate]",
]


def _pipeline(run_dir: str, teacher: str, corpus: str) -> list[str]:
    data = [f"data.original=[{corpus}]", f"data.distill=[{corpus}]"]
    return ["pipeline", f"run_dir={run_dir}", f"teacher={teacher}", *data, *PIPELINE]


def _run_until(argv: list[str], extra_env: dict, path: str, timeout: int = 600) -> None:
    """Start ``minitron argv`` in its own session and SIGKILL that session the moment ``path``
    exists (a node lost in the middle of a step)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "minitron_mcore", *argv],
        env=dict(env(), **extra_env),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    try:
        while not os.path.exists(path) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.multiproc
def test_runtime_every_command_loads_safely(site, shared, tmp_path):
    """import-hf, correct (+ resume, also on 2 ranks), importance, prune, distill (+ resume),
    evaluate, export-hf, and a tiny pipeline: killed inside distillation, re-run with a planted
    ``.metadata`` in the checkpoint it resumes from (refused), re-run (resumes), re-run again
    (skips). Every load is one of judge()'s safe kinds."""
    from minitron_mcore.checkpoint.megatron import resolve_checkpoint

    w, log = str(tmp_path), str(tmp_path / "audit.jsonl")
    run = Audited(site, log)
    corpus, data = shared.get("corpus"), f"data.train=[{shared.get('corpus')}]"
    run("import-hf", ["import-hf", f"load={shared.get('hf')}", f"save={w}/imported", "dtype=fp32"])
    scores = f"{w}/scores"
    imp = [
        "importance.num_samples=4",
        "importance.seq_length=32",
        "importance.layer_loss_samples=4",
    ]
    _correct_then_distill(run, shared, w, student=f"{w}/imported")
    run("importance", ["importance", f"load={w}/corrected", f"save={scores}", data, *imp])
    prune = ["prune", f"load={w}/corrected", f"scores={scores}", f"save={w}/student"]
    run("prune", prune + ["prune.target.hidden_size=48", "prune.target.num_layers=3"])
    kd = ["distill", f"load={w}/student", f"teacher={w}/corrected", f"save={w}/kd2", data]
    run("distill-pruned", kd + _train_args(2, w))
    run("distill-resume", kd + _train_args(4, w, RESUME))
    ev = ["evaluate", f"load={w}/kd2", f"data.valid=[{corpus}]", "iters=1", "seq_length=32"]
    run("evaluate", ev + [f"save={w}/eval"])
    run("export-hf", ["export-hf", f"load={w}/kd2", f"save={w}/hf"])
    # 2 ranks resuming a 1-rank run: the reads are shared out, objects go between ranks
    run("correct-resume-2ranks", _correct(shared, w) + _train_args(6, w, RESUME), nproc=2)

    pipe = _pipeline(f"{w}/pipe", shared.get("hf"), corpus)
    distilled = f"{w}/pipe/students/width/distilled"
    _run_until(pipe, _audit_env(site, log, "pipeline-killed"), f"{distilled}/minitron.json")
    assert not os.path.exists(f"{w}/pipe/stages/distill.width.json"), "killed too late"
    meta = os.path.join(resolve_checkpoint(distilled), "optim", ".metadata")
    shutil.copy2(meta, meta + ".orig")
    marker = tmp_path / "pwned"
    _plant(meta, marker)
    r = run("pipeline-planted", pipe, ok=False)
    err = _one_error(r)
    assert "refusing to load" in err and "nothing from it was run" in err, err
    assert not marker.exists(), "the pipeline's resume ran the planted payload"
    os.replace(meta + ".orig", meta)
    r = run("pipeline-resume", pipe)
    assert "resumed" in r.stderr, r.stderr[-3000:]
    r = run("pipeline-done", pipe)
    assert "running distill.width" not in r.stderr, r.stderr[-3000:]
    loading = {"correct", "correct-resume", "distill", "importance", "prune", "distill-pruned"}
    loading |= {"distill-resume", "evaluate", "export-hf", "correct-resume-2ranks"}
    loading |= {"pipeline-killed", "pipeline-resume"}
    run.check(loading)
    print("seconds per command:", run.seconds)


# ============================================================================ planted files


def _planted_copy(shared: Shared, tmp_path, what: str) -> tuple[str, object]:
    """A copy of the shared checkpoint with ``weights/<what>`` replaced by a pickle that would
    create a marker file; returns (checkpoint, marker)."""
    from minitron_mcore.checkpoint.megatron import resolve_checkpoint

    ckpt = str(tmp_path / "planted")
    shutil.copytree(shared.get("ckpt"), ckpt)
    marker = tmp_path / "pwned"
    _plant(os.path.join(resolve_checkpoint(ckpt), "weights", what), marker)
    return ckpt, marker


def _refused(r, marker, what: str) -> None:
    err = _one_error(r)
    assert "refusing to load" in err and "nothing from it was run" in err, err
    assert not marker.exists(), f"{what} ran the planted payload"


@pytest.mark.parametrize(
    "role,what",
    [("teacher", ".metadata"), ("teacher", "common.pt"), ("student", ".metadata")],
)
def test_distill_refuses_planted_checkpoint(shared, tmp_path, role, what):
    """distill reads the student (load=) and the teacher (teacher=) through safe_load: a planted
    file in either is refused before anything from it runs, and nothing is saved."""
    planted, marker = _planted_copy(shared, tmp_path, what)
    good = shared.get("ckpt")
    student, teacher = (good, planted) if role == "teacher" else (planted, good)
    argv = ["distill", f"load={student}", f"teacher={teacher}", f"save={tmp_path}/kd"]
    argv += [f"data.train=[{shared.get('corpus')}]", *_train_args(2, str(tmp_path))]
    _refused(cli(argv), marker, f"distill ({role} {what})")
    assert not os.path.exists(f"{tmp_path}/kd/minitron.json")


def test_pipeline_refuses_planted_teacher(shared, tmp_path):
    """The pipeline's first load (teacher correction) of a given Megatron teacher."""
    planted, marker = _planted_copy(shared, tmp_path, ".metadata")
    argv = _pipeline(f"{tmp_path}/pipe", planted, shared.get("corpus"))
    _refused(cli(argv), marker, "pipeline")
    assert not os.path.exists(f"{tmp_path}/pipe/stages/correct.json")


# (The pipeline's resume from its own interval checkpoint, with a planted .metadata, is part of
# the slow test_runtime_every_command_loads_safely.)


# ============================================================================ (b) safetensors only


def test_import_hf_refuses_pickled_weights(site, shared, tmp_path):
    """An HF directory with ``pytorch_model.bin`` and no safetensors: one error line naming
    the fix (re-save with safe_serialization=True); the file is never unpickled (its payload
    does not run, and the audit sees no torch.load or unpickling at all). Not in the
    catalogue, which covers only broken safetensors files."""
    hf = str(tmp_path / "hf_bin")
    shutil.copytree(shared.get("hf"), hf)
    for p in glob.glob(os.path.join(hf, "*.safetensors*")):
        os.remove(p)
    marker = tmp_path / "pwned"
    _plant(os.path.join(hf, "pytorch_model.bin"), marker)
    log = str(tmp_path / "audit.jsonl")
    argv = ["import-hf", f"load={hf}", f"save={tmp_path}/out", "dtype=fp32"]
    r = cli(argv, extra_env=_audit_env(site, log, "import-hf-bin"))
    err = _one_error(r)
    assert "safetensors" in err and "safe_serialization=True" in err, err
    assert not marker.exists(), "import-hf unpickled pytorch_model.bin"
    assert not os.path.exists(f"{tmp_path}/out")
    loads = read_audit(log) if os.path.exists(log) else []
    assert not loads, [(x["fn"], x["stack"][0]) for x in loads]
