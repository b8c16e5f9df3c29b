"""--admit-tokens, hostile: bad flag values are refused before anything loads; on the in-process engine
with the real model, a burst of 20 short prompts plus one long prompt (and prompts of exactly the piece
and the piece + 1) each give the text of that request run alone (one StreamingMHLA)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from mhla_stream.sampling import SamplingParams

CHUNK, PIECE, ADMIT = 64, 16, 48


def test_bad_admit_tokens_are_refused_before_loading():
    for bad in ("0", "-1", "2.5", "x", ""):
        r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--admit-tokens", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--admit-tokens" in r.stderr, r.stderr[-500:]
        assert "mhla-serve:" not in r.stderr  # the start-up line: nothing was loaded


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def test_burst_and_a_long_prompt_each_equal_alone(ref, tmp_path):
    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.jobs import Job
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m, tok = ref.model, ref.tokenizer
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(str(tmp_path), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    engine = Engine(m, tok, store, max_batch=24, prefill_chunk=CHUNK, prefill_piece=PIECE, admit_tokens=ADMIT,
                    cuda_graph=False)
    base = tok.encode("Once upon a time there was a little dog who liked to run in the park every day")
    prompts = [[(i * 37 + j) % 500 + 100 for j in range(3 + i % 7)] for i in range(20)]
    prompts += [(base * 20)[:150], (base * 2)[:PIECE], (base * 2)[:PIECE + 1], (base * 2)[:PIECE - 1]]
    out = {}

    def job(key, ids):
        out[key] = []
        return Job(SamplingParams(temperature=0, do_sample=False, max_new_tokens=5, stop_at_eos=False),
                   lambda kind, payload: out[key].append(payload) if kind == "text" else None, ids=ids, add_bos=False)
    engine.submit(job("runner", base[:5]))  # a stream decoding while the burst arrives
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
