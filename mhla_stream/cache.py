"""``MHLACache``: the per-layer ``MHLAState`` list as a transformers ``Cache`` for ``generate()``.

Nothing grows with the context: each layer keeps its bounded MHLA state. ``seen`` counts the
columns of ``input_ids`` already consumed (padding included), which is what ``generate`` asks.
It is derived, never counted separately: the state's position (the one truth for real tokens)
plus the padding columns that the model skipped (``add_padding``).
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .state import MHLAState


class MHLACache(Cache):
    is_compileable = False

    def __init__(self, states: list[MHLAState]):
        super().__init__(layers=[])
        self.states = states
        # per sequence: attention-masked columns consumed without entering the state (host side)
        self.padding = torch.zeros(states[0].batch_size if states else 0, dtype=torch.long)

    def __len__(self):
        return len(self.states)

    @property
    def seen(self) -> int:
        """Columns of ``input_ids`` consumed: tokens in the state plus padding (same for every row)."""
        return int(self.states[0].pos[0]) + int(self.padding[0]) if self.states else 0

    def add_padding(self, columns: torch.Tensor) -> None:
        self.padding += columns.cpu()

    def __repr__(self):
        return f"MHLACache(layers={len(self.states)}, seen={self.seen}, bytes={self.nbytes})"

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.states)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_max_length(self, layer_idx=None) -> int:
        return -1  # unbounded: the state does not grow

    def get_mask_sizes(self, query_length, layer_idx=0):
        return self.seen + query_length, 0

    def has_previous_state(self, layer_idx=None, state_idx=None) -> bool:
        return self.seen > 0

    def update(self, *args, **kwargs):
        raise NotImplementedError("MHLACache is updated by the MHLA layers, not with keys and values")

    def reset(self):
        for s in self.states:
            s.zero_()
        self.padding.zero_()

    def crop(self, max_length: int):
        raise NotImplementedError("a recurrent MHLA state cannot be cropped; take a snapshot and restore it instead")

    def _reindex(self, index: torch.Tensor):
        self.states = [s.select(index.to(s.device)).clone() for s in self.states]
        self.padding = self.padding[index.cpu()].clone()

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._reindex(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor):
        self._reindex(indices)

    def batch_repeat_interleave(self, repeats: int):
        B = self.states[0].batch_size
        self._reindex(torch.arange(B).repeat_interleave(repeats))
