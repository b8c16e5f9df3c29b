"""Batched admission: several whole short prompts prefilled in one forward, then placed in their slots.

A prompt of at most one piece costs one forward whatever else runs, and on a GPU a forward of a
few hundred tokens is bound by its ~15 kernels a layer, not by its tokens: admitting 8 such prompts
one per forward costs about 8 times what one forward of all 8 costs. So ``BatchStager`` owns
``rows`` state rows of its own, prefills up to ``rows`` prompts side by side (right-padded to a
common length; each row's ``lengths`` entry keeps the padding out of its state and positions),
takes each prompt's logits at its own last token, and places each finished row into its slot.

Placing is one ``index_copy_`` per state field into the runner's rows (the slot numbers a device
buffer), over every layer at once (both sides are allocated stacked: a field of all layers is one
tensor), then the stager's rows are zeroed for the next batch: on CUDA one captured graph per
prompt count. A fresh prompt of at most one piece completes at most piece // C blocks, so of the
ring (~94% of a row) it writes only the first ``touched`` slots: then only those are copied, the
rest of each slot's ring (an earlier stream's summaries, or junk from decode steps run over free
rows) is zeroed in place, and only those are zeroed in the stager's rows. That is a third of the
memory traffic of whole rows (at the 340M shape ~0.5 instead of ~1.2 GB a prompt). "Touched" is per
batch: prompts padded to ``s`` tokens complete at most ``s // C`` blocks, so a batch of 128-token prompts
copies and clears 2 slots, not the 16 of a 1,024-token piece (on CUDA a placement graph per count). A
batch with a stored session in it (a full ring loaded into its row) is placed whole. The stager's rows are
separate tensors rather than more rows of the runner's, because a copy between rows of one tensor
is refused by ``index_copy_``; and one graph replaces building ~1,000 row views and a foreach copy
over them on the host (2-3 ms for 8 prompts on this project's CPU, the engine thread's time while
every stream waits).

On CUDA each (row bucket, padded length) is one captured graph over the same rows, lengths a
device buffer: no host-bound eager forward between decode steps. The lengths are powers of two
from 16 up to the piece (a prompt of 100 tokens pads to 128), so there are a few dozen graphs,
sharing one memory pool. Off CUDA the forward runs eagerly, padded only to the longest prompt.

The numbers: each row's attention is its own (the per-row lengths), but the projections of a
batched forward are products over more rows, so a prompt admitted beside others matches the same
prompt admitted alone to rounding, as a batched decode step matches a batch-1 one.
"""
from __future__ import annotations

import torch

from ..state import MHLAState
from .runner import _captured, decode_buckets, foreach_by_dtype

SMALLEST_PAD = 16


def pad_sizes(piece: int) -> list[int]:
    """Padded lengths captured on CUDA: 16, 32, ... below ``piece``, then ``piece`` itself."""
    sizes, n = [], SMALLEST_PAD
    while n < piece:
        sizes.append(n)
        n *= 2
    return sizes + [piece]


