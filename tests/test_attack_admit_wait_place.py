"""Hostile and edge cases for two serve surfaces: the admission hold (``--admit-wait-ms``, intake.py
``_admit_together``) and partial placement in batched admission (admission.py ``BatchStager._place``).

The hold: a held request cancelled by its client or ended by a server stop ends cleanly (its slot
freed, nothing else affected); held prompts are admitted at once when the last stream finishes;
admit_batch 1 makes it a no-op; prompts of 1, piece and piece + 1 tokens; held session and fork
requests give the text of one stream; a ``submitted`` time from another clock (inf, NaN, the future)
cannot hold a request past its wait; no hold once a stop begins; a short prompt is not kept out by
long prompts admitted after it; odd CLI values. Placement: pieces under a block (nothing
touched), of exactly one block, of the whole ring (window and window+far), a bf16 ring, and a failed
batched forward followed by a partial placement: slot states equal one-at-a-time admission over dirty
slots and the stager's rows are left all zero; slots that are not slots (the staging row) or given
twice are refused before anything runs. Texts are compared by ids (jobs use add_bos=False)."""
from __future__ import annotations

import math
import time

import pytest
import torch

from mhla_stream.sampling import SamplingParams
from admit_util import admit_alone as _alone, drain, slot_tensors as _slot, stored_session as _stored

CHUNK, PIECE = 64, 16
LONG_WAIT = 10_000  # ms: a held prompt's wait never runs out inside a test


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def _store(ref, tmp_path):
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    return SessionStore(str(tmp_path), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})


def _engine(ref, tmp_path, wait_ms=LONG_WAIT, admit_batch=4, real=False, max_batch=8, admit_tokens=48):
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.hostbench import FakeRunner
    m = ref.model
    runner = None if real else FakeRunner(ref.tokenizer, m.config.vocab_size, max_batch, CHUNK, PIECE, record=True,
                                          admit_batch=admit_batch)
    engine = Engine(m, ref.tokenizer, _store(ref, tmp_path), max_batch=max_batch, prefill_chunk=CHUNK,
                    prefill_piece=PIECE, admit_tokens=admit_tokens, admit_batch=admit_batch, runner=runner,
                    cuda_graph=False, admit_wait_ms=wait_ms)
    return engine, runner


class Events:
    """A job's events in order: kinds, the text, the error."""

    def __init__(self):
        self.kinds, self.text, self.error = [], [], None

    def __call__(self, kind, payload):
        self.kinds.append(kind)
        if kind == "text":
            self.text.append(payload)
        elif kind == "error":
            self.error = payload


def _job(ids, n, session=None, fork_from=None):
    from mhla_stream.serve.jobs import Job
    events = Events()
    job = Job(SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False), events, ids=ids, add_bos=False,
              session=session, fork_from=fork_from)
    return job, events


def _seq(engine, job):
    return next((s for s in engine.seqs.values() if s.job is job), None)


def _ops(runner, start=0):
    return [c for c in runner.calls[start:] if c[0] in ("admit", "feed")]



def _streaming(ref, tmp_path, **kw):
    """An engine with one stream decoding (the condition for holding)."""
    engine, runner = _engine(ref, tmp_path, **kw)
    stream, events = _job([5, 6, 7], 40)
    engine.submit(stream)
    engine._turn()
    return engine, runner, stream, events


# -- the hold -------------------------------------------------------------------------------------------
def test_a_held_request_cancelled_by_its_client_ends_cleanly(ref, tmp_path):
    engine, runner, stream, stream_events = _streaming(ref, tmp_path)
    gone, gone_events = _job([8, 9], 4)
    kept, kept_events = _job([10, 11, 12], 4)
    for job in (gone, kept):
        engine.submit(job)
        engine._turn()
    held_slot = _seq(engine, gone).slot
    assert not _seq(engine, gone).staged and not _seq(engine, kept).staged
    start = len(runner.calls)
    gone.cancelled.set()
    engine._turn()
    assert _seq(engine, gone) is None and held_slot in engine.free
    assert gone_events.kinds == ["start"]             # a cancelled request gets no further event
    assert _ops(runner, start) == []                 # its leaving did not release the other held prompt
    kept.submitted -= 60.0
    engine._turn()
    assert _ops(runner, start) == [("admit", 3)]      # only the one left
    drain(engine)
    assert kept_events.kinds[-1] == "done" and stream_events.kinds[-1] == "done"
    assert len(stream_events.text) == 40 and sorted(engine.free) == list(range(8))


