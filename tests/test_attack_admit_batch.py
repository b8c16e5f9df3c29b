"""--admit-batch, hostile, on the in-process engine with the real shipped model (CPU, turns run by hand so
what lands in one batch is certain). The oracle is the same requests run one at a time on an engine
with ``admit_batch=1`` (the old path): text, finish reason and token counts must match, errors too.
Covered: sessions in a batch (new, continued from host memory and from disk, forked from a session
in the same batch, a damaged file refused with 409 beside healthy prompts, an empty prompt on stored
logits, chat turns), BOS/no BOS, 1 token, exactly the piece, the piece + 1, sampling with a seed,
repetition penalty, stop strings, max_tokens=1, an injected fault; clients leaving while queued,
while their batch is being admitted and right after (slots and sessions freed, others unchanged);
--admit-batch above --max-batch; a long prompt is not starved by short ones admitted every turn."""
from __future__ import annotations

import os

import pytest
from admit_util import drain

from mhla_stream.sampling import SamplingParams

CHUNK, PIECE = 64, 16


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def session_bytes(ref) -> int:
    return sum(s.nbytes for s in ref.model.new_state(1))


def make_engine(ref, directory, admit_batch, *, max_batch=8, budget=1 << 30):
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(str(directory), budget, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    return Engine(m, ref.tokenizer, store, max_batch=max_batch, prefill_chunk=CHUNK, prefill_piece=PIECE,
                  admit_batch=admit_batch, cuda_graph=False)


class Outcomes:
    """Every request's events by key: its text, then ("done", finish, completion tokens) or ("error", status)."""

    def __init__(self):
        self.events: dict[str, list] = {}

    def job(self, key, ids=None, *, max_tokens=4, temperature=0.0, seed=None, penalty=1.0, stop=(), **kw):
        from mhla_stream.serve.jobs import Job
        self.events[key] = []
        params = SamplingParams(temperature=temperature, do_sample=temperature > 0, seed=seed,
                                repetition_penalty=penalty, stop=list(stop), max_new_tokens=max_tokens,
                                stop_at_eos=False)

        def emit(kind, payload):
            self.events[key].append((kind, payload))
        kw.setdefault("add_bos", False)
        return Job(params, emit, ids=ids, **kw)

    def result(self, key):
        text = "".join(p for k, p in self.events[key] if k == "text")
        for kind, payload in self.events[key]:
            if kind == "done":
                return text, payload["finish_reason"], payload["completion_tokens"], payload["prompt_tokens"]
            if kind == "error":
                return "error", payload.status, payload.code
        return "unfinished", text



def together(engine, jobs):
    for j in jobs:
        engine.submit(j)
    drain(engine)


def alone(engine, jobs):
    for j in jobs:
        engine.submit(j)
        drain(engine)


def assert_idle(engine, max_batch):
    assert engine.free == list(range(max_batch)) and engine.staging is None and not engine.seqs
    assert not any(s["busy"] for s in engine.store.describe())


def chat(ref, messages):
    from mhla_stream.serve.app import ChatRender
    return ChatRender(messages, ref.tokenizer.chat is not None, ref.tokenizer)


def session_file(directory, sid):
    from mhla_stream.serve.sessions import file_name
    return os.path.join(str(directory), file_name(sid))


def mixed_scenario(ref, engine, directory, run, out):
    """Phase 1 makes sessions (``host`` in host memory; ``disk`` and ``bad`` evicted to disk), ``bad``'s file
    is then damaged; phase 2 sends everything below in one go."""
    tok = ref.tokenizer
    words = tok.encode("Once upon a time there was a little dog who liked to run in the park every day " * 3)
    run(engine, [out.job("d1", words[:5], session="disk"), out.job("b1", words[5:9], session="bad")])
    run(engine, [out.job("h1", words[9:14], session="host")])
    tiers = {s["id"]: s["tier"] for s in engine.store.describe()}
    assert tiers == {"host": "host", "disk": "disk", "bad": "disk"}, tiers
    with open(session_file(directory, "bad"), "r+b") as f:  # a flipped byte in the tensors: checksum refused
        f.seek(-20, os.SEEK_END)
        byte = f.read(1)
        f.seek(-20, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))
    jobs = [
        out.job("bad2", words[20:24], session="bad"),                     # 409, beside healthy prompts
        # forked from a session continued in the same batch (admitted first: it forks the state before)
        out.job("fork", words[30:33], session="forked", fork_from="host"),
        out.job("host2", words[14:20], session="host"),                   # continued from host memory
        out.job("disk2", [], session="disk"),                             # empty prompt: its stored logits
        out.job("new", words[3:8], session="fresh"),                      # a new session, with BOS
        out.job("chat", render=chat(ref, [{"role": "user", "content": "Tell me about a cat."}]), session="c"),
        out.job("bos", words[:6], add_bos=True),
        out.job("one", words[7:8]),
        out.job("piece", words[:PIECE]),
        out.job("piece+1", words[:PIECE + 1]),
        out.job("bos-piece", words[1:PIECE], add_bos=True),               # BOS makes it exactly the piece
        out.job("sample", words[2:9], temperature=0.9, seed=11, max_tokens=6),
        out.job("penalty", words[4:10], penalty=1.3, max_tokens=6),
        out.job("stop", words[:10], stop=[" the", "."], max_tokens=8),
        out.job("max1", words[11:15], max_tokens=1),
        out.job("sample-session", words[8:12], temperature=0.7, seed=3, session="fresh2"),
    ]
    run(engine, jobs)
    # and the sessions continue: the next turn of each must still agree
    run(engine, [out.job("host3", words[40:43], session="host"), out.job("fork2", words[43:45], session="forked"),
                 out.job("disk3", words[45:48], session="disk"), out.job("chat2", session="c", render=chat(ref, [
                     {"role": "user", "content": "Tell me about a cat."}, {"role": "user", "content": "And a dog?"}]))])


