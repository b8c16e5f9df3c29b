"""Helpers for the admission tests: a slot's state tensors, a slot as a stored session, one prompt
admitted the one-at-a-time way (the staging row) as the reference for batched admission, and an
engine run turn by turn until it has nothing left."""
from __future__ import annotations

from mhla_stream.state import MHLAState


def slot_tensors(runner, slot):
    return [getattr(s, n).clone() for s in runner.rows(slot, slot + 1) for n in MHLAState.TENSORS]


def stored_session(runner, slot):
    return {f"layers.{i}.{n}": getattr(s, n).clone() for i, s in enumerate(runner.rows(slot, slot + 1))
            for n in MHLAState.TENSORS}


def admit_alone(runner, slot, stored, ids):
    runner.stage_begin(stored)
    logits = runner.stage_feed(ids)
    runner.stage_finish(slot)
    return logits


def drain(engine, turns=3000):
    """Engine turns until no sequence runs or waits; an engine that never gets there fails the test."""
    for _ in range(turns):
        if not engine.seqs and not engine.waiting:
            return
        engine._turn()
    raise AssertionError("the engine did not finish")
