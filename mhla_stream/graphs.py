"""CUDA-graph decode: one captured forward step of the whole model on a fixed batch.

The MHLA state is preallocated and updated in place by the decode kernels, so a step has no
host work: capture once, then each token is one ``replay()``. Warm-up runs (needed to compile
the kernels before capture) execute for real, so the state is saved before them and put back.
"""
from __future__ import annotations

import torch

from .cache import MHLACache


class GraphDecoder:
    def __init__(self, model, cache: MHLACache, warmup: int = 2):
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.model, self.cache = model, cache
        B = cache.states[0].batch_size
        self.ids = torch.zeros(B, 1, dtype=torch.long, device=model.device)
        saved = [s.clone() for s in cache.states]
        seen = cache.seen
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._forward()
        for live, s in zip(cache.states, saved):
            live.copy_(s)
        cache.seen = seen

    def _forward(self):
        return self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True).logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, 1] -> logits [B, 1, V] (a view of a static buffer: copy it to keep it)."""
        self.ids.copy_(ids)
        self.graph.replay()
        self.cache.seen += 1
        return self.logits