class BatchStager:
    """``rows`` staging rows for whole short prompts, placed into ``slot_states`` (the runner's
    per-layer states: row i is slot i)."""

    def __init__(self, model, slot_states: list[MHLAState], rows: int, piece: int, *, backend: str,
                 policy: str | None, cuda_graphs: bool, state_dtype=None, pool=None):
        self.model, self.rows, self.piece = model, rows, piece
        self.device = model.device
        self.buckets = decode_buckets(rows)
        self.states = model.new_state(rows, policy, state_dtype=state_dtype, stacked=True)  # zeroed after each batch
        self._views = {kb: [st.select(slice(0, kb)) for st in self.states] for kb in self.buckets}
        # every field of every layer as one [layers, rows, ...] tensor, the slots' and the stager's: a
        # placement is ~10 launches, not ~7 a layer (H100, 2026-11-23: 0.51 ms to place one 128-token
        # prompt, most of it the launches of 170 small copies)
        self._stacks = [(n, MHLAState.stacked(slot_states, n), MHLAState.stacked(self.states, n))
                        for n in MHLAState.TENSORS]
        if any(full is None for _, full, _ in self._stacks):
            raise ValueError("batched admission needs slot states allocated stacked (new_state(stacked=True))")
        self.slots = torch.zeros(rows, dtype=torch.long, device=self.device)  # where each row goes
        # ring slots a fresh prompt of at most ``piece`` tokens can write: blocks 0 .. piece // C - 1
        first = self.states[0]
        self.touched = min(first.window, piece // model.config.block_size)
        self._touch = lambda s: min(self.touched, s // model.config.block_size)  # noqa: E731 (padded length s)
        self.dirty = False  # rows left unplaced by a failed admission: zeroed before the next one
        self.plans = {kb: model.make_plan(kb, backend=backend, policy=policy, cuda_graphs=cuda_graphs)
                      for kb in self.buckets}
        # static inputs of every forward (the graphs read views of these)
        self.ids = torch.zeros(rows, piece, dtype=torch.long, device=self.device)
        self.lengths = torch.zeros(rows, dtype=torch.long, device=self.device)
        self.sizes = pad_sizes(piece)
        self.graphs: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}
        if cuda_graphs and self.device.type == "cuda":
            self._capture(pool)
        # placing k rows: a graph per k on CUDA (the slot numbers are read from ``self.slots``), after one
        # eager warm-up outside any capture. The forward graphs' warm-ups advanced the rows: zeroed first,
        # so the warm-up places zeros (into slot 0) and the first batch starts from empty rows
        if self.graphs:
            self._clear_rows()
            for whole in (False, True):
                self._place(rows, whole, self.touched)
            torch.cuda.synchronize()
        # (k, t) partial placements for each slot count t of a padded length, (k, None) whole ones
        kinds = sorted({self._touch(s) for s in self.sizes}) + [None]
        self._placers = {(k, t): _captured(lambda k=k, t=t: self._place(k, t is None, t or 0), self.device)
                         for k in range(1, rows + 1) for t in kinds} if self.graphs else {}

    def describe(self) -> str:
        graphs = f", graphs for {len(self.graphs)} (rows, length) pairs" if self.graphs else ""
        return f"batched admission: up to {self.rows} prompts of at most {self.piece} tokens a forward{graphs}"

    # -- the forward ------------------------------------------------------------------------------------
    def _forward(self, kb: int, s: int) -> torch.Tensor:
        """Rows [0, kb) fed ``ids[:kb, :s]`` with ``lengths[:kb]``: fp32-able logits [kb, V] at each
        row's last real token (row of length 0: its first position, never read)."""
        lengths = self.lengths[:kb]
        hidden = self.model.model(input_ids=self.ids[:kb, :s], states=self._views[kb], lengths=lengths,
                                  plan=self.plans[kb])                                          # [kb, s, D]
        last = (lengths - 1).clamp(min=0)[:, None, None].expand(-1, 1, hidden.shape[-1])
        return self.model.lm_head(hidden.gather(1, last))[:, 0]                                 # [kb, V]

    def _capture(self, pool):
        # at start-up, as the runner's other graphs: never in the middle of serving
        self.pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        for kb in self.buckets:
            for s in self.sizes:
                self.lengths[:kb].fill_(s)
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream), torch.inference_mode():
                    for _ in range(2):  # warm-up: autotuning and lazy set-up happen outside the capture
                        self._forward(kb, s)
                torch.cuda.current_stream().wait_stream(stream)
                graph = torch.cuda.CUDAGraph()
                # one pool for all: each replay's logits are copied out before the next replay
                with torch.cuda.graph(graph, pool=self.pool), torch.inference_mode():
                    logits = self._forward(kb, s)
                self.graphs[(kb, s)] = (graph, logits)
        self.lengths.zero_()

    def _clear_rows(self) -> None:
        for _, _, own in self._stacks:
            own.zero_()

    def _place(self, k: int, whole: bool, t: int) -> None:
        """Rows [0, k) into the slots ``self.slots[:k]``, then rows [0, bucket(k)) zeroed (a padding row
        of the bucket's forward had length 0, but is cleared all the same). ``whole``: every ring slot
        (a stored session's row); else the first ``t`` (those the batch's prompts can have written), the
        slots' other ring entries zeroed."""
        to = self.slots[:k]
        kb = next(b for b in self.buckets if b >= k)
        for n, full, own in self._stacks:       # [layers, rows, ...]; the ring [layers, rows, H, W, K, V]
            if n == "ring" and not whole:
                if t:
                    full[:, :, :, :t].index_copy_(1, to, own[:, :k, :, :t])
                full[:, :, :, t:].index_fill_(1, to, 0)
                own[:, :kb, :, :t].zero_()
            else:
                full.index_copy_(1, to, own[:, :k])
                own[:, :kb].zero_()

    # -- admission --------------------------------------------------------------------------------------
    def admit(self, items: list[tuple[int, dict | None, list[int]]], host_stage=None) -> torch.Tensor:
        """``items``: (slot, stored session tensors or None, prompt ids of 1..piece tokens), at most
        ``rows`` of them. Prefills them side by side, copies each into its slot (positions included),
        returns fp32 logits [len(items), V] of each prompt's last token. ``host_stage(values)``: the
        runner's pinned host-to-device copy (None: a plain copy)."""
        k = len(items)
        if not 0 < k <= self.rows:
            raise ValueError(f"a batched admission holds 1 to {self.rows} prompts, got {k}")
        longest = max(len(ids) for _, _, ids in items)
        if min(len(ids) for _, _, ids in items) < 1 or longest > self.piece:
            raise ValueError(f"a batched admission takes prompts of 1 to {self.piece} ids")
        kb = next(b for b in self.buckets if b >= k)
        s = next(n for n in self.sizes if n >= longest) if self.graphs else longest
        views = self._views[kb]
        if self.dirty:  # the last admission failed before placing its rows
            self._clear_rows()
        self.dirty = True
        for i, (_, stored, _) in enumerate(items):
            if stored is not None:
                names = [f"layers.{j}.{n}" for j in range(len(views)) for n in MHLAState.TENSORS]
                live = [getattr(st, n)[i] for st in views for n in MHLAState.TENSORS]
                saved = [stored[key].to(self.device, non_blocking=True)[0] for key in names]
                foreach_by_dtype(torch._foreach_copy_, live, saved)
        # one host-to-device copy of every row's ids (padded with 0), length and slot
        flat = []
        for _, _, ids in items:
            flat += list(ids) + [0] * (s - len(ids))
        flat += [0] * ((kb - k) * s)
        values = flat + [len(ids) for _, _, ids in items] + [0] * (kb - k) + [slot for slot, _, _ in items]
        staged = host_stage(values) if host_stage is not None else torch.tensor(values, dtype=torch.long)
        self.ids[:kb, :s].copy_(staged[:kb * s].view(kb, s))
        self.lengths[:kb].copy_(staged[kb * s:kb * s + kb])
        self.slots[:k].copy_(staged[kb * s + kb:])
        if (kb, s) in self.graphs:
            graph, out = self.graphs[(kb, s)]
            graph.replay()
        else:
            out = self._forward(kb, s)
        logits = out[:k].to(torch.float32, copy=True)
        whole = any(stored is not None for _, stored, _ in items)
        t = None if whole else self._touch(s)
        placer = self._placers.get((k, t))
        if placer is not None:
            placer.replay()
        else:
            self._place(k, whole, t or 0)
        self.dirty = False
        return logits
