"""mhla-serve --http-process: the HTTP app in a child process, the engine in the main one. Real processes
and the official openai client: the same answers as the in-process server (whose tests compare it with
one StreamingMHLA), sessions through the child, disconnects, errors, metrics, SIGTERM, either process
killed; plus the wire's hostile cases (ipc.py) on a real pipe, in this process."""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import signal
import time
import types

import httpx
import pytest

from serve_util import Server

openai = pytest.importorskip("openai")

KEY = "k-http-process"
MODEL = "mhla-stories-17m"
PROMPTS = ["Once upon a time", "The little dog ran to the park and", "Tom had a red ball.", "She said hello",
           "One day, a cat", "The sun was hot", "Lily and Ben went", "There was a big tree"]
AUTH = {"Authorization": f"Bearer {KEY}"}
EXIT_WAIT_S = 60  # a bound on waiting for a process to go, not a timing assertion


@pytest.fixture(scope="module")
def sessions_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("sessions")


@pytest.fixture(scope="module")
def server(tmp_path_factory, sessions_dir):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    s = Server("--http-process", "--max-batch", 8, "--max-prompt-tokens", 200, "--api-key", KEY,
               "--sessions-dir", sessions_dir, log=log)
    s.log_path = log
    yield s
    s.terminate()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def complete(client, prompt, n=8, **extra):
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, temperature=0, extra_body=extra or None)
    return r.choices[0].text


def child_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        pids = [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in open(f"/proc/{p}/cmdline", "rb").read()]


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has exited
    except OSError:
        return True


def test_two_processes_and_the_announced_url(server):
    assert len(child_pids(server.proc.pid)) == 1
    assert f"http://127.0.0.1:{server.port}/v1" in server.log_path.read_text()


def test_completions_and_chat_equal_one_stream(client, ref):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0)
    ref.reset()
    assert r.choices[0].text == ref.generate("Once upon a time", max_new_tokens=12, temperature=0)
    assert r.usage.completion_tokens == 12 and r.choices[0].finish_reason == "length"
    chunks = list(client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    from mhla_stream.serve.schemas import PLAIN_CHAT_STOP, render_plain_chat
    msgs = [{"role": "user", "content": "Tell me a story about a fox."}]
    chat = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0)
    ref.reset()
    assert chat.choices[0].message.content == ref.generate(render_plain_chat(msgs, False), max_new_tokens=10,
                                                           temperature=0, stop=[PLAIN_CHAT_STOP])
    streamed = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_16_concurrent_equal_sequential(client):
    prompts = (PROMPTS * 2)[:16]
    alone = [complete(client, p) for p in prompts]
    with cf.ThreadPoolExecutor(16) as pool:
        assert list(pool.map(lambda p: complete(client, p), prompts)) == alone


def test_sessions_through_the_child(server, client, ref):
    ref.reset()
    want = [ref.generate("Once upon a time", max_new_tokens=8, temperature=0)]
    snap = ref.snapshot()
    want.append(ref.generate(" Then the dog", max_new_tokens=8, temperature=0))
    assert [complete(client, p, session="s1") for p in ("Once upon a time", " Then the dog")] == want
    ids = [s["id"] for s in client.get("/sessions", cast_to=object)["data"]]
    assert "s1" in ids
    got = httpx.get(server.base + "/v1/sessions/s1", headers=AUTH).json()
    assert got["position"] == ref.position
    # a fork of s1 continues from s1's state; s1 stays as it was
    complete(client, "Once upon a time", session="base")
    ref.restore(snap)
    assert complete(client, " Then the dog", session="fork", fork_from="base") == want[1]
    assert httpx.post(server.base + "/v1/completions", headers=AUTH,
                      json={"prompt": "x", "session": "fork", "fork_from": "base"}).status_code == 409
    assert httpx.delete(server.base + "/v1/sessions/fork", headers=AUTH).status_code == 200
    r = httpx.delete(server.base + "/v1/sessions/fork", headers=AUTH)
    assert r.status_code == 404 and r.json()["error"]["code"] == "session_not_found"
    assert httpx.get(server.base + "/v1/sessions/a%00b", headers=AUTH).status_code == 400


