"""Hostile cases for the serve engine's run-ahead path (greedy rows fed the device's picks of the step in
flight before the host reads them): slots freed and reused while a row is ahead, greedy / session /
sampled rows going in and out of the batch, limits found a step late, faults inside the step, the
pick reader and one row's accept, engine stop with a flight pending, and the metrics. Every request's
text must equal the same request run alone; a session's saved state must equal one StreamingMHLA run.

Each engine runs on the test's thread (``_drive``) unless the case is about the engine thread itself.
A spy around ``runner.decode`` checks on every step that each ``auto`` row (fed the device's pick) is
the very sequence the step before fed at that slot, and a plain greedy one without a session."""
from __future__ import annotations

import threading

import pytest
import torch

from mhla_stream.sampling import SamplingParams
from mhla_stream.serve.engine import Job
from test_serve_runner import _drive, _engine, _text


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def _spy(engine):
    """Wraps ``runner.decode`` with the run-ahead invariants (plain rows only ahead, a device sampler for
    exactly the plain sampled rows); returns the list of (tokens, auto) calls."""
    decode, calls, prev = engine.runner.decode, [], {}

    def checked(tokens, auto=(), samplers=None):
        samplers = samplers or {}
        for slot in auto:
            seq = engine.seqs.get(slot)
            # its own pick: from the step before, or its first token picked on the device from its prompt
            first = seq is not None and seq.first is not None and seq.generated == 0
            assert seq is not None and (prev.get(slot) is seq or first), f"slot {slot}: fed a pick made for another row"
            p = seq.job.params
            assert seq.job.session is None and p.repetition_penalty == 1.0, "a non-plain row ran ahead"
        for slot in [*tokens, *auto]:  # a plain sampled row draws on the device, a greedy one takes the argmax
            seq = engine.seqs.get(slot)
            p = seq.job.params
            assert (slot in samplers) == (seq.plain and not p.greedy), f"slot {slot}: sampler {slot in samplers}"
        assert set(samplers) <= {*tokens, *auto}
        assert not set(tokens) & set(auto)
        step = decode(tokens, auto, samplers)
        prev.clear()
        prev.update({s: engine.seqs.get(s) for s in [*tokens, *auto]})
        calls.append((dict(tokens), list(auto)))
        return step
    engine.runner.decode = checked
    return calls


class Out:
    """The events each job got, by job number."""

    def __init__(self, tok):
        self.tok, self.events = tok, {}

    def job(self, prompt, n, session=None, bos=True, **sampling) -> Job:
        key = len(self.events)
        self.events[key] = []
        sampling.setdefault("temperature", 0)

        def emit(kind, payload):
            self.events[key].append(payload if kind == "text" else (kind, payload))
        ids = self.tok.encode(prompt, add_bos=bos) if isinstance(prompt, str) else prompt
        return Job(SamplingParams(max_new_tokens=n, **sampling), emit, ids=ids, add_bos=False, session=session)

    def text(self, k):
        return _text(self.events[k])

    def done(self, k):
        return self.events[k][-1][1]

    def error(self, k):
        last = self.events[k][-1]
        assert isinstance(last, tuple) and last[0] == "error", last
        return last[1]


def _alone(ref, prompt, n, **sampling):
    if n == 0:  # the API allows max_tokens 0 (nothing generated); StreamingMHLA refuses it
        return ""
    ref.reset()
    sampling.setdefault("temperature", 0)
    ids = ref.tokenizer.encode(prompt, add_bos=True) if isinstance(prompt, str) else prompt
    return ref.generate(ids, max_new_tokens=n, **sampling)


def _same_state(saved, ref, exact=False):
    """A session's saved state against a StreamingMHLA that ran the same requests: the same tokens fed
    (history, position, exactly); the tensors bit for bit when the session ran alone (``exact``), else
    up to fp32 rounding of a batched step against a one-row one (~1e-7 relative, the same with
    running ahead off)."""
    assert saved.position == ref.position and saved.history == list(ref._history)
    tol = {"rtol": 0, "atol": 0} if exact else {"rtol": 1e-5, "atol": 1e-4}
    for i, st in enumerate(ref.cache.states):
        for name in st.TENSORS:
            got, want = saved.tensors[f"layers.{i}.{name}"], getattr(st, name).cpu()
            assert torch.allclose(got, want, **tol), (i, name)
    assert torch.allclose(saved.logits, ref._logits.cpu(), **tol)


