"""The serve engine's step runner: decode buckets, prefill pieces, staging-row prefill equal to a direct
prefill, and batched decode over the low rows equal to each sequence alone. The CUDA-graph path is
exercised on the CPU with a stand-in for ``GraphStep`` that runs the same fixed-shape forward eagerly."""
from __future__ import annotations

import pytest
import torch

from mhla_stream.cache import MHLACache
from mhla_stream.serve.runner import StepRunner, bucket_for, decode_buckets, prefill_pieces, prefill_sizes


@pytest.fixture(scope="module")
def model():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained().model


def test_decode_buckets_and_bucket_choice():
    assert decode_buckets(65) == [1, 2, 4, 8, 16, 32, 64, 65]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 32, 64]
    assert decode_buckets(1) == [1]
    b = decode_buckets(65)
    assert [bucket_for(n, b) for n in (1, 2, 3, 5, 32, 33, 64, 65)] == [1, 2, 4, 8, 32, 64, 64, 65]
    with pytest.raises(ValueError, match="largest decode bucket"):
        bucket_for(66, b)


def test_prefill_pieces_cover_any_length():
    sizes = prefill_sizes(1024)
    assert sizes == [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert prefill_sizes(1000)[:2] == [1000, 512] and prefill_sizes(1) == [1]
    assert prefill_pieces(1024, sizes) == [1024]
    assert prefill_pieces(700, sizes) == [512, 128, 32, 16, 8, 4]
    for n in range(1, 1025, 37):
        pieces = prefill_pieces(n, sizes)
        assert sum(pieces) == n and pieces == sorted(pieces, reverse=True)
    with pytest.raises(ValueError):
        prefill_pieces(3, [2])


def _direct(model, ids, chunk):
    """The reference: a fresh one-row state fed ``ids`` in chunks, as StreamingMHLA.feed does."""
    states = model.new_state(1)
    cache = MHLACache(states)
    for i in range(0, len(ids), chunk):
        logits = model(input_ids=torch.tensor([ids[i:i + chunk]]), past_key_values=cache, use_cache=True,
                       logits_to_keep=1).logits[0, -1].float()
    return states, logits


def _close(a, b, tol=1e-4):
    return torch.allclose(a, b, atol=tol, rtol=tol)


def _stage(runner, ids, slot):
    runner.stage_begin(None)
    for i in range(0, len(ids), runner.prefill_chunk):
        logits = runner.stage_feed(ids[i:i + runner.prefill_chunk])
    runner.stage_finish(slot)
    return logits


class _EagerGraph:
    """Stands in for GraphStep on the CPU: the same fixed (rows, chunk) forward on the same views."""
    captured: list = []

    def __init__(self, model, cache, chunk=1, warmup=2, plan=None, ids=None, feedback=False):
        self.model, self.cache, self.chunk, self.plan, self.feedback = model, cache, chunk, plan, feedback
        self.rows = cache.states[0].batch_size
        self.ids = ids if ids is not None else torch.zeros(self.rows, chunk, dtype=torch.long)
        assert tuple(self.ids.shape) == (self.rows, chunk)
        _EagerGraph.captured.append((self.rows, chunk))

    def step(self, ids):
        assert tuple(ids.shape) == (self.rows, self.chunk), "a replay must match its capture's shape"
        self.ids.copy_(ids)
        return self.replay()

    def replay(self):
        logits = self.model(input_ids=self.ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1,
                            plan=self.plan).logits
        if self.feedback:
            torch.argmax(logits[:, -1], -1, out=self.ids[:, -1])
        return logits


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
@torch.inference_mode()
def test_staging_prefill_and_low_row_decode_equal_each_sequence_alone(model, monkeypatch, graphs):
    r = StepRunner(model, 5, 16, cuda_graphs=False)
    if graphs:  # the CUDA code path, with graph replays run eagerly
        import mhla_stream.graphs
        monkeypatch.setattr(mhla_stream.graphs, "GraphStep", _EagerGraph)
        _EagerGraph.captured = []
        r.graphs = True
        r._capture()
        assert _EagerGraph.captured == [(n, 1) for n in (1, 2, 4, 5)] + [(1, s) for s in (16, 8, 4, 2, 1)]
    prompts = {0: list(range(5, 42)), 2: list(range(100, 107)), 3: [9]}
    refs = {}
    for slot, ids in prompts.items():
        logits = _stage(r, ids, slot)
        states, want = _direct(model, ids, 512)
        assert _close(logits, want)
        for live, ref in zip(r.rows(slot, slot + 1), states):
            assert int(live.pos) == len(ids) and _close(live.far, ref.far) and _close(live.ring, ref.ring)
        refs[slot] = (states, ids)
    # slot 1 and 4 are junk rows: whatever happens to them must not touch the others
    tokens = {0: 11, 2: 22, 3: 33}
    step = r.decode(tokens)
    logits, lo = step.logits, step.lo
    assert lo == 0 and logits.shape[0] == 4  # rows [0, 4): slot 3 is the highest active one
    for slot, token in tokens.items():
        states, ids = refs[slot]
        _, want = _direct(model, ids + [token], 512)
        assert _close(logits[slot - lo], want)
    # one sequence alone on slot 0: the smallest bucket
    step = r.decode({0: 5})
    logits, lo = step.logits, step.lo
    assert logits.shape[0] == 1 and lo == 0
    # eagerly only the occupied range runs; the graph path rounds up to a bucket (here all 5 rows)
    step = r.decode({3: 1, 4: 2})
    logits, lo = step.logits, step.lo
    assert (lo, logits.shape[0]) == ((0, 5) if graphs else (3, 2))


@torch.inference_mode()
def test_staging_loads_a_stored_state(model):
    r = StepRunner(model, 2, 8, cuda_graphs=False)
    states, _ = _direct(model, list(range(3, 20)), 8)
    stored = {f"layers.{i}.{n}": getattr(s, n).clone() for i, s in enumerate(states) for n in s.TENSORS}
    r.stage_begin(stored)
    logits = r.stage_feed([7, 8, 9])
    r.stage_finish(1)
    _, want = _direct(model, list(range(3, 20)) + [7, 8, 9], 8)
    assert _close(logits, want) and int(r.rows(1, 2)[0].pos) == 20


def test_staging_chunk_bounds(model):
    r = StepRunner(model, 1, 4, cuda_graphs=False)
    r.stage_begin(None)
    for bad in ([], [1, 2, 3, 4, 5]):
        with pytest.raises(ValueError, match="staging chunk"):
            r.stage_feed(bad)
    assert "1 slots + 1 staging row" in r.describe() and r.info()["decode_buckets"] == "1"


# -- the engine in-process (no HTTP): staging row and low-row decode under a mixed load ---------------------

def _engine(stream, max_batch, chunk, piece=None):
    import tempfile

    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = stream.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(tempfile.mkdtemp(), 1 << 30, layout,
                         {"model_name": "t", "policy": m.config.mixing_policy, "config": "{}"})
    return Engine(m, stream.tokenizer, store, max_batch=max_batch, prefill_chunk=chunk, prefill_piece=piece)


def _job(ids, n, out, session=None):
    from mhla_stream.sampling import SamplingParams
    from mhla_stream.serve.engine import Job
    p = SamplingParams(temperature=0, max_new_tokens=n)
    key = len(out)
    out[key] = []

    def emit(kind, payload):
        out[key].append(payload if kind == "text" else (kind, payload))
    return Job(p, emit, ids=ids, add_bos=False, session=session)  # ids carry their BOS


def _drive(engine, jobs_by_turn):
    """Runs engine turns on this thread, submitting jobs_by_turn[t] before turn t."""
    t = 0
    while t < len(jobs_by_turn) or engine.seqs or engine.waiting:
        for job in (jobs_by_turn[t] if t < len(jobs_by_turn) else []):
            engine.submit(job)
        engine._turn()
        t += 1


def _text(events):
    assert isinstance(events[-1], tuple) and events[-1][0] == "done", events[-1]
    return "".join(e for e in events if isinstance(e, str))


@pytest.mark.parametrize("piece", [None, 8], ids=["piece=chunk", "piece=8"])
def test_engine_long_prompt_mid_decode_and_sessions_equal_alone(piece):
    from mhla_stream import StreamingMHLA
    ref = StreamingMHLA.from_pretrained()
    tok = ref.tokenizer
    engine = _engine(ref, 4, 32, piece)  # a 32-token chunk: the long prompt takes several turns in the staging row
    short = [tok.encode(p, add_bos=True) for p in ("Once upon a time", "The dog ran", "Tom had a ball")]
    long_ids = tok.encode("Lily saw a big red ball in the park. " * 12, add_bos=True)
    assert len(long_ids) > 3 * 32
    out = {}
    # two streams start, the long prompt and a session request arrive while they decode, a third short one later
    turns = [[_job(short[0], 12, out), _job(short[1], 12, out)], [], [_job(long_ids, 6, out)],
             [_job(short[2], 5, out, session="s")]]
    _drive(engine, turns)
    assert not engine.seqs  # the session's first request is done: its next one may come
    _drive(engine, [[_job(tok.encode(" Then"), 5, out, session="s")]])
    want = []
    for ids, n in ((short[0], 12), (short[1], 12), (long_ids, 6), (short[2], 5)):
        ref.reset()
        want.append(ref.generate(ids, max_new_tokens=n, temperature=0))
    want.append(ref.generate(tok.encode(" Then"), max_new_tokens=5, temperature=0))  # the session goes on
    assert [_text(out[k]) for k in range(5)] == want
    assert engine.staging is None and not engine.seqs and sorted(engine.free) == [0, 1, 2, 3]


@torch.inference_mode()
def test_graph_path_with_prefill_pieces_smaller_than_the_chunk(model, monkeypatch):
    """``prefill_piece`` caps the captured prefill graphs; any feed up to a chunk replays pieces of it."""
    import mhla_stream.graphs
    monkeypatch.setattr(mhla_stream.graphs, "GraphStep", _EagerGraph)
    _EagerGraph.captured = []
    r = StepRunner(model, 2, 16, cuda_graphs=False, prefill_piece=4)
    r.graphs = True
    r._capture()
    assert r.piece_sizes == [4, 2, 1] and [c for c in _EagerGraph.captured if c[0] == 1 and c[1] > 1] == [(1, 4), (1, 2)]
    assert r.info()["prefill_piece"] == "4" and "pieces of 4" in r.describe()
    ids = list(range(5, 42))
    logits = _stage(r, ids, 1)  # feeds of 16, 16, 5: replays of 4 x 4, 4 x 4, 4 + 1
    _, want = _direct(model, ids, 512)
    assert _close(logits, want) and int(r.rows(1, 2)[0].pos) == len(ids)
    assert StepRunner(model, 1, 8, cuda_graphs=False, prefill_piece=100).prefill_piece == 8  # never above the chunk


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-path"])
def test_engine_runs_ahead_on_plain_rows_and_settles_for_penalty_ones(graphs, monkeypatch):
    """Plain rows (no penalty, no session) run one step ahead: the next step is fed the device's picks
    before the host reads them, the argmax for greedy rows and a draw from the row's own generator for
    sampled ones. A row with a repetition penalty in the batch makes each step settle first. Either way
    every request's text equals the same request alone: eos and the length limit found one step late,
    a row ending while ahead, sampled rows with their seeds."""
    from mhla_stream import StreamingMHLA
    from mhla_stream.serve.engine import Job
    ref = StreamingMHLA.from_pretrained()
    tok = ref.tokenizer
    engine = _engine(ref, 5, 32)
    if graphs:  # the CUDA code path (buckets over the shared feed buffer, picks written by the replay), run eagerly
        import mhla_stream.graphs
        monkeypatch.setattr(mhla_stream.graphs, "GraphStep", _EagerGraph)
        engine.runner.graphs = True
        engine.runner._capture()
    calls, decode = [], engine.runner.decode

    def spy(tokens, auto=(), samplers=None):
        samplers = samplers or {}
        seed = {q.slot: q.job.params.seed for q in engine.seqs.values()}
        penalty = [q.slot for q in engine.seqs.values() if q.job.params.repetition_penalty != 1.0]
        assert not set(penalty) & (set(auto) | set(samplers))
        calls.append((sorted(tokens), sorted(auto), sorted(seed[s] for s in samplers),
                      bool(set(penalty) & set(tokens)), sorted(seed[s] for s in auto if seed[s] is not None)))
        return decode(tokens, auto, samplers)
    engine.runner.decode = spy
    out = {}

    def job(prompt, n, **sampling):
        key = len(out)
        out[key] = []
        emit = lambda kind, payload: out[key].append(payload if kind == "text" else (kind, payload))  # noqa: E731
        # the model's generation defaults (top_k, top_p), as ``ref.generate`` below resolves them
        return Job(ref.sampling_params(max_new_tokens=n, **sampling), emit, ids=tok.encode(prompt, add_bos=True),
                   add_bos=False)
    specs = [("Once upon a time there was a cat.", 150, {"temperature": 0}),   # ends on eos, ahead
             ("They were happy.", 20, {"temperature": 0}),                     # the length limit, ahead
             ("The end.", 10, {"temperature": 0}),                             # eos as its first pick
             ("Tom had a ball", 14, {"temperature": 0.8, "seed": 3}),          # sampled: ahead, drawn on device
             ("Ben ran", 8, {"temperature": 0.8, "seed": 4, "repetition_penalty": 1.3})]  # penalty: settles
    turns = [[job(*specs[0][:2], **specs[0][2]), job(*specs[1][:2], **specs[1][2])], [],
             [job(*specs[2][:2], **specs[2][2]), job(*specs[3][:2], **specs[3][2])]] + [[]] * 30 + \
        [[job(*specs[4][:2], **specs[4][2])]]
    _drive(engine, turns)
    want = []
    for prompt, n, sampling in specs:
        ref.reset()
        want.append(ref.generate(tok.encode(prompt, add_bos=True), max_new_tokens=n, **sampling))
    assert [_text(out[k]) for k in range(5)] == want
    assert want[0] and len(tok.encode(want[0])) < 140  # it did end on eos
    assert any(auto for _, auto, _, _, _ in calls)                   # greedy rows ran ahead
    assert any(3 in ahead for *_, ahead in calls)                    # the sampled row ran ahead
    assert any(3 in drawn for _, _, drawn, _, _ in calls)            # ... drawing on the device
    # once the penalty row is in the step in flight, each step settles first (only the step it joins
    # may still feed device picks to the rows ahead)
    assert sum(pen for *_, pen, _ in calls) >= 7
    assert sum(bool(auto) for _, auto, _, pen, _ in calls if pen) <= 1
    assert engine.flight is None or not [s for s in engine.flight.rows if engine.seqs.get(s.slot) is s]
    assert not engine.seqs and sorted(engine.free) == [0, 1, 2, 3, 4]


def test_engine_run_ahead_off_gives_the_same_text():
    from mhla_stream import StreamingMHLA
    ref = StreamingMHLA.from_pretrained()
    tok = ref.tokenizer
    texts = []
    for run_ahead in (True, False):
        engine = _engine(ref, 2, 32)
        engine.run_ahead = run_ahead
        out = {}
        _drive(engine, [[_job(tok.encode("Once upon a time", add_bos=True), 16, out),
                         _job(tok.encode("The dog ran", add_bos=True), 9, out)]])
        texts.append([_text(out[k]) for k in range(2)])
    assert texts[0] == texts[1]


def test_unseeded_sampled_rows_share_one_draw_and_seeded_rows_draw_alone():
    """Plain sampled rows run ahead; unseeded ones with the same settings are drawn together (one call
    over their logits), seeded ones alone from their own generator (each equal to that request alone);
    every unseeded stream still gets valid text and its full length."""
    from mhla_stream import StreamingMHLA
    from mhla_stream.serve.engine import Job
    ref = StreamingMHLA.from_pretrained()
    tok = ref.tokenizer
    engine = _engine(ref, 6, 32)
    groups, decode = [], engine.runner.decode

    def spy(tokens, auto=(), samplers=None):
        by_draw = {}
        for slot, draw in (samplers or {}).items():
            by_draw.setdefault(id(draw), []).append(slot)
        groups.append(sorted(len(v) for v in by_draw.values()))
        return decode(tokens, auto, samplers)
    engine.runner.decode = spy
    out = {}

    def job(prompt, n, **sampling):
        key = len(out)
        out[key] = []
        emit = lambda kind, payload: out[key].append(payload if kind == "text" else (kind, payload))  # noqa: E731
        return Job(ref.sampling_params(max_new_tokens=n, stop_at_eos=False, **sampling), emit,
                   ids=tok.encode(prompt, add_bos=True), add_bos=False)
    specs = [("Tom had a ball", 12, {"temperature": 0.8, "seed": 3}),
             ("Lily saw a bird", 12, {"temperature": 0.8, "seed": 9}),
             ("The sun was", 12, {"temperature": 0.8}),
             ("A big dog", 12, {"temperature": 0.8}),
             ("Mom said", 12, {"temperature": 0.8}),
             ("One day", 12, {"temperature": 0.5})]
    _drive(engine, [[job(p, n, **kw) for p, n, kw in specs]])
    for k in (0, 1):
        ref.reset()
        want = ref.generate(tok.encode(specs[k][0], add_bos=True), max_new_tokens=12, stop_at_eos=False, **specs[k][2])
        assert _text(out[k]) == want
    for k in (2, 3, 4, 5):
        assert out[k][-1][0] == "done" and out[k][-1][1]["completion_tokens"] == 12
    assert [1, 1, 1, 3] in groups  # two seeded alone, three unseeded at 0.8 together, one at 0.5
