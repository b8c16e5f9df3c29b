"""The engine: one thread owns the model and runs every request with continuous batching.

Slots are rows of one preallocated state (``runner.py`` says how the rows are used). Each loop turn
admits waiting requests into free slots (lowest first), prefills prompt pieces in the staging row
(one piece while other sequences decode, up to a chunk otherwise; a finished prompt's state is
copied into its slot), picks the next token of every sequence that is generating, ends the
sequences that are done, and feeds the picked tokens in one batched decode step (sequences at
different positions). So a long prompt arriving costs the running streams one bounded piece per
turn, never a freeze. A sequence reproduces
``StreamingMHLA.generate`` token for token: the same BOS rule, ``select_next``, history for the
repetition penalty, stop strings and eos, and every generated token but eos is fed. How requests
get a slot and their prompt fed (one at a time or batched) is ``intake.py``.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time

import torch

from ..sampling import select_next
from .runner import StepRunner
from .schemas import APIError
from .shutdown import SHUTDOWN_GRACE_S
from .sessions import SessionBusy, SessionData, SessionMissing, StateFileError
from .intake import FAULT_MARK, Intake  # noqa: F401  (FAULT_MARK: imported from here by the tests)
from .jobs import Flight, Job, Seq
from .text import TextAssembler

log = logging.getLogger("mhla_stream.serve")


def _shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down",
                    headers={"Retry-After": "1"})


def _put_all(items):
    for queue, event in items:
        queue.put_nowait(event)


class Engine(Intake):
    def __init__(self, model, tokenizer, store, *, max_batch: int = 32, max_queue: int = 256,
                 prefill_chunk: int = 512, policy: str | None = None, metrics=None, cuda_graph: bool = True,
                 backend: str = "auto", runner=None, prefill_piece: int | None = None, state_dtype=None,
                 run_ahead: bool = True, admit_tokens: int | None = None, admit_batch: int = 1,
                 async_session_copy: bool = False, admit_wait_ms: float = 0.0):
        self.model, self.tokenizer, self.store, self.metrics = model, tokenizer, store, metrics
        self.max_batch, self.max_queue, self.prefill_chunk = max_batch, max_queue, prefill_chunk
        if prefill_piece is not None and not 1 <= prefill_piece:
            raise ValueError(f"prefill_piece must be >= 1, got {prefill_piece}")
        # prompts are fed in pieces of this many tokens; a turn feeds at most one piece's worth while
        # other sequences are decoding (their next token waits for it), up to a chunk's worth otherwise
        self.prefill_piece = min(prefill_piece or prefill_chunk, prefill_chunk)
        if admit_tokens is not None and not 1 <= admit_tokens:
            raise ValueError(f"admit_tokens must be >= 1, got {admit_tokens}")
        # whole short prompts (one piece each) a turn may admit while streams decode: clients that arrive
        # together (a burst) are admitted a few per turn, not one per turn behind a growing queue
        self.admit_tokens = max(admit_tokens or self.prefill_piece, self.prefill_piece)
        if not 1 <= admit_batch:
            raise ValueError(f"admit_batch must be >= 1, got {admit_batch}")
        # > 1: those whole short prompts are prefilled side by side in one forward (admission.py)
        self.admit_batch = admit_batch
        if not 0 <= admit_wait_ms <= 10_000:  # NaN fails this too
            raise ValueError(f"admit_wait_ms must be in [0, 10000], got {admit_wait_ms}")
        # while streams decode, short prompts may wait up to this long after their submission for others
        # to share their forward (a forward's cost is mostly fixed: one a prompt was the served streams'
        # largest overhead); never longer, never when nothing decodes
        self.admit_wait_s = admit_wait_ms / 1e3
        self.device = model.device
        # ``runner``: a stand-in for the model's steps (the host-cost harness, tests); None = the real one
        self.runner = runner if runner is not None else StepRunner(
            model, max_batch, prefill_chunk, policy=policy, backend=backend, cuda_graphs=cuda_graph,
            prefill_piece=self.prefill_piece, state_dtype=state_dtype, admit_batch=admit_batch,
            async_snapshots=async_session_copy)
        self.admit_batch = getattr(self.runner, "admit_batch", admit_batch)  # 1 if the runner could not batch
        self.free = list(range(max_batch))
        self.seqs: dict[int, Seq] = {}
        self.staging: Seq | None = None       # the sequence whose prompt is in the staging row
        self.flight: Flight | None = None
        self.eos_id = model.config.eos_token_id  # read per token: a transformers config attribute costs µs
        self.run_ahead = run_ahead
        self._no_history = torch.empty(1, 0, dtype=torch.long, device=self.device)
        # unseeded sampled rows that run ahead draw from this one generator, several rows a call
        self._generator = torch.Generator(device=self.device).manual_seed(int.from_bytes(os.urandom(6), "little"))
        self.waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False                # the grace is over: end everything left, then exit
        self._accepting = True
        self._stop_begun, self._stopped = False, threading.Event()
        self._faults = os.environ.get("MHLA_SERVE_FAULT_INJECTION") == "1"
        # MHLA_SERVE_PROFILE=1: the engine thread's wall time per turn phase, logged every 200 turns
        self._profile = collections.Counter() if os.environ.get("MHLA_SERVE_PROFILE") == "1" else None
        log.info("engine: %s", self.runner.describe())
        if metrics is not None:
            metrics.engine.info(self.runner.info())
        self.thread = threading.Thread(target=self._run, name="mhla-engine", daemon=True)

    # -- called from the server's threads ------------------------------------------------------------
    def start(self):
        self.thread.start()

    def submit(self, job: Job) -> None:
        now = time.perf_counter()
        if not (math.isfinite(job.submitted) and job.submitted <= now):
            # another process's clock (--http-process): inf or a future time would hold the prompt past its
            # wait (while anything decodes), NaN would reach the TTFT histogram; taken as received now
            job.submitted = now
        with self._cv:
            if not self._accepting:
                raise _shutting_down()
            if len(self.waiting) >= self.max_queue:
                raise APIError(429, f"the request queue is full ({self.max_queue} waiting); retry shortly",
                               type="rate_limit_error", code="queue_full", headers={"Retry-After": "1"})
            if job.session is not None:
                try:
                    self.store.acquire(job.session, job.fork_from)
                except SessionBusy as e:
                    raise APIError(409, str(e), param="session", code="session_busy") from None
                except SessionMissing as e:
                    raise APIError(404, e.args[0], param="fork_from", code="session_not_found") from None
            self.waiting.append(job)
            self._cv.notify()

    def counts(self) -> tuple[int, int]:
        return len(self.seqs), len(self.waiting)

    def stop(self, grace_s: float = SHUTDOWN_GRACE_S) -> None:
        """Stops accepting, lets in-flight requests finish for ``grace_s``, then ends the rest with a 503
        ``shutting_down`` error (a stream gets it as its last event, then [DONE]; a session keeps its
        state from before that request), and joins. Several threads may call it (SIGTERM starts it, the
        app's shutdown waits for it): the first does the work, the others wait for it to be done."""
        with self._cv:
            self._accepting = False
            first, self._stop_begun = not self._stop_begun, True
        if not first:
            self._stopped.wait()  # bounded: the first call's grace and join
            return
        try:
            deadline = time.monotonic() + grace_s
            while (self.seqs or self.waiting) and time.monotonic() < deadline and self.thread.is_alive():
                time.sleep(0.05)
            with self._cv:  # the engine thread ends whatever is left at its next turn (``_reap_cancelled``)
                self._stopping = True
                self._cv.notify()
            if self.thread.is_alive():
                self.thread.join(timeout=30)
        finally:
            self._stopped.set()

    # -- the loop --------------------------------------------------------------------------------------
    def _run(self):
        while True:
            with self._cv:
                while not self._stopping and not self.waiting and not self.seqs:
                    self._cv.wait()
                if self._stopping and not self.seqs and not self.waiting:
                    return
            try:
                self._turn()
            except Exception as e:  # a fault the per-request guards did not catch: fail the batch, go on
                self.flight = None
                for seq in list(self.seqs.values()):
                    try:
                        self._end(seq, error=e)
                    except Exception:  # e.g. telling a client whose event loop is closed: the loop must live
                        log.exception("could not end a request after an engine fault")

    @torch.inference_mode()
    def _turn(self):
        mark = self._marker()
        self._reap_cancelled()
        self._admit()
        mark("admit")
        self._prefill()
        mark("prefill")
        # Running ahead: when every sequence of the step in flight is a plain one (no penalty, no session:
        # its pick is made on the device, the argmax or a draw from its own generator, and a token fed past
        # the end changes nothing anyone keeps), the next step is launched at once, fed those picks on
        # the device, and the host reads the picks of the step in flight while the next one runs.
        # Otherwise the step in flight is settled first: its rows get their logits and are chosen on the
        # host, as a sequence run alone is (a sampled plain row keeps the draw the device already made:
        # its generator must advance once a token, as alone).
        flight, self.flight = self.flight, None
        ahead = [s for s in flight.rows if self.seqs.get(s.slot) is s and s.finish is None] if flight else []
        if ahead and not all(s.plain for s in ahead):
            for seq in ahead:
                seq.ahead = False
                if seq.first is not None:  # its first token, then it is chosen from the step's logits
                    self._guarded(seq, self._accept_first)
                    self._publish([seq])
                seq.logits = flight.step.row_logits(seq.slot)
                if seq.plain and not seq.job.params.greedy:
                    seq.drawn = flight.step.tokens()[seq.slot - flight.step.lo]
            ahead = []
        ready = [s for s in self.seqs.values() if s.staged and not s.ahead and s.pending is None and s.finish is None]
        # a plain greedy request's first token is picked on the device too: no sync for an admission
        first = [s for s in ready if s.generated == 0 and s.job.params.max_new_tokens > 0 and s.plain]
        for seq in first:
            seq.first = self.runner.pick_first(seq.slot, seq.logits, self._sampler(seq))
        if first:
            ready = [s for s in ready if s.first is None]
        # greedy rows without a penalty: one argmax and one device sync for all of them
        plain = [s for s in ready if s.job.params.greedy and s.job.params.repetition_penalty == 1.0]
        picks = dict(zip(map(id, plain), torch.stack([s.logits for s in plain]).argmax(-1).tolist())) if plain else {}
        for seq in ready:
            self._guarded(seq, lambda q: self._choose(q, picks.get(id(q))))
        picked = [s for s in ready if s.fresh is not None]
        mark("choose")
        # rows that leave before the step publish their token now; the others while the step runs on
        # the device (a CUDA step is launched asynchronously: text decoding, metrics and emitting the
        # pieces then overlap it instead of adding to it)
        self._publish([s for s in picked if s.pending is None])
        # done before the step: a finished row must not be stepped (its state may be a session's)
        for seq in [s for s in self.seqs.values() if s.finish is not None and s.pending is None and not s.ahead]:
            self._end(seq)
        fed = [s for s in self.seqs.values() if s.pending is not None]
        mark("publish+end")
        if fed or ahead or first:
            try:
                self._decode(fed, ahead + first)
            except Exception as e:
                for seq in fed + ahead + first:
                    self._end(seq, error=e)
        mark("launch")
        if ahead:  # the picks of the step before, while the step just launched runs
            tokens = flight.step.tokens()
            mark("wait picks")
            for seq in ahead:
                if seq.first is not None:  # its first token (fed by the step before), then the step's pick
                    self._guarded(seq, self._accept_first)
                    self._publish([seq])
                if self.seqs.get(seq.slot) is seq and seq.finish is None:
                    self._guarded(seq, lambda q: self._accept_fed(q, tokens[q.slot - flight.step.lo]))
        mark("accept")
        self._publish([s for s in picked + ahead if self.seqs.get(s.slot) is s])
        for seq in [s for s in self.seqs.values() if s.finish is not None and s.pending is None]:
            self._end(seq)
        mark("publish+end")

    def _marker(self):
        """``mark(phase)`` adds the time since the last mark to ``phase`` (a no-op unless profiling)."""
        if self._profile is None:
            return lambda phase: None
        last = [time.perf_counter()]
        prof = self._profile

        def mark(phase):
            now = time.perf_counter()
            prof[phase] += now - last[0]
            last[0] = now
            if phase == "accept":
                prof["turns"] += 1
                prof["rows"] += len(self.seqs)
                if prof["turns"] % 200 == 0:
                    n, forwards = prof["turns"], prof["admit forwards"]
                    per = f", {prof['admitted'] / forwards:.1f} prompts a batched admission" if forwards else ""
                    log.warning("engine profile over %d turns (%.1f rows%s): %s", n, prof["rows"] / n, per,
                                ", ".join(f"{k} {1e6 * v / n:.0f} us" for k, v in prof.items()
                                          if k not in ("turns", "rows", "admit forwards", "admitted")))
                    prof.clear()
        return mark

    def _may_run_ahead(self, job: Job, fault: bool) -> bool:
        p = job.params
        return self.run_ahead and p.repetition_penalty == 1.0 and job.session is None and not fault

    def _samplers(self, rows: list[Seq]) -> dict:
        """slot -> draw for the plain sampled rows of a step. A seeded row draws alone from its own
        generator (its text must equal the request alone); unseeded rows with the same settings share
        one draw over all their logits from the engine's generator: one set of launches, not one a row."""
        out, shared = {}, {}
        for seq in rows:
            p = seq.job.params
            if not seq.plain or p.greedy:
                continue
            if p.seed is not None:
                out[seq.slot] = self._sampler(seq)
                continue
            key = (p.temperature, p.top_k, p.top_p, p.min_p)
            if key not in shared:
                shared[key] = lambda logits, p=p: select_next(logits, self._no_history, p, self._generator)
            out[seq.slot] = shared[key]
        return out

    def _sampler(self, seq: Seq):
        """A plain sampled row's pick on the device: ``select_next`` on its fp32 logits [1, V] with its own
        generator, as ``_choose`` would on the host (None: greedy rows take the step's argmax)."""
        p = seq.job.params
        if not seq.plain or p.greedy:
            return None
        none = self._no_history
        return lambda logits: select_next(logits, none, p, seq.generator)

    def _guarded(self, seq, fn):
        try:
            fn(seq)
        except Exception as e:
            self._end(seq, error=e)

    def _reap_cancelled(self):
        """Drops requests whose client left; once the shutdown grace is over, ends every other one too
        with a 503 (each gets a last event: no stream is cut, no request answered with a 500)."""
        with self._cv:
            ending = self._stopping
            left = [j for j in self.waiting if ending or j.cancelled.is_set()]
            for job in left:
                self.waiting.remove(job)
                if job.session is not None:  # released with the removal: no window where it is neither
                    self.store.release(job.session, None)
        for seq in [s for s in self.seqs.values() if ending or s.job.cancelled.is_set()]:
            if seq.job.cancelled.is_set():
                self._end(seq, cancelled=True)
            else:
                self._end(seq, error=_shutting_down())
        for job in left:
            if not job.cancelled.is_set():
                self._fail_job(job, _shutting_down(), released=True)

    def _choose(self, seq: Seq, token: int | None = None):
        """Picks the next token from the logits, as ``StreamingMHLA.generate_ids`` does (``token``: the
        greedy pick already made for a batch of rows, the same argmax)."""
        p = seq.job.params
        if seq.assembler is None:  # the stream's text decoder starts from the ids already in the stream
            seq.assembler = TextAssembler(self.tokenizer, p.stop, list(seq.history)[-8:])
        if seq.generated >= p.max_new_tokens:
            seq.finish = "length"
            return
        if seq.fault and seq.generated >= 1:
            raise RuntimeError("injected fault (MHLA_SERVE_FAULT_INJECTION)")
        if token is None and seq.drawn is not None:  # drawn on the device already (a settled plain row)
            token, seq.drawn = seq.drawn, None
        if token is None:
            history = torch.empty(1, 0, dtype=torch.long, device=self.device) if p.repetition_penalty == 1.0 else \
                torch.tensor([list(seq.history)], dtype=torch.long, device=self.device)
            token = int(select_next(seq.logits[None], history, p, seq.generator))
        if p.stop_at_eos and token == self.eos_id:
            seq.finish = "stop"
            return
        seq.pending = seq.fresh = token
        seq.generated += 1
        if seq.generated >= p.max_new_tokens:
            seq.finish = "length"
            if seq.job.session is None:
                seq.pending = None  # nobody keeps this state: skip feeding the last token

    def _publish(self, seqs: list[Seq]):
        """The tokens just picked: metrics, text pieces (a stop string ends the sequence; a token fed
        past it changes nothing kept: a session's stream is fed every token but eos anyway). Pieces
        for jobs with a ``sink`` reach their event loop in one wake-up per turn, not one per token."""
        now = time.perf_counter()
        batches: dict[object, list] = {}
        sent = 0
        for seq in seqs:
            token, seq.fresh = seq.fresh, None
            if token is None:
                continue
            sent += 1
            self._guarded(seq, lambda q: self._publish_one(q, token, now, batches))
        # tokens out are counted here, as generated, not per row fed in ``_decode``: a row's last token at
        # the length limit is not fed, while a run-ahead row is fed its eos (and a token past its stop
        # string or limit) before the host sees it, so counting fed rows disagreed with the completion
        # tokens reported, and differently with and without running ahead
        if self.metrics is not None and sent:
            self.metrics.tokens_out.inc(sent)
        for loop, items in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: the server is going away
                log.warning("dropped text for %d requests: their event loop is closed", len(items))

    def _publish_one(self, seq: Seq, token: int, now: float, batches: dict):
        if self.metrics is not None:
            if seq.generated == 1:
                self.metrics.ttft.observe(now - seq.job.submitted)
            else:
                self.metrics.itl.observe(now - seq.last_token_at)
        seq.last_token_at = now
        piece, stopped = seq.assembler.push(token)
        if piece:
            if seq.job.sink is not None:
                loop, queue = seq.job.sink
                batches.setdefault(loop, []).append((queue, ("text", piece)))
            else:
                seq.job.emit("text", piece)
        if stopped:
            seq.finish = "stop"

    def _decode(self, fed: list[Seq], ahead: list[Seq]):
        """One batched step: ``fed`` rows take the token the host chose, ``ahead`` rows the device's
        pick of the step before (read by the host after this launch, in ``_accept_fed``)."""
        samplers = self._samplers(fed + ahead)
        step = self.runner.decode({s.slot: s.pending for s in fed}, auto=[s.slot for s in ahead], samplers=samplers)
        for s in fed:
            s.history.append(s.pending)
            s.position += 1
            s.pending = None
        rows = fed + ahead
        for s in rows:
            s.ahead = s.finish is None
            if not s.plain:  # its logits now (a view): a session's snapshot keeps them
                s.logits = step.row_logits(s.slot)
        self.flight = Flight(step, [s for s in rows if s.ahead])

    def _accept_first(self, seq: Seq):
        """A first token picked on the device (``pick_first``) and already fed: accepted as
        ``_choose`` would accept it."""
        token, seq.first = seq.first.tokens()[0], None
        if seq.assembler is None:
            seq.assembler = TextAssembler(self.tokenizer, seq.job.params.stop, list(seq.history)[-8:])
        self._accept_fed(seq, token)

    def _accept_fed(self, seq: Seq, token: int):
        """A run-ahead row's pick, already fed by the step just launched: the choice ``_choose`` would
        make (a greedy pick, eos, the length limit), with the feeding already done."""
        p = seq.job.params
        if p.stop_at_eos and token == self.eos_id:
            seq.finish, seq.ahead = "stop", False
            return
        seq.fresh = token
        seq.generated += 1
        seq.history.append(token)
        seq.position += 1
        if seq.generated >= p.max_new_tokens:
            seq.finish, seq.ahead = "length", False

    # -- leaving -------------------------------------------------------------------------------------
    def _end(self, seq: Seq, error: Exception | None = None, cancelled: bool = False):
        if self.seqs.get(seq.slot) is not seq:
            return
        del self.seqs[seq.slot]
        if self.staging is seq:
            self.staging = None
        self.free.append(seq.slot)
        self.free.sort()
        job = seq.job
        ok = error is None and not cancelled
        tail = seq.assembler.flush() if ok and seq.assembler is not None else ""
        if job.session is not None:
            data = None
            if ok:
                reply = seq.assembler.text if seq.assembler is not None else ""
                messages = seq.messages + ([{"role": "assistant", "content": reply}] if job.render is not None else [])
                data = self._snapshot(seq, messages)
            self.store.release(job.session, data)
        if error is not None:
            self._fail_job(job, error, released=True)
        elif not cancelled:
            if tail:
                job.emit("text", tail)
            job.emit("done", {"finish_reason": seq.finish or "stop", "prompt_tokens": seq.prompt_tokens,
                              "completion_tokens": seq.generated, "position": seq.position})

    def _snapshot(self, seq: Seq, messages) -> SessionData:
        tensors, logits, ready = self.runner.snapshot(seq.slot, seq.logits)
        return SessionData(tensors, logits, list(seq.history), seq.position, messages, ready=ready)

    def _fail_job(self, job: Job, error: Exception, released: bool = False):
        if isinstance(error, (SessionMissing, StateFileError)):  # the client's session, not a server fault
            log.warning("request refused: %s", str(error.args[0])[:300])
        elif not isinstance(error, APIError):
            log.error("request failed in the engine", exc_info=error)
        if job.session is not None and not released:
            self.store.release(job.session, None)
        if isinstance(error, APIError):
            job.emit("error", error)
        elif isinstance(error, (SessionMissing, StateFileError)):
            # a stored session this server cannot continue (another state_dtype, a damaged or crafted file): 409
            missing = isinstance(error, SessionMissing)
            job.emit("error", APIError(404 if missing else 409, str(error.args[0]), type="invalid_request_error",
                                       param="session", code="session_not_found" if missing else "session_refused"))
        else:
            job.emit("error", APIError(500, f"the request failed inside the engine: {type(error).__name__}: {error}",
                                       type="server_error", code="engine_error"))
