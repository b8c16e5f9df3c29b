"""mhla-serve's engine process with ``--http-process``: the HTTP side (FastAPI, uvicorn, one SSE write
per token per stream) runs in a child process, so its Python no longer competes with the engine thread
for this process's GIL. This process keeps the model, the engine, the session store, the engine's
metrics and signal handling; ``EngineBridge`` turns the child's messages (ipc.py) into engine jobs and
sends the engine's events back, one message per engine turn for all text, whatever the stream count.
"""
from __future__ import annotations

import logging
import multiprocessing
import signal
import sys
import threading
import time

from ..sampling import SamplingParams
from .app import ChatRender
from .ipc import JOB_FIELDS, Channel, bad_message, kind_of, picklable_error
from .jobs import Job
from .schemas import APIError
from .shutdown import stop_in_background

log = logging.getLogger("mhla_stream.serve")
CHILD_EXIT_WAIT_S = 30  # after the engine stopped: the HTTP process only has to close and exit


class _TurnSink:
    """Stands in for an event loop in every bridge job's ``sink``: the engine hands it all text events
    of one turn in one ``call_soon_threadsafe(_put_all, [(rid, event), ...])`` and it sends them to
    the HTTP process as one message (the HTTP side files each event under its request id)."""

    def __init__(self, channel: Channel):
        self.channel = channel

    def call_soon_threadsafe(self, _put_all, items) -> None:
        self.channel.send(("events", items))


def _fields_problem(fields, vocab_size: int) -> str | None:
    """Why a submit's fields cannot make a ``Job`` (None when they can)."""
    if not isinstance(fields, dict) or not set(fields) <= set(JOB_FIELDS) or "params" not in fields:
        return "fields are not a dict of job fields"
    if not isinstance(fields["params"], SamplingParams):
        return "params is not SamplingParams"
    ids, render = fields.get("ids"), fields.get("render")
    if (ids is None) == (render is None):
        return "exactly one of ids and render is needed"
    if ids is not None and not _ids_in_range(ids, vocab_size):  # (an id out of range would be a CUDA assert)
        return "ids is not a list of token ids in the vocabulary"
    if render is not None and not (isinstance(render, ChatRender) and isinstance(render.messages, list)):
        return "render is not a ChatRender"
    for name in ("session", "fork_from"):
        if not isinstance(fields.get(name), (str, type(None))):
            return f"{name} is not a string"
    if not isinstance(fields.get("max_prompt_tokens", 1), int) or not isinstance(fields.get("add_bos", True), bool):
        return "max_prompt_tokens or add_bos has the wrong type"
    if not isinstance(fields.get("submitted", 0.0), float):
        return "submitted is not a float"
    return None


