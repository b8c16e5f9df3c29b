"""The engine: one thread owns the model and runs every request with continuous batching.

Slots are rows of one preallocated state (``runner.py`` says how the rows are used). Each loop turn
admits waiting requests into free slots (lowest first), prefills prompt pieces in the staging row
(one piece while other sequences decode, up to a chunk otherwise; a finished prompt's state is
copied into its slot), picks the next token of every sequence that is generating, ends the
sequences that are done, and feeds the picked tokens in one batched decode step (sequences at
different positions). So a long prompt arriving costs the running streams one bounded piece per
turn, never a freeze. A sequence reproduces
``StreamingMHLA.generate`` token for token: the same BOS rule, ``select_next``, history for the
repetition penalty, stop strings and eos, and every generated token but eos is fed.
"""
from __future__ import annotations

import collections
import logging
import os
import threading
import time

import torch

from ..sampling import select_next
from ..state import MHLAState
from .runner import StepRunner
from .schemas import APIError
from .sessions import SessionBusy, SessionData, SessionMissing, StateFileError
from .jobs import Flight, Job, Seq
from .text import TextAssembler

HISTORY = 4096  # as StreamingMHLA's default: recent ids for the repetition penalty
log = logging.getLogger("mhla_stream.serve")
FAULT_MARK = "<<inject-fault>>"  # with MHLA_SERVE_FAULT_INJECTION=1, a request containing it fails (tests)


def _put_all(items):
    for queue, event in items:
        queue.put_nowait(event)


