"""Hostile cases for mhla-serve --http-process (real processes, the shipped model): one session hit by
concurrent requests, clients leaving while queued or before their first token, bodies of several MB,
prompts at and over --max-prompt-tokens, odd unicode, the API key on every /v1 route, listing while
sessions move to disk, SIGTERM with 16 streams, the HTTP child killed mid-request, restarts on the same
--sessions-dir and SIGINT twice. The module's servers run one after another on one sessions dir."""
from __future__ import annotations

import concurrent.futures as cf
import json
import os
import signal
import socket
import threading

import httpx
import pytest

from serve_util import Server

KEY = "k-attack"
AUTH = {"Authorization": f"Bearer {KEY}"}
LIMIT = 200
EXIT_WAIT_S = 120  # a bound on waiting for a process to go, not a timing assertion
LONG = {"max_tokens": 100000, "stream": True, "ignore_eos": True}


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.fixture(scope="module")
def sessions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("attack-sessions")


@pytest.fixture(scope="module")
def server(tmp_path_factory, sessions_dir):
    log = tmp_path_factory.mktemp("attack") / "a.log"
    # 4 slots and a queue of 12: 16 streams are 4 running and 12 queued; every session goes to disk
    s = Server("--http-process", "--max-batch", 4, "--max-queue", 12, "--max-prompt-tokens", LIMIT,
               "--api-key", KEY, "--sessions-dir", sessions_dir, "--session-memory", "1", log=log)
    s.log_path = log
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def post(server, body, path="/v1/completions", **kw):
    return httpx.post(server.base + path, headers=AUTH, json=body, timeout=120, **kw)


def complete(server, prompt, session=None, n=6):
    r = post(server, {"prompt": prompt, "max_tokens": n, "temperature": 0, **({"session": session} if session else {})})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def open_streams(server, bodies):
    """Streams held open (their first line read); returns (client, responses)."""
    client = httpx.Client(headers=AUTH, timeout=120)
    streams = []
    for body in bodies:
        r = client.send(client.build_request("POST", server.base + "/v1/completions", json=body), stream=True)
        streams.append(r)
    return client, streams


