"""mhla-serve's SIGTERM path (serve/shutdown.py): the engine's stop lets requests finish for the grace,
then ends every one left with a 503 as its last event (no stream cut, no 500), sessions keep the state
from before an ended request, several callers of ``stop`` wait for one stop; the HTTP process's
shutdown starts the engine's grace ("draining", also when only the HTTP process gets SIGTERM); and a
real one-process server with 16 session streams (4 running, 12 queued) ends each properly and exits 0
(the two-process case is in test_attack_http.py)."""
from __future__ import annotations

import concurrent.futures as cf
import json
import multiprocessing
import os
import signal
import threading

import httpx
import pytest

from mhla_stream.serve.shutdown import SHUTDOWN_GRACE_S
from test_attack_run_ahead import Out, _idle
from test_serve_runner import _drive, _engine

LONG = 100000
EXIT_WAIT_S = 120  # a bound on waiting for a process to go, not a timing assertion


@pytest.fixture(scope="module")
def ref():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained()


def _started(job):
    """An Event set at the job's first text piece."""
    seen, emit = threading.Event(), job.emit
    job.emit = lambda kind, payload: (emit(kind, payload), kind == "text" and seen.set())
    return seen


def _assert_shutdown_error(out, k):
    err = out.error(k)
    assert err.status == 503 and err.code == "shutting_down" and err.headers.get("Retry-After") == "1"


def test_stop_ends_running_and_queued_requests_with_a_503_and_keeps_sessions(ref):
    out = Out(ref.tokenizer)
    engine = _engine(ref, 2, 32)
    _drive(engine, [[out.job("Once upon a time", 3, session="s")]])  # session "s" exists, idle
    before = engine.store.describe("s")[0]["position"]
    running = [out.job("The dog ran", LONG, stop_at_eos=False),
               out.job(" and then", LONG, session="s", bos=False, stop_at_eos=False)]
    seen = [_started(job) for job in running]
    queued = [out.job("Tom had a ball", 5, session="q"), out.job("She said", 5)]
    engine.start()
    for job in running + queued:
        engine.submit(job)
    assert all(s.wait(120) for s in seen)
    assert len(engine.waiting) == 2  # both slots hold endless streams: the others wait
    with cf.ThreadPoolExecutor(2) as pool:  # SIGTERM's stop and the app's shutdown, at once
        stops = [pool.submit(engine.stop, 0.2), pool.submit(engine.stop)]
        [f.result(timeout=EXIT_WAIT_S) for f in stops]
    assert not engine.thread.is_alive()
    _idle(engine, 2)
    for k in (1, 2):  # running: text, then the error as the last event (a stream ends with it and [DONE])
        assert out.events[k][0][0] == "start" and isinstance(out.events[k][1], str)
        _assert_shutdown_error(out, k)
    for k in (3, 4):  # queued: the error is all they hear
        assert len(out.events[k]) == 1
        _assert_shutdown_error(out, k)
    assert engine.store.describe("s")[0] == {"id": "s", "object": "session", "position": before, "busy": False,
                                             "tier": "host"}
    assert "q" not in engine.store._entries  # its first request never ran: nothing kept, not busy
    with pytest.raises(Exception, match="shutting down") as e:
        engine.submit(out.job("late", 3))
    assert e.value.status == 503


def test_stop_lets_requests_finish_within_the_grace(ref):
    out = Out(ref.tokenizer)
    engine = _engine(ref, 1, 32)
    jobs = [out.job("Once upon a time", 6), out.job("The dog ran", 6, session="y")]
    engine.start()
    for job in jobs:
        engine.submit(job)
    engine.stop(grace_s=600)  # returns as soon as nothing is left (the grace is only a bound)
    assert out.done(0)["finish_reason"] == "length" and out.done(1)["completion_tokens"] == 6
    assert engine.store.describe("y")[0]["position"] == out.done(1)["position"] > 6
    _idle(engine, 1)


def test_stop_before_start_and_twice_returns():
    from mhla_stream.serve.engine import Engine
    engine = Engine.__new__(Engine)  # only what stop needs: no model
    engine._cv, engine._stop_begun, engine._stopped = threading.Condition(), False, threading.Event()
    engine.seqs, engine.waiting, engine._accepting, engine._stopping = {}, [], True, False
    engine.thread = threading.Thread(target=lambda: None)
    engine.stop(0)
    engine.stop(0)
    assert engine._stopped.is_set() and not engine._accepting


class _StoppableEngine:
    def __init__(self):
        self.stops = []
        self.stopped = threading.Event()

    def stop(self, grace_s=SHUTDOWN_GRACE_S):
        self.stops.append(grace_s)
        self.stopped.set()