def test_disconnect_mid_stream_frees_the_slot(server, client):
    streams = [client.completions.create(model=MODEL, prompt=p, max_tokens=5000, temperature=0, stream=True,
                                         extra_body={"ignore_eos": True}) for p in PROMPTS]  # every slot
    for s in streams:
        next(iter(s))
        s.close()
    server.wait_until(lambda h: h["running"] == 0 and h["free_slots"] == 8)
    assert complete(client, "Once upon a time", n=2)


def test_errors_as_in_process(server):
    r = httpx.post(server.base + "/v1/completions", headers=AUTH, json={"prompt": "x", "temperature": 3})
    assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    r = httpx.post(server.base + "/v1/completions", headers=AUTH, json={"prompt": "word " * 400})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    r = httpx.post(server.base + "/v1/chat/completions", headers=AUTH,  # too long only once rendered in the child
                   json={"messages": [{"role": "user", "content": "word " * 400}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "prompt_too_long"
    r = httpx.post(server.base + "/v1/completions", json={"prompt": "x"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(server.base + "/v1/completions", headers=AUTH, content=b"{bad", timeout=60)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_metrics_have_both_processes_families_once(server, client):
    complete(client, "Hi", n=2)
    text = httpx.get(server.base + "/metrics").text
    for name in ("mhla_requests_total{", "mhla_prompt_tokens_total", "mhla_generated_tokens_total",
                 "mhla_running_sequences", "mhla_time_to_first_token_seconds_bucket", 'mhla_sessions{tier="host"}'):
        assert name in text
    types = [line for line in text.splitlines() if line.startswith("# TYPE ")]
    assert len(types) == len(set(types))  # no family twice


def test_sigterm_ends_streams_flushes_sessions_exits_0(server, client, sessions_dir):
    """Last on the module's server: a stream in flight on a session, then SIGTERM."""
    from mhla_stream.serve.sessions import file_name
    complete(client, "Hello", session="kept")
    body = {"prompt": "Hi", "max_tokens": 100000, "stream": True, "ignore_eos": True, "session": "in-flight"}
    child = child_pids(server.proc.pid)[0]
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=AUTH, timeout=120) as r:
        next(r.iter_lines())
        assert server.terminate() == 0, server.log_path.read_text()[-3000:]
    assert gone(child)
    assert file_name("kept") in os.listdir(sessions_dir)


def test_killed_http_process_stops_the_engine(tmp_path):
    """kill -9 of the child: the main process says so in one line and exits non-zero; before that, a full
    queue answers 429 through the child."""
    s = Server("--http-process", "--max-batch", 1, "--max-queue", 1, log=tmp_path / "a.log")
    try:
        body = {"prompt": "Hi", "max_tokens": 100000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            with cf.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(httpx.post, s.base + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                                      timeout=120)
                s.wait_until(lambda h: h["queued"] == 1)
                full = httpx.post(s.base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=120)
                assert full.status_code == 429 and full.headers["retry-after"] == "1"
                assert full.json()["error"]["code"] == "queue_full"
                os.kill(child_pids(s.proc.pid)[0], signal.SIGKILL)
                assert s.proc.wait(timeout=EXIT_WAIT_S) == 1
                with pytest.raises(httpx.HTTPError):
                    waiting.result()
    finally:
        s.terminate()
    assert "the HTTP process exited while serving (status -9)" in (tmp_path / "a.log").read_text()


def test_killed_engine_process_ends_the_http_process(tmp_path):
    s = Server("--http-process", log=tmp_path / "b.log")
    child = child_pids(s.proc.pid)[0]
    s.proc.kill()
    s.proc.wait()
    deadline = time.monotonic() + EXIT_WAIT_S
    while not gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert gone(child)
    assert "the engine process is gone" in (tmp_path / "b.log").read_text()


# -- the wire's hostile cases, on a real pipe ------------------------------------------------------------
class _FakeEngine:
    def __init__(self):
        self.jobs, self.free, self.tokenizer = [], [0, 1], None
        self.model = types.SimpleNamespace(config=types.SimpleNamespace(vocab_size=100))

    def submit(self, job):
        self.jobs.append(job)

    def counts(self):
        return len(self.jobs), 0


class _FakeStore:
    def describe(self, sid=None):
        return [{"id": sid or "all"}]

    def delete(self, sid):
        from mhla_stream.serve.sessions import SessionMissing
        raise SessionMissing(f"no session {sid!r}")


def _recv(conn):
    assert conn.poll(60), "no answer from the bridge"  # a bound, so a lost answer fails instead of hanging
    return conn.recv()


def test_engine_side_ignores_malformed_messages(caplog):
    from mhla_stream.sampling import SamplingParams
    from mhla_stream.serve.bridge import EngineBridge
    from mhla_stream.serve.ipc import Channel
    from mhla_stream.serve.sessions import SessionMissing
    ours, theirs = multiprocessing.Pipe()
    engine = _FakeEngine()
    bridge = EngineBridge(Channel(ours), engine, _FakeStore(), None)
    bridge.start()
    for junk in (42, (), ("nope",), ("submit",), ("submit", "x", {}), ("cancel", [1]), ("call", 1, "rm -rf", ()),
                 ("call", 1, "describe", "not a tuple"), ("listening", 1), ("submit", 7, {"params": "greedy"}),
                 ("submit", 9, {"params": SamplingParams(), "ids": [1, 100]}),
                 ("submit", 10, {"params": SamplingParams(), "ids": [1, "2"]})):
        theirs.send(junk)
    theirs.send_bytes(b"\x80\x04not a pickle")
    for rid in (7, 9, 10):  # bad fields: the request gets an error, the bridge lives
        reply = _recv(theirs)
        assert reply[0] == "events" and reply[1][0][0] == rid and reply[1][0][1][1].status == 500
    theirs.send(("call", 2, "describe", ("a",)))
    assert _recv(theirs) == ("reply", 2, True, [{"id": "a"}])
    theirs.send(("call", 3, "delete", ("a",)))
    kind, call_id, ok, err = _recv(theirs)
    assert (call_id, ok) == (3, False) and isinstance(err, SessionMissing)
    theirs.send(("submit", 8, {"params": SamplingParams(temperature=0), "ids": [1, 2], "add_bos": True}))
    theirs.send(("cancel", 8))
    theirs.send(("call", 4, "counts", ()))
    assert _recv(theirs) == ("reply", 4, True, (1, 0, 2))
    assert engine.jobs[0].ids == [1, 2] and engine.jobs[0].cancelled.is_set()
    assert sum("malformed" in r.message or "unreadable" in r.message for r in caplog.records) >= 12
    theirs.close()
    bridge.thread.join(10)
    assert bridge.gone.is_set()


def test_http_side_ignores_malformed_events():
    import asyncio

    from mhla_stream.serve.app import Mailbox
    from mhla_stream.serve.http_child import Link
    from mhla_stream.serve.ipc import Channel
    from mhla_stream.serve.schemas import APIError

    async def run():
        ours, theirs = multiprocessing.Pipe()
        link = Link(Channel(ours))
        link.loop = asyncio.get_running_loop()
        link.start()
        box = Mailbox(link.loop)
        link.boxes[5] = box
        theirs.send_bytes(b"garbage")
        for junk in ("x", ("events",), ("events", "notalist"), ("reply", 99, True, 1), ("events", [1, (5,), (5, 6)]),
                     ("events", [(5, ("text", 3)), (5, ("error", "not an APIError")), (5, ("weird", 1))])):
            theirs.send(junk)
        theirs.send(("events", [(5, ("start", {"prompt_tokens": 1, "position": 0})), (5, ("text", "ok")),
                                (6, ("text", "for nobody")), (5, ("error", APIError(429, "full")))]))
        events = []
        while not any(k == "error" for k, _ in events):
            events += await box.wait(5)
        assert [k for k, _ in events] == ["start", "text", "error"] and events[-1][1].status == 429
        assert 5 not in link.boxes  # closed by its error event
        theirs.close()  # the engine process is gone: waiting calls fail, open requests get a 503
        link.boxes[9] = box2 = Mailbox(link.loop)
        link.thread.join(10)
        late = await box2.wait(5)
        assert late[0][0] == "error" and late[0][1].status == 503
    asyncio.run(run())


def test_the_http_side_imports_no_model_code():
    import subprocess
    import sys
    code = ("import sys, mhla_stream.serve.http_child as h, mhla_stream.serve.app; "
            "bad = [m for m in ('mhla_stream.modeling', 'mhla_stream.serve.runner', 'mhla_stream.serve.engine') "
            "if m in sys.modules]; assert not bad, bad")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def test_port_in_use_fails_with_a_line(tmp_path):
    import socket
    import subprocess
    import sys
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--http-process", "--port",
                            str(taken.getsockname()[1])], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "address already in use" in r.stderr
    assert "the HTTP process stopped before it was listening" in r.stderr
