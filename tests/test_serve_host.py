"""The server's host path: the text assembler's table fast path equals the incremental decoder; the
prefill work per engine turn is bounded while streams decode (counted on a stand-in runner, no
timings); SSE chunks that carry many tokens reassemble to the same text; the host-cost harness runs."""
from __future__ import annotations

import asyncio
import json
import random

import pytest

from mhla_stream.sampling import SamplingParams


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


# -- text ----------------------------------------------------------------------------------------------
def _assembled(tok, ids, prefix, stops=()):
    from mhla_stream.serve.text import TextAssembler
    a = TextAssembler(tok, list(stops), prefix)
    pieces = []
    for i in ids:
        piece, stopped = a.push(i)
        pieces.append(piece)
        if stopped:
            break
    return "".join(pieces) + a.flush(), pieces


def _decoded(tok, ids, prefix, stops=()):
    """The reference: the incremental decoder alone, stop strings cut as StreamingMHLA.stream does."""
    from mhla_stream.tokenizer import IncrementalDecoder
    d = IncrementalDecoder(tok, prefix=prefix)
    text = ""
    for i in ids:
        text += d.push(i)
        cuts = [text.find(s) for s in stops if s in text]
        if cuts:
            return text[:min(cuts)]
    text += d.flush()  # an unfinished character at the end: U+FFFD, as the tokenizer's decode shows it
    cuts = [text.find(s) for s in stops if s in text]
    return text[:min(cuts)] if cuts else text


def test_table_fast_path_equals_the_incremental_decoder(ref):
    from mhla_stream.serve.text import plain_surfaces
    tok = ref.tokenizer
    surfaces = plain_surfaces(tok)
    assert surfaces is not None  # the shipped SentencePiece model takes the fast path
    rng = random.Random(0)
    story = tok.encode("Once upon a time, Lily said: \"Look! A café, naïve 🙂 and 日本\".\nThe end.")
    plain = [i for i, s in enumerate(surfaces) if s is not None]
    odd = [i for i, s in enumerate(surfaces) if s is None]  # bytes, control, unknown
    cases = [(story, []), (story, [tok.bos_id]), (story[5:], story[:5])]
    for _ in range(60):  # random streams, mostly plain pieces with bytes and specials mixed in
        ids = [rng.choice(odd) if rng.random() < 0.15 else rng.choice(plain) for _ in range(rng.randrange(1, 40))]
        cases.append((ids, [rng.choice(plain + odd) for _ in range(rng.randrange(0, 10))]))
    ref.reset()
    cases.append((tok.encode(ref.generate("Once upon a time", max_new_tokens=60, temperature=0)), [tok.bos_id]))
    for ids, prefix in cases:
        assert _assembled(tok, ids, prefix)[0] == _decoded(tok, ids, prefix), (ids, prefix)
        for stops in (["."], [" the", "!"], ["zzz"]):
            assert _assembled(tok, ids, prefix, stops)[0] == _decoded(tok, ids, prefix, stops), (ids, prefix, stops)


def test_tokenizers_without_a_vouched_table_take_the_decoder(ref):
    from mhla_stream.serve.text import TextAssembler
    from mhla_stream.tokenizer import Tokenizer
    tok = ref.tokenizer
    # decodes like the model but is not the file the table is read from: no fast path, same text
    wrapped = Tokenizer(tok._encode, tok._decode, tok.vocab_size, tok.bos_id, tok.eos_id, "not-a-file.model")
    assert TextAssembler(wrapped, [], []).surfaces is None
    ids = tok.encode("The dog ran to the park.")
    assert _assembled(wrapped, ids, [])[0] == _decoded(tok, ids, [])
    # a tokenizer that decodes differently from its declared file is refused by the spot check
    shifted = Tokenizer(tok._encode, lambda ids: tok._decode([(i + 1) % tok.vocab_size for i in ids]),
                        tok.vocab_size, tok.bos_id, tok.eos_id, tok.source + "")
    from mhla_stream.serve.text import plain_surfaces
    assert plain_surfaces(shifted) is None
    # a widened tokenizer (random-weight benchmarks): ids past the file read modulo its size
    from mhla_stream.cli.serve import _widened
    wide = _widened(tok, tok.vocab_size + 1000)
    table = plain_surfaces(wide)
    assert table is not None and len(table) == tok.vocab_size + 1000
    ids = [tok.vocab_size + 500, 300, tok.vocab_size + 7, 9000, 400]
    assert _assembled(wide, ids, [400])[0] == _decoded(wide, ids, [400])