def raw_post(server, body) -> socket.socket:
    """A request sent on a raw socket, nothing read: a client that can leave at any moment."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: %d\r\n\r\n" % len(data) + data)
    return sock


def test_api_key_on_every_v1_route(server):
    routes = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
              ("GET", "/v1/sessions"), ("GET", "/v1/sessions/x"), ("DELETE", "/v1/sessions/x"), ("GET", "/v1/nope")]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Bearer {KEY}x"},
                    {"Authorization": f"Bearer {KEY[:-1]}"}, {"Authorization": "Basic " + KEY}):
        for method, path in routes:
            r = httpx.request(method, server.base + path, headers=headers, json={"prompt": "x"}, timeout=60)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", (method, path, headers)
    assert httpx.get(server.base + "/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200
    for path in ("/health", "/metrics"):
        assert httpx.get(server.base + path).status_code == 200


def test_the_key_is_compared_in_constant_time(monkeypatch):
    import asyncio
    import hmac

    from mhla_stream.serve import app as app_module
    seen, real = [], hmac.compare_digest
    monkeypatch.setattr(app_module.hmac, "compare_digest", lambda a, b: seen.append((a, b)) or real(a, b))
    counter = type("C", (), {"labels": lambda self, *a: self, "inc": lambda self: None})()
    mw = app_module.AuthAndCount(None, "sekrit", type("M", (), {"requests": counter})())
    sent = []

    async def send(message):
        sent.append(message)
    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", b"Bearer guess")]}
    asyncio.run(mw(scope, None, send))
    assert seen == [(b"guess", b"sekrit")] and sent[0]["status"] == 401


def test_bodies_of_several_mb_and_prompts_at_the_limit(server, ref):
    big = post(server, {"prompt": "word " * 1_000_000, "max_tokens": 1})  # 5 MB of text
    assert big.status_code == 400 and big.json()["error"]["code"] == "prompt_too_long"
    ids = post(server, {"prompt": [7] * 1_000_000, "max_tokens": 1})  # 3 MB of token ids
    assert ids.status_code == 400 and ids.json()["error"]["code"] == "prompt_too_long"
    chat = post(server, {"messages": [{"role": "user", "content": "x" * 4_000_000}]}, "/v1/chat/completions")
    assert chat.status_code == 400 and chat.json()["error"]["code"] == "prompt_too_long"
    assert post(server, {"prompt": [7] * LIMIT, "max_tokens": 1}).status_code == 200
    over = post(server, {"prompt": [7] * (LIMIT + 1), "max_tokens": 1})
    assert over.status_code == 400 and over.json()["error"]["code"] == "prompt_too_long"
    # a text prompt: its tokens plus BOS
    k = next(k for k in range(LIMIT, 0, -1) if len(ref.tokenizer.encode(" a" * k)) + 1 == LIMIT)
    assert post(server, {"prompt": " a" * k, "max_tokens": 1}).status_code == 200
    assert len(ref.tokenizer.encode(" a" * (k + 1))) + 1 > LIMIT
    assert post(server, {"prompt": " a" * (k + 1), "max_tokens": 1}).status_code == 400
    # on a session past position 0 no BOS is added: exactly LIMIT tokens pass (the engine checks)
    from test_serve_prompt_limit import check_prompt_limit
    check_prompt_limit(server, ref.tokenizer, LIMIT, AUTH)


def test_odd_unicode_is_a_400_or_served(server):
    lone = '{"prompt": "a\\ud800b", "max_tokens": 1}'  # valid JSON, not valid Unicode
    r = httpx.post(server.base + "/v1/completions", headers={**AUTH, "content-type": "application/json"},
                   content=lone, timeout=60)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"], r.text
    for extra in ({}, {"session": "odd-chat"}):
        body = '{"messages": [{"role": "user", "content": "hi \\udfff"}], "max_tokens": 1%s}' % (
            ', "session": "odd-chat"' if extra else "")
        r = httpx.post(server.base + "/v1/chat/completions", headers={**AUTH, "content-type": "application/json"},
                       content=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text
    r = httpx.post(server.base + "/v1/completions", headers={**AUTH, "content-type": "application/json"},
                   content='{"prompt": "x", "max_tokens": 1, "session": "s\\ud800"}', timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "session", r.text
    odd = "\u202e\u0301\U0001F600\x00\ufeff\u200b\U000E0001 \u0627\u0644"
    msgs = [{"role": "user", "content": odd}]
    r = post(server, {"messages": msgs, "max_tokens": 3, "temperature": 0, "session": "odd"}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    reply = r.json()["choices"][0]["message"]["content"]
    msgs += [{"role": "assistant", "content": reply}, {"role": "user", "content": odd * 3}]
    r = post(server, {"messages": msgs, "max_tokens": 3, "temperature": 0, "session": "odd"}, "/v1/chat/completions")
    assert r.status_code == 200, r.text
    huge = post(server, {"messages": [{"role": "user", "content": odd * 50_000}] * 4}, "/v1/chat/completions")
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "prompt_too_long"
    assert server.health()["status"] == "ok"


def test_concurrent_requests_on_one_session(server, ref):
    prompts = ["Once upon a time", "The dog ran", "Tom had a ball.", "She said hello"]
    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda p: post(server, {"prompt": p, "max_tokens": 6, "temperature": 0,
                                                        "session": "shared"}), prompts))
    assert all(r.status_code in (200, 409) for r in results), [r.text for r in results]
    won = sorted((r.json()["session"]["position"], p, r.json()["choices"][0]["text"])
                 for p, r in zip(prompts, results) if r.status_code == 200)
    assert won and all(r.json()["error"]["code"] == "session_busy" for r in results if r.status_code == 409)
    ref.reset()
    for position, prompt, text in won:  # the successes, in the order they ran, equal one stream
        assert ref.generate(prompt, max_new_tokens=6, temperature=0) == text and ref.position == position
    assert complete(server, " And then", "shared") == ref.generate(" And then", max_new_tokens=6, temperature=0)


def test_clients_leaving_while_queued_or_before_their_first_token(server):
    client, running = open_streams(server, [{"prompt": f"Tale {i}", **LONG} for i in range(4)])
    try:
        server.wait_until(lambda h: h["running"] == 4)
        # a queued streaming client (its headers come with its first event: a raw socket) and plain ones,
        # then the queue is full: 429
        left = raw_post(server, {"prompt": "q", **LONG, "session": "left-queued"})
        with cf.ThreadPoolExecutor(11) as pool:
            plain = [pool.submit(post, server, {"prompt": "p", "max_tokens": 1}) for _ in range(11)]
            server.wait_until(lambda h: h["queued"] == 12)
            full = post(server, {"prompt": "x", "max_tokens": 1})
            assert full.status_code == 429 and full.headers["retry-after"] == "1"
            left.close()
            server.wait_until(lambda h: h["queued"] == 11)  # the engine dropped the one that left
            for r in running:
                r.close()
            assert all(f.result().status_code == 200 for f in plain)
        server.wait_until(lambda h: h["running"] == 0 and h["queued"] == 0 and h["free_slots"] == 4)
        # the session of the client that left is free and was never created
        assert httpx.get(server.base + "/v1/sessions/left-queued", headers=AUTH).status_code == 404
        complete(server, "q", "left-queued", n=1)
        # a client gone before its first token (its prompt is being prefilled): the slot comes back
        raw_post(server, {"prompt": [9] * LIMIT, **LONG, "session": "left-early"}).close()
        server.wait_until(lambda h: h["running"] == 0 and h["queued"] == 0 and h["free_slots"] == 4)
        assert httpx.get(server.base + "/v1/sessions/left-early", headers=AUTH).status_code == 404
    finally:
        client.close()


def test_listing_while_sessions_move_to_disk(server):
    stop, listings, errors = threading.Event(), [], []

    def lister():
        while not stop.is_set():
            r = httpx.get(server.base + "/v1/sessions", headers=AUTH, timeout=60)
            (listings if r.status_code == 200 else errors).append(r.json())
    watcher = threading.Thread(target=lister)
    watcher.start()
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: complete(server, f"Story {i}", f"evict-{i}", n=2), range(10)))
    finally:
        stop.set()
        watcher.join()
    assert not errors and listings
    final = {s["id"]: s for s in httpx.get(server.base + "/v1/sessions", headers=AUTH).json()["data"]}
    assert all(final[f"evict-{i}"]["tier"] == "disk" and final[f"evict-{i}"]["position"] > 0 for i in range(10))
    for listing in listings:  # every listed session was whole: a tier and a position
        assert all(s["tier"] in ("host", "disk") and s["position"] > 0 for s in listing["data"])


def test_health_and_metrics_while_busy(server):
    client, streams = open_streams(server, [{"prompt": f"Busy {i}", **LONG} for i in range(4)])
    try:
        server.wait_until(lambda h: h["running"] == 4)
        for _ in range(5):
            assert server.health()["running"] == 4
            assert "mhla_running_sequences 4.0" in httpx.get(server.base + "/metrics", timeout=60).text
    finally:
        for s in streams:
            s.close()
        client.close()
    server.wait_until(lambda h: h["running"] == 0)


def test_sigterm_with_16_streams(tmp_path):
    """16 streams on sessions (4 running, 12 queued) through the HTTP child, then SIGTERM: the engine's
    grace starts with the child's shutdown, so each running stream ends with the shutdown error and
    [DONE], each queued request gets a 503, sessions stay as they were and are on disk, both processes
    exit (0). Its own server: the module's one is needed after it. (Was: cut streams, 500s.)"""
    from test_serve_shutdown import sigterm_with_16_session_streams
    log, sessions = tmp_path / "t.log", tmp_path / "sessions"
    s = Server("--http-process", "--max-batch", 4, "--max-queue", 12, "--api-key", KEY, "--sessions-dir", sessions,
               "--session-memory", "1", log=log)
    s.log_path = log
    try:
        child = child_pids(s.proc.pid)[0]
        sigterm_with_16_session_streams(s, sessions, AUTH)
        assert gone(child)
    finally:
        s.terminate()


