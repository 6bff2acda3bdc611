"""Text <-> token ids for the lm-eval adapter, with the special-token rules of lm-eval's ``hf``
model, so that a checkpoint and its ``export-hf`` copy are scored on the same token ids.

Those rules: ``tok_encode`` adds the tokenizer's own special tokens (a Llama-3 tokenizer
prepends BOS, a bare byte-level BPE adds nothing) unless ``add_bos_token`` says otherwise or the
text already starts with the prefix token's text; an empty context is replaced by the prefix
token (BOS, else EOS); decoding drops special tokens.
"""

from __future__ import annotations

from minitron_mcore.data.tokenizer import Tokenizer


class TextCodec:
    """A checkpoint's tokenizer (Hugging Face directory or SentencePiece ``.model``)."""

    def __init__(
        self, path: str, add_bos_token: bool | None = None, prefix_token_id: int | None = None
    ):
        checked = Tokenizer(path)  # validates the files; its errors are one `error:` line
        self.path = checked.path
        self.add_bos_token = add_bos_token
        self.custom_prefix_id = prefix_token_id
        self.hf = None
        self.sp = None
        if self.path.endswith(".model"):
            import sentencepiece

            self.sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
            bos, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
            self.bos_id = bos if bos >= 0 else None
        else:
            from transformers import AutoTokenizer

            self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
            self.bos_id, self.eos_id = self.hf.bos_token_id, self.hf.eos_token_id
        self.vocab_size = checked.vocab_size
        self._prefix_text = self.decode([self.prefix_id], skip_special_tokens=False)

    @property
    def prefix_id(self) -> int:
        """The token that stands for an empty context (lm-eval: BOS, else EOS)."""
        if self.custom_prefix_id is not None:
            return self.custom_prefix_id
        return self.bos_id if self.bos_id is not None else self.eos_id

    def encode(self, text: str, add_special_tokens: bool | None = None) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = True if self.add_bos_token is None else self.add_bos_token
            if self._prefix_text and text.startswith(self._prefix_text):
                add_special_tokens = False  # the text brings its own BOS
        if self.hf is not None:
            return self.hf.encode(text, add_special_tokens=add_special_tokens)
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_special_tokens and self.bos_id is not None else []) + ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self.hf is not None:
            return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)
        if skip_special_tokens:
            ids = [i for i in ids if not self.sp.is_control(i)]
        return self.sp.decode(ids)
