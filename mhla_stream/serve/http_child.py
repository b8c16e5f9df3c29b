"""The HTTP process of ``mhla-serve --http-process``: the same FastAPI app (app.py) as the in-process
server, with small proxies in place of the engine, the session store and the metrics renderer. It
loads only the tokenizer (never the model, never CUDA). A reader thread files the engine's events
under each request's ``Mailbox`` (one ``call_soon_threadsafe`` per message, i.e. per engine turn) and
hands RPC replies to the threads waiting for them.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import signal
import sys
import threading
from types import SimpleNamespace

from .ipc import JOB_FIELDS, Channel, bad_message, kind_of
from .schemas import APIError
from .shutdown import HTTP_DRAIN_S, draining_server

log = logging.getLogger("mhla_stream.serve")
CALL_TIMEOUT_S = 120
STOP_TIMEOUT_S = 300        # the engine's grace period, the flush of every session to disk
ORPHAN_EXIT_S = 15          # the engine process is gone: a bound on the graceful way out
_EVENT_KINDS = {"start": dict, "text": str, "done": dict, "error": APIError}


def _engine_gone() -> APIError:
    return APIError(503, "the engine process is gone; the server is shutting down", type="server_error",
                    code="engine_gone")


class _Reply:
    def __init__(self):
        self.ready, self.ok, self.value = threading.Event(), False, None

    def set(self, ok: bool, value) -> None:
        self.ok, self.value = ok, value
        self.ready.set()


class Link:
    """The HTTP process's end of the connection (see ipc.py for the messages)."""

    def __init__(self, channel: Channel):
        self.channel = channel
        self.loop = None                  # the app's event loop, set when its lifespan starts
        self.boxes: dict = {}             # request id -> Mailbox, while it may still get events (loop thread only)
        self.replies: dict = {}           # call id -> _Reply
        self._rids, self._call_ids = itertools.count(1), itertools.count(1)
        self.gone = False
        self.on_gone = None               # called on the loop when the engine process is gone
        self.on_lost = None               # called on the reader thread then
        self.thread = threading.Thread(target=self._read, name="mhla-http-link", daemon=True)

    def start(self) -> None:
        self.thread.start()

    # -- the event loop's side -------------------------------------------------------------------------
    def submit(self, job) -> None:
        """Called by the app's ``run_job`` (its ``job.sink`` holds the request's Mailbox)."""
        if self.gone:
            raise _engine_gone()
        rid = next(self._rids)
        fields = {name: getattr(job, name) for name in JOB_FIELDS}
        self.boxes[rid] = job.sink[1]
        job.cancelled = RemoteCancel(self, rid)
        if not self.channel.send(("submit", rid, fields)):
            self.boxes.pop(rid, None)
            raise _engine_gone()

    def _deliver(self, items) -> None:
        boxes = self.boxes
        for item in items:
            try:
                rid, (kind, payload) = item
                if not isinstance(payload, _EVENT_KINDS[kind]):
                    raise TypeError(f"a {kind} event with a {type(payload).__name__}")
            except (TypeError, ValueError, KeyError) as e:
                bad_message(item, f"not an event: {e}")
                continue
            box = boxes.get(rid)
            if box is None:  # a request that already ended (cancelled, its client gone)
                continue
            if kind == "done" or kind == "error":
                del boxes[rid]
            box.put_nowait((kind, payload))

    def _fail_all(self) -> None:
        boxes, self.boxes = self.boxes, {}
        for box in boxes.values():
            box.put_nowait(("error", _engine_gone()))
        if self.on_gone is not None:
            self.on_gone()

    # -- any thread ------------------------------------------------------------------------------------
    def call(self, name: str, *args, timeout: float = CALL_TIMEOUT_S):
        """An RPC to the engine process (from a worker thread, never the event loop)."""
        if self.gone:
            raise _engine_gone()
        call_id, reply = next(self._call_ids), _Reply()
        self.replies[call_id] = reply
        if not self.channel.send(("call", call_id, name, args)) or not reply.ready.wait(timeout):
            self.replies.pop(call_id, None)
            raise _engine_gone() if self.gone or self.channel.closed else \
                APIError(504, f"the engine process did not answer {name!r} in {timeout:.0f} s", type="server_error")
        if not reply.ok:
            raise reply.value
        return reply.value

    # -- the reader thread -----------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            try:
                message = self.channel.recv()
            except (EOFError, OSError):
                return self._lost()
            if message is None:
                continue
            try:
                self._handle(message)
            except Exception:
                log.exception("mhla-serve http: a message from the engine process failed")

    def _handle(self, message) -> None:
        kind = kind_of(message)
        if kind == "events" and len(message) == 2 and isinstance(message[1], list):
            if self.loop is None:
                return bad_message(message, "events before the app started")
            self.loop.call_soon_threadsafe(self._deliver, message[1])
        elif kind == "reply" and len(message) == 4:
            reply = self.replies.pop(message[1], None) if type(message[1]) is int else None
            if reply is None:
                return bad_message(message, "a reply to no call")
            ok, value = bool(message[2]), message[3]
            reply.set(ok, value if ok or isinstance(value, BaseException) else RuntimeError(repr(value)[:200]))
        else:
            bad_message(message, "unknown kind or wrong length")

    def _lost(self) -> None:
        if self.gone:
            return
        self.gone = True
        print("mhla-serve http: the engine process is gone; shutting down", file=sys.stderr, flush=True)
        for call_id in list(self.replies):
            reply = self.replies.pop(call_id, None)
            if reply is not None:
                reply.set(False, _engine_gone())
        if self.loop is not None and not self.loop.is_closed():
            try:
                self.loop.call_soon_threadsafe(self._fail_all)
            except RuntimeError:
                pass
        if self.on_lost is not None:
            self.on_lost()