def test_session_alone_never_runs_ahead_and_saves_the_exact_state(ref):
    """A session on its own (run ahead on): requests ending by a stop string and by the length limit;
    no step is fed a device pick and the saved state is one StreamingMHLA's, bit for bit."""
    tok = ref.tokenizer
    first = _alone(ref, "Lily saw a cat", 20)
    stop = first.split()[4]
    engine = _engine(ref, 2, 32)
    calls = _spy(engine)
    out = Out(tok)
    _drive(engine, [[out.job("Lily saw a cat", 20, session="s", stop=[stop])]])
    _drive(engine, [[out.job(" Then", 6, session="s", bos=False)]])
    assert calls and not any(auto for _, auto in calls)
    ref.reset()
    want = [ref.generate(tok.encode("Lily saw a cat", add_bos=True), max_new_tokens=20, temperature=0, stop=[stop]),
            ref.generate(tok.encode(" Then"), max_new_tokens=6, temperature=0)]
    assert [out.text(0), out.text(1)] == want and out.done(0)["finish_reason"] == "stop"
    assert out.done(1)["finish_reason"] == "length"
    _same_state(engine.store._read("s"), ref, exact=True)


def _idle(engine, slots):
    assert not engine.seqs and not engine.waiting and engine.staging is None
    assert sorted(engine.free) == list(range(slots))


def test_cancel_while_ahead_then_slot_reused_at_once(ref):
    """A row cancelled while it is in the step in flight: its slot goes to a new request in the same
    turn (a one-token prompt: staged and fed in that turn too). The new row is never fed the old
    row's pick, gets none of its text, and the cancelled job hears nothing more."""
    engine = _engine(ref, 2, 32)
    calls = _spy(engine)
    out = Out(ref.tokenizer)
    a, b = out.job("Once upon a time", 40), out.job("The dog ran", 12)
    for job in (a, b):
        engine.submit(job)
    for _ in range(6):
        engine._turn()
    assert any(auto for _, auto in calls)
    assert engine.flight is not None and engine.seqs[0].ahead and engine.seqs[0].job is a
    a.cancelled.set()
    seen = len(out.events[0])
    # c: a session request staged at once into the freed slot
    c, d = out.job([ref.tokenizer.bos_id], 10, session="c"), out.job("Tom had a ball", 10)
    engine.submit(c)
    engine.submit(d)
    _drive(engine, [])
    assert len(out.events[0]) == seen  # nothing after the cancel
    assert out.text(1) == _alone(ref, "The dog ran", 12)
    assert out.text(3) == _alone(ref, "Tom had a ball", 10)
    assert out.text(2) == _alone(ref, [ref.tokenizer.bos_id], 10)
    _same_state(engine.store._read("c"), ref)
    _idle(engine, 2)


