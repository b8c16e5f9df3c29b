"""A finished session request's state, copied out of its slot without stopping the engine (CUDA).

Copying a slot's state to host memory the plain way (``tensor.to("cpu")``) blocks the engine thread
until the device has finished everything queued and the copy has crossed into pageable memory: for
mhla-340m, 396 MiB, tens of milliseconds in which no stream gets a token. And the slot cannot simply
be copied later: the next decode step runs over it (runner.py) and overwrites it.

So the slot is first copied into one of a few **park rows** on the device (stream-ordered before any
later step: ~0.3 ms of device time), and a side stream then copies the park row into pinned host
memory while decode steps go on. The returned tensors are valid once ``ready`` (a CUDA event) has
completed: ``SessionData.wait()`` is called by everything that reads them on the host (a state file
write, a fork, the next request on the session). A park row is reused only after its copy is done.
Off CUDA the copy is the plain synchronous one (``ready`` None).
"""
from __future__ import annotations

import torch

from ..state import MHLAState
from .runner import foreach_by_dtype


def sync_snapshot(states: list[MHLAState], logits: torch.Tensor | None):
    """The plain copy: ``layers.{i}.{name}`` CPU tensors, CPU logits, ready = None."""
    tensors = {f"layers.{i}.{n}": getattr(s, n).to("cpu", copy=True) for i, s in enumerate(states)
               for n in MHLAState.TENSORS}
    return tensors, None if logits is None else logits.to("cpu", copy=True), None


class AsyncSnapshots:
    """``park`` (list of per-layer state views of ``n`` rows each, ``park(i)`` -> row ``i``) on CUDA."""

    def __init__(self, park_rows, n: int):
        self.park_rows, self.n = park_rows, n
        self.stream = torch.cuda.Stream()
        self.done: list[torch.cuda.Event | None] = [None] * n  # the copy out of each park row
        self._next = 0

    def _free_row(self) -> int:
        """A park row whose last copy out has finished (waits for the oldest one if none has)."""
        for k in range(self.n):
            i = (self._next + k) % self.n
            if self.done[i] is None or self.done[i].query():
                self._next = (i + 1) % self.n
                return i
        i = self._next
        self.done[i].synchronize()  # every park row still copying: rare (n requests ended this instant)
        self._next = (i + 1) % self.n
        return i

    def take(self, states: list[MHLAState], logits: torch.Tensor | None):
        """Starts copying ``states`` (one row's per-layer views) and ``logits`` [V] to pinned host memory;
        returns (tensors, logits, ready event) at once."""
        i = self._free_row()
        park = self.park_rows(i)
        live = [getattr(s, n) for s in states for n in MHLAState.TENSORS]
        parked = [getattr(p, n) for p in park for n in MHLAState.TENSORS]
        main = torch.cuda.current_stream()
        # on the main stream: before any later step touches the slot
        foreach_by_dtype(torch._foreach_copy_, parked, live)
        logits = None if logits is None else logits.clone()
        copied = torch.cuda.Event()
        copied.record(main)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(copied)
            host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in parked]
            for h, t in zip(host, parked):
                h.copy_(t, non_blocking=True)
            host_logits = None
            if logits is not None:
                host_logits = torch.empty(logits.shape, dtype=logits.dtype, pin_memory=True)
                host_logits.copy_(logits, non_blocking=True)
                logits.record_stream(self.stream)  # freed on the main stream: not reused before this copy
            ready = torch.cuda.Event()
            ready.record(self.stream)
        self.done[i] = ready
        names = [f"layers.{j}.{n}" for j in range(len(states)) for n in MHLAState.TENSORS]
        return dict(zip(names, host)), host_logits, ready
