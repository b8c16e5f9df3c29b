"""--admit-wait-ms (intake.py ``_admit_together``): while streams decode, a short prompt may wait up to
that long after its submission so that later arrivals share its batched admission forward. Checked on
the engine with the host-cost stand-in runner (which records each call): a lone arrival is held while
streams decode and admitted once its wait is over; a full group, a group cut by the token limit and
an arrival while nothing decodes are never held; the texts equal those of requests run alone (the real
model); bad values are refused before anything loads."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mhla_stream.sampling import SamplingParams

CHUNK, PIECE = 64, 16


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def _engine(ref, tmp_path, wait_ms, admit_tokens=48, real=False):
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.hostbench import FakeRunner
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(str(tmp_path), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    runner = None if real else FakeRunner(ref.tokenizer, m.config.vocab_size, 16, CHUNK, PIECE, record=True,
                                          admit_batch=4)
    engine = Engine(m, ref.tokenizer, store, max_batch=16, prefill_chunk=CHUNK, prefill_piece=PIECE,
                    admit_tokens=admit_tokens, admit_batch=4, runner=runner, cuda_graph=False, admit_wait_ms=wait_ms)
    return engine, runner


def _job(ids, n, sink=None):
    from mhla_stream.serve.jobs import Job
    return Job(SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False), sink or (lambda *a: None),
               ids=ids, add_bos=False)


def _admits(runner, start):
    return [n for kind, n in runner.calls[start:] if kind == "admit"]


def test_a_lone_arrival_waits_while_streams_decode_then_is_admitted(ref, tmp_path):
    engine, runner = _engine(ref, tmp_path, wait_ms=10_000)
    engine.submit(_job([5, 6, 7], 40))
    engine._turn()                                    # nothing decoded yet: admitted at once, never held
    assert _admits(runner, 0) == [3]
    late = _job([8, 9], 4)
    engine.submit(late)
    start = len(runner.calls)
    for _ in range(3):
        engine._turn()
    assert _admits(runner, start) == []               # held: the stream decodes, the arrival waits
    seq = next(s for s in engine.seqs.values() if s.job is late)
    assert not seq.staged and seq.generated == 0
    late.submitted -= 20.0                            # its wait is over
    start = len(runner.calls)
    engine._turn()
    assert _admits(runner, start) == [2] and seq.staged


def test_a_full_group_or_one_cut_by_the_token_limit_is_not_held(ref, tmp_path):
    engine, runner = _engine(ref, tmp_path, wait_ms=10_000, admit_tokens=20)
    engine.submit(_job([5, 6, 7], 40))
    engine._turn()
    start = len(runner.calls)
    for i in range(4):                                # admit_batch prompts: a full group
        engine.submit(_job([10 + i, 11], 4))
    engine._turn()
    assert _admits(runner, start) == [8]
    start = len(runner.calls)
    engine.submit(_job(list(range(20, 20 + PIECE)), 4))   # 16 tokens ...
    engine.submit(_job(list(range(40, 40 + 8)), 4))       # ... + 8 > admit_tokens 20: the first is cut off
    engine._turn()
    assert _admits(runner, start)[:1] == [PIECE]


def test_nothing_decoding_means_no_wait(ref, tmp_path):
    engine, runner = _engine(ref, tmp_path, wait_ms=10_000)
    engine.submit(_job([8, 9], 4))
    engine._turn()
    assert _admits(runner, 0) == [2]


def test_held_and_batched_requests_give_their_alone_text(ref, tmp_path):
    """The real model (CPU fp32): one long stream decoding, then arrivals spread over turns, held and
    admitted together; each text equals the request run alone."""
    engine, _ = _engine(ref, tmp_path, wait_ms=10_000, real=True)
    tok = ref.tokenizer
    prompts = ["Once upon a time", "The little dog", "Lily saw a big", "Tom and his mom"]
    out = {p: [] for p in prompts}
    out["first"] = []
    engine.submit(_job(tok.encode("One day a cat"), 30, lambda kind, x: out["first"].append(x) if kind == "text" else 0))
    engine._turn()
    jobs = []
    for p in prompts[:3]:                              # three arrive, one a turn: all held
        jobs.append(_job(tok.encode(p), 6, lambda kind, x, p=p: out[p].append(x) if kind == "text" else 0))
        engine.submit(jobs[-1])
        engine._turn()
    assert not any(s.staged for s in engine.seqs.values() if s.job in jobs)
    jobs.append(_job(tok.encode(prompts[3]), 6, lambda kind, x: out[prompts[3]].append(x) if kind == "text" else 0))
    engine.submit(jobs[-1])                            # the fourth fills the group: admitted together
    for _ in range(200):
        if not engine.seqs and not engine.waiting:
            break
        engine._turn()
    for p, n in [(p, 6) for p in prompts] + [("One day a cat", 30)]:  # ids as the jobs fed them (no BOS)
        ref.reset()
        want = "".join(ref.stream(tok.encode(p), max_new_tokens=n, temperature=0, stop_at_eos=False))
        assert "".join(out["first" if n == 30 else p]) == want, p


def test_bad_values_are_refused(ref, tmp_path):
    for bad in (-1.0, float("nan"), 1e9):
        with pytest.raises(ValueError, match="admit_wait_ms"):
            _engine(ref, tmp_path, wait_ms=bad)
    for bad in ("-1", "nan", "inf", "x", "", "10001"):
        r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--admit-wait-ms", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--admit-wait-ms" in r.stderr, r.stderr[-500:]
        assert "mhla-serve:" not in r.stderr          # the start-up line: nothing was loaded
