"""The package's structure, read from its imports (``ast``): dependencies point down the layers of
DESIGN.md, no module takes another module's private names, and no two modules import each other
through any chain (imports inside functions count: a deferred import is still a dependency).

The layers, top to bottom (DESIGN.md's order; where it puts several packages on one level, the
finer order below is the one the code keeps - a stage entry composes importance/prune/evaluate
components, a checkpoint knows the model families and the data's tokenizer, not the reverse):
"""

from __future__ import annotations

import ast
import os
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "minitron_mcore")
PKG = "minitron_mcore"

# Higher number = higher layer. A module may import its own layer or any lower one.
LAYERS: dict[str, int] = {
    "testing": 11,  # helpers for tests and examples: may use anything, nothing imports them
    "__main__": 10,
    "cli": 10,
    "pipeline": 9,
    "stages": 8,
    "importance": 7,
    "prune": 7,
    "evaluate": 7,
    "train": 6,
    "distill": 6,
    "checkpoint": 5,
    "data": 4,
    "models": 4,
    "parallel": 3,
    "utils": 2,
    "compat": 1,
    "errors": 0,
    "__init__": 0,
}


def modules(root: str = ROOT) -> dict[str, str]:
    out = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(dirpath, f)
                rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
                out[rel[: -len(".__init__")] if rel.endswith(".__init__") else rel] = path
    return out


def imports(mods: dict[str, str]) -> list[tuple[str, str, str | None, int]]:
    """(importer, imported module, imported name or None, line) for every import of the package."""
    edges = []
    for mod, path in mods.items():
        is_pkg = path.endswith("__init__.py")
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                pairs = [(a.name, None) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".")[: None if is_pkg else -1]
                    base = base[: len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                pairs = [(target, a.name) for a in node.names]
            else:
                continue
            for target, name in pairs:
                if target != PKG and not target.startswith(PKG + "."):
                    continue
                if name and f"{target}.{name}" in mods:  # `from pkg import submodule`
                    target, name = f"{target}.{name}", None
                while target not in mods and "." in target:  # `import a.b.c` of a name
                    target = target.rsplit(".", 1)[0]
                edges.append((mod, target, name, node.lineno))
    return edges


def layer(mod: str) -> tuple[str, int]:
    parts = mod.split(".")
    top = parts[1] if len(parts) > 1 else "__init__"
    if top not in LAYERS:
        raise KeyError(f"{mod}: package {top!r} has no layer in tests/test_layering.py")
    return top, LAYERS[top]


def upward(edges) -> list[str]:
    bad = []
    for src, dst, name, line in edges:
        (a, la), (b, lb) = layer(src), layer(dst)
        if lb > la:
            bad.append(f"{src}:{line} imports {dst}{'.' + name if name else ''} ({a} < {b})")
    return bad


def private(edges) -> list[str]:
    return [
        f"{src}:{line} imports {dst}.{name}"
        for src, dst, name, line in edges
        if name and name.startswith("_") and not name.startswith("__") and src != dst
    ]


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    graph: dict[str, set[str]] = {}
    for src, dst, _name, _line in edges:
        if src != dst and not src.startswith(
            dst + "."
        ):  # a module's own package __init__ is not a cycle
            graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(max(10000, sys.getrecursionlimit()))

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


EDGES = imports(modules())


def test_every_package_has_a_layer():
    for mod in modules():
        layer(mod)


def test_no_import_runs_upward():
    bad = upward(EDGES)
    assert not bad, "imports from a lower layer to a higher one:\n" + "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    bad = private(EDGES)
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


def test_no_import_cycle():
    found = cycles(EDGES)
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_module_over_400_lines():
    long = {}
    for mod, path in modules().items():
        with open(path, encoding="utf-8") as f:
            n = sum(1 for _ in f)
        if n > 400:
            long[mod] = n
    assert not long, f"modules over 400 lines: {long}"


# The checks themselves, on planted trees: each rule catches what it is there for.


def _tree(tmp_path, files: dict[str, str]) -> dict[str, str]:
    for rel, text in files.items():
        path = tmp_path / PKG / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return modules(str(tmp_path / PKG))


@pytest.mark.parametrize(
    "files,rule,expected",
    [
        (
            {"models/a.py": "from minitron_mcore.cli import conf_dir\n", "cli.py": ""},
            upward,
            "(models < cli)",
        ),
        (
            {"models/a.py": "def f():\n    from ..pipeline import x\n", "pipeline/__init__.py": ""},
            upward,
            "(models < pipeline)",
        ),
        ({"data/a.py": "from .b import _helper\n", "data/b.py": ""}, private, "data.b._helper"),
        (
            {
                "a.py": "from . import b\n",
                "b.py": "import minitron_mcore.c\n",
                "c.py": "from .a import x\n",
            },
            cycles,
            "minitron_mcore.a",
        ),
    ],
)
def test_the_rules_catch_a_planted_violation(tmp_path, files, rule, expected, monkeypatch):
    monkeypatch.setitem(LAYERS, "a", 4)
    monkeypatch.setitem(LAYERS, "b", 4)
    monkeypatch.setitem(LAYERS, "c", 4)
    found = rule(imports(_tree(tmp_path, files)))
    assert found and expected in str(found)


def test_a_clean_planted_tree_passes(tmp_path):
    edges = imports(
        _tree(
            tmp_path,
            {
                "cli.py": "from .models import build\nfrom .models.build import make\n",
                "models/build.py": "from ..parallel import rank\n",
                "parallel/__init__.py": "",
            },
        )
    )
    assert edges and not upward(edges) and not private(edges) and not cycles(edges)