def test_mixed_requests_in_one_batch_equal_one_at_a_time(ref, tmp_path):
    budget = int(session_bytes(ref) * 1.5)  # room for one idle session in host memory: the others go to disk
    got, want = Outcomes(), Outcomes()
    batched = make_engine(ref, tmp_path / "b", 4, max_batch=8, budget=budget)
    sizes = []
    real = batched.runner.admit
    batched.runner.admit = lambda items: sizes.append(len(items)) or real(items)
    mixed_scenario(ref, batched, tmp_path / "b", together, got)
    mixed_scenario(ref, make_engine(ref, tmp_path / "a", 1, max_batch=8, budget=budget), tmp_path / "a", alone, want)
    assert max(sizes) == 4  # batches did form
    for key in want.events:
        assert got.result(key) == want.result(key), key
    assert got.result("bad2")[:3] == ("error", 409, "session_refused")
    assert got.result("piece")[1] == "length" and got.result("max1")[2] == 1
    assert_idle(batched, 8)


def test_an_injected_fault_in_a_batch_fails_that_request_only(ref, tmp_path, monkeypatch):
    from mhla_stream.serve.engine import FAULT_MARK
    monkeypatch.setenv("MHLA_SERVE_FAULT_INJECTION", "1")
    tok = ref.tokenizer
    prompts = {"a": tok.encode("The cat sat"), "fault": tok.encode("x " + FAULT_MARK), "b": tok.encode("A bird"),
               "c": tok.encode("The king"), "d": tok.encode("Lily went")}
    got, want = Outcomes(), Outcomes()
    batched = make_engine(ref, tmp_path / "b", 4)
    together(batched, [got.job(k, ids, session="s" if k == "b" else None) for k, ids in prompts.items()])
    alone(make_engine(ref, tmp_path / "a", 1), [want.job(k, ids, session="s" if k == "b" else None)
                                                for k, ids in prompts.items()])
    assert got.result("fault")[:2] == ("error", 500)
    for key in prompts:
        assert got.result(key) == want.result(key), key
    assert_idle(batched, 8)