def test_greedy_sampled_and_session_rows_alternating(ref):
    """Long greedy rows run while session requests (ending by length, by a stop string, by eos) and a
    sampled row come and go. Texts equal each alone; each session's saved state equals one
    StreamingMHLA fed the same requests; the session rows are never fed a device pick (spy)."""
    tok = ref.tokenizer
    first = _alone(ref, "Lily saw a cat", 30)
    stop = first.split()[6]  # a word the session's first reply reaches while other rows run ahead
    engine = _engine(ref, 4, 32)
    calls = _spy(engine)
    out = Out(tok)
    turns = [[out.job("Once upon a time", 60), out.job("The dog ran", 45)], [], [],
             [out.job("Lily saw a cat", 30, session="s", stop=[stop])], [], [],
             [out.job("They were happy.", 20, temperature=0.8, seed=5)], [], [], [], [],
             [out.job("Ben", 7, session="t")]]
    _drive(engine, turns)
    _drive(engine, [[out.job(" Then", 9, session="s", bos=False), out.job(" and", 1, session="t", bos=False),
                     out.job("A bird sang", 25)]])
    assert any(auto for _, auto in calls)
    assert out.text(0) == _alone(ref, "Once upon a time", 60)
    assert out.text(1) == _alone(ref, "The dog ran", 45)
    assert out.text(3) == _alone(ref, "They were happy.", 20, temperature=0.8, seed=5)
    assert out.text(7) == _alone(ref, "A bird sang", 25)
    assert out.done(2)["finish_reason"] == "stop" and stop not in out.text(2)
    for sid, requests, keys in (("s", [("Lily saw a cat", 30, [stop]), (" Then", 9, [])], (2, 5)),
                                ("t", [("Ben", 7, []), (" and", 1, [])], (4, 6))):
        ref.reset()
        want = [ref.generate(tok.encode(p, add_bos=i == 0), max_new_tokens=n, temperature=0, stop=s)
                for i, (p, n, s) in enumerate(requests)]
        assert [out.text(k) for k in keys] == want, sid
        _same_state(engine.store._read(sid), ref)
    _idle(engine, 4)


def test_short_limits_eos_first_and_rows_ending_together(ref):
    """max_tokens 0, 1 and 2 (the limit found a step late), eos as the first pick, and four rows of
    the same prompt that all end in the same turn, mixed with a longer row."""
    out = Out(ref.tokenizer)
    engine = _engine(ref, 8, 32)
    _spy(engine)
    same = "Once upon a time"
    turns = [[out.job(same, 0), out.job(same, 1), out.job(same, 2), out.job("The end.", 10),
              out.job("Tom had a ball", 30)],
             [out.job(same, 6), out.job(same, 6), out.job(same, 6)]]
    _drive(engine, turns)
    _drive(engine, [[out.job(same, 6)]])  # ends in the same turn as nothing else
    # eos fed and gone on from while ahead; a greedy row with a penalty (never ahead) beside it
    _drive(engine, [[out.job("The end.", 6, stop_at_eos=False), out.job(same, 12, repetition_penalty=1.3)]])
    assert out.text(9) == _alone(ref, "The end.", 6, stop_at_eos=False) != ""
    assert out.text(10) == _alone(ref, same, 12, repetition_penalty=1.3) != _alone(ref, same, 12)
    want_n = {0: 0, 1: 1, 2: 2, 4: 30, 5: 6, 6: 6, 7: 6, 8: 6}
    for k, n in want_n.items():
        prompt = "Tom had a ball" if k == 4 else same
        assert out.text(k) == _alone(ref, prompt, n), k
        assert out.done(k)["completion_tokens"] == n and out.done(k)["finish_reason"] == "length"
    assert out.text(3) == _alone(ref, "The end.", 10) == ""
    assert out.done(3)["completion_tokens"] == 0 and out.done(3)["finish_reason"] == "stop"
    _idle(engine, 8)


def test_stop_string_hit_while_ahead(ref):
    full = _alone(ref, "Once upon a time", 40)
    stop = full.split()[8]
    out = Out(ref.tokenizer)
    engine = _engine(ref, 2, 32)
    calls = _spy(engine)
    _drive(engine, [[out.job("Once upon a time", 40, stop=[stop]), out.job("The dog ran", 40)]])
    assert out.text(0) == _alone(ref, "Once upon a time", 40, stop=[stop]) == full[:full.index(stop)]
    assert out.done(0)["finish_reason"] == "stop" and out.text(1) == _alone(ref, "The dog ran", 40)
    assert sum(bool(auto) for _, auto in calls) > 10


