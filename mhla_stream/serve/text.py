"""Generated ids -> text pieces exactly as ``StreamingMHLA.stream`` makes them: the same incremental
decoder (primed with the last ids already in the stream), stop strings held back and cut.

The incremental decoder decodes a short window twice per token (two tokenizer calls, ~10 us). For
a SentencePiece tokenizer most tokens are plain pieces, and the text a plain piece adds after a
window of plain pieces is its surface (the piece, ``▁`` read as a space): only the first piece of a
decoded sequence loses its leading space, and only byte, control and unknown pieces combine or
vanish. So while the decoder's window holds plain pieces only and nothing is held back, a plain
token's text is a table look-up, and the decoder's window is advanced exactly as its own ``push``
would; anything else goes through the decoder itself. The output is the same either way
(``tests/test_serve_host.py`` checks it against the decoder on random and real token streams).
"""
from __future__ import annotations

import os
import weakref

from ..tokenizer import IncrementalDecoder

# tokenizer -> surface of each plain piece (None: not plain), made once per tokenizer object
_SURFACES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def plain_surfaces(tokenizer) -> list | None:
    """Per id: the text a plain SentencePiece piece adds after other plain pieces, or None for a piece
    that is not plain; None when the tokenizer is not a SentencePiece model this can vouch for."""
    source = getattr(tokenizer, "source", "")
    if not isinstance(source, str) or not source.endswith(".model") or not os.path.isfile(source):
        return None
    if tokenizer not in _SURFACES:
        _SURFACES[tokenizer] = _build_surfaces(tokenizer, source)
    return _SURFACES[tokenizer]


def _build_surfaces(tokenizer, source: str) -> list | None:
    try:
        import sentencepiece as spm
        sp = spm.SentencePieceProcessor(model_file=source)
    except Exception:
        return None
    size = sp.get_piece_size()
    surfaces = [None if sp.IsByte(i) or sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i)
                else sp.IdToPiece(i).replace("\u2581", " ") for i in range(size)]
    # a piece that is (or ends in) the replacement character would be held back by the decoder
    surfaces = [None if s is None or s.endswith("\ufffd") else s for s in surfaces]
    # the tokenizer must decode as this model file does (a wrapped one may not): spot-check
    if not _decodes_as(tokenizer, surfaces, 0, size):
        return None
    # a tokenizer wider than its model file (random-weight benchmarks) may read id i as i mod size
    wide = [surfaces[i % size] for i in range(size, tokenizer.vocab_size)]
    return surfaces + wide if wide and _decodes_as(tokenizer, surfaces + wide, size, len(surfaces) + len(wide)) \
        else surfaces


def _decodes_as(tokenizer, surfaces: list, lo: int, hi: int) -> bool:
    """Spot check: plain ids in [lo, hi) add their surface after another plain id."""
    plain = [i for i in range(lo, hi) if surfaces[i]]
    if not plain:
        return False
    sample = plain[:: max(1, len(plain) // 64)]
    return all(tokenizer.decode([a, b]) == tokenizer.decode([a]) + surfaces[b]
               for a, b in zip(sample, reversed(sample)))


class TextAssembler:
    def __init__(self, tokenizer, stops: list[str], prefix: list[int]):
        self.decoder = IncrementalDecoder(tokenizer, prefix=prefix)
        self.surfaces = plain_surfaces(tokenizer)
        # how many ids at the end of the decoder's window are plain (the fast path needs all of them)
        self.plain_run = self._plain_run()
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _plain_run(self) -> int:
        run = 0
        if self.surfaces is not None:
            for i in reversed(self.decoder.ids):
                if not (0 <= i < len(self.surfaces) and self.surfaces[i] is not None):
                    break
                run += 1
        return run

    def _decode(self, token: int) -> str:
        d, surfaces = self.decoder, self.surfaces
        ids = d.ids
        plain = surfaces is not None and 0 <= token < len(surfaces) and surfaces[token] is not None
        if plain and ids and self.plain_run >= len(ids) and d.emitted == len(ids):
            # the decoder's own push, less its two decodes: append, all emitted, keep the last `context`
            ids.append(token)
            if len(ids) > d.context:
                del ids[: len(ids) - d.context]
            d.emitted = len(ids)
            self.plain_run = len(ids)
            return surfaces[token]
        piece = d.push(token)
        self.plain_run = self.plain_run + 1 if plain else 0
        return piece

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def push(self, token: int) -> tuple[str, bool]:
        """Adds one generated id; returns (text safe to show now, whether a stop string was reached)."""
        self.pending += self._decode(int(token))
        if not self.stops:
            piece, self.pending = self.pending, ""
            return self._emit(piece), False
        cut = min((self.pending.find(s) for s in self.stops if s in self.pending), default=-1)
        if cut >= 0:
            piece, self.pending, self.stopped = self.pending[:cut], "", True
            return self._emit(piece), True
        if len(self.pending) > self.hold:
            piece = self.pending[: len(self.pending) - self.hold]
            self.pending = self.pending[len(self.pending) - self.hold:]
            return self._emit(piece), False
        return "", False

    def flush(self) -> str:
        """The held-back tail once generation ends without a stop string (with the decoder's own tail:
        an unfinished character, as the tokenizer's decode shows it), cut at a stop string in it."""
        if self.stopped:
            self.pending = ""
            return ""
        pending, self.pending = self.pending + self.decoder.flush(), ""
        self.plain_run = 0  # the decoder's window was advanced outside the fast path's count
        cut = min((pending.find(s) for s in self.stops if s in pending), default=-1)
        if cut >= 0:
            pending, self.stopped = pending[:cut], True
        return self._emit(pending)