def test_the_http_process_draining_starts_the_engines_grace_once():
    from mhla_stream.serve.bridge import EngineBridge
    from mhla_stream.serve.ipc import Channel
    ours, theirs = multiprocessing.Pipe()
    engine = _StoppableEngine()
    bridge = EngineBridge(Channel(ours), engine, None, None)
    bridge.start()
    theirs.send(("draining",))
    theirs.send(("draining",))
    theirs.send(("draining", "extra"))  # malformed: ignored
    theirs.close()
    bridge.thread.join(10)
    assert engine.stopped.wait(10)
    bridge.stopper.join(10)
    assert engine.stops == [SHUTDOWN_GRACE_S]


def _stream_outcome(server, body, headers=None):
    """("done", finish) / ("error", code) for a stream that ended with [DONE], (status, code) for a
    request refused before its stream began; a stream cut without its end raises."""
    with httpx.stream("POST", server.base + "/v1/completions", json=body, headers=headers, timeout=120) as r:
        if r.status_code != 200:
            r.read()
            return r.status_code, r.json()["error"]["code"]
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    if "error" in chunks[-1]:
        return "error", chunks[-1]["error"]["code"]
    return "done", next(c["choices"][0]["finish_reason"] for c in chunks
                        if c.get("choices") and c["choices"][0].get("finish_reason"))


def sigterm_with_16_session_streams(server, sessions_dir, headers=None):
    """4 endless streams running, 12 queued, every one on a session; SIGTERM: each running stream ends
    with the shutdown error and [DONE], each queued request gets a 503, the process exits 0, every
    session is on disk at the position it had before (their requests were ended, not half-kept)."""
    from mhla_stream.serve.sessions import file_name
    positions = {}
    for i in range(16):
        r = httpx.post(server.base + "/v1/completions", headers=headers, timeout=120,
                       json={"prompt": f"Hello {i}", "max_tokens": 1, "temperature": 0, "session": f"term-{i}"})
        assert r.status_code == 200, r.text
        positions[f"term-{i}"] = r.json()["session"]["position"]
    endless = {"prompt": " more", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    with cf.ThreadPoolExecutor(16) as pool:
        running = [pool.submit(_stream_outcome, server, {**endless, "session": f"term-{i}"}, headers) for i in range(4)]
        server.wait_until(lambda h: h["running"] == 4)  # then the queue: never more than 12 waiting (no 429)
        queued = [pool.submit(_stream_outcome, server, {**endless, "max_tokens": 4, "session": f"term-{i}"}, headers)
                  for i in range(4, 16)]
        server.wait_until(lambda h: h["running"] == 4 and h["queued"] == 12)
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=EXIT_WAIT_S) == 0, server.log_path.read_text()[-3000:]
        assert [f.result() for f in running] == [("error", "shutting_down")] * 4
        assert [f.result() for f in queued] == [(503, "shutting_down")] * 12
    on_disk = set(os.listdir(sessions_dir))
    assert all(file_name(sid) in on_disk for sid in positions)
    return positions


def test_sigterm_with_16_session_streams_in_one_process(tmp_path, ref):
    from serve_util import Server
    log, sessions = tmp_path / "a.log", tmp_path / "sessions"
    s = Server("--no-http-process", "--max-batch", 4, "--max-queue", 12, "--sessions-dir", sessions, log=log)
    s.log_path = log
    try:
        positions = sigterm_with_16_session_streams(s, sessions)
    finally:
        s.terminate()
    # a restart finds every session where it was before the ended requests
    s = Server("--no-http-process", "--sessions-dir", sessions, log=tmp_path / "b.log")
    try:
        listed = {x["id"]: x["position"] for x in httpx.get(s.base + "/v1/sessions").json()["data"]}
        assert listed == positions
    finally:
        assert s.terminate() == 0


def test_sigterm_to_the_http_process_alone_drains_through_the_engine(tmp_path):
    """The child's own shutdown tells the engine process ("draining"): the open stream ends with the
    shutdown error and [DONE] instead of being cut at uvicorn's drain timeout; both processes exit 0."""
    from serve_util import Server
    from test_attack_http import child_pids, gone
    s = Server("--http-process", "--max-batch", 2, log=tmp_path / "c.log")
    try:
        child = child_pids(s.proc.pid)[0]
        with cf.ThreadPoolExecutor(1) as pool:
            stream = pool.submit(_stream_outcome, s, {"prompt": "Hi", "max_tokens": LONG, "stream": True,
                                                      "ignore_eos": True})
            s.wait_until(lambda h: h["running"] == 1)
            os.kill(child, signal.SIGTERM)
            assert s.proc.wait(timeout=EXIT_WAIT_S) == 0, (tmp_path / "c.log").read_text()[-3000:]
            assert stream.result() == ("error", "shutting_down")
        assert gone(child)
    finally:
        s.terminate()
