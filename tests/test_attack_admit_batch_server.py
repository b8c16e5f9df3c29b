"""--admit-batch against one real ``mhla-serve --admit-batch 4 --max-batch 6 --http-process`` process
(CPU, shipped model, fault injection on): a load test of 100 requests 16 at a time, prompts of 1 to 300
tokens (batched ones and pieced ones), some clients leaving after their first chunk and some requests
with an injected fault: no other request fails and every greedy text equals that request run alone
(one StreamingMHLA); then SIGTERM while a burst of session requests is being admitted: exit 0, and
every session that finished is on disk at the position its response gave."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import random
import signal

import httpx
import pytest

from serve_util import Server

PIECE, SLOTS = 32, 6


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("admit-batch-server")
    srv = Server("--admit-batch", "4", "--max-batch", SLOTS, "--prefill-piece", PIECE, "--http-process",
                 "--sessions-dir", d / "sessions", env={"MHLA_SERVE_FAULT_INJECTION": "1"})
    yield srv, d / "sessions"
    srv.terminate()


def _leave_after_first_chunk(base, ids):
    with httpx.stream("POST", base + "/v1/completions", timeout=120,
                      json={"prompt": ids, "max_tokens": 8, "temperature": 0, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                return "left"
    return "left"


@pytest.mark.slow
def test_load_mixed_lengths_each_equal_alone(ref, server):
    from mhla_stream.serve.engine import FAULT_MARK
    srv, _ = server
    words = ref.tokenizer.encode(open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()[:6000])
    rng = random.Random(12)
    requests = []
    for i in range(100):
        n = rng.choice([1, 2, 5, 9, PIECE - 1, PIECE, PIECE + 1, 40, rng.randint(1, 300), 300])
        start = rng.randint(0, len(words) - n)
        kind = "fault" if i in (17, 61) else "leave" if i % 10 == 3 else "greedy"
        requests.append((kind, words[start:start + n]))

    def send(item):
        kind, ids = item
        if kind == "leave":
            return _leave_after_first_chunk(srv.base, ids)
        prompt = f"Once upon a time {FAULT_MARK}" if kind == "fault" else ids
        r = httpx.post(srv.base + "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "temperature": 0},
                       timeout=300)
        return r.status_code, (r.json()["choices"][0]["text"] if r.status_code == 200 else r.json()["error"]["code"])
    with cf.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(send, requests))
    for (kind, ids), result in zip(requests, got):
        if kind == "fault":
            # the injected fault fires after the first token: a stream already started fails with 500
            assert result == (500, "engine_error"), result
        elif kind == "greedy":
            ref.reset()
            want = "".join(ref.stream(ids, max_new_tokens=2, temperature=0))
            assert result == (200, want), (len(ids), result, want)
    h = srv.wait_until(lambda h: h["running"] == 0 and h["queued"] == 0)
    assert h["free_slots"] == SLOTS


def test_sigterm_while_session_burst_is_admitted_exits_0_and_flushes(server):
    """Runs last in this module: it stops the server."""
    from safetensors import safe_open

    from mhla_stream.serve.sessions import file_name
    srv, sessions = server
    results: dict[str, object] = {}

    def ask(sid):
        try:
            r = httpx.post(srv.base + "/v1/completions", timeout=120,
                           json={"prompt": f"The story of {sid} begins", "max_tokens": 12, "temperature": 0,
                                 "session": sid})
            results[sid] = ("done", r.json()["session"]["position"]) if r.status_code == 200 else r.status_code
        except httpx.HTTPError as e:  # cut by the shutdown: allowed
            results[sid] = type(e).__name__
    with cf.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, f"s{i}") for i in range(8)]
        srv.wait_until(lambda h: h["running"] + h["queued"] > 0, delay=0.02)
        srv.proc.send_signal(signal.SIGTERM)
        for f in futures:
            f.result()
    assert srv.proc.wait(timeout=120) == 0
    finished = {sid: r[1] for sid, r in results.items() if isinstance(r, tuple)}
    for sid, position in finished.items():
        path = os.path.join(str(sessions), file_name(sid))
        assert os.path.exists(path), sid
        with safe_open(path, framework="pt") as f:
            assert int(f.metadata()["position"]) == position, sid
