"""Tokenizers: a SentencePiece ``tokenizer.model`` in the model directory, or a transformers
tokenizer where a checkpoint carries one (``tokenizer.json`` / ``tokenizer_config.json``)."""
from __future__ import annotations

import os
from pathlib import Path


class TokenizerError(ValueError):
    pass


class Tokenizer:
    """encode / decode, plus the special ids the runtime needs."""

    def __init__(self, encode, decode, vocab_size: int, bos_id: int | None, eos_id: int | None, source: str,
                 chat=None):
        self._encode, self._decode = encode, decode
        self.chat = chat  # (user message, system prompt or None) -> one templated turn; None: a base model
        self.vocab_size, self.bos_id, self.eos_id, self.source = vocab_size, bos_id, eos_id, source

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates (e.g. undecodable bytes from argv) are not text
            raise TokenizerError(f"text is not valid Unicode: lone surrogate {text[e.start]!r} at character {e.start} "
                                 "(the input was probably not UTF-8)") from None
        ids = list(self._encode(text))
        return ([self.bos_id] if add_bos and self.bos_id is not None else []) + ids

    def decode(self, ids) -> str:
        return self._decode([int(i) for i in ids])

    @classmethod
    def from_sentencepiece(cls, path) -> "Tokenizer":
        import sentencepiece as spm
        try:
            sp = spm.SentencePieceProcessor(model_file=os.fspath(path))
        except Exception as e:
            raise TokenizerError(f"{path}: not a SentencePiece model ({e})") from None
        bos, eos = sp.bos_id(), sp.eos_id()
        return cls(lambda t: sp.encode(t), lambda ids: sp.decode(ids), sp.get_piece_size(),
                   bos if bos >= 0 else None, eos if eos >= 0 else None, os.fspath(path))

    @classmethod
    def from_transformers(cls, directory) -> "Tokenizer":
        from transformers import AutoTokenizer
        try:
            tok = AutoTokenizer.from_pretrained(os.fspath(directory), local_files_only=True)
        except Exception as e:
            raise TokenizerError(f"{directory}: cannot load the transformers tokenizer ({e})") from None
        chat = None
        if getattr(tok, "chat_template", None):
            def chat(message, system=None):
                turns = ([{"role": "system", "content": system}] if system else []) + \
                    [{"role": "user", "content": message}]
                return tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
        return cls(lambda t: tok.encode(t, add_special_tokens=False), lambda ids: tok.decode(ids, skip_special_tokens=True),
                   len(tok), tok.bos_token_id, tok.eos_token_id, os.fspath(directory), chat)

    @classmethod
    def from_directory(cls, directory) -> "Tokenizer":
        from .checkpoint import checkpoint_file  # the checkpoint folder's one gate: regular files inside it
        d = Path(directory)
        sentencepiece = checkpoint_file(d, "tokenizer.model", required=False)
        if sentencepiece is not None:
            return cls.from_sentencepiece(sentencepiece)
        found = [checkpoint_file(d, n, required=False) for n in ("tokenizer.json", "tokenizer_config.json")]
        if any(found):
            return cls.from_transformers(d)
        raise TokenizerError(f"{d}: no tokenizer found (expected tokenizer.model, or tokenizer.json / "
                             "tokenizer_config.json); pass token ids instead of text, or add one")


class IncrementalDecoder:
    """Turns a growing list of ids into new text pieces. Decodes a short window of recent ids and
    holds back text that ends in an incomplete character (U+FFFD) until it completes."""

    def __init__(self, tokenizer: Tokenizer, context: int = 8, prefix=()):
        self.tok, self.context = tokenizer, context
        self.ids: list[int] = list(prefix)[-context:]  # text already shown: keeps leading spaces right
        self.emitted = len(self.ids)  # ids whose text has been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        start = max(0, self.emitted - self.context)
        before = self.tok.decode(self.ids[start:self.emitted])
        now = self.tok.decode(self.ids[start:])
        if now.endswith("\ufffd") or not now.startswith(before):
            return ""
        self.emitted = len(self.ids)
        del self.ids[: max(0, len(self.ids) - self.context)]
        self.emitted = len(self.ids)
        return now[len(before):]

    def flush(self) -> str:
        """At the end of the text: what ``push`` held back (bytes of a character that never completed),
        as the tokenizer's decode of the whole sequence shows it (U+FFFD), so the pieces add up to it."""
        if self.emitted == len(self.ids):
            return ""
        start = max(0, self.emitted - self.context)
        before = self.tok.decode(self.ids[start:self.emitted])
        now = self.tok.decode(self.ids[start:])
        del self.ids[: max(0, len(self.ids) - self.context)]
        self.emitted = len(self.ids)
        return now[len(before):] if now.startswith(before) else ""