class Engine:
    def __init__(self, model, tokenizer, store, *, max_batch: int = 32, max_queue: int = 256,
                 prefill_chunk: int = 512, policy: str | None = None, metrics=None, cuda_graph: bool = True,
                 backend: str = "auto", runner=None, prefill_piece: int | None = None, state_dtype=None,
                 run_ahead: bool = True, admit_tokens: int | None = None, admit_batch: int = 1):
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
        self.device = model.device
        # ``runner``: a stand-in for the model's steps (the host-cost harness, tests); None = the real one
        self.runner = runner if runner is not None else StepRunner(
            model, max_batch, prefill_chunk, policy=policy, backend=backend, cuda_graphs=cuda_graph,
            prefill_piece=self.prefill_piece, state_dtype=state_dtype, admit_batch=admit_batch)
        self.admit_batch = getattr(self.runner, "admit_batch", admit_batch)  # 1 if the runner could not batch
        self.free = list(range(max_batch))
        self.seqs: dict[int, Seq] = {}
        self.staging: Seq | None = None       # the sequence whose prompt is in the staging row
        self.flight: Flight | None = None
        self.eos_id = model.config.eos_token_id  # read per token: a transformers config attribute costs µs
        self.run_ahead = run_ahead
        self.waiting: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._accepting = True
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
        with self._cv:
            if not self._accepting:
                raise APIError(503, "the server is shutting down", type="server_error", code="shutting_down")
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

    def stop(self, grace_s: float = 5.0) -> None:
        """Stops accepting, lets in-flight requests finish for ``grace_s``, cancels the rest, joins."""
        with self._cv:
            self._accepting = False
        deadline = time.monotonic() + grace_s
        while (self.seqs or self.waiting) and time.monotonic() < deadline:
            time.sleep(0.05)
        for job in list(self.waiting) + [s.job for s in list(self.seqs.values())]:
            job.cancelled.set()
        with self._cv:
            self._stopping = True
            self._cv.notify()
        self.thread.join(timeout=30)

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
        # Running ahead: when every sequence of the step in flight is a plain greedy one (the pick is
        # the device's argmax, a token fed past the end changes nothing anyone keeps), the next step
        # is launched at once, fed those picks on the device, and the host reads the picks of the
        # step in flight while the next one runs. Otherwise the step in flight is settled first: its
        # rows get their logits and are chosen on the host, as a sequence run alone is.
        flight, self.flight = self.flight, None
        ahead = [s for s in flight.rows if self.seqs.get(s.slot) is s and s.finish is None] if flight else []
        if ahead and not all(s.plain for s in ahead):
            for seq in ahead:
                seq.ahead = False
                if seq.first is not None:  # its first token, then it is chosen from the step's logits
                    self._guarded(seq, self._accept_first)
                    self._publish([seq])
                seq.logits = flight.step.row_logits(seq.slot)
            ahead = []
        ready = [s for s in self.seqs.values() if s.staged and not s.ahead and s.pending is None and s.finish is None]
        # a plain greedy request's first token is picked on the device too: no sync for an admission
        first = [s for s in ready if s.generated == 0 and s.job.params.max_new_tokens > 0 and s.plain]
        for seq in first:
            seq.first = self.runner.pick_first(seq.slot, seq.logits)
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
                    n = prof["turns"]
                    log.warning("engine profile over %d turns (%.1f rows): %s", n, prof["rows"] / n,
                                ", ".join(f"{k} {1e6 * v / n:.0f} us" for k, v in prof.items()
                                          if k not in ("turns", "rows")))
                    prof.clear()
        return mark

    def _may_run_ahead(self, job: Job, fault: bool) -> bool:
        p = job.params
        return self.run_ahead and p.greedy and p.repetition_penalty == 1.0 and job.session is None and not fault

    def _prefill(self):
        """Prompt tokens for this turn: at most ``prefill_piece`` of them while other sequences decode
        (the running streams wait one bounded piece, never a whole long prompt), else up to
        ``prefill_chunk``; several short prompts, or pieces of a long one. Short prompts (one piece
        each) may fill up to ``admit_tokens`` while others decode. A prompt is always cut into
        the same pieces, so its numbers never depend on what else runs (same alone or batched).
        With ``admit_batch`` > 1 those whole short prompts are prefilled side by side, up to
        ``admit_batch`` a forward (``_admit_together``); they then match the one-at-a-time numbers
        to rounding, as a batched decode step matches a batch-1 one."""
        decoding = any(s.staged for s in self.seqs.values())
        budget = self.prefill_piece if decoding else self.prefill_chunk
        # admission order between the two ways: batches go first only when the oldest prompt not yet
        # in its slot is one they take; else the prompt being staged (or the oldest one batches cannot
        # take) gets its piece first. Batches always first starved a long prompt for as long as short
        # ones kept arriving (each turn's batch spent the piece budget its next piece needed).
        oldest = next((s for s in self.seqs.values() if not s.staged), None)
        batches_first = oldest is not None and self._batchable(oldest)
        spent = self._prefill_batches(budget, 0) if batches_first else 0
        spent = self._prefill_one_at_a_time(budget, spent)
        if not batches_first:
            self._prefill_batches(budget, spent)

    def _prefill_batches(self, budget: int, spent: int) -> int:
        """Batches of whole short prompts while the budget lasts; returns the tokens spent so far."""
        while self.admit_batch > 1:
            fed = self._admit_together(max(budget, self.admit_tokens) - spent)
            if not fed:
                break
            spent += fed
        return spent

    def _prefill_one_at_a_time(self, budget: int, spent: int) -> int:
        """Pieces in the staging row, in admission order (with batched admission: of the prompts it
        does not take), while the budget lasts; returns the tokens spent so far."""
        while True:
            seq = self.staging
            if seq is None:  # admission order; with batched admission, the prompts that cannot be batched
                seq = next((s for s in self.seqs.values() if not s.staged and not self._batchable(s)), None)
                if seq is None:
                    return spent
                try:
                    self.runner.stage_begin(seq.stored)
                except Exception as e:
                    self._end(seq, error=e)
                    continue
                seq.stored, self.staging = None, seq
            if seq.fed < len(seq.feed):
                size = min(len(seq.feed) - seq.fed, self.prefill_piece)
                # a whole prompt of one piece may join others up to ``admit_tokens``; a piece of a
                # longer prompt keeps to the piece budget (long prompts are what ITL is guarded from)
                whole = seq.fed == 0 and len(seq.feed) <= self.prefill_piece
                limit = max(budget, self.admit_tokens) if whole else budget
                if spent and spent + size > limit:
                    return spent
                spent += size
                self._guarded(seq, self._prefill_piece)
            if self.staging is seq and seq.fed == len(seq.feed):
                self._guarded(seq, self._stage_finish)

    def _admit_together(self, limit: int) -> int:
        """Whole short prompts (one piece each), in admission order, up to ``admit_batch`` of them and
        ``limit`` tokens: prefilled in one batched forward and placed in their slots. Returns the
        tokens fed. If the batched forward fails, its prompts go the one-at-a-time way instead (a
        failure that belongs to one of them then fails that request only)."""
        group, spent = [], 0
        for seq in self.seqs.values():  # insertion order = admission order
            if not self._batchable(seq) or seq.staged:
                continue
            if len(group) == self.admit_batch or spent + len(seq.feed) > limit:
                break
            group.append(seq)
            spent += len(seq.feed)
        if not group:
            return 0
        try:
            logits = self.runner.admit([(s.slot, s.stored, s.feed) for s in group])
        except Exception:
            log.warning("a batched admission of %d prompts failed; admitting them one at a time", len(group),
                        exc_info=True)
            for seq in group:
                seq.solo = True
            return 0
        for i, seq in enumerate(group):
            seq.stored, seq.fed, seq.logits = None, len(seq.feed), logits[i]
            seq.history.extend(seq.feed)
            seq.position += len(seq.feed)
            seq.staged = True
        return spent

    def _batchable(self, seq: Seq) -> bool:
        """Whether batched admission takes ``seq``: a whole prompt of at most one piece, not yet begun."""
        return (self.admit_batch > 1 and not seq.solo and seq.fed == 0 and seq is not self.staging
                and 1 <= len(seq.feed) <= self.prefill_piece)

    def _stage_finish(self, seq: Seq):
        self.runner.stage_finish(seq.slot)
        seq.staged, self.staging = True, None

    def _guarded(self, seq, fn):
        try:
            fn(seq)
        except Exception as e:
            self._end(seq, error=e)

    def _reap_cancelled(self):
        with self._cv:
            for job in [j for j in self.waiting if j.cancelled.is_set()]:
                self.waiting.remove(job)
                if job.session is not None:
                    self.store.release(job.session, None)
        for seq in [s for s in self.seqs.values() if s.job.cancelled.is_set()]:
            self._end(seq, cancelled=True)

    def _admit(self):
        while self.free:
            with self._cv:
                if not self.waiting:
                    return
                job = self.waiting.popleft()
            slot = self.free.pop(0)
            try:
                self.seqs[slot] = self._start(job, slot)
            except Exception as e:
                self.free.insert(0, slot)
                self._fail_job(job, e)

    def _slot(self, slot: int) -> list[MHLAState]:
        return self.runner.rows(slot, slot + 1)

    def _start(self, job: Job, slot: int) -> Seq:
        data = self.store.load(job.session) if job.session is not None else None
        position = data.position if data else 0
        messages = list(data.messages) if data else []
        ids = job.ids
        if job.render is not None:
            text, messages = job.render(messages)
            ids = self.tokenizer.encode(text)
        fault = self._faults and job.render is None and ids is not None and FAULT_MARK in self.tokenizer.decode(ids)
        if job.add_bos and position == 0 and self.tokenizer is not None and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + list(ids)
        if len(ids) > job.max_prompt_tokens:
            raise APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of "
                           f"{job.max_prompt_tokens} (--max-prompt-tokens)", param="prompt", code="prompt_too_long")
        history = collections.deque(data.history if data else [], maxlen=HISTORY)
        logits = data.logits.to(self.device) if data is not None and data.logits is not None else None
        if not ids and logits is None:
            bos = self.model.config.bos_token_id
            if bos is None:
                raise APIError(400, "empty prompt and the model has no BOS token", param="prompt")
            ids = [bos]
        p = job.params
        generator = None
        if not p.greedy:
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(6), "little")
            generator = torch.Generator(device=self.device).manual_seed(seed)
        seq = Seq(job, slot, list(ids), messages, history, position, logits, generator=generator,
                   prompt_tokens=len(ids), fault=fault, stored=data.tensors if data is not None else None,
                   plain=self._may_run_ahead(job, fault))
        job.emit("start", {"prompt_tokens": len(ids), "position": position})
        return seq

    def _prefill_piece(self, seq: Seq):
        piece = seq.feed[seq.fed:seq.fed + self.prefill_piece]
        seq.fed += len(piece)
        seq.logits = self.runner.stage_feed(piece)
        seq.history.extend(piece)
        seq.position += len(piece)

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
        step = self.runner.decode({s.slot: s.pending for s in fed}, auto=[s.slot for s in ahead])
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
        tensors = {f"layers.{i}.{n}": getattr(v, n).to("cpu", copy=True)
                   for i, v in enumerate(self._slot(seq.slot)) for n in MHLAState.TENSORS}
        logits = None if seq.logits is None else seq.logits.to("cpu", copy=True)
        return SessionData(tensors, logits, list(seq.history), seq.position, messages)

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
