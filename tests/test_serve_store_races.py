"""The session store under concurrency, made deterministic: a file write or read is paused on an Event
while another thread acquires, loads, releases or deletes the session. What every reader must see:
the newest state, never an older file; a session deleted while its file was written stays deleted;
a session being written is not "busy" to a request (no spurious 409)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from mhla_stream.serve import sessions as sessions_module
from mhla_stream.serve.sessions import SessionData, SessionStore, file_name
from mhla_stream.state_io import StateLayout

WAIT_S = 30  # a bound on waiting for another thread, never a timing assertion


def _store(path, budget=0):
    layout = StateLayout({"layers.0.pos": ((1,), torch.long)}, 1, 10, "window", "fp")
    return SessionStore(str(path), budget, layout, {"policy": "window"})


def _state(position: int) -> SessionData:
    return SessionData({"layers.0.pos": torch.full((1,), position, dtype=torch.long)}, torch.zeros(10),
                       list(range(position)), position)


class Gate:
    """Wraps a function: its first ``pauses`` calls signal ``entered`` and wait for ``open``."""

    def __init__(self, fn, pauses=1, after=False):
        self.fn, self.pauses, self.after = fn, pauses, after
        self.entered, self.open = threading.Event(), threading.Event()

    def __call__(self, *args):
        pause = self.pauses > 0
        self.pauses -= 1
        if pause and not self.after:
            self._wait()
        result = self.fn(*args)
        if pause and self.after:
            self._wait()
        return result

    def _wait(self):
        self.entered.set()
        assert self.open.wait(WAIT_S), "the test never opened the gate"


def _run(fn, *args):
    """Runs fn in a thread; returns (thread, box) where box gets its result or exception."""
    box = {}

    def target():
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # handed to the test
            box["error"] = e
    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _until(predicate):
    for _ in range(int(WAIT_S / 0.01)):
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("the other thread never got there")


def _position_on_disk(path, sid):
    fresh = _store(path)
    fresh.acquire(sid)
    return fresh.load(sid).position


def test_a_request_during_eviction_gets_the_newest_state_and_keeps_its_own(tmp_path):
    store = _store(tmp_path)  # budget 0: every release moves the session to disk
    gate = store._write = Gate(store._write)
    store.acquire("s")
    evicting, box = _run(store.release, "s", _state(1))
    assert gate.entered.wait(WAIT_S)  # state 1 is being written
    store.acquire("s")  # a request while it is written: not busy (was: a spurious 409)
    assert store.load("s").position == 1  # the newest state, from memory, while its file is half-written
    store.release("s", _state(2))  # a newer state; its own eviction leaves the entry to the writer
    assert store.describe("s")[0]["position"] == 2
    gate.open.set()
    evicting.join(WAIT_S)
    assert "error" not in box, box
    # the write of state 1 ended after state 2 came: state 2 was not dropped for the older file
    assert store.describe("s")[0]["tier"] == "disk" and _position_on_disk(tmp_path, "s") == 2
    store.acquire("s")
    assert store.load("s").position == 2


def test_a_file_read_racing_a_newer_state_is_not_kept(tmp_path, monkeypatch):
    store = _store(tmp_path)
    store.acquire("src")
    store.release("src", _state(1))  # on disk
    gate = Gate(sessions_module.read_state_file, after=True)  # the first read returns, then pauses
    monkeypatch.setattr(sessions_module, "read_state_file", gate)
    store.acquire("fork", fork_from="src")
    forking, box = _run(store.load, "fork")  # reads src's file (state 1), paused before keeping it
    assert gate.entered.wait(WAIT_S)
    store.acquire("src")  # meanwhile src's own request runs: state 2, evicted to disk
    assert store.load("src").position == 1
    store.release("src", _state(2))
    gate.open.set()
    forking.join(WAIT_S)
    assert box["result"].position == 2  # the read of state 1 was stale by then: read again
    store.acquire("src")
    assert store.load("src").position == 2  # was: state 1 kept in memory over the newer file


@pytest.mark.parametrize("writer", ["evict", "flush"])
def test_a_session_deleted_while_written_stays_deleted(tmp_path, writer):
    store = _store(tmp_path, budget=0 if writer == "evict" else 1 << 30)
    store.acquire("s")
    if writer == "flush":
        store.release("s", _state(1))  # in host memory
    gate = store._write = Gate(store._write)
    writing, wbox = _run(store.release, "s", _state(1)) if writer == "evict" else _run(store.flush)
    assert gate.entered.wait(WAIT_S)
    deleting, dbox = _run(store.delete, "s")  # not busy: deleted now; the file goes after the write
    _until(lambda: not store.describe())
    gate.open.set()
    writing.join(WAIT_S)
    deleting.join(WAIT_S)
    assert "error" not in wbox and "error" not in dbox, (wbox, dbox)
    assert file_name("s") not in [p.name for p in tmp_path.iterdir()]
    assert _store(tmp_path).describe() == []  # a restart does not bring it back


def test_flush_writes_only_states_not_on_disk_and_keeps_them_in_memory(tmp_path):
    store = _store(tmp_path, budget=1 << 30)
    for sid, position in (("a", 1), ("b", 2)):
        store.acquire(sid)
        store.release(sid, _state(position))
    assert store.flush() == 2 and store.flush() == 0
    assert [s["tier"] for s in store.describe()] == ["host", "host"]
    store.acquire("a")
    store.release("a", _state(3))
    assert store.flush() == 1 and _position_on_disk(tmp_path, "a") == 3 and _position_on_disk(tmp_path, "b") == 2
