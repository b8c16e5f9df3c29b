"""Helpers for the admission tests: a slot's state tensors, a slot as a stored session, and one prompt
admitted the one-at-a-time way (the staging row) as the reference for batched admission."""
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