# -- the engine on a stand-in runner -------------------------------------------------------------------
def _fake_engine(ref, max_batch, chunk, piece, admit_tokens=None):
    import tempfile

    from mhla_stream.serve.engine import Engine
    from mhla_stream.serve.hostbench import FakeRunner
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    m = ref.model
    layout = StateLayout.of(m.new_state(1, device="meta"), m.config.vocab_size, model_fingerprint(m))
    store = SessionStore(tempfile.mkdtemp(), 1 << 20, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    runner = FakeRunner(ref.tokenizer, m.config.vocab_size, max_batch, chunk, piece, record=True)
    return Engine(m, ref.tokenizer, store, max_batch=max_batch, prefill_chunk=chunk, prefill_piece=piece,
                  runner=runner, admit_tokens=admit_tokens), runner


def _job(ids, n, out):
    from mhla_stream.serve.engine import Job
    key = len(out)
    out[key] = []
    return Job(SamplingParams(temperature=0, max_new_tokens=n, stop_at_eos=False),
               lambda kind, payload: out[key].append(payload if kind == "text" else kind), ids=ids, add_bos=False)


def _turns(engine, runner, jobs_by_turn):
    """Runs engine turns on this thread; returns each turn's runner calls."""
    turns, t = [], 0
    while t < len(jobs_by_turn) or engine.seqs or engine.waiting:
        for job in (jobs_by_turn[t] if t < len(jobs_by_turn) else []):
            engine.submit(job)
        start = len(runner.calls)
        engine._turn()
        turns.append(runner.calls[start:])
        t += 1
    return turns


def test_long_prompt_waits_in_bounded_pieces_while_streams_decode(ref):
    chunk, piece = 64, 16
    engine, runner = _fake_engine(ref, 4, chunk, piece)
    out = {}
    long_ids = list(range(300, 300 + 1000))
    turns = _turns(engine, runner, [[_job([5, 6, 7], 200, out), _job([8], 200, out)], [], [_job(long_ids, 3, out)]])
    fed = [sum(n for kind, n in calls if kind == "feed") for calls in turns]
    decoded = ["decode" in (kind for kind, _ in calls) for calls in turns]
    # while streams decode, a turn feeds at most one piece; on its own a prompt gets a chunk per turn
    assert all(f <= piece for f, d in zip(fed, decoded) if d) and max(fed) <= chunk
    # the long prompt took one turn per piece and every one of those turns stepped the running streams
    long_turns = [i for i, f in enumerate(fed) if f and i >= 2]
    assert len(long_turns) == -(-len(long_ids) // piece) and all(decoded[i] for i in long_turns)
    assert all(kind == "done" for kind in (out[k][-1] for k in out))
    # the same prompt alone is cut into the same pieces (its numbers do not depend on what else runs)
    alone, runner2 = _fake_engine(ref, 4, chunk, piece)
    turns2 = _turns(alone, runner2, [[_job(long_ids, 3, {})]])
    pieces = lambda calls: [n for kind, n in calls if kind == "feed"]  # noqa: E731
    with_streams = [n for calls in turns[2:] for n in pieces(calls)]
    assert pieces(runner2.calls) == with_streams == [piece] * 62 + [8]
    # with nothing else running, a chunk's worth a turn (64 = 4 pieces; 1000 = 15 x 64 + 40)
    assert [sum(pieces(calls)) for calls in turns2 if pieces(calls)] == [chunk] * 15 + [40]


def test_a_burst_of_short_prompts_is_admitted_several_a_turn_and_long_pieces_stay_bounded(ref):
    chunk, piece, admit = 64, 16, 40
    engine, runner = _fake_engine(ref, 12, chunk, piece, admit)
    out = {}
    long_ids = list(range(300, 300 + 100))
    burst = [_job([10 + i] * 10, 4, out) for i in range(8)]  # 8 prompts of 10 tokens: 4 a turn (40 tokens)
    turns = _turns(engine, runner, [[_job([5, 6, 7], 60, out)], [], burst + [_job(long_ids, 3, out)]])
    fed = [[n for kind, n in calls if kind == "feed"] for calls in turns]
    decoded = ["decode" in (kind for kind, _ in calls) for calls in turns]
    assert fed[2] == [10] * 4 and fed[3] == [10] * 4 and all(decoded[2:4])
    # then the long prompt: one piece a turn while the others decode, never joined by a short prompt
    assert all(f == [piece] for f in fed[4:4 + 100 // piece]) and fed[4 + 100 // piece] == [100 % piece]
    assert all(kind == "done" for kind in (out[k][-1] for k in out))
    # each burst prompt's text equals that prompt run alone (admission order changes nothing it computes)
    for i in range(8):
        alone_out = {}
        alone, _ = _fake_engine(ref, 12, chunk, piece)
        _turns(alone, _, [[_job([10 + i] * 10, 4, alone_out)]])
        assert alone_out[0] == out[i]  # the burst was made first: keys 0-7
    with pytest.raises(ValueError, match="admit_tokens"):
        _fake_engine(ref, 2, 64, 16, 0)


def test_engine_prefill_piece_setting(ref):
    engine, _ = _fake_engine(ref, 2, 64, 1000)
    assert engine.prefill_piece == 64  # never above the chunk
    with pytest.raises(ValueError, match="prefill_piece"):
        _fake_engine(ref, 2, 64, 0)


# -- SSE chunks ----------------------------------------------------------------------------------------
def _sse_events(body: str) -> list[dict]:
    lines = [ln[6:] for ln in body.split("\n\n") if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_coalesced_chunks_reassemble_to_the_same_text(monkeypatch):
    """Every text piece of a request arrives in one chunk (the mailbox held back until the engine is
    done, as when the event loop falls far behind): the text, finish_reason and usage are unchanged."""
    import httpx

    from mhla_stream.serve import app as app_module
    from mhla_stream.serve.hostbench import build_fake_server

    async def run(coalesce: bool):
        app = build_fake_server(max_batch=4, max_queue=8)  # a server's engine thread starts once
        if coalesce:
            async def wait_for_all(box, timeout):
                while not any(kind in ("done", "error") for kind, _ in box.items):
                    await asyncio.sleep(0.005)
                items, box.items = box.items, []
                return items
            monkeypatch.setattr(app_module.Mailbox, "wait", wait_for_all)
        results = {}
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                for path, body in (("/v1/completions", {"prompt": "Once upon a time", "max_tokens": 40}),
                                   ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                                                             "max_tokens": 40})):
                    body = {**body, "temperature": 0, "ignore_eos": True}
                    plain = (await client.post(path, json=body)).json()
                    streamed = (await client.post(path, json={**body, "stream": True,
                                                              "stream_options": {"include_usage": True}})).text
                    results[path] = (plain, _sse_events(streamed))
        monkeypatch.undo()
        return results

    per_token, coalesced = asyncio.run(run(False)), asyncio.run(run(True))
    for path, key in (("/v1/completions", "text"), ("/v1/chat/completions", "content")):
        for plain, events in (per_token[path], coalesced[path]):
            message = plain["choices"][0].get("message", plain["choices"][0])
            want = message.get("text", message.get("content"))
            pieces = [e["choices"][0].get(key, e["choices"][0].get("delta", {}).get(key)) for e in events
                      if e["choices"] and e["choices"][0]["finish_reason"] is None]
            assert "".join(p for p in pieces if p) == want and len(want) > 20
            assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
            assert events[-1]["usage"]["completion_tokens"] == 40 == plain["usage"]["completion_tokens"]
        text_chunks = [e for e in coalesced[path][1] if e["choices"] and e["choices"][0]["finish_reason"] is None
                       and (e["choices"][0].get("text") or e["choices"][0].get("delta", {}).get("content"))]
        assert len(text_chunks) == 1  # the whole reply in one chunk


# -- the harness ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_host_cost_harness_runs(tmp_path):
    """``serve_bench --fake-model`` starts the stand-in server, drives it and reports host figures."""
    import subprocess
    import sys
    out = tmp_path / "host.json"
    r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve_bench", "--fake-model", "--concurrency", "1,3",
                        "--rounds", "1", "--prompt-len", "8", "--max-tokens", "12", "--long-prompts", "1",
                        "--long-prompt-len", "600", "--long-streams", "2", "--client-procs", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["fake_model"] and [row["concurrency"] for row in data["serve"]] == [1, 3]
    for row in data["serve"]:
        assert row["requests"] == row["concurrency"] and row["output_tok_s"] > 0
        assert row["server_cpu_us_per_token"] >= 0 and row["client_cpu_us_per_token"] >= 0  # clock ticks: may be 0
    assert data["long_prompts"]["long_prompts"] == 1  # (the stand-in prefills at once: few ITL samples, if any)


def test_prefill_piece_option_rejects_bad_values():
    import subprocess
    import sys
    for bad in ("0", "-3", "x"):
        r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--prefill-piece", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--prefill-piece" in r.stderr, r.stderr[-500:]


def test_staggered_clients_start_spread_over_the_span():
    from mhla_stream.cli.serve_bench import _start_offsets
    shares = [3, 3, 2]  # 8 clients over 3 processes, as _concurrency_phase splits them
    offsets = _start_offsets(shares, 0.8)
    assert [len(o) for o in offsets] == shares
    flat = sorted(x for o in offsets for x in o)
    assert flat == pytest.approx([0.1 * n for n in range(8)])     # one start every 1/8 of the span
    assert _start_offsets([4], 0.0) == [[0.0] * 4]               # 0: all together, as before
    import subprocess
    import sys
    for bad in ("-1", "nan", "x"):
        r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve_bench", "--fake-model", "--stagger-ms", bad],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--stagger-ms" in r.stderr, (bad, r.stderr[-500:])