def test_a_server_stop_ends_a_held_request_with_a_503(ref, tmp_path):
    engine, runner, stream, stream_events = _streaming(ref, tmp_path)
    held, held_events = _job([8, 9], 4)
    engine.submit(held)
    engine._turn()
    assert not _seq(engine, held).staged
    engine.stop(grace_s=0)                           # the engine thread is not running: the turn below reaps
    engine._turn()
    assert not engine.seqs and sorted(engine.free) == list(range(8))
    assert held_events.kinds == ["start", "error"] and held_events.error.status == 503
    assert held_events.error.code == "shutting_down"
    assert stream_events.kinds[-1] == "error" and stream_events.error.code == "shutting_down"
    assert not any(kind == "admit" for kind, _ in runner.calls[1:])  # nothing was fed after the stop


def test_held_prompts_are_admitted_at_once_when_the_server_stops_accepting_was_a_bug(ref, tmp_path):
    """A stop's grace (5 s) is shorter than the longest wait (10 s): a prompt held when the stop began
    stayed held (nothing can arrive to share its forward any more) and got a 503 at the grace's end
    instead of its text. Now the stop's first step (no more accepting) ends every hold."""
    engine, runner, _, _ = _streaming(ref, tmp_path)
    held, held_events = _job([8, 9], 4)
    engine.submit(held)
    engine._turn()
    assert not _seq(engine, held).staged
    with engine._cv:
        engine._accepting = False                    # what ``stop`` does first; its grace runs from here
    start = len(runner.calls)
    engine._turn()
    assert _ops(runner, start) == [("admit", 2)]
    for _ in range(6):
        engine._turn()
    assert held_events.kinds[-1] == "done"


def test_held_prompts_are_admitted_at_once_when_the_last_stream_finishes(ref, tmp_path):
    engine, runner = _engine(ref, tmp_path)
    stream, _ = _job([5, 6, 7], 3)
    engine.submit(stream)
    engine._turn()
    held, held_events = _job([8, 9], 4)
    engine.submit(held)
    while _seq(engine, stream) is not None:
        start = len(runner.calls)
        engine._turn()
        if _seq(engine, stream) is not None:
            assert _ops(runner, start) == []         # held while the stream decodes
    start = len(runner.calls)
    engine._turn()                                   # nothing decodes: no wait, although 10 s are left
    assert _ops(runner, start) == [("admit", 2)] and _seq(engine, held).staged
    drain(engine)
    assert held_events.kinds[-1] == "done"


def test_admit_wait_with_admit_batch_1_is_a_no_op(ref, tmp_path):
    engine, runner, _, _ = _streaming(ref, tmp_path, admit_batch=1)
    job, _ = _job([8, 9], 4)
    engine.submit(job)
    start = len(runner.calls)
    engine._turn()
    assert _ops(runner, start) == [("feed", 2)] and _seq(engine, job).staged


@pytest.mark.parametrize("length, held", [(1, True), (PIECE, True), (PIECE + 1, False)])
def test_prompt_lengths_at_the_piece_edge(ref, tmp_path, length, held):
    """1 and ``piece`` tokens are batchable (held); piece + 1 is cut in two pieces: never held."""
    engine, runner, _, _ = _streaming(ref, tmp_path)
    job, _ = _job(list(range(100, 100 + length)), 4)
    engine.submit(job)
    start = len(runner.calls)
    engine._turn()
    assert _ops(runner, start) == ([] if held else [("feed", PIECE)])
    job.submitted -= 60.0
    drain(engine)


@pytest.mark.parametrize("wait_ms", [0, LONG_WAIT])
def test_a_short_prompt_is_not_kept_out_by_long_prompts_admitted_after_it_was_a_bug(ref, tmp_path, wait_ms):
    """admit_tokens = piece (the CPU default) with batched admission: the staging row's piece spends
    the whole allowance every turn, and when a long prompt finished the next one (admitted after the
    short prompt) was begun in the same turn; so the short prompt waited until no long prompt was left
    (forever under a steady flow of them). Now the next long prompt begins a turn later, after the
    short prompt's batch had its turn (with the hold, a held prompt delays it one turn, no more)."""
    engine, runner = _engine(ref, tmp_path, wait_ms=wait_ms, admit_tokens=PIECE)
    engine.submit(_job([5, 6, 7], 200)[0])           # a stream decoding throughout
    engine._turn()
    longs = [_job(list(range(100 + i, 100 + i + 3 * PIECE)), 2)[0] for i in range(4)]
    engine.submit(longs[0])
    engine._turn()                                   # the first long prompt begins
    short, _ = _job([8, 9], 2)
    for job in [short] + longs[1:]:
        engine.submit(job)
    if wait_ms:
        short.submitted -= 60.0
    for _ in range(12):
        engine._turn()
        if _seq(engine, short) is None or _seq(engine, short).staged:
            break
    assert _seq(engine, short) is None or _seq(engine, short).staged
    assert _seq(engine, longs[1]).fed == 0 and _seq(engine, longs[2]).fed == 0
    drain(engine)


