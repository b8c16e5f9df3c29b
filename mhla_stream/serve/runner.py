"""The engine's model calls: the batched decode step over the slots and prompt prefill in a staging row.

State rows ``0 .. max_batch - 1`` are the slots; one more row, ``max_batch``, is the staging row.
Slots are handed out lowest-first, so the active rows sit at the low end: a decode step runs over
rows ``[0, n)`` only, with ``n`` the smallest bucket (1, 2, 4, ..., max_batch) that covers the
highest active slot. On CUDA each bucket is one captured graph over views ``select(slice(0, n))``
of the same state storage, so one sequence costs a batch-1 step, not a batch-``max_batch`` one.

A prompt is prefilled in the staging row (one prompt at a time), then its finished state is
copied into its slot and it joins decoding. Rows inside the decode range that are not decoding
(free slots, slots whose prompt is still staging) hold nothing anyone reads: whatever the step
writes there is overwritten by the staging copy before the row is used, so nothing has to be saved
and restored around a step. On CUDA what is fed is split into power-of-two pieces (with a largest
size ``prefill_piece`` of 1024: 700 = 512 + 128 + 32 + 16 + 8 + 4), each the replay of one captured
graph: no host-bound eager forward (tens of ms of Python launches for a 24-layer model) sits
between decode steps.
The chunk form of the operator is exact across chunkings to fp32 rounding. On the CPU the chunk
runs eagerly in one call, as ``StreamingMHLA.feed`` does.
"""
from __future__ import annotations

import logging

import torch

from ..cache import MHLACache
from ..state import MHLAState
from .capacity import check_rows_fit

log = logging.getLogger("mhla_stream.serve")
PARK_ROWS = 2  # device rows a finished session's state passes through on its way to host memory


def park_rows(async_snapshots: bool, device: torch.device) -> int:
    """The park rows a runner makes: only for the asynchronous session copy, which is CUDA's."""
    return PARK_ROWS if async_snapshots and device.type == "cuda" else 0


def decode_buckets(max_batch: int) -> list[int]:
    """Row counts the decode step is captured for: powers of two below ``max_batch``, then ``max_batch``."""
    sizes, n = [], 1
    while n < max_batch:
        sizes.append(n)
        n *= 2
    return sizes + [max_batch]


def bucket_for(rows: int, buckets: list[int]) -> int:
    """The smallest bucket holding ``rows`` rows (``buckets`` ascending)."""
    for b in buckets:
        if b >= rows:
            return b
    raise ValueError(f"{rows} rows do not fit in the largest decode bucket ({buckets[-1]})")


def prefill_pieces(tokens: int, sizes: list[int]) -> list[int]:
    """Splits ``tokens`` into pieces of the captured ``sizes`` (descending, ending in 1), largest first."""
    pieces = []
    for size in sizes:
        while tokens >= size:
            pieces.append(size)
            tokens -= size
    if tokens:
        raise ValueError("prefill piece sizes must end in 1")
    return pieces


def prefill_sizes(chunk: int) -> list[int]:
    """The chunk itself, then every power of two below it, descending."""
    sizes, n = [], 1
    while n < chunk:
        sizes.append(n)
        n *= 2
    return [chunk] + sizes[::-1]


class HostBuffers:
    """Pinned host buffers for the per-step copies, reused instead of allocated per step (a pinned
    allocation and an event per step were ~100 us of the engine thread's turn on the GPU host).

    ``take(n)`` gives a device-to-host buffer; the ``DecodeStep`` holding it gives it back once its
    tokens are read (one never read is simply dropped). ``stage(values)`` fills the next of a ring of
    host-to-device buffers; a buffer is refilled only after the copy that last read it has run (its
    event), so a copy still queued behind the step in flight never sees the next step's values."""

    def __init__(self, size: int, ring: int = 8):
        self.size, self._free = size, []
        self._ring = [torch.empty(size, dtype=torch.long, pin_memory=True) for _ in range(ring)]
        self._done = [torch.cuda.Event() for _ in range(ring)]
        self._used = [False] * ring
        self._next = 0

    def take(self) -> tuple[torch.Tensor, torch.cuda.Event]:
        if self._free:
            return self._free.pop()
        return torch.empty(self.size, dtype=torch.long, pin_memory=True), torch.cuda.Event()

    def give(self, pair) -> None:
        self._free.append(pair)

    def stage(self, values: list[int], device) -> torch.Tensor:
        """``values`` on ``device`` (an asynchronous copy from the next ring buffer)."""
        i = self._next
        self._next = (i + 1) % len(self._ring)
        if self._used[i]:
            self._done[i].synchronize()  # long done in practice: the ring is several steps deep
        buf = self._ring[i]
        n = len(values)
        if n > self.size:  # larger than the ring's buffers: a one-off pinned tensor
            out = torch.tensor(values, dtype=torch.long, pin_memory=True).to(device, non_blocking=True)
            self._done[i].record()
        else:
            buf[:n] = torch.tensor(values, dtype=torch.long)
            out = buf[:n].to(device, non_blocking=True)
            self._done[i].record()
        self._used[i] = True
        return out


