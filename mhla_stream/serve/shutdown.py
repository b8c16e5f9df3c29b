"""SIGTERM, in the order that lets every request end properly.

uvicorn's own order is: stop listening, wait ``timeout_graceful_shutdown`` for the open connections to
close, cancel the requests still open (a stream is cut mid-body, a queued request gets a 500), and only
then run the app's shutdown, which stopped the engine. Streams the engine kept generating could never
close on their own in that wait. So the engine's stop starts when uvicorn's shutdown starts: it stops
accepting, lets requests finish for ``SHUTDOWN_GRACE_S``, then ends the rest with a 503, each with a
last event (an error chunk and ``[DONE]`` for a stream); their connections then close and uvicorn moves
on to the app's shutdown (flush the sessions) long before its own, longer, timeout would cut anything.
Imports no model code (the HTTP process of ``--http-process`` uses it too).
"""
from __future__ import annotations

import threading

SHUTDOWN_GRACE_S = 5.0  # in-flight requests may finish for this long after SIGTERM
# uvicorn cancels what is still open this long after its shutdown began: the grace, then time for the
# engine's last turn and the final events to be written (a bound for clients that stop reading)
HTTP_DRAIN_S = int(SHUTDOWN_GRACE_S) + 10


def draining_server(config, on_shutdown_begins):
    """A ``uvicorn.Server`` that calls ``on_shutdown_begins()`` (on its event loop, not in the signal
    handler: it may take locks) as its shutdown begins, before it waits for the open connections."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        async def shutdown(self, sockets=None):
            on_shutdown_begins()
            await super().shutdown(sockets)

    return DrainingServer(config)


def stop_in_background(engine) -> threading.Thread:
    """Starts ``engine.stop()`` (the grace, then the 503s) without waiting for it; the app's shutdown
    calls ``engine.stop()`` again, which waits for this one."""
    thread = threading.Thread(target=engine.stop, name="mhla-engine-stop", daemon=True)
    thread.start()
    return thread