def test_a_held_short_prompt_does_not_stall_long_prompts(ref, tmp_path):
    engine, runner = _engine(ref, tmp_path, admit_tokens=PIECE)
    engine.submit(_job([5, 6, 7], 200)[0])
    engine._turn()
    short, _ = _job([8, 9], 2)
    long, _ = _job(list(range(100, 100 + 3 * PIECE)), 40)
    engine.submit(short)
    engine.submit(long)
    for _ in range(4):                               # the short prompt is held throughout
        engine._turn()
    assert not _seq(engine, short).staged and _seq(engine, long).staged


@pytest.mark.parametrize("bad", [math.inf, math.nan, -math.inf, "future"])
def test_a_submitted_time_from_another_clock_cannot_hold_a_request_was_a_bug(ref, tmp_path, bad):
    """``submitted`` crosses the process boundary with --http-process (bridge.py takes any float):
    inf or a time in the future held the request for as long as any stream decoded (past the wait
    that bounds the hold); NaN or -inf went into the TTFT histogram. The engine now takes such a time
    as the moment it received the request. Through the bridge, as the HTTP process sends it."""
    from mhla_stream.serve.bridge import EngineBridge
    engine, runner, _, _ = _streaming(ref, tmp_path, wait_ms=1)
    sent = []
    bridge = EngineBridge(type("Channel", (), {"send": lambda self, m: sent.append(m)})(), engine, engine.store, None)
    before = time.perf_counter()
    bridge.handle(("submit", 7, {"params": SamplingParams(temperature=0, max_new_tokens=4, stop_at_eos=False),
                                 "ids": [8, 9], "add_bos": False,
                                 "submitted": before + 3600 if bad == "future" else bad}))
    job = bridge.jobs[7]
    assert sent == []                                # taken, not refused
    while time.perf_counter() - before < 0.01:       # the 1 ms wait is over (a wait, not a timed assertion)
        time.sleep(0.002)
    start = len(runner.calls)
    engine._turn()
    assert _ops(runner, start) == [("admit", 2)]      # inf, the future: held on (while the stream decodes)
    assert math.isfinite(job.submitted) and before <= job.submitted <= time.perf_counter()  # TTFT's origin


def test_a_held_session_request_and_a_held_fork_give_one_streams_text(ref, tmp_path):
    """The real model: a session's second request and a fork of it, both held beside a decoding stream
    and admitted in one batch (stored states: placed whole), each equal to one StreamingMHLA stream."""
    engine, _ = _engine(ref, tmp_path, real=True)
    tok = ref.tokenizer
    a, b, c = tok.encode("The little cat sat on the"), tok.encode(" Then the dog ran"), tok.encode(" A bird")
    first, first_events = _job(a, 5, session="s")
    engine.submit(first)
    drain(engine)
    stream, stream_events = _job(tok.encode("One day a fox"), 30)
    engine.submit(stream)
    engine._turn()
    second, second_events = _job(b, 5, session="s")
    fork, fork_events = _job(c, 5, session="f", fork_from="s")
    for job in (second, fork):
        engine.submit(job)
        engine._turn()
        assert not _seq(engine, job).staged and _seq(engine, job).stored is not None  # held, a stored state
    for job in (second, fork):
        job.submitted -= 60.0
    drain(engine)

    def alone(*prompts):
        ref.reset()
        return ["".join(ref.stream(p, max_new_tokens=5, temperature=0, stop_at_eos=False)) for p in prompts]
    assert ["".join(first_events.text), "".join(second_events.text)] == alone(a, b)
    assert "".join(fork_events.text) == alone(a, c)[1]
    ref.reset()
    assert "".join(stream_events.text) == "".join(ref.stream(tok.encode("One day a fox"), max_new_tokens=30,
                                                             temperature=0, stop_at_eos=False))