def foreach_by_dtype(op, *lists) -> None:
    """``op`` (a ``torch._foreach_*`` in-place op) over parallel tensor lists, one call per dtype: a
    foreach call over mixed dtypes takes the slow path (one launch per tensor)."""
    groups: dict[torch.dtype, list] = {}
    for items in zip(*lists):
        groups.setdefault(items[0].dtype, []).append(items)
    for items in groups.values():
        op(*(list(col) for col in zip(*items)))


def draw_samples(picks: torch.Tensor, logits: torch.Tensor, lo: int, samplers, stage=None) -> None:
    """Writes each sampler's draw into ``picks`` [slots] (logits [rows, V] cover slots lo, lo + 1, ...);
    slots sharing one draw function are drawn in one call. ``stage(values)``: a pinned host-to-device
    copy of the row indices (a pageable copy would wait for the device); None: a plain tensor."""
    groups: dict[int, tuple] = {}
    for slot, draw in (samplers or {}).items():
        groups.setdefault(id(draw), (draw, []))[1].append(slot)
    for draw, slots in groups.values():
        if len(slots) == 1:
            s = slots[0]
            picks[s:s + 1].copy_(draw(logits[s - lo:s - lo + 1].float()))
            continue
        rows = [s - lo for s in slots]
        idx = stage(rows) if stage is not None else torch.tensor(rows)
        picks.index_copy_(0, idx + lo, draw(logits.index_select(0, idx).float()))


class DecodeStep:
    """What one decode step leaves: ``lo`` (the slot of row 0), the step's logits (``logits`` [rows, V]
    fp32, or ``row_logits(slot)``: copies, valid until the next decode step is launched), and the
    greedy pick of every row in ``picks`` (the runner's per-slot device buffer of ids to feed next),
    copied to the host without blocking: ``tokens()`` waits for that copy only, so the host can read
    one step's picks while the next step runs."""

    def __init__(self, logits: torch.Tensor, lo: int, picks: torch.Tensor, buffers: HostBuffers | None = None):
        self._logits, self.lo = logits, lo
        self._buffers, self._pair, self._tokens = buffers, None, None
        if picks.is_cuda:
            if buffers is not None and picks.numel() <= buffers.size:
                self._pair = buffers.take()
                host, self._ready = self._pair
                self._host = host[:picks.numel()]
            else:
                self._host, self._ready = torch.empty(picks.shape, dtype=picks.dtype, pin_memory=True), torch.cuda.Event()
            self._host.copy_(picks, non_blocking=True)
            self._ready.record()
        else:
            self._host, self._ready = picks.clone(), None

    @property
    def logits(self) -> torch.Tensor:
        return self._logits.to(torch.float32, copy=True)

    def row_logits(self, slot: int) -> torch.Tensor:
        """fp32 logits [V] of ``slot``'s row (a copy)."""
        return self._logits[slot - self.lo].to(torch.float32, copy=True)

    def tokens(self) -> list[int]:
        """The greedy pick of every row of the step (waits for the step, not for later work)."""
        if self._tokens is None:
            if self._ready is not None:
                self._ready.synchronize()
            self._tokens = self._host.tolist()
            if self._pair is not None:  # read: the buffer may carry another step's picks now
                self._buffers.give(self._pair)
                self._pair = None
        return self._tokens


