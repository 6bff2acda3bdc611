"""Tokenizers: Hugging Face (``tokenizer.json`` / any ``AutoTokenizer`` directory) and plain
SentencePiece ``.model`` files.

The class answers what ``megatron.core.datasets`` asks of a tokenizer (``eod``, ``pad``,
``vocab_size``) so it plugs into ``GPTDatasetConfig`` directly; Megatron's own tokenizer classes
would pull in its deprecated legacy system or a config-driven factory we do not need."""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from minitron_mcore.errors import MinitronError, first_line, require

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(src_dir: str) -> list[str]:
    return [
        os.path.join(src_dir, f)
        for f in TOKENIZER_FILES
        if os.path.isfile(os.path.join(src_dir, f))
    ]


def check_tokenizer_vocab(tokenizer, vocab_size: int) -> None:
    require(
        tokenizer.vocab_size <= vocab_size,
        f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
        f"{vocab_size}; they do not belong together - use the model's tokenizer",
    )


class Tokenizer:
    """A Hugging Face or SentencePiece tokenizer with an end-of-document id."""

    def __init__(self, path: str):
        require(bool(path), "tokenizer= is empty; pass a tokenizer directory or .model file")
        require(os.path.exists(path), f"tokenizer {path} does not exist; check tokenizer=")
        sp_only = os.path.join(path, "tokenizer.model")
        if (
            os.path.isdir(path)
            and os.path.isfile(sp_only)
            and not any(
                os.path.isfile(os.path.join(path, f))
                for f in ("tokenizer.json", "tokenizer_config.json")
            )
        ):
            path = sp_only  # a bare SentencePiece model stored in a checkpoint's tokenizer/
        self.path = path
        self._sp = None
        self._hf = None
        if os.path.isfile(path) and path.endswith(".model"):
            import sentencepiece

            try:
                self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
            except Exception as e:  # sentencepiece raises plain RuntimeError/OSError
                raise MinitronError(f"cannot load SentencePiece model {path} ({e})") from e
            self._eod = self._sp.eos_id()
            self._pad = self._sp.pad_id()
        else:
            from transformers import AutoTokenizer

            try:
                self._hf = AutoTokenizer.from_pretrained(path, local_files_only=True)
            except Exception as e:
                raise MinitronError(
                    f"cannot load a tokenizer from {path} ({type(e).__name__}: {first_line(e)}); "
                    "pass a directory with tokenizer.json or a SentencePiece .model file"
                ) from e
            self._eod = self._hf.eos_token_id
            self._pad = self._hf.pad_token_id
        require(
            self._eod is not None and self._eod >= 0,
            f"tokenizer {path} has no end-of-sequence token; one is needed to mark document ends",
        )

    # -- what megatron.core.datasets reads
    def tokenize(self, text: str) -> list[int]:
        if self._sp is not None:
            return self._sp.encode(text)
        return self._hf.encode(text, add_special_tokens=False)

    def detokenize(self, ids) -> str:
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        return self._sp.decode(ids) if self._sp is not None else self._hf.decode(ids)

    @property
    def vocab(self) -> dict:
        if self._sp is not None:
            return {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        return self._hf.get_vocab()

    @property
    def inv_vocab(self) -> dict:
        return {v: k for k, v in self.vocab.items()}

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size() if self._sp is not None else len(self._hf)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        """A pad id that never occurs in the text: the tokenizer's own pad token if it is
        distinct from EOD, else -1 (Megatron masks labels equal to the pad id out of the loss)."""
        if self._pad is None or self._pad < 0 or self._pad == self._eod:
            return -1
        return self._pad

    @property
    def unique_identifiers(self) -> dict:
        """Part of the key of Megatron's dataset index cache."""
        return {"class": "minitron_mcore.Tokenizer", "fingerprint": self.fingerprint()}

    # -- ours
    def fingerprint(self) -> str:
        """A hash of the vocabulary: two tokenizers with the same fingerprint map text to the
        same ids (used to refuse mismatched datasets / teacher-student pairs)."""
        if getattr(self, "_fingerprint", None):
            return self._fingerprint
        items = sorted(self.vocab.items(), key=lambda kv: kv[1])
        blob = json.dumps([items, self._eod], ensure_ascii=False).encode()
        self._fingerprint = hashlib.sha256(blob).hexdigest()[:16]
        return self._fingerprint

    def files(self) -> list[str]:
        """The files that make up this tokenizer (to store next to a checkpoint)."""
        if self._sp is not None:
            return [self.path]
        return tokenizer_files(self.path)