class RemoteCancel:
    """Stands in for a bridge job's ``cancelled`` event in the HTTP process: setting it (the client left,
    the task was cancelled, the stream ended) tells the engine, once, if the request is still open."""

    def __init__(self, link: Link, rid: int):
        self.link, self.rid, self._set = link, rid, False

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        if self.link.boxes.pop(self.rid, None) is not None:
            self.link.channel.send(("cancel", self.rid))

    def is_set(self) -> bool:
        return self._set


class EngineProxy:
    """What app.py uses of the ``Engine``: ``submit``, ``counts``, ``free``, ``start``/``stop`` and the
    model's vocabulary size."""

    def __init__(self, link: Link, vocab_size: int, on_start=None):
        self.link, self.on_start = link, on_start
        self.model = SimpleNamespace(config=SimpleNamespace(vocab_size=vocab_size))
        self.free = range(0)  # as of the last ``counts``

    def start(self) -> None:
        self.link.loop = asyncio.get_running_loop()
        if self.on_start is not None:
            self.on_start()

    def submit(self, job) -> None:
        self.link.submit(job)

    def counts(self) -> tuple[int, int]:
        running, queued, free = self.link.call("counts")
        self.free = range(free)
        return running, queued

    def stop(self) -> None:
        """The app's lifespan ends: the engine process stops its engine and flushes the sessions."""
        try:
            self.link.call("stop", timeout=STOP_TIMEOUT_S)
        except APIError:
            log.warning("mhla-serve http: the engine process did not confirm its stop")


class StoreProxy:
    def __init__(self, link: Link):
        self.link = link

    def describe(self, *args) -> list[dict]:
        return self.link.call("describe", *args)

    def delete(self, session_id: str) -> None:
        self.link.call("delete", session_id)

    def flush(self) -> int:
        return 0  # the engine process flushes when it stops


class HttpMetrics:
    """The request counters live here; /metrics is the engine process's text plus these families."""

    def __init__(self, link: Link):
        from prometheus_client import CollectorRegistry

        from .metrics import http_counters
        self.link, self.registry = link, CollectorRegistry()
        self.requests, self.tokens_in = http_counters(self.registry)

    def render(self, _engine, _store) -> bytes:
        from prometheus_client import generate_latest
        return self.link.call("metrics") + generate_latest(self.registry)


def load_tokenizer(spec: tuple):
    """The tokenizer the engine process uses: (directory, widened vocabulary size or None)."""
    from mhla_stream.tokenizer import Tokenizer
    directory, widen_to = spec
    tokenizer = Tokenizer.from_directory(directory)
    if widen_to is not None:
        from mhla_stream.cli.serve import _widened
        tokenizer = _widened(tokenizer, widen_to)
    return tokenizer


def run_http_process(conn, settings: dict) -> None:
    """The child's entry point (multiprocessing "spawn")."""
    os.setpgrp()  # a terminal's Ctrl-C reaches the engine process only; it tells this one to stop
    sys.setswitchinterval(settings["switch_interval"])
    import uvicorn

    from .app import create_app
    channel = Channel(conn)
    link = Link(channel)
    server_box = []

    async def announce_when_listening():
        while not server_box[0].started:
            await asyncio.sleep(0.02)
        channel.send(("listening",))

    def on_start():
        asyncio.get_running_loop().create_task(announce_when_listening())

    engine = EngineProxy(link, settings["vocab_size"], on_start)
    app = create_app(engine, load_tokenizer(settings["tokenizer"]), StoreProxy(link), HttpMetrics(link),
                     settings["config"])
    # its shutdown (SIGTERM from the engine process, or sent to this process alone) tells the engine
    # first, so the engine's grace and last events end the open requests while uvicorn waits for them
    server = draining_server(uvicorn.Config(app, host=settings["host"], port=settings["port"],
                                            log_level=settings["log_level"], timeout_graceful_shutdown=HTTP_DRAIN_S,
                                            http=settings["http"], loop=settings["loop"]),
                             lambda: channel.send(("draining",)))
    server_box.append(server)
    link.on_gone = lambda: setattr(server, "should_exit", True)
    # the graceful way out has a bound: no HTTP process outlives its engine for long
    link.on_lost = lambda: threading.Timer(ORPHAN_EXIT_S, os._exit, (1,)).start()
    link.start()
    # uvicorn re-raises the signal that stopped it once it is done: a no-op handler, so the exit is clean
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    sys.exit(1 if link.gone else 0)
