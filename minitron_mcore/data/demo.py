"""The built-in demo corpora, made from text every Python installation has.

* ``demo:stdlib-code`` - the source of the standard library's modules, one document per module.
* ``demo:stdlib-docs`` - their docstrings (module, class and function), one document per module:
  English prose, a shifted distribution relative to the code (used to show teacher correction).
"""

from __future__ import annotations

import ast
import glob
import json
import os
import sysconfig

from minitron_mcore.errors import require

DEMOS = ("stdlib-code", "stdlib-docs")


def _stdlib_files() -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(glob.glob(os.path.join(root, "*.py")))
    files += sorted(glob.glob(os.path.join(root, "*", "*.py")))
    return [f for f in files if "site-packages" not in f and "test" not in os.path.basename(f)]


def _docstrings(source: str) -> str:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return ""
    nodes = [tree] + [
        n
        for n in ast.walk(tree)
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    ]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d)


def check_demo_name(name: str) -> None:
    require(
        name in DEMOS,
        f"unknown demo corpus demo:{name}; available: " + ", ".join("demo:" + d for d in DEMOS),
    )


def write_demo(name: str, out_dir: str, max_docs: int | None = None) -> str:
    """Write ``demo:<name>`` as JSONL into ``out_dir`` (once) and return the file path."""
    check_demo_name(name)
    path = os.path.join(out_dir, f"{name}.jsonl")
    if os.path.isfile(path):
        return path
    os.makedirs(out_dir, exist_ok=True)
    tmp, n = f"{path}.{os.getpid()}.partial", 0  # per process: writers never share a file
    with open(tmp, "w", encoding="utf-8") as out:
        for f in _stdlib_files():
            with open(f, encoding="utf-8", errors="replace") as src:
                text = src.read()
            if name == "stdlib-docs":
                text = _docstrings(text)
            if text.strip():
                out.write(json.dumps({"text": text, "source": os.path.basename(f)}) + "\n")
                n += 1
            if max_docs and n >= max_docs:
                break
    os.replace(tmp, path)
    return path