def test_decode_failure_while_ahead_fails_those_requests_only(ref):
    """``runner.decode`` raises on the step where a session row joins two rows ahead: those three
    requests fail with a 500, the session keeps its stored state, a prompt still prefilling goes
    on, and later requests (the session's next one included) equal alone."""
    out = Out(ref.tokenizer)
    engine = _engine(ref, 4, 8, piece=8)
    decode, failed = engine.runner.decode, []

    def faulty(tokens, auto=(), samplers=None):
        if auto and 2 in tokens and not failed:
            failed.append(sorted([*tokens, *auto]))
            raise RuntimeError("device lost")
        return decode(tokens, auto, samplers)
    engine.runner.decode = faulty
    _drive(engine, [[out.job("Lily", 3, session="s")]])  # the session's first request, before the fault
    long_prompt = "Lily saw a big red ball in the park. " * 6  # still staging when the step fails
    _drive(engine, [[out.job("Once upon a time", 30), out.job("The dog ran", 30)], [], [],
                    [out.job(" saw", 30, session="s", bos=False), out.job(long_prompt, 8)]])
    assert failed == [[0, 1, 2]]
    for k in (1, 2, 3):
        err = out.error(k)
        assert err.status == 500 and "device lost" in str(err.body())
    assert out.text(4) == _alone(ref, long_prompt, 8)
    _spy(engine)
    _drive(engine, [[out.job("Tom had a ball", 12), out.job(" saw", 12, session="s", bos=False)]])
    assert out.text(5) == _alone(ref, "Tom had a ball", 12)
    ref.reset()  # the failed request left the session as its first request did
    want = [ref.generate(ref.tokenizer.encode("Lily", add_bos=True), max_new_tokens=3, temperature=0),
            ref.generate(ref.tokenizer.encode(" saw"), max_new_tokens=12, temperature=0)]
    assert [out.text(0), out.text(6)] == want
    _same_state(engine.store._read("s"), ref)
    _idle(engine, 4)


def test_pick_reader_failure_on_the_engine_thread_goes_on(ref):
    """The host's read of the picks (``DecodeStep.tokens``) raises: the engine thread fails the batch
    and serves the next requests (equal alone)."""
    out = Out(ref.tokenizer)
    engine = _engine(ref, 2, 32)
    decode, broken = engine.runner.decode, []

    def breaking(tokens, auto=(), samplers=None):
        step = decode(tokens, auto, samplers)
        if auto and not broken:
            broken.append(True)

            def tokens_fail():
                raise RuntimeError("sync failed")
            step.tokens = tokens_fail
        return step
    engine.runner.decode = breaking
    done = threading.Semaphore(0)

    def signalled(job):  # releases ``done`` when the job ends
        emit = job.emit
        job.emit = lambda kind, payload: (emit(kind, payload), kind in ("done", "error") and done.release())
        return job
    jobs = [signalled(out.job("Once upon a time", 30)), signalled(out.job("The dog ran", 30))]
    engine.start()
    try:
        for job in jobs:
            engine.submit(job)
        for _ in jobs:
            assert done.acquire(timeout=120)
        assert broken and all(out.error(k).status == 500 for k in (0, 1))  # ahead while it broke: both failed
        later = [signalled(out.job("Tom had a ball", 10)), signalled(out.job("The end is near", 10))]
        for job in later:
            engine.submit(job)
        for _ in later:
            assert done.acquire(timeout=120)
    finally:
        engine.stop(grace_s=0)
    assert out.text(2) == _alone(ref, "Tom had a ball", 10) and out.text(3) == _alone(ref, "The end is near", 10)
    assert not engine.thread.is_alive()


def test_accept_failure_fails_only_that_request(ref, monkeypatch):
    out = Out(ref.tokenizer)
    engine = _engine(ref, 4, 32)
    _spy(engine)
    accept, victim = engine._accept_fed, []

    def accept_or_fail(seq, token):
        if seq.job is victim[0] and seq.generated == 4:
            raise ValueError("bad pick")
        return accept(seq, token)
    monkeypatch.setattr(engine, "_accept_fed", accept_or_fail)
    jobs = [out.job("Once upon a time", 20), out.job("The dog ran", 20), out.job("Tom had a ball", 20)]
    victim.append(jobs[1])
    _drive(engine, [jobs, [], [], [], [], [], [out.job("A bird sang", 15)]])
    err = out.error(1)
    assert err.status == 500 and "bad pick" in str(err.body())
    assert _alone(ref, "The dog ran", 4).startswith("".join(e for e in out.events[1] if isinstance(e, str)))
    assert out.text(0) == _alone(ref, "Once upon a time", 20) and out.text(2) == _alone(ref, "Tom had a ball", 20)
    assert out.text(3) == _alone(ref, "A bird sang", 15)
    _idle(engine, 4)


