"""Training windows from ``prepare_data``'s token files, and the validation loss.

Every micro-batch draws its windows from its own random stream, seeded by (seed, optimizer step,
global micro-batch index), where the global index runs over ranks and accumulation steps:
``micro * world + rank``. So each rank reads its own shard of the sample stream, a run is
reproducible, a resume needs no saved RNG state, and N ranks with accumulation A see exactly the
samples that one process sees with accumulation N x A.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TOKEN_FILES = ("stories.bin", "books.bin", "valid.bin")


class DataError(ValueError):
    pass


def read_vocab_size(data: Path) -> int:
    info = data / "info.json"
    try:
        vocab = json.loads(info.read_text())["vocab_size"]
    except FileNotFoundError:
        raise DataError(f"{info}: not found; make the data with python -m mhla_stream.cli.prepare_data") from None
    except (ValueError, KeyError, TypeError):
        raise DataError(f"{info}: not JSON with a vocab_size") from None
    if not isinstance(vocab, int) or not 2 < vocab <= 65536:
        raise DataError(f"{info}: vocab_size {vocab!r} must be an integer in 3..65536 (uint16 token files)")
    return vocab


def load_tokens(path: Path, min_tokens: int, vocab: int) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: not found; make the data with python -m mhla_stream.cli.prepare_data")
    tokens = np.fromfile(path, dtype=np.uint16)
    if tokens.size < min_tokens:
        raise DataError(f"{path}: {tokens.size} tokens, need at least {min_tokens} (context + 2)")
    if int(tokens.max()) >= vocab:
        raise DataError(f"{path}: token id {int(tokens.max())} is outside the vocabulary of {vocab}")
    return tokens


class Batches:
    """Random windows of ``context + 1`` tokens, a fraction from the stories, the rest from books."""

    def __init__(self, data: Path, context: int, stories_frac: float, seed: int, vocab: int):
        need = context + 2
        self.stories = load_tokens(data / "stories.bin", need, vocab) if stories_frac > 0 else None
        self.books = load_tokens(data / "books.bin", need, vocab) if stories_frac < 1 else None
        self.context, self.frac, self.seed = context, stories_frac, seed

    def get(self, step: int, micro_index: int, batch: int, device) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step, micro_index])
        rows = []
        for _ in range(batch):
            src = self.stories if rng.random() < self.frac else self.books
            i = rng.integers(0, len(src) - self.context - 1)
            rows.append(src[i:i + self.context + 1])
        x = torch.from_numpy(np.stack(rows).astype(np.int64))
        return x.to(device, non_blocking=True)


@torch.no_grad()
def evaluate(model, tokens: np.ndarray, context: int, device, max_windows: int = 64) -> float:
    """Mean next-token loss over the first ``max_windows`` disjoint windows of ``tokens``."""
    was_training = model.training
    model.eval()
    n = min(max_windows, (len(tokens) - 1) // context)
    losses = []
    for i in range(0, n, 16):
        x = np.stack([tokens[j * context: j * context + context + 1] for j in range(i, min(n, i + 16))]).astype(np.int64)
        x = torch.from_numpy(x).to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x[:, :-1]).logits
        losses.append(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="none"))
    model.train(was_training)
    return float(torch.cat(losses).mean())
