"""CUDA graphs for the streaming model: one captured forward of a fixed batch and chunk length.

The MHLA state is preallocated and updated in place by the kernels, positions live on the
device, and no step synchronises with the host (the state update after a prefill chunk is a
kernel too), so a step can be captured once and replayed: ``chunk=1`` is the decode step,
a longer chunk the prefill of full prompt chunks. On a slow host this matters for prefill too:
an eager 16k-token chunk of the 340M model spends as long launching its ~600 kernels as the
GPU spends running them.

Warm-up runs (needed to compile and tune the kernels before capture) execute for real, so the
state is saved before them and put back. A graph is bound to its cache's tensors: keep the
cache (``zero_()`` it to start over) and the graph stays valid.
"""
from __future__ import annotations

import torch

from .cache import MHLACache


class GraphStep:
    def __init__(self, model, cache: MHLACache, chunk: int = 1, warmup: int = 2, plan=None, ids=None,
                 feedback: bool = False):
        """``ids``: a [B, chunk] long buffer to read the input from (default: the graph's own);
        ``feedback``: the replay ends by writing each row's greedy pick (argmax of its last logits)
        into ``ids[:, -1]``, so the next replay feeds it without the host (mhla-serve's running ahead)."""
        if model.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model on a CUDA device")
        self.model, self.cache, self.chunk, self.feedback = model, cache, chunk, feedback
        B = cache.states[0].batch_size
        self.plan = plan if plan is not None else model.make_plan(B)  # captured with this plan
        self.ids = ids if ids is not None else torch.zeros(B, chunk, dtype=torch.long, device=model.device)
        if tuple(self.ids.shape) != (B, chunk) or self.ids.dtype != torch.long:
            raise ValueError(f"ids must be a [{B}, {chunk}] long buffer, got {tuple(self.ids.shape)} {self.ids.dtype}")
        saved = _save(cache.states)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(warmup):
                self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph), torch.inference_mode():
            self.logits = self._forward()
        _restore(cache.states, saved)

    def _forward(self):
        logits = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                            plan=self.plan).logits
        if self.feedback:  # after the forward has read the ids (one stream: the graph keeps the order)
            torch.argmax(logits[:, -1], -1, out=self.ids[:, -1])
        return logits

    def step(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, chunk] -> logits of the last token [B, 1, V] (a view of a static buffer: copy it to keep it)."""
        self.ids.copy_(ids)
        return self.replay()

    def replay(self) -> torch.Tensor:
        """Runs the captured step on whatever ``ids`` holds now; returns the static logits buffer."""
        self.graph.replay()  # moves the states' positions on the device
        return self.logits


def _save(states):
    """What to put back after the warm-up: None for states that are all zero bits (fresh ones:
    mhla-serve's and mhla-bench's captures), put back by zeroing; otherwise a copy, on the device
    when it has room, in host memory if not (at batch 128 the 340M model's fp32 state is 50 GB, and
    a second copy would not fit on an 80 GB GPU). The zero check reads the state once on the device
    (milliseconds) and spares the two trips through host memory that cost a batch-128 capture about
    40 s (mhla-bench, H100)."""
    flags = [_any_bit(getattr(s, n)) for s in states for n in s.TENSORS]
    if not bool(torch.stack(flags).any()):  # (one host sync)
        return None
    need = sum(s.nbytes for s in states)
    free, _ = torch.cuda.mem_get_info(states[0].device)
    if need < free // 2:
        return [s.clone() for s in states]
    return [s.to("cpu") for s in states]


def _any_bit(t: torch.Tensor) -> torch.Tensor:
    """Whether any bit of ``t`` is set (-0.0 counts: the state is put back bit for bit), without a
    full-size temporary: the bits as integers of the element's width, a slice at a time."""
    bits = t.reshape(-1).view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    parts = [piece.any() for piece in bits.split(1 << 26)]
    return torch.stack(parts).any() if parts else torch.zeros((), dtype=torch.bool, device=t.device)


def _restore(states, saved) -> None:
    """Puts back what ``_save`` kept (positions included)."""
    for i, live in enumerate(states):
        if saved is None:
            live.zero_()
        else:
            live.copy_(saved[i])


class GraphDecoder(GraphStep):
    """The decode step (one token per sequence)."""

    def __init__(self, model, cache: MHLACache, warmup: int = 2, plan=None, feedback: bool = False):
        super().__init__(model, cache, 1, warmup, plan, feedback=feedback)


def prefill(model, cache: MHLACache, ids: torch.Tensor, chunk: int, plan, graph: GraphStep | None = None,
            progress=None):
    """Feeds ``ids`` [B, T] into ``cache`` in chunks of ``chunk`` tokens (bounded activation
    memory); a full chunk replays ``graph`` where one is given. Returns the last token's logits
    [B, V] (with a graph, possibly a view of its static buffer: copy it to keep it). Written once:
    ``StreamingMHLA.feed`` and ``mhla-bench`` both prefill through here. ``progress(done, total)``
    is called after each chunk."""
    logits = None
    for start in range(0, ids.shape[1], chunk):
        piece = ids[:, start:start + chunk]
        if graph is not None and piece.shape[1] == graph.chunk:
            logits = graph.step(piece)[:, -1]
        else:
            logits = model(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1, plan=plan).logits[:, -1]
        if progress is not None:
            progress(start + piece.shape[1], ids.shape[1])
    return logits