def test_a_held_session_request_cancelled_leaves_the_session_as_it_was(ref, tmp_path):
    engine, _ = _engine(ref, tmp_path, real=True)
    tok = ref.tokenizer
    a, b = tok.encode("The little cat sat on the"), tok.encode(" Then the dog ran")
    engine.submit(_job(a, 5, session="s")[0])
    drain(engine)
    stream, _ = _job(tok.encode("One day a fox"), 30)
    engine.submit(stream)
    engine._turn()
    gone, gone_events = _job(tok.encode(" A bird flew"), 5, session="s")
    engine.submit(gone)
    engine._turn()
    assert not _seq(engine, gone).staged
    gone.cancelled.set()
    engine._turn()
    assert _seq(engine, gone) is None and gone_events.kinds == ["start"]
    again, again_events = _job(b, 5, session="s")   # not busy: the cancelled request released it unchanged
    engine.submit(again)
    again.submitted -= 60.0
    drain(engine)
    ref.reset()
    want = [("".join(ref.stream(p, max_new_tokens=5, temperature=0, stop_at_eos=False))) for p in (a, b)][1]
    assert "".join(again_events.text) == want


def test_held_prompts_of_1_piece_and_piece_plus_1_tokens_give_their_alone_text(ref, tmp_path):
    """Into slots an earlier stream left dirty (a completed block in their ring): the held prompts
    are placed partially (under a block: no ring slot copied, every ring entry zeroed)."""
    engine, _ = _engine(ref, tmp_path, real=True)
    words = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park every day")
    for i in range(5):                               # slots 0-4 dirtied: 70 tokens in, one block in the ring
        engine.submit(_job((words * 5)[i:i + 70], 2)[0])
    drain(engine)
    assert all(engine.runner.rows(i, i + 1)[0].ring.any() for i in range(5))
    prompts = [words[:1], words[:PIECE], words[:PIECE + 1], words[3:9]]
    stream, _ = _job(words[:4], 20)
    engine.submit(stream)
    engine._turn()
    jobs = []
    for ids in prompts:
        jobs.append(_job(ids, 6))
        engine.submit(jobs[-1][0])
        engine._turn()
    for job, _ in jobs:
        job.submitted -= 60.0
    drain(engine)
    for ids, (_, events) in zip(prompts, jobs):
        ref.reset()
        assert "".join(events.text) == "".join(ref.stream(ids, max_new_tokens=6, temperature=0, stop_at_eos=False))


def test_odd_admit_wait_values(ref, tmp_path):
    """Through the CLI option's own conversion (no process, no model): odd spellings of allowed values
    are taken and the engine takes what the CLI gives; the rest are refused."""
    import click

    from mhla_stream.cli.serve import main
    option = next(p for p in main.params if p.name == "admit_wait_ms")
    ctx = click.Context(main)
    for text, want in (("-0", 0.0), ("1e4", 10_000.0), (" 5 ", 5.0), ("1_0", 10.0), ("1e-400", 0.0)):
        value = option.process_value(ctx, text)
        assert value == want, text
        engine, runner, _, _ = _streaming(ref, tmp_path, wait_ms=value)
        assert engine.admit_wait_s == want / 1e3
        if want == 0:                                # -0.0 and an underflow: never held
            job, _ = _job([8, 9], 4)
            engine.submit(job)
            start = len(runner.calls)
            engine._turn()
            assert _ops(runner, start) == [("admit", 2)]
    for text in ("10000.001", "-1e-9", "nan", "-nan", "+inf", "infinity", "0x10", "5ms", "1,5"):
        with pytest.raises(click.BadParameter):
            option.process_value(ctx, text)
    for bad in (None, "5", -0.001, math.inf):
        with pytest.raises((ValueError, TypeError)):
            _engine(ref, tmp_path, wait_ms=bad)


# -- partial placement ----------------------------------------------------------------------------------
def _same(a, b, tol):
    for x, y in zip(a, b):
        if x.dtype == torch.long:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x.float(), y.float(), rtol=tol, atol=tol)


def _dirty_pair(model, piece, policy=None, state_dtype=None):
    """A batched and a one-at-a-time runner whose slots hold the same junk (an earlier stream's state)."""
    from mhla_stream.serve.runner import StepRunner
    kw = dict(cuda_graphs=False, prefill_piece=piece, policy=policy, state_dtype=state_dtype)
    batched = StepRunner(model, 4, max(piece, CHUNK), admit_batch=4, **kw)
    alone = StepRunner(model, 4, max(piece, CHUNK), admit_batch=1, **kw)
    g = torch.Generator().manual_seed(1)
    for a, b in zip(alone._tensors(alone.rows(0, 4)), batched._tensors(batched.rows(0, 4))):
        junk = torch.randint(1, 999, a.shape, generator=g) if a.dtype == torch.long else \
            torch.randn(a.shape, generator=g).to(a.dtype)
        a.copy_(junk)
        b.copy_(junk)
    return batched, alone


