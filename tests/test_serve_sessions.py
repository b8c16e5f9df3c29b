"""mhla-serve sessions across tiers and restarts, a full queue, and SIGTERM; plus the session store alone."""
from __future__ import annotations

import concurrent.futures as cf
import os

import httpx
import pytest

from serve_util import Server

pytest.importorskip("openai")


def complete(server, prompt, n=8, **extra):
    r = httpx.post(server.base + "/v1/completions", json={"prompt": prompt, "max_tokens": n, "temperature": 0, **extra},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_disk_tier_restart_queue_full_and_sigterm(tmp_path):
    from mhla_stream import StreamingMHLA
    from mhla_stream.serve.sessions import file_name
    d = tmp_path / "sessions"
    args = ("--max-batch", 1, "--max-queue", 1, "--session-memory", "1", "--sessions-dir", d)  # 1 byte: all to disk
    s = Server(*args, log=tmp_path / "a.log")
    try:
        first = complete(s, "Once upon a time", session="persist")
        info = httpx.get(s.base + "/v1/sessions/persist").json()
        assert info["tier"] == "disk" and os.listdir(d) == [file_name("persist")]
        # one long stream holds the only slot, one request waits, the next is refused with Retry-After
        body = {"prompt": "Hi", "max_tokens": 100000, "stream": True, "ignore_eos": True}
        with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()  # kept: a dropped line iterator closes the response
            next(lines)
            with cf.ThreadPoolExecutor(1) as pool:
                waiting = pool.submit(complete, s, "The sun", 2)
                s.wait_until(lambda h: h["queued"] == 1)
                full = httpx.post(s.base + "/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=120)
                assert full.status_code == 429 and full.headers["retry-after"]
                assert full.json()["error"]["code"] == "queue_full"
                r.close()  # the stream's client leaves: its slot goes to the waiting request
                assert waiting.result()
    finally:
        assert s.terminate() == 0, (tmp_path / "a.log").read_text()[-3000:]
    # a restart finds the session on disk and continues it exactly like one stream
    s = Server(*args, log=tmp_path / "b.log")
    try:
        assert httpx.get(s.base + "/v1/sessions").json()["data"][0]["id"] == "persist"
        second = complete(s, " Then the dog", session="persist")
        ref = StreamingMHLA.from_pretrained()
        assert [first, second] == [ref.generate("Once upon a time", max_new_tokens=8, temperature=0),
                                   ref.generate(" Then the dog", max_new_tokens=8, temperature=0)]
        # SIGTERM with a stream in flight: the stream ends, sessions are on disk, the exit status is 0
        body = {"prompt": "Hi", "max_tokens": 100000, "stream": True, "ignore_eos": True, "session": "in-flight"}
        with httpx.stream("POST", s.base + "/v1/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()
            next(lines)
            assert s.terminate() == 0, (tmp_path / "b.log").read_text()[-3000:]
    finally:
        s.terminate()
    # the session file is the state-file format: a StreamingMHLA loads it and is where the server left it
    stream = StreamingMHLA.from_pretrained()
    stream.load_state(d / file_name("persist"))
    assert stream.position == ref.position


def test_store_names_files_by_hash_and_skips_damaged_files(tmp_path):
    import torch

    from mhla_stream.serve.sessions import SessionData, SessionStore, file_name
    from mhla_stream.state_io import StateLayout
    layout = StateLayout({"layers.0.pos": ((1,), torch.long)}, 1, 10, "window", "fp")
    for sid in ("../x", "/etc/passwd", "a\\b", "x" * 256):
        name = file_name(sid)
        assert os.sep not in name and ".." not in name and len(name) < 100
    (tmp_path / file_name("junk")).write_bytes(b"not a state file")
    store = SessionStore(str(tmp_path), 0, layout, {"policy": "window"})
    assert store.describe() == []
    store.acquire("../escape")
    data = SessionData({"layers.0.pos": torch.full((1,), 2, dtype=torch.long)}, torch.zeros(10), [1, 2], 2)
    store.release("../escape", data)  # budget 0: straight to disk, inside the folder
    assert sorted(os.listdir(tmp_path)) == sorted([file_name("junk"), file_name("../escape")])
    assert not (tmp_path.parent / "escape").exists()
    again = SessionStore(str(tmp_path), 0, layout, {"policy": "window"})
    assert [s["id"] for s in again.describe()] == ["../escape"]
    again.acquire("../escape")
    assert again.load("../escape").history == [1, 2]


@pytest.mark.slow
def test_serve_bench_smoke(tmp_path):
    """The load generator runs every phase (tiny CPU setting) and writes its JSON."""
    import json
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve_bench", "--smoke", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    assert [row["concurrency"] for row in data["serve"]] == [1, 2] and all(row["output_tok_s"] > 0 for row in data["serve"])
    assert data["long_prompts"]["itl_samples"] > 0 and data["meta"]["state_bytes_per_session"] > 0


def test_bf16_state_sessions_equal_a_bf16_stream_and_refuse_an_fp32_server(tmp_path):
    """``--state-dtype bf16``: a session continues exactly like a ``StreamingMHLA`` with a bf16
    ring; its file records the ring dtype, and an fp32 server refuses it clearly and leaves it as it is."""
    from mhla_stream import StreamingMHLA
    from mhla_stream.serve.sessions import file_name
    d = tmp_path / "sessions"
    s = Server("--state-dtype", "bf16", "--session-memory", "1", "--sessions-dir", d, log=tmp_path / "a.log")
    try:
        got = [complete(s, "Once upon a time", session="half"), complete(s, " Then the dog", session="half")]
    finally:
        assert s.terminate() == 0, (tmp_path / "a.log").read_text()[-3000:]
    ref = StreamingMHLA.from_pretrained(state_dtype="bf16")
    assert got == [ref.generate("Once upon a time", max_new_tokens=8, temperature=0),
                   ref.generate(" Then the dog", max_new_tokens=8, temperature=0)]
    path = d / file_name("half")
    before = path.read_bytes()
    s = Server("--sessions-dir", d, log=tmp_path / "b.log")  # fp32 ring, the default
    try:
        r = httpx.post(s.base + "/v1/completions", timeout=120,
                       json={"prompt": " x", "max_tokens": 2, "temperature": 0, "session": "half"})
        assert r.status_code >= 400 and "bfloat16" in r.json()["error"]["message"], r.text
        assert httpx.get(s.base + "/health").status_code == 200  # the server goes on
    finally:
        assert s.terminate() == 0, (tmp_path / "b.log").read_text()[-3000:]
    assert path.read_bytes() == before