def test_clients_leaving_queued_in_a_batch_and_right_after(ref, tmp_path):
    """Slots 3, a burst of 7 (session ``s`` among them): one leaves while queued, one while its batch's
    forward runs, one right after it; the others get their alone text; every slot and session is free,
    and ``s`` (left mid-admission) keeps its state: its next request equals one never interrupted."""
    tok = ref.tokenizer
    words = tok.encode("One day a small girl named Lily found a shiny red ball in the garden near her house")
    prompts = {f"p{i}": words[i:i + 2 + i] for i in range(7)}
    got, want = Outcomes(), Outcomes()
    engine = make_engine(ref, tmp_path / "b", 4, max_batch=3)
    oracle = make_engine(ref, tmp_path / "a", 1, max_batch=3)
    for e, o, run in ((engine, got, together), (oracle, want, alone)):
        run(e, [o.job("s0", words[:4], session="s")])
    jobs = {k: got.job(k, ids, session="s" if k == "p1" else None) for k, ids in prompts.items()}
    real = engine.runner.admit

    def admit(items):
        jobs["p1"].cancelled.set()  # the client goes while its batch is being prefilled
        return real(items)
    engine.runner.admit = admit
    for j in jobs.values():
        engine.submit(j)
    jobs["p5"].cancelled.set()  # still queued: 3 slots
    engine._turn()
    engine.runner.admit = real
    admitted = [s.job for s in engine.seqs.values()]
    assert any(j is jobs["p0"] for j in admitted) and any(j is jobs["p2"] for j in admitted)
    jobs["p2"].cancelled.set()  # admitted, its first token just picked
    drain(engine)
    assert_idle(engine, 3)
    for key in ("p1", "p2", "p5"):
        assert not any(k in ("done", "error") for k, _ in got.events[key]), key
    alone(oracle, [want.job(k, ids) for k, ids in prompts.items() if k not in ("p1", "p2", "p5")])
    for key in ("p0", "p3", "p4", "p6"):
        assert got.result(key) == want.result(key), key
    together(engine, [got.job("s1", words[20:24], session="s")])
    alone(oracle, [want.job("s1", words[20:24], session="s")])
    assert got.result("s1") == want.result("s1")


def test_admit_batch_above_max_batch_is_the_slot_count(ref, tmp_path):
    engine = make_engine(ref, tmp_path, 8, max_batch=2)
    assert engine.admit_batch == 2 and engine.runner.stager.rows == 2
    tok = ref.tokenizer
    got, want = Outcomes(), Outcomes()
    prompts = {f"q{i}": tok.encode(t) for i, t in enumerate(["A cat", "The sun was", "Tom and", "Birds sing", "Hi"])}
    together(engine, [got.job(k, ids) for k, ids in prompts.items()])
    alone(make_engine(ref, tmp_path / "a", 1, max_batch=2), [want.job(k, ids) for k, ids in prompts.items()])
    for key in prompts:
        assert got.result(key) == want.result(key), key
    assert_idle(engine, 2)


def test_a_long_prompt_is_not_starved_by_short_ones_arriving_every_turn(ref, tmp_path):
    """While a stream decodes, a turn feeds one piece of prompt. A long prompt admitted first, then one
    short prompt arriving every turn: the long prompt must still get a piece every turn (as with
    admit_batch=1), not wait behind every short prompt batched ahead of it."""
    out = Outcomes()
    engine = make_engine(ref, tmp_path, 4, max_batch=16)
    engine.submit(out.job("stream", [100, 101, 102], max_tokens=200))
    engine._turn()
    long_ids = [(7 * i) % 400 + 50 for i in range(6 * PIECE)]  # 6 pieces
    long_job = out.job("long", long_ids, max_tokens=2)
    engine.submit(long_job)
    for turn in range(12):
        if out.result("long")[0] != "unfinished" or any(s.staged for s in engine.seqs.values() if s.job is long_job):
            break
        engine.submit(out.job(f"short{turn}", [200 + turn, 300], max_tokens=1))
        engine._turn()
    assert turn <= 8, f"the long prompt waited {turn} turns for 6 pieces"
