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


SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


def bpe_tokenizer(out_dir: str, texts, vocab_size: int = 512) -> str:
    """Train a byte-level BPE tokenizer on ``texts`` with ``tokenizers`` and save it in Hugging
    Face format (``<pad>``, ``<s>``, ``</s>`` special tokens; ``</s>`` ends documents)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    return out_dir


def train_tokenizer(
    out_dir: str, corpora: list, vocab_size: int = 512, max_chars: int = 2_000_000
) -> str:
    """A BPE tokenizer for a model trained from scratch on ``corpora`` (``demo:<name>`` or text
    / JSONL files), from their first ``max_chars`` characters."""
    import tempfile

    from minitron_mcore.data.preprocess import iter_documents

    def texts():
        total = 0
        with tempfile.TemporaryDirectory() as tmp:
            for c in corpora:
                path = write_demo(c[5:], tmp) if str(c).startswith("demo:") else str(c)
                for doc in iter_documents([path], "text", "file"):
                    yield doc
                    total += len(doc)
                    if total >= max_chars:
                        return

    return bpe_tokenizer(out_dir, texts(), vocab_size)
