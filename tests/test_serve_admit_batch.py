"""Batched admission (``--admit-batch``, serve/admission.py): several whole short prompts prefilled in
one padded forward, then copied into their slots. Against the one-at-a-time staging path on the real
shipped model (CPU, fp32): the same logits and the same slot states (positions included), with and
without a stored session; bad batches refused before anything changes; a burst gives each request the
text it gets alone; a failing batched forward falls back to one at a time; bad flags refused."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mhla_stream.sampling import SamplingParams
from admit_util import admit_alone as _alone, slot_tensors as _slot, stored_session as _stored

CHUNK, PIECE = 64, 16


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def _runner(model, admit_batch):
    from mhla_stream.serve.runner import StepRunner
    return StepRunner(model, 4, CHUNK, cuda_graphs=False, prefill_piece=PIECE, admit_batch=admit_batch)


def _same(a, b):
    for x, y in zip(a, b):
        if x.dtype == torch.long:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)  # fp32 products over more rows: rounding


@torch.inference_mode()
def test_batched_admission_equals_one_at_a_time(ref):
    m = ref.model
    batched, alone = _runner(m, 4), _runner(m, 1)
    words = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park every day")
    prompts = {2: words[:1], 0: words[:7], 3: words[:PIECE]}  # slot -> prompt: 1 token, some, a whole piece
    got = batched.admit([(slot, None, ids) for slot, ids in prompts.items()])
    assert got.shape == (3, m.config.vocab_size) and got.dtype == torch.float32
    for i, (slot, ids) in enumerate(prompts.items()):
        want = _alone(alone, slot, None, ids)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-4)
        _same(_slot(batched, slot), _slot(alone, slot))
        assert int(batched.rows(slot, slot + 1)[0].pos) == len(ids)
    # a stored session (mid-block: 7 tokens in) continued beside a fresh prompt
    stored = _stored(alone, 0)
    got = batched.admit([(1, stored, words[7:12]), (2, None, words[:3])])
    want1 = _alone(alone, 1, stored, words[7:12])
    want2 = _alone(alone, 2, None, words[:3])
    torch.testing.assert_close(got[0], want1, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], want2, rtol=1e-5, atol=1e-4)
    _same(_slot(batched, 1), _slot(alone, 1))
    assert int(batched.rows(1, 2)[0].pos) == 12


@torch.inference_mode()
def test_placement_over_dirty_slots_equals_alone_and_leaves_clean_rows(ref):
    """Prompts of up to 2.3 blocks write ring slots 0-1 only: those are copied, the rest of each slot's
    ring is zeroed in place. Every slot starts dirty (an earlier stream's state: random values), as slots
    do after serving. The slot states equal one-at-a-time admission (which copies whole rows), the
    stager's rows are all zero after each batch, and a batch with a stored session is placed whole."""
    from mhla_stream.serve.runner import StepRunner
    m, piece = ref.model, 150
    batched = StepRunner(m, 4, 256, cuda_graphs=False, prefill_piece=piece, admit_batch=4)
    alone = StepRunner(m, 4, 256, cuda_graphs=False, prefill_piece=piece, admit_batch=1)
    assert batched.stager.touched == piece // m.config.block_size == 2
    g = torch.Generator().manual_seed(0)
    for a, b in zip(alone._tensors(alone.rows(0, 4)), batched._tensors(batched.rows(0, 4))):
        junk = torch.randint(1, 999, a.shape, generator=g) if a.dtype == torch.long else torch.randn(a.shape, generator=g)
        a.copy_(junk)
        b.copy_(junk)
    words = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park " * 12)
    prompts = {1: words[:piece], 3: words[:64], 0: words[:5]}  # 2 blocks + 22, exactly one block, a few
    got = batched.admit([(slot, None, ids) for slot, ids in prompts.items()])
    for i, (slot, ids) in enumerate(prompts.items()):
        torch.testing.assert_close(got[i], _alone(alone, slot, None, ids), rtol=1e-5, atol=1e-4)
        _same(_slot(batched, slot), _slot(alone, slot))

    def clean():
        return all(not t.any() for t in batched._tensors(batched.stager.states))
    assert clean()
    stored = _stored(alone, 1)  # a full row (2 blocks in its ring) continued beside a fresh prompt
    got = batched.admit([(2, stored, words[piece:piece + 40]), (0, None, words[:100])])
    torch.testing.assert_close(got[0], _alone(alone, 2, stored, words[piece:piece + 40]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1], _alone(alone, 0, None, words[:100]), rtol=1e-5, atol=1e-4)
    _same(_slot(batched, 2), _slot(alone, 2))
    _same(_slot(batched, 0), _slot(alone, 0))
    assert clean()
    # prompts of less than a block (they touch no ring slot: all of each slot's ring is cleared), over
    # slots that hold 2 blocks now, then one block over a slot that held 2
    for prompts in ({1: words[:20], 3: words[5:9]}, {2: words[:70]}):
        got = batched.admit([(slot, None, ids) for slot, ids in prompts.items()])
        for i, (slot, ids) in enumerate(prompts.items()):
            torch.testing.assert_close(got[i], _alone(alone, slot, None, ids), rtol=1e-5, atol=1e-4)
            _same(_slot(batched, slot), _slot(alone, slot))
        assert clean()


@torch.inference_mode()
def test_bad_batches_are_refused_before_anything_changes(ref):
    runner = _runner(ref.model, 2)
    runner.admit([(0, None, [5, 6, 7])])
    before = [t.clone() for t in runner._tensors(runner.states)]
    for bad in ([], [(0, None, [5])] * 3, [(0, None, [])], [(1, None, list(range(5, 5 + PIECE + 1)))]):
        with pytest.raises(ValueError):
            runner.admit(bad)
    _same([t for t in runner._tensors(runner.states)], before)
    with pytest.raises(RuntimeError, match="batched admission is off"):
        _runner(ref.model, 1).admit([(0, None, [5])])
    with pytest.raises(ValueError, match="admit_batch"):
        _runner(ref.model, 0)


def _engine(ref, tmp_path, admit_batch, max_batch=24):
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(str(tmp_path), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    return Engine(m, ref.tokenizer, store, max_batch=max_batch, prefill_chunk=CHUNK, prefill_piece=PIECE,
                  admit_tokens=48, admit_batch=admit_batch, cuda_graph=False)


def _burst(ref, engine):
    """A stream decoding, then a burst of short prompts, one long one and piece-edge ones: each must give
    the text that request gets alone."""
    from mhla_stream.serve.jobs import Job
    base = ref.tokenizer.encode("Once upon a time there was a little dog who liked to run in the park every day")
    prompts = [[(i * 37 + j) % 500 + 100 for j in range(1 + i % 9)] for i in range(14)]
    prompts += [(base * 20)[:150], (base * 2)[:PIECE], (base * 2)[:PIECE + 1]]
    out = {}

    def job(key, ids):
        out[key] = []
        return Job(SamplingParams(temperature=0, do_sample=False, max_new_tokens=5, stop_at_eos=False),
                   lambda kind, payload: out[key].append(payload) if kind == "text" else None, ids=ids, add_bos=False)
    engine.submit(job("runner", base[:5]))
    engine._turn()
    for i, ids in enumerate(prompts):
        engine.submit(job(i, ids))
    for _ in range(2000):
        if not engine.seqs and not engine.waiting:
            break
        engine._turn()
    assert not engine.seqs and not engine.waiting
    for i, ids in enumerate(prompts):
        ref.reset()
        want = "".join(ref.stream(ids, max_new_tokens=5, temperature=0, stop_at_eos=False))
        assert "".join(out[i]) == want, (i, len(ids))


def test_burst_with_batched_admission_each_equal_alone(ref, tmp_path):
    engine = _engine(ref, tmp_path, 4)
    calls = []
    real = engine.runner.admit
    engine.runner.admit = lambda items: calls.append(len(items)) or real(items)
    _burst(ref, engine)
    assert max(calls) == 4 and sum(calls) >= 14  # batches of up to 4; every short prompt went that way


def test_a_failing_batch_falls_back_to_one_at_a_time(ref, tmp_path, caplog):
    engine = _engine(ref, tmp_path, 4)

    def broken(items):
        raise RuntimeError("simulated failure of the batched forward")
    engine.runner.admit = broken
    _burst(ref, engine)  # every request still served, each equal to alone
    assert "admitting them one at a time" in caplog.text


@pytest.mark.parametrize("bad", ["0", "65", "-2", "x"])
def test_bad_admit_batch_is_refused_before_loading(bad):
    r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--admit-batch", bad],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--admit-batch" in r.stderr, r.stderr[-500:]
    assert "mhla-serve:" not in r.stderr


def test_session_requests_through_batched_admission_equal_one_stream(ref, tmp_path):
    """Request 1 (prompt A) then request 2 (prompt B) on one session, each admitted in a batch beside
    other prompts: the same text as one StreamingMHLA fed A then B."""
    from mhla_stream.serve.jobs import Job
    engine = _engine(ref, tmp_path, 4, max_batch=6)
    tok = ref.tokenizer
    a, b = tok.encode("The little cat sat on the"), tok.encode(" Then the dog ran to the")
    out = {}

    def job(key, ids, session=None):
        out[key] = []
        return Job(SamplingParams(temperature=0, do_sample=False, max_new_tokens=6, stop_at_eos=False),
                   lambda kind, payload: out[key].append(payload) if kind == "text" else None, ids=ids,
                   add_bos=False, session=session)

    def run(jobs):
        for j in jobs:
            engine.submit(j)
        for _ in range(500):
            if not engine.seqs and not engine.waiting:
                return
            engine._turn()
        raise AssertionError("the engine did not finish")
    run([job("s1", a, "chat"), job("x1", [300, 301, 302]), job("x2", [400])])
    run([job("s2", b, "chat"), job("x3", [500, 501])])
    ref.reset()
    want1 = "".join(ref.stream(a, max_new_tokens=6, temperature=0, stop_at_eos=False))
    want2 = "".join(ref.stream(b, max_new_tokens=6, temperature=0, stop_at_eos=False))
    assert ("".join(out["s1"]), "".join(out["s2"])) == (want1, want2)


def test_real_server_with_admit_batch_gives_each_request_its_alone_text(ref, tmp_path):
    import concurrent.futures as cf

    import httpx
    from serve_util import Server
    prompts = [f"Once upon a time, {w} went to the" for w in ("a fox", "Tom", "a bird", "the king", "Lily", "a dog")]
    srv = Server("--admit-batch", "4", "--max-batch", "8", "--prefill-piece", "32", "--sessions-dir", tmp_path / "s")
    try:
        def ask(p):
            r = httpx.post(srv.base + "/v1/completions", json={"prompt": p, "max_tokens": 8, "temperature": 0},
                           timeout=120)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        with cf.ThreadPoolExecutor(len(prompts)) as pool:
            got = list(pool.map(ask, prompts))
        info = httpx.get(srv.base + "/metrics", timeout=10).text
        assert 'admit_batch="4"' in info
    finally:
        assert srv.terminate() == 0
    for p, text in zip(prompts, got):
        ref.reset()
        assert text == ref.generate(p, max_new_tokens=8, temperature=0), p


def test_short_arrivals_do_not_starve_a_long_prompt(ref, tmp_path):
    """While streams decode and short prompts keep arriving every turn, the long prompt already in the
    staging row still gets one piece a turn (batches of short prompts take what the budget leaves)."""
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.hostbench import FakeRunner
    from mhla_stream.serve.jobs import Job
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(str(tmp_path), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    runner = FakeRunner(ref.tokenizer, m.config.vocab_size, 40, CHUNK, PIECE, record=True, admit_batch=4)
    engine = Engine(m, ref.tokenizer, store, max_batch=40, prefill_chunk=CHUNK, prefill_piece=PIECE,
                    admit_tokens=48, admit_batch=4, runner=runner)

    def job(ids, n):
        return Job(SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False), lambda *a: None, ids=ids,
                   add_bos=False)
    engine.submit(job([5, 6, 7], 60))                      # a stream decoding throughout
    engine._turn()
    engine.submit(job(list(range(300, 300 + 8 * PIECE)), 2))  # a long prompt: 8 pieces
    long_fed = []
    for turn in range(12):
        engine.submit(job([400 + turn, 401], 40))        # a short arrival every turn
        start = len(runner.calls)
        engine._turn()
        long_fed.append(sum(n for kind, n in runner.calls[start:] if kind == "feed"))
    assert long_fed[1:9] == [PIECE] * 8                   # one piece every turn once it is staging
    assert any(kind == "admit" for kind, _ in runner.calls)


def test_stager_refuses_slot_states_not_allocated_stacked(ref):
    """Placement copies each field over all layers at once: slot states from a plain ``new_state``
    (one tensor a layer) are refused when the stager is built, before anything is allocated."""
    from mhla_stream.serve.admission import BatchStager
    with pytest.raises(ValueError, match="stacked"):
        BatchStager(ref.model, ref.model.new_state(3), 2, PIECE, backend="auto", policy=None, cuda_graphs=False)