class StepRunner:
    def __init__(self, model, max_batch: int, prefill_chunk: int, *, policy: str | None = None,
                 backend: str = "auto", cuda_graphs: bool = True, prefill_piece: int | None = None,
                 state_dtype=None, admit_batch: int = 1, async_snapshots: bool = False):
        self.model, self.max_batch, self.prefill_chunk = model, max_batch, prefill_chunk
        # the largest captured prefill graph: the engine feeds prompts in pieces of at most this size
        self.prefill_piece = min(prefill_piece or prefill_chunk, prefill_chunk)
        self.device = model.device
        if not 1 <= admit_batch:
            raise ValueError(f"admit_batch must be >= 1, got {admit_batch}")
        # the slots, the staging row, then (CUDA, ``async_snapshots``) the park rows a finished session is
        # copied out through (snapshots.py); batched admission's rows (admission.py), never more than the
        # slots (a batch only fills free slots), are tensors of their own, counted here too
        admit_batch = self.admit_batch = min(admit_batch, max_batch)
        park = park_rows(async_snapshots, model.device)
        check_rows_fit(model, max_batch, admit_batch=admit_batch, park=park, policy=policy, state_dtype=state_dtype)
        self.states = model.new_state(max_batch + 1 + park, policy, state_dtype=state_dtype, stacked=True)
        self.snapshots = None
        if park:
            from .snapshots import AsyncSnapshots
            base = max_batch + 1
            self.snapshots = AsyncSnapshots(lambda i: self.rows(base + i, base + i + 1), park)
        self._views: dict[tuple[int, int], list[MHLAState]] = {}
        self.staging = self.rows(max_batch, max_batch + 1)
        self.backend, self.policy = backend, policy
        self.prefill_plan = model.make_plan(1, backend=backend, policy=policy, cuda_graphs=cuda_graphs)
        self.decode_plan = model.make_plan(max_batch, backend=backend, policy=policy, cuda_graphs=cuda_graphs)
        self.buckets = decode_buckets(max_batch)
        self.graphs = self.decode_plan.cuda_graphs
        self.decode_graphs: dict[int, object] = {}
        self.prefill_graphs: dict[int, object] = {}
        # each slot's next decode input: the host's token, or the greedy pick its last step wrote there
        self.feed = torch.zeros(max_batch, 1, dtype=torch.long, device=self.device)
        self.piece_sizes = prefill_sizes(self.prefill_piece)
        cuda = self.device.type == "cuda"
        self.host = HostBuffers(max(2 * max_batch, self.prefill_chunk, admit_batch * (self.prefill_piece + 2))) \
            if cuda else None
        self._zero_graph, self._finish_graphs = None, {}
        if self.graphs:
            self._capture()
        self.stager = None
        if admit_batch > 1:
            from .admission import BatchStager
            try:
                self.stager = BatchStager(model, self.states, admit_batch, self.prefill_piece, backend=backend,
                                          policy=policy, cuda_graphs=self.graphs, state_dtype=state_dtype)
            except Exception:  # e.g. a capture this device refuses: serve, one prompt a forward, and say so
                if not self.graphs:
                    raise
                log.exception("batched admission could not be set up; admitting one prompt a forward")
                self.admit_batch = 1
                torch.cuda.synchronize()

    def _capture(self):
        # at start-up, not on first use: a capture in the middle of serving would stall every stream
        from ..graphs import GraphStep
        for n in self.buckets:
            plan = self.model.make_plan(n, backend=self.backend, policy=self.policy, cuda_graphs=True)
            self.decode_graphs[n] = GraphStep(self.model, MHLACache(self.rows(0, n)), 1, plan=plan,
                                              ids=self.feed[:n], feedback=True)
        for size in self.piece_sizes:
            self.prefill_graphs[size] = GraphStep(self.model, MHLACache(self.staging), size, plan=self.prefill_plan)
        # emptying the staging row and copying it into a slot touch every layer's five tensors: ~120
        # small launches each (~0.7 ms of host time on the GPU host, GIL held), or one graph replay
        self._zero_graph = _captured(lambda: torch._foreach_zero_(self._tensors(self.staging)), self.device)
        for slot in range(self.max_batch):
            self._finish_graphs[slot] = _captured(
                lambda slot=slot: torch._foreach_copy_(self._tensors(self.rows(slot, slot + 1)),
                                                       self._tensors(self.staging)), self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()  # the captures' warm-up saved and restored the rows they cover

    def rows(self, start: int, stop: int) -> list[MHLAState]:
        """Views of rows [start, stop) of every layer's state, made once per range (making ~5 views a
        layer every step is measurable host time)."""
        views = self._views.get((start, stop))
        if views is None:
            views = self._views[(start, stop)] = [s.select(slice(start, stop)) for s in self.states]
        return views

    def describe(self) -> str:
        graphs = (f"decode graphs for {self.buckets} rows, prefill graphs for pieces {self.piece_sizes}"
                  if self.graphs else "no CUDA graphs (eager steps)")
        stager = f"; {self.stager.describe()}" if self.stager is not None else ""
        return (f"{self.max_batch} slots + 1 staging row, prefill chunk {self.prefill_chunk} (pieces of "
                f"{self.prefill_piece} while streams decode), {graphs}{stager}; "
                f"decode plan: {self.decode_plan.describe()}; prefill plan: {self.prefill_plan.describe()}")

    def info(self) -> dict[str, str]:
        """The same as ``describe`` as Prometheus info labels."""
        return {"slots": str(self.max_batch), "prefill_chunk": str(self.prefill_chunk),
                "prefill_piece": str(self.prefill_piece), "admit_batch": str(self.admit_batch),
                "cuda_graphs": str(self.graphs), "decode_buckets": ",".join(map(str, self.buckets)),
                "prefill_pieces": ",".join(map(str, self.piece_sizes)) if self.graphs else "",
                "decode_plan": self.decode_plan.describe(), "prefill_plan": self.prefill_plan.describe()}

    # -- decode ----------------------------------------------------------------------------------------
    def decode(self, tokens: dict[int, int], auto=(), samplers=None) -> DecodeStep:
        """One token for each slot in ``tokens`` (slot -> id) and for each slot in ``auto``, which is
        fed the greedy pick of the previous step that covered it, straight from ``feed`` on the
        device (the host need not have read it yet: the engine runs one step ahead). Other rows of
        the range run on junk. Every step ends by writing each row's greedy pick into ``feed``;
        ``samplers`` (slot -> draw(fp32 logits [n, V]) -> ids [n]) replace that pick for their rows, on
        the device, before the picks are copied to the host; slots sharing one draw are drawn together."""
        top = max([*tokens, *auto]) + 1
        if self.graphs:
            lo, hi = 0, bucket_for(top, self.buckets)
        else:
            lo, hi = min([*tokens, *auto]), top
        if tokens:  # the host's tokens over the picks: one copy of (slots, ids) from pinned memory (a
            # copy from pageable memory would first wait for the step in flight, undoing running ahead)
            values = [*tokens, *tokens.values()]
            if self.host is not None:
                pairs = self.host.stage(values, self.device)
            else:
                pairs = torch.tensor(values, dtype=torch.long)
            n = len(tokens)
            self.feed[:, 0].index_copy_(0, pairs[:n], pairs[n:])
        picks = self.feed[lo:hi, 0]
        if self.graphs:  # the replay writes the picks into feed itself
            logits = self.decode_graphs[hi].replay()[:, -1]
            self._sample(logits, lo, samplers)
            return DecodeStep(logits, lo, picks, self.host)
        plan = self.model.make_plan(hi - lo, backend=self.decode_plan.decode_backend, policy=self.policy,
                                    cuda_graphs=False)
        logits = self.model(input_ids=self.feed[lo:hi], past_key_values=MHLACache(self.rows(lo, hi)), use_cache=True,
                            logits_to_keep=1, plan=plan).logits[:, -1]
        torch.argmax(logits, -1, out=picks)   # ties: the first index, as the host's argmax
        self._sample(logits, lo, samplers)
        return DecodeStep(logits, lo, picks, self.host)

    def _sample(self, logits: torch.Tensor, lo: int, samplers) -> None:
        stage = (lambda values: self.host.stage(values, self.device)) if self.host is not None else None
        draw_samples(self.feed[:, 0], logits, lo, samplers, stage)

    # -- staging ---------------------------------------------------------------------------------------
    def stage_begin(self, tensors: dict | None) -> None:
        """Empties the staging row, or loads a stored session state (``layers.{i}.{name}`` tensors) into it."""
        live = self._tensors(self.staging)
        if tensors is None and self._zero_graph is not None:
            self._zero_graph.replay()
        elif tensors is None:
            torch._foreach_zero_(live)  # a few launches for every layer's tensors, not one per tensor
        else:
            names = [f"layers.{i}.{n}" for i in range(len(self.staging)) for n in MHLAState.TENSORS]
            # from pinned memory (an asynchronous session copy) this does not wait for the device
            saved = [tensors[k].to(self.device, non_blocking=True) for k in names]
            foreach_by_dtype(torch._foreach_copy_, live, saved)

    def stage_feed(self, ids: list[int]) -> torch.Tensor:
        """Feeds up to one chunk of ids into the staging row; returns the last token's fp32 logits [V]."""
        if not 0 < len(ids) <= self.prefill_chunk:
            raise ValueError(f"a staging chunk holds 1 to {self.prefill_chunk} ids, got {len(ids)}")
        # pinned, as in ``decode``: a piece queues behind the step in flight without waiting for it
        if self.host is not None:
            x = self.host.stage(ids, self.device)[None]
        else:
            x = torch.tensor([ids], dtype=torch.long)
        if not self.graphs:
            out = self.model(input_ids=x, past_key_values=MHLACache(self.staging), use_cache=True,
                             logits_to_keep=1, plan=self.prefill_plan)
            return out.logits[0, -1].float()
        start, logits = 0, None
        for size in prefill_pieces(len(ids), self.piece_sizes):
            logits = self.prefill_graphs[size].step(x[:, start:start + size])
            start += size
        return logits[0, -1].to(torch.float32, copy=True)

    def admit(self, items: list[tuple[int, dict | None, list[int]]]) -> torch.Tensor:
        """Whole short prompts (slot, stored session tensors or None, ids of at most a piece), up to
        ``admit_batch`` of them, prefilled in one forward and placed in their slots (admission.py);
        returns fp32 logits [len(items), V] of each prompt's last token."""
        if self.stager is None:
            raise RuntimeError("batched admission is off (admit_batch = 1)")
        slots = [item[0] for item in items]
        # checked before anything runs: a row past the slots is the staging row (a prompt half fed) or a park row
        if len(set(slots)) < len(slots) or not all(type(s) is int and 0 <= s < self.max_batch for s in slots):
            raise ValueError(f"a batched admission's slots must be distinct slot numbers below {self.max_batch}, "
                             f"got {slots!r:.80}")
        stage = (lambda values: self.host.stage(values, self.device)) if self.host is not None else None
        return self.stager.admit(items, stage)

    def snapshot(self, slot: int, logits: torch.Tensor | None):
        """``slot``'s state and ``logits`` on the host: (``layers.{i}.{name}`` tensors, logits, ready), where
        ``ready`` is None or a CUDA event after which the tensors hold the copy (snapshots.py)."""
        from .snapshots import sync_snapshot
        if self.snapshots is not None:
            return self.snapshots.take(self.rows(slot, slot + 1), logits)
        return sync_snapshot(self.rows(slot, slot + 1), logits)

    def pick_first(self, slot: int, logits: torch.Tensor, sampler=None) -> DecodeStep:
        """The greedy pick (or ``sampler``'s draw) of a staged prompt's last logits [V], written into
        ``slot``'s feed on the device (its first decode step feeds it) and copied to the host without
        blocking."""
        picks = self.feed[slot:slot + 1, 0]
        if sampler is None:
            torch.argmax(logits[None], -1, out=picks)
        else:
            picks.copy_(sampler(logits[None].float()))
        return DecodeStep(logits[None], slot, picks, self.host)

    def stage_finish(self, slot: int) -> None:
        """Copies the staged state (positions included) into ``slot``."""
        graph = self._finish_graphs.get(slot)
        if graph is not None:
            graph.replay()
            return
        torch._foreach_copy_(self._tensors(self.rows(slot, slot + 1)), self._tensors(self.staging))

    @staticmethod
    def _tensors(states: list[MHLAState]) -> list[torch.Tensor]:
        return [getattr(s, n) for s in states for n in MHLAState.TENSORS]


class _Replay:
    """Off CUDA (the tests' stand-in for the graph path): ``replay`` runs ``fn`` itself."""

    def __init__(self, fn):
        self.replay = fn


def _captured(fn, device):
    """``fn`` (in-place work on preallocated tensors) captured as a CUDA graph."""
    if device.type != "cuda":
        return _Replay(fn)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
