"""What the engine keeps per request: the request as submitted (``Job``), its sequence while it holds a
slot (``Seq``), and the decode step in flight with the sequences it fed (``Flight``)."""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch

from ..sampling import SamplingParams
from .text import TextAssembler


@dataclass
class Job:
    """One request. ``emit(kind, payload)`` is called from the engine thread: start, text, done, error."""
    params: SamplingParams
    emit: object
    ids: list[int] | None = None           # a tokenized prompt (BOS added by the engine at position 0)
    add_bos: bool = True
    render: object = None                  # chat: (stored_messages) -> (text, messages fed), run at admission
    session: str | None = None
    fork_from: str | None = None
    max_prompt_tokens: int = 1 << 30
    cancelled: threading.Event = field(default_factory=threading.Event)
    sink: tuple | None = None              # (event loop, asyncio.Queue): text pieces of a turn go in one call
    submitted: float = field(default_factory=time.perf_counter)


@dataclass
class Seq:
    job: Job
    slot: int
    feed: list[int]                        # the prompt ids; feed[fed:] are still to be prefilled
    messages: list[dict]
    history: collections.deque
    position: int
    logits: torch.Tensor | None = None
    pending: int | None = None             # generated token still to be fed
    fresh: int | None = None               # generated token whose text is not yet published
    generated: int = 0
    finish: str | None = None
    assembler: TextAssembler | None = None
    generator: torch.Generator | None = None
    last_token_at: float = 0.0
    prompt_tokens: int = 0
    fault: bool = False
    stored: dict | None = None             # a session's state tensors, until the staging row takes them
    staged: bool = False                   # the prompt is fed and the state sits in the slot
    fed: int = 0                           # (an offset, not slicing: a 32k prompt is not copied per piece)
    ahead: bool = False                    # in the step in flight; its next token is that step's pick
    first: object = None                   # its first token, picked on the device (runner.DecodeStep)
    plain: bool = False                    # may run ahead (``Engine._may_run_ahead``), fixed for its life
    drawn: int | None = None               # its next token, drawn on the device before its step was settled
    solo: bool = False                     # staged alone even with batched admission (its batch failed)


@dataclass
class Flight:
    """The decode step launched last turn and the sequences it fed (read next turn)."""
    step: object                           # runner.DecodeStep
    rows: list