def test_stop_with_a_flight_pending(ref):
    """``Engine.stop`` (the SIGTERM path) while greedy rows are ahead and a session row runs: the
    thread ends, every slot is freed, the session is released unchanged (its request was cancelled)."""
    out = Out(ref.tokenizer)
    engine = _engine(ref, 4, 32)
    started = threading.Event()
    jobs = [out.job("Once upon a time", 100000), out.job("The dog ran", 100000, stop_at_eos=False),
            out.job("Tom had a ball", 100000, session="s", stop_at_eos=False)]
    emit = jobs[1].emit
    jobs[1].emit = lambda kind, payload: (emit(kind, payload), kind == "text" and started.set())
    engine.start()
    for job in jobs:
        engine.submit(job)
    assert started.wait(120)
    engine.stop(grace_s=0)
    assert not engine.thread.is_alive()
    _idle(engine, 4)
    assert "s" not in engine.store._entries  # its first request was cancelled: nothing kept, not busy
    with pytest.raises(Exception, match="shutting down") as e:
        engine.submit(out.job("late", 3))
    assert e.value.status == 503


@pytest.mark.parametrize("run_ahead", [True, False], ids=["ahead", "settled"])
def test_metrics_count_what_the_clients_got(ref, run_ahead):
    """tokens out = the completion tokens reported (eos, a token fed past a stop string or the length
    limit, and a cancelled row's unsent pick are not counted); one time to first token per request
    that got a token; one inter-token latency per further token. The same with or without running ahead."""
    from mhla_stream.serve.metrics import Metrics
    out = Out(ref.tokenizer)
    engine = _engine(ref, 4, 32)
    engine.run_ahead = run_ahead
    engine.metrics = metrics = Metrics()
    full = _alone(ref, "Once upon a time", 40)
    jobs = [out.job("Once upon a time", 40, stop=[full.split()[5]]), out.job("The dog ran", 2),
            out.job("The end.", 10), out.job("Once upon a time there was a cat.", 150),
            out.job("Tom had a ball", 1), out.job("They were happy.", 9, session="m")]
    _drive(engine, [jobs])
    done = [out.done(k) for k in range(len(jobs))]
    assert done[2]["completion_tokens"] == 0 and done[3]["finish_reason"] == "stop"  # eos first; eos later

    def value(m):
        return m.collect()[0].samples

    total = sum(d["completion_tokens"] for d in done)
    assert value(metrics.tokens_out)[0].value == total
    ttft = {s.name: s.value for s in value(metrics.ttft)}
    itl = {s.name: s.value for s in value(metrics.itl)}
    got_a_token = sum(d["completion_tokens"] > 0 for d in done)
    assert ttft["mhla_time_to_first_token_seconds_count"] == got_a_token
    assert itl["mhla_inter_token_latency_seconds_count"] == total - got_a_token


def test_run_ahead_on_the_graph_path(ref, monkeypatch):
    """The CUDA-graph decode (buckets over rows [0, n), junk rows included), with the replays run
    eagerly: rows fed the device picks of a bucketed step equal each request alone, a freed middle
    slot and a bucket change included."""
    import mhla_stream.graphs
    from mhla_stream.serve.runner import StepRunner
    from test_serve_runner import _EagerGraph
    monkeypatch.setattr(mhla_stream.graphs, "GraphStep", _EagerGraph)
    engine = _engine(ref, 5, 16)
    runner = engine.runner = StepRunner(ref.model, 5, 16, cuda_graphs=False)
    runner.graphs = True
    runner._capture()
    calls = _spy(engine)
    out = Out(ref.tokenizer)
    _drive(engine, [[out.job("Once upon a time", 14), out.job("The dog ran", 3), out.job("Tom had a ball", 20)],
                    [], [], [], [], [out.job("A bird sang", 12), out.job("They were happy.", 8)]])
    assert sum(bool(auto) for _, auto in calls) > 10
    for k, (prompt, n) in enumerate([("Once upon a time", 14), ("The dog ran", 3), ("Tom had a ball", 20),
                                     ("A bird sang", 12), ("They were happy.", 8)]):
        assert out.text(k) == _alone(ref, prompt, n), k
    _idle(engine, 5)