def test_restart_continue_kill_the_child_restart_sigint_twice(server, sessions_dir, ref, tmp_path):
    """Last in the module: two sessions, the module's server stopped; a restart continues one; the child
    killed while a request runs on the other leaves it as it was; a second restart continues it; SIGINT twice."""
    for i in range(2):
        complete(server, f"Hello {i}", f"term-{i}", n=1)
    assert server.terminate() == 0
    ref.reset()
    ref.generate("Hello 0", max_new_tokens=1, temperature=0)
    want = ref.generate(" then", max_new_tokens=6, temperature=0)
    s = Server("--http-process", "--api-key", KEY, "--sessions-dir", sessions_dir, log=tmp_path / "b.log")
    try:
        assert complete(s, " then", "term-0") == want
        before = httpx.get(s.base + "/v1/sessions/term-1", headers=AUTH).json()["position"]
        client, streams = open_streams(s, [{"prompt": " more", **LONG, "session": "term-1"}])
        next(streams[0].iter_lines())
        os.kill(child_pids(s.proc.pid)[0], signal.SIGKILL)
        assert s.proc.wait(timeout=EXIT_WAIT_S) == 1
        client.close()
    finally:
        s.terminate()
    s = Server("--http-process", "--api-key", KEY, "--sessions-dir", sessions_dir, log=tmp_path / "c.log")
    try:
        assert httpx.get(s.base + "/v1/sessions/term-1", headers=AUTH).json()["position"] == before
        ref.reset()
        ref.generate("Hello 1", max_new_tokens=1, temperature=0)
        assert complete(s, " then", "term-1") == ref.generate(" then", max_new_tokens=6, temperature=0)
        child = child_pids(s.proc.pid)[0]
        s.proc.send_signal(signal.SIGINT)
        s.proc.send_signal(signal.SIGINT)
        assert s.proc.wait(timeout=EXIT_WAIT_S) == 0
        assert gone(child)
    finally:
        s.terminate()
