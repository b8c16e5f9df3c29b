"""How requests enter the engine: a free slot for each waiting request (``_admit``, ``_start``), then
its prompt fed through the staging row one piece at a time (``_stage_pieces``) or, with batched
admission, several whole short prompts in one forward (``_admit_together``). A mixin of ``Engine``
(engine.py), which owns the loop; it uses the engine's runner, store, sequences and limits.
"""
from __future__ import annotations

import collections
import logging
import os
import time

import torch

from ..state import MHLAState
from .jobs import Job, Seq
from .schemas import APIError

HISTORY = 4096  # as StreamingMHLA's default: recent ids for the repetition penalty
FAULT_MARK = "<<inject-fault>>"  # with MHLA_SERVE_FAULT_INJECTION=1, a request containing it fails (tests)
log = logging.getLogger("mhla_stream.serve")


class Intake:
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
        # the prompt already in the staging row first (short arrivals never starve a long prompt), then
        # batches of whole short prompts, then the next prompts one at a time, while the budget lasts
        spent = self._stage_pieces(budget, 0, current_only=True)
        # no wait once the server stops accepting: nothing can arrive to share the forward, and a held
        # prompt would only spend the shutdown grace (shorter than the longest wait) and get a 503
        may_wait = decoding and self._accepting
        while self.admit_batch > 1:
            fed = self._admit_together(max(budget, self.admit_tokens) - spent, may_wait=may_wait)
            if not fed:
                break
            spent += fed
        self._stage_pieces(budget, spent)

    def _stage_pieces(self, budget: int, spent: int, current_only: bool = False) -> int:
        """Pieces of prompts through the staging row, one prompt at a time in admission order (with
        batched admission, those it cannot take), until the budget is spent; returns the tokens spent."""
        while True:
            seq = self.staging
            if seq is None:
                if current_only:
                    return spent
                older_short = False  # a whole short prompt admitted before the next one to begin here
                for seq in self.seqs.values():
                    if not seq.staged and not self._batchable(seq):
                        break
                    older_short = older_short or (not seq.staged and self._batchable(seq))
                else:
                    return spent
                if spent and older_short:
                    # it is left a turn that starts with the budget unspent (``_admit_together`` goes first
                    # then): begun now, each long prompt after it would spend every turn's budget in turn
                    # and keep it out until no long prompt is left (admit_tokens = piece)
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
            if current_only:
                return spent

    def _admit_together(self, limit: int, may_wait: bool = False) -> int:
        """Whole short prompts (one piece each), in admission order, up to ``admit_batch`` of them and
        ``limit`` tokens: prefilled in one batched forward and placed in their slots. Returns the
        tokens fed. If the batched forward fails, its prompts go the one-at-a-time way instead (a
        failure that belongs to one of them then fails that request only). ``may_wait`` (streams are
        decoding): a group that neither limit cut stays unfed until its oldest prompt was submitted
        ``admit_wait_s`` ago, so that prompts arriving meanwhile share its forward."""
        group, spent, full = [], 0, False
        for seq in self.seqs.values():  # insertion order = admission order
            if not self._batchable(seq) or seq.staged:
                continue
            if len(group) == self.admit_batch or spent + len(seq.feed) > limit:
                full = True
                break
            group.append(seq)
            spent += len(seq.feed)
        if not group:
            return 0
        if (may_wait and not full and len(group) < self.admit_batch and self.admit_wait_s > 0
                and time.perf_counter() - min(s.job.submitted for s in group) < self.admit_wait_s):
            return 0
        if self._profile is not None:
            self._profile["admit forwards"] += 1
            self._profile["admitted"] += len(group)
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
        logits = data.logits.to(self.device, non_blocking=True) if data is not None and data.logits is not None else None
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