def _clean(runner):
    return all(not t.any() for t in runner._tensors(runner.stager.states))


@pytest.mark.parametrize("piece, policy, state_dtype, touched", [
    (16, None, None, 0),                  # under a block: no ring slot written, the slots' rings all zeroed
    (64, None, None, 1),                  # exactly one block
    (1024, None, None, 15),               # 16 blocks: the ring wraps, every slot touched
    (1024, "window+far", None, 15),       # ... and a far sum (a tensor copied whole)
    (150, None, "bf16", 2),               # a bf16 ring
])
@torch.inference_mode()
def test_partial_placement_over_dirty_slots_equals_alone(ref, piece, policy, state_dtype, touched):
    m = ref.model
    batched, alone = _dirty_pair(m, piece, policy, state_dtype)
    assert batched.stager.touched == touched == min(m.config.num_blocks - 1, piece // m.config.block_size)
    words = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park " * 80)
    assert len(words) > piece
    prompts = {2: words[:piece], 0: words[:1], 3: words[7:7 + max(piece - 40, 2)]}
    got = batched.admit([(slot, None, ids) for slot, ids in prompts.items()])
    tol = 2e-2 if state_dtype else 1e-4              # bf16 summaries: one rounding step apart at most
    for i, (slot, ids) in enumerate(prompts.items()):
        torch.testing.assert_close(got[i], _alone(alone, slot, None, ids), rtol=tol, atol=tol)
        _same(_slot(batched, slot), _slot(alone, slot), tol)
        assert int(batched.rows(slot, slot + 1)[0].pos) == len(ids)
    if policy == "window+far":
        assert batched.rows(2, 3)[0].far.abs().sum() > 0  # the far sum was really exercised
    _same(_slot(batched, 1), _slot(alone, 1), 0)     # the slot not admitted into is untouched
    assert _clean(batched)


@torch.inference_mode()
def test_a_failed_batched_forward_then_a_partial_placement_leaves_clean_rows(ref):
    """A batch with a stored session (a full ring in the stager's row) fails after its forward ran;
    the next batch (fresh prompts only: placed partially, zeroing only the touched ring slots) must
    still start from empty rows and leave them empty."""
    m, piece = ref.model, 150
    batched, alone = _dirty_pair(m, piece)
    words = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park " * 20)
    _alone(alone, 0, None, words[:140])
    stored = _stored(alone, 0)                       # 2 blocks + 12 tokens: ring slots 0-1 and a partial
    stager, real = batched.stager, batched.stager._forward

    def fails_after(kb, s):
        real(kb, s)
        raise RuntimeError("simulated failure after the forward")
    stager._forward = fails_after
    with pytest.raises(RuntimeError, match="simulated"):
        batched.admit([(1, stored, words[140:150]), (3, None, words[:130])])
    assert stager.dirty and not _clean(batched)
    stager._forward = real
    prompts = {3: words[:5], 1: words[:120]}
    got = batched.admit([(slot, None, ids) for slot, ids in prompts.items()])
    for i, (slot, ids) in enumerate(prompts.items()):
        torch.testing.assert_close(got[i], _alone(alone, slot, None, ids), rtol=1e-5, atol=1e-4)
        _same(_slot(batched, slot), _slot(alone, slot), 1e-4)
    assert _clean(batched) and not stager.dirty


@torch.inference_mode()
def test_slots_outside_the_slots_or_repeated_are_refused_before_anything_changes_was_a_bug(ref):
    """``StepRunner.admit`` placed into any row of the runner's state: slot ``max_batch`` (the staging
    row, where a long prompt may be half prefilled) was overwritten silently, a slot given twice got
    one of two prompts, and -1 or 99 failed inside ``index_copy_`` only after the forward had run."""
    from mhla_stream.serve.runner import StepRunner
    runner = StepRunner(ref.model, 4, CHUNK, cuda_graphs=False, prefill_piece=PIECE, admit_batch=4)
    _alone(runner, 0, None, [5, 6, 7])
    runner.stage_begin(None)
    runner.stage_feed([8, 9, 10])                    # a prompt half fed in the staging row
    before = [t.clone() for t in runner._tensors(runner.states)]
    for bad in ([(4, None, [5, 6])], [(-1, None, [5])], [(99, None, [5])], [(1, None, [5]), (1, None, [6])],
                [(True, None, [5])], [(1.0, None, [5])], [("1", None, [5])]):
        with pytest.raises(ValueError, match="slot"):
            runner.admit(bad)
        _same(runner._tensors(runner.states), before, 0)
        assert not runner.stager.dirty and _clean(runner)