def test_random_load_on_the_stand_in_runner_keeps_every_invariant(ref):
    """A seeded random mix on the host-cost harness's stand-in runner (no model: ~0 per step):
    greedy and sampled rows, max_tokens 0 to 30, stop strings, cancels at any turn, and faults in
    ``runner.decode`` and in one row's accept. Every step passes the run-ahead spy; every request
    that was not cancelled ends with exactly one done or error, nothing follows a cancel or an end,
    done counts agree with the limits; the engine ends idle."""
    import collections
    import random
    import tempfile

    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.hostbench import STORY, FakeRunner
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m, tok = ref.model, ref.tokenizer
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(tempfile.mkdtemp(), 1 << 20, layout, {"model_name": "t", "policy": "x", "config": "{}"})
    runner = FakeRunner(tok, m.config.vocab_size, 6, 16, piece=4)
    engine = Engine(m, tok, store, max_batch=6, prefill_chunk=16, prefill_piece=4, runner=runner)
    calls = _spy(engine)
    rnd = random.Random(12)
    decode, accept = engine.runner.decode, engine._accept_fed

    def flaky_decode(tokens, auto=(), samplers=None):
        if rnd.random() < 0.03:
            raise RuntimeError("injected decode fault")
        return decode(tokens, auto, samplers)

    def flaky_accept(seq, token):
        if rnd.random() < 0.01:
            raise RuntimeError("injected accept fault")
        return accept(seq, token)
    engine.runner.decode, engine._accept_fed = flaky_decode, flaky_accept
    words = STORY.split()
    out, jobs, cancelled_at = Out(tok), [], {}
    for turn in range(800):
        for _ in range(rnd.choice([0, 0, 0, 1, 2])):
            if len(jobs) < 300 and len(engine.waiting) < 20:
                n = rnd.choice([0, 1, 2, 3, rnd.randint(4, 30)])
                sampling = {"temperature": 0.7, "seed": rnd.randint(0, 99)} if rnd.random() < 0.25 else {}
                if rnd.random() < 0.3:
                    sampling["stop"] = [rnd.choice(words)]
                job = out.job(" ".join(rnd.sample(words, rnd.randint(1, 12))), n, **sampling)
                jobs.append((job, n))
                engine.submit(job)
        for k, (job, _) in enumerate(jobs):
            ended = any(isinstance(e, tuple) and e[0] in ("done", "error") for e in out.events[k])
            if k not in cancelled_at and not ended and rnd.random() < 0.02:
                job.cancelled.set()
                cancelled_at[k] = len(out.events[k])
        if engine.seqs or engine.waiting:
            engine._turn()
    _drive(engine, [])
    assert len(jobs) > 200 and sum(bool(auto) for _, auto in calls) > 50
    ends = {"done": 0, "error": 0}
    for k, (job, n) in enumerate(jobs):
        events = out.events[k]
        marks = [e[0] for e in events if isinstance(e, tuple)]
        if k in cancelled_at:
            assert len(events) == cancelled_at[k], "an event after the cancel"
            assert marks.count("done") + marks.count("error") <= 1
            continue
        assert marks[-1] in ("done", "error") and marks.count("done") + marks.count("error") == 1, marks
        assert marks[0] in ("start", "error")
        ends[marks[-1]] += 1
        if marks[-1] == "done":
            d = out.done(k)
            assert d["completion_tokens"] <= n and d["finish_reason"] in ("length", "stop")
            assert d["finish_reason"] == "stop" or d["completion_tokens"] == n
    errors = collections.Counter(str(out.error(k).body())[:120] for k in range(len(jobs))
                                 if k not in cancelled_at and out.events[k][-1][0] == "error")
    assert ends["done"] > 50 and ends["error"] > 0, (ends, errors)
    _idle(engine, 6)
