"""A finished session request's state copied out of its slot (serve/snapshots.py): the session store
waits for an asynchronous copy before any host read (state file write, fork, the next request); on
CUDA the asynchronous copy through park rows equals the plain one even while later steps overwrite
the slot (GPU only); the flag is refused clearly."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mhla_stream.state import MHLAState


class _Event:
    """Stands in for a CUDA event: counts host waits."""

    def __init__(self):
        self.waits = 0

    def synchronize(self):
        self.waits += 1


@pytest.fixture(scope="module")
def model():
    from mhla_stream import StreamingMHLA
    return StreamingMHLA.from_pretrained().model


def _store(model, tmp_path, budget=1 << 30):
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    layout = StateLayout.of(model.new_state(1, device="meta"), model.config.vocab_size, model_fingerprint(model))
    return SessionStore(str(tmp_path), budget, layout, {"model_name": "t", "policy": "window", "config": "{}"})


def _data(model, ready, fill=1.0):
    from mhla_stream.serve.sessions import SessionData
    tensors = {f"layers.{i}.{n}": torch.full_like(getattr(s, n), fill) if n != "pos" else getattr(s, n) + 3
               for i, s in enumerate(model.new_state(1, device="cpu")) for n in MHLAState.TENSORS}
    return SessionData(tensors, torch.zeros(model.config.vocab_size), [5, 6, 7], 3, [], ready=ready)


def test_every_host_reader_waits_for_the_copy(model, tmp_path):
    store = _store(model, tmp_path)
    ev = _Event()
    store.acquire("a")
    store.release("a", _data(model, ev))
    assert ev.waits == 0                       # releasing does not wait: the engine goes on
    store.acquire("b", fork_from="a")          # a fork reads (clones) the source's tensors
    forked = store.load("b")
    assert ev.waits == 1 and forked.ready is None
    store.release("b", None)
    ev2 = _Event()
    store.acquire("a")
    assert store.load("a").ready is None       # the next request on it reads them
    store.release("a", _data(model, ev2, 2.0))
    assert store.flush() >= 1 and ev2.waits == 1   # a state file write reads them


def test_eviction_to_disk_waits_for_the_copy(model, tmp_path):
    one = _data(model, None).nbytes
    store = _store(model, tmp_path, budget=one)   # room for one session in host memory
    events = [_Event(), _Event()]
    for sid, ev in zip("xy", events):
        store.acquire(sid)
        store.release(sid, _data(model, ev))
    assert events[0].waits == 1                   # x went to disk: its copy was waited for first
    store.acquire("x")
    back = store.load("x")
    assert int(back.tensors["layers.0.pos"][0]) == 3 and back.position == 3


def test_bad_flag_is_refused():
    r = subprocess.run([sys.executable, "-m", "mhla_stream.cli.serve", "--async-session-copy=maybe"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "mhla-serve:" not in r.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA streams and pinned memory")
def test_async_snapshot_equals_plain_copy_while_the_slot_is_overwritten(model):
    from mhla_stream.serve.runner import StepRunner
    m = model.to("cuda")
    try:
        runner = StepRunner(m, 4, 64, cuda_graphs=False, prefill_piece=16, async_snapshots=True)
        assert runner.snapshots is not None
        runner.stage_begin(None)
        logits = runner.stage_feed(list(range(100, 116)))
        runner.stage_finish(1)
        want, want_logits, _ = __import__("mhla_stream.serve.snapshots", fromlist=["x"]).sync_snapshot(
            runner.rows(1, 2), logits)
        got = [runner.snapshot(1, logits) for _ in range(3)]  # more than the park rows: one waits
        for t in runner._tensors(runner.rows(1, 2)):            # the slot reused at once
            t.fill_(7)
        for tensors, lg, ready in got:
            ready.synchronize()
            for k, v in want.items():
                assert torch.equal(tensors[k], v), k
            assert torch.equal(lg, want_logits)
    finally:
        model.to("cpu")


def test_background_writer_keeps_the_engine_thread_free(model, tmp_path, monkeypatch):
    """With the writer thread, a release over the budget returns at once while the file is written
    elsewhere; the session stays usable meanwhile (a request on it reads the newest state from
    memory, no 409); past twice the budget the releasing thread writes too; flush stops the writer."""
    import threading
    from mhla_stream.serve.sessions import SessionStore
    from mhla_stream.state_io import StateLayout, model_fingerprint
    one = _data(model, None).nbytes
    layout = StateLayout.of(model.new_state(1, device="meta"), model.config.vocab_size, model_fingerprint(model))
    store = SessionStore(str(tmp_path), one, layout, {"model_name": "t", "policy": "window", "config": "{}"},
                         background=True)
    gate, writers, write = threading.Event(), [], store._write

    def slow_write(sid, data):
        writers.append(threading.current_thread().name)
        gate.wait(30)
        write(sid, data)
    monkeypatch.setattr(store, "_write", slow_write)
    for sid in "ab":
        store.acquire(sid)
        store.release(sid, _data(model, None, 1.0 if sid == "a" else 2.0))   # returns while "a" is written
    for _ in range(500):
        if writers:
            break
        threading.Event().wait(0.01)
    assert writers == ["mhla-session-writer"]
    store.acquire("a")                                 # being written: still usable, from memory
    assert float(store.load("a").tensors["layers.0.ring"].flatten()[0]) == 1.0
    store.release("a", _data(model, None, 3.0))        # a newer state while the old one is written
    gate.set()
    store.settle()
    store.acquire("a")
    assert float(store.load("a").tensors["layers.0.ring"].flatten()[0]) == 3.0   # never the older file
    store.release("a", None)
    assert store.flush() >= 1 and store._writer is None
    reopened = SessionStore(str(tmp_path), one, layout, {"model_name": "t", "policy": "window", "config": "{}"})
    for sid, want in (("a", 3.0), ("b", 2.0)):
        reopened.acquire(sid)
        assert float(reopened.load(sid).tensors["layers.0.ring"].flatten()[0]) == want
