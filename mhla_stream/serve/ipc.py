"""The wire between mhla-serve's two processes (``--http-process``): the engine process (model, engine,
session store) and the HTTP process (FastAPI app, tokenizer). Messages are pickled tuples over one
``multiprocessing`` connection:

HTTP -> engine
    ("submit", rid, fields)           a request for the engine (``JOB_FIELDS``)
    ("cancel", rid)                   its client left or its task was cancelled
    ("call", call_id, name, args)     an RPC (``CALLS``); answered by a "reply"
    ("listening",)                    the app is up and bound: the engine process prints the URL
    ("draining",)                     its shutdown began: the engine's grace starts (shutdown.py)
engine -> HTTP
    ("events", [(rid, (kind, payload)), ...])   every event of one engine turn (or one start/done/error)
    ("reply", call_id, ok, value)     an RPC's result, or the exception it raised (ok False)

Either side ignores (and logs) a message it cannot read: a bad message never takes a process down.
"""
from __future__ import annotations

import logging
import threading

log = logging.getLogger("mhla_stream.serve")

JOB_FIELDS = ("params", "ids", "add_bos", "render", "session", "fork_from", "max_prompt_tokens", "submitted")
CALLS = ("describe", "delete", "counts", "metrics", "stop")


class Channel:
    """One end of the connection, shared by threads: a lock keeps each message whole; a send to a peer
    that is gone returns False instead of raising (the caller is often the engine thread, which must
    not die of a closed pipe)."""

    def __init__(self, conn):
        self.conn = conn
        self._lock = threading.Lock()
        self.closed = False

    def send(self, message) -> bool:
        if self.closed:
            return False
        try:
            with self._lock:
                self.conn.send(message)
            return True
        except (OSError, EOFError, ValueError):  # the peer is gone (ValueError: this end was closed)
            self.closed = True
            return False
        except Exception:  # an unpicklable payload: that message is lost, the channel lives
            log.exception("could not send a message to the other mhla-serve process")
            return False

    def recv(self):
        """The next message; raises EOFError/OSError when the peer is gone. A message that does not
        unpickle is logged and skipped (None is returned)."""
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            self.closed = True
            raise
        except Exception as e:
            log.warning("ignored an unreadable message from the other mhla-serve process: %s: %s",
                        type(e).__name__, str(e)[:200])
            return None

    def close(self) -> None:
        self.closed = True
        try:
            self.conn.close()
        except OSError:
            pass


def bad_message(message, why: str) -> None:
    log.warning("ignored a malformed message from the other mhla-serve process (%s): %.200r", why, message)


def kind_of(message) -> str | None:
    """The message's kind if it is a non-empty tuple starting with a string, else None."""
    if isinstance(message, tuple) and message and isinstance(message[0], str):
        return message[0]
    return None


def picklable_error(error: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text (an RPC's
    error must reach the caller as something)."""
    import pickle
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")
