"""Generated ids -> text pieces exactly as ``StreamingMHLA.stream`` makes them: the same incremental
decoder (primed with the last ids already in the stream), stop strings held back and cut."""
from __future__ import annotations

from ..tokenizer import IncrementalDecoder


class TextAssembler:
    def __init__(self, tokenizer, stops: list[str], prefix: list[int]):
        self.decoder = IncrementalDecoder(tokenizer, prefix=prefix)
        self.stops = list(stops)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.pending = ""
        self.text = ""  # everything emitted so far
        self.stopped = False

    def _emit(self, piece: str) -> str:
        self.text += piece
        return piece

    def push(self, token: int) -> tuple[str, bool]:
        """Adds one generated id; returns (text safe to show now, whether a stop string was reached)."""
        self.pending += self.decoder.push(token)
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
        """The held-back tail once generation ends without a stop string."""
        piece, self.pending = ("" if self.stopped else self.pending), ""
        return self._emit(piece)