class EngineBridge:
    """The engine process's end of the connection: a reader thread runs submits, cancels and RPCs."""

    def __init__(self, channel: Channel, engine, store, metrics):
        self.channel, self.engine, self.store, self.metrics = channel, engine, store, metrics
        self.sink = _TurnSink(channel)
        self.jobs: dict = {}  # request id -> its Job, until its done/error event or its cancel
        self.wake = threading.Event()         # the supervisor has something to look at
        self.listening = threading.Event()    # the HTTP process serves
        self.stop_call = None                 # the call id of the HTTP process's "stop" (its lifespan ends)
        self.gone = threading.Event()         # the HTTP process's end is closed
        self.stopper = None                   # the thread running the engine's stop, once begun
        self.thread = threading.Thread(target=self._read, name="mhla-bridge", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                self.gone.set()
                self.wake.set()
                return
            if message is None:
                continue
            try:
                self.handle(message)
            except Exception:  # a message that broke its handler: logged, the bridge lives
                log.exception("mhla-serve: a message from the HTTP process failed")

    def handle(self, message) -> None:
        kind = kind_of(message)
        if kind == "submit" and len(message) == 3:
            self._submit(message[1], message[2])
        elif kind == "cancel" and len(message) == 2:
            job = self.jobs.pop(message[1], None) if _is_rid(message[1]) else None
            if job is not None:
                job.cancelled.set()  # the engine drops it (queued) or frees its slot at its next turn
        elif kind == "call" and len(message) == 4 and isinstance(message[3], tuple):
            self._call(message[1], message[2], message[3])
        elif kind == "listening" and len(message) == 1:
            self.listening.set()
            self.wake.set()
        elif kind == "draining" and len(message) == 1:
            self.begin_stop()
        else:
            bad_message(message, "unknown kind or wrong length")

    def _send_events(self, rid, kind: str, payload) -> None:
        if kind in ("done", "error"):
            self.jobs.pop(rid, None)
        self.channel.send(("events", [(rid, (kind, payload))]))

    def _submit(self, rid, fields) -> None:
        if not _is_rid(rid) or rid in self.jobs:
            return bad_message(("submit", rid), "the request id is not a new int")
        problem = _fields_problem(fields, self.engine.model.config.vocab_size)
        if problem is not None:
            bad_message(("submit", rid, fields), problem)
            return self._send_events(rid, "error", APIError(500, f"mhla-serve internal: bad request message ({problem})",
                                                            type="server_error", code="ipc_error"))
        job = Job(fields["params"], lambda kind, payload: self._send_events(rid, kind, payload),
                  **{k: v for k, v in fields.items() if k != "params" and k != "submitted"})
        job.submitted = fields.get("submitted", job.submitted)  # the HTTP process's clock (monotonic, shared)
        if job.render is not None:
            job.render.tokenizer = self.engine.tokenizer
        job.sink = (self.sink, rid)
        self.jobs[rid] = job
        try:
            self.engine.submit(job)
        except APIError as e:  # queue full, session busy, shutting down: as the in-process server answers
            self._send_events(rid, "error", e)

    def _call(self, call_id, name, args) -> None:
        if name == "stop":  # the supervisor stops the engine and flushes, then answers
            self.stop_call = call_id
            self.wake.set()
            return
        handlers = {"describe": self.store.describe, "delete": self.store.delete, "counts": self._counts,
                    "metrics": lambda: self.metrics.render(self.engine, self.store)}
        if name not in handlers:
            return bad_message(("call", call_id, name), "unknown call")
        try:
            value, ok = handlers[name](*args), True
        except Exception as e:
            value, ok = picklable_error(e), False
        self.channel.send(("reply", call_id, ok, value))

    def _counts(self) -> tuple[int, int, int]:
        running, queued = self.engine.counts()
        return running, queued, len(self.engine.free)

    def begin_stop(self) -> None:
        """The HTTP process began its shutdown (or this one got SIGTERM): the engine's grace starts now,
        so the open streams end with their last events while the HTTP process waits for them."""
        if self.stopper is None:
            self.stopper = stop_in_background(self.engine)

    def cancel_all(self) -> None:
        for rid in list(self.jobs):
            job = self.jobs.pop(rid, None)
            if job is not None:
                job.cancelled.set()


def _ids_in_range(ids, vocab_size: int) -> bool:
    if not isinstance(ids, list):
        return False
    try:  # min and max run in C: a 32k-id prompt costs well under a millisecond here
        return not ids or (0 <= min(ids) and max(ids) < vocab_size)
    except TypeError:
        return False


def _is_rid(rid) -> bool:
    return type(rid) is int


def serve_split(engine, store, metrics, config, *, tokenizer_spec: tuple, host: str, port: int, log_level: str,
                http: str, loop: str, announce, on_shutdown=None) -> int:
    """Runs the engine here and the HTTP app in a child process until SIGTERM/SIGINT (exit status 0
    once in-flight requests ended and sessions are flushed) or the child's death (1). ``announce()``
    prints the start-up lines once the child listens."""
    from .http_child import run_http_process
    ctx = multiprocessing.get_context("spawn")  # no fork of a process holding CUDA and threads
    ours, theirs = ctx.Pipe(duplex=True)
    for family in (metrics.requests, metrics.tokens_in):  # counted by the HTTP process (no duplicate family)
        metrics.registry.unregister(family)
    settings = {"config": config, "tokenizer": tokenizer_spec, "vocab_size": engine.model.config.vocab_size,
                "host": host, "port": port, "log_level": log_level, "http": http, "loop": loop,
                "switch_interval": sys.getswitchinterval()}
    child = ctx.Process(target=run_http_process, args=(theirs, settings), name="mhla-serve-http")
    channel = Channel(ours)
    bridge = EngineBridge(channel, engine, store, metrics)
    signalled = []

    def on_signal(signum, _frame):
        signalled.append(signum)
        bridge.wake.set()
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    engine.start()
    child.start()
    theirs.close()  # only the child holds that end now: its death closes the connection
    bridge.start()
    announced = forwarded = False
    try:
        while True:
            if bridge.stop_call is not None:  # the child's lifespan ends: stop, flush, answer, both exit
                _finish(engine, store, on_shutdown)
                channel.send(("reply", bridge.stop_call, True, None))
                child.join(CHILD_EXIT_WAIT_S)
                if bridge.listening.is_set():
                    return 0
                # its start failed after the app's start-up (the port in use): uvicorn said why
                print(f"mhla-serve: the HTTP process stopped before it was listening (status {child.exitcode})",
                      file=sys.stderr, flush=True)
                return child.exitcode or 1
            if bridge.gone.is_set() or not child.is_alive():
                child.join(5)
                when = "while serving" if announced else "before it was listening"
                print(f"mhla-serve: the HTTP process exited {when} (status {child.exitcode}); stopping the engine "
                      "and flushing sessions", file=sys.stderr, flush=True)
                bridge.cancel_all()
                _finish(engine, store, on_shutdown, grace_s=0.0)
                return 1
            if bridge.listening.is_set() and not announced:
                announce()
                announced = True
            if signalled and not forwarded and announced:
                # SIGTERM: the engine stops accepting and its grace begins; the child stops listening and
                # waits for its open requests, which the engine ends, then asks for "stop" (flush, exit)
                bridge.begin_stop()
                child.terminate()
                forwarded = True
            elif len(signalled) > 1 and not announced:  # still starting and asked twice: no graceful path
                child.kill()
            bridge.wake.wait(0.5)
            bridge.wake.clear()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if child.is_alive():
            child.kill()
            child.join(5)
        channel.close()


def _finish(engine, store, on_shutdown, grace_s: float = 5.0) -> None:
    t0 = time.monotonic()
    engine.stop(grace_s)
    flushed = store.flush()
    log.info("engine stopped and %s sessions flushed in %.1f s", flushed, time.monotonic() - t0)
    if on_shutdown is not None:
        on_shutdown()
