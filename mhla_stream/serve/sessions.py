"""Persistent sessions: a stream's whole history in a constant-size state, kept in tiers.

* device: while a request runs, the session's state lives in an engine slot;
* host: between requests, a CPU copy, up to ``host_budget`` bytes (least recently used leave first);
* disk: beyond that, a state file in ``directory`` in the format of ``StreamingMHLA.save_state``
  (atomic, fingerprinted, checksummed), so a stream can also load it.

A session id is opaque: the file name is a hash of it, never the id itself, so no id can name a
path. The id and the chat messages are kept inside the file's metadata, which is what a restart
reads back. One request at a time per session: ``acquire`` refuses a busy one (the API's 409).

Moving a session between tiers is atomic from every reader's point of view: files are written outside
the lock, but an entry's ``data`` (the newest state when not None) is dropped for its file only under
the lock, only if it is still the very data the file holds and no request holds the session; a file
read outside the lock is kept only if the entry did not change meanwhile (``version``); a session
deleted while its file was being written has that file removed. So a request never loads an older
state than the newest, and a deleted session never comes back.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..state import MHLAState
from ..state_io import StateFileError, StateLayout, read_state_file, write_state_file

log = logging.getLogger("mhla_stream.serve")
FIELDS = MHLAState.TENSORS
SUFFIX = ".mhla-session"


class SessionBusy(Exception):
    pass


class SessionMissing(KeyError):
    pass


@dataclass
class SessionData:
    """Everything a stream depends on, on the CPU: per-layer tensors, next-token logits, history, position."""
    tensors: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    history: list[int]
    position: int
    messages: list[dict] = field(default_factory=list)  # chat turns already in the stream
    ready: object = None  # a CUDA event after which the tensors hold their values (snapshots.py), or None

    def wait(self) -> "SessionData":
        """Blocks until an asynchronous copy into these tensors has finished; every host reader calls it."""
        if self.ready is not None:
            self.ready.synchronize()
            self.ready = None
        return self

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


@dataclass
class _Entry:
    data: SessionData | None  # None while it lives only on disk
    on_disk: bool = False
    busy: bool = False
    last_used: float = field(default_factory=time.monotonic)
    position: int = 0
    fork_from: str | None = None  # a new session's state comes from here at its first request
    version: int = 0              # bumped by every new state: a file read that raced one is not kept
    written: SessionData | None = None  # the data its file holds, when known (written or read here)
    writing: bool = False         # its file is being written (no second writer picks it)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def file_name(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest() + SUFFIX


class SessionStore:
    def __init__(self, directory: str, host_budget: int, layout: StateLayout, meta: dict[str, str],
                 background: bool = False):
        """``layout``: what one session's state must look like (files are checked against it on read).
        ``background``: sessions over the host budget are written to disk by a writer thread, not by
        the thread that releases them (the engine: a 396 MiB state file takes about a second to write,
        in which no stream would get a token). Host memory may then pass the budget by what is being
        written; past twice the budget, the releasing thread writes too (memory stays bounded)."""
        self.directory, self.host_budget, self.layout = directory, host_budget, layout
        self.fingerprint = layout.fingerprint
        self.meta = meta  # model name, policy, config: written into each file like save_state does
        self._lock = threading.Lock()
        self._io = threading.Lock()  # one file write or delete at a time; taken before ``_lock``, never inside it
        self._entries: dict[str, _Entry] = {}
        os.makedirs(directory, exist_ok=True)
        self._recover()
        self._wake = threading.Event()
        self._closed = False
        self._writer = None
        if background:
            self._writer = threading.Thread(target=self._write_loop, name="mhla-session-writer", daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._closed:
                return
            try:
                self._evict()
            except Exception:  # e.g. a full disk: the sessions stay in host memory; said, and tried again later
                log.exception("writing sessions to disk failed; they stay in host memory")

    def _resident_bytes(self) -> int:
        with self._lock:
            return sum(e.data.nbytes for e in self._entries.values() if e.data is not None)

    def settle(self) -> None:
        """Waits until no session is being written and host memory is within the budget as far as
        eviction can take it (tests, shutdown)."""
        for _ in range(1000):
            with self._io:  # a write in progress finishes first
                pass
            self._evict()
            with self._lock:
                writing = any(e.writing for e in self._entries.values())
            if not writing:
                return

    def close(self) -> None:
        """Stops the writer thread after the write in progress (later evictions run on the caller)."""
        self._closed = True
        self._wake.set()
        if self._writer is not None:
            self._writer.join(timeout=120)
            self._writer = None

    # -- restart recovery --------------------------------------------------------------------------
    def _recover(self) -> None:
        """Indexes the state files of this model found in the directory (metadata only; tensors load on use)."""
        from safetensors import safe_open
        for name in sorted(os.listdir(self.directory)):
            if not name.endswith(SUFFIX):
                continue
            try:
                with safe_open(os.path.join(self.directory, name), framework="pt") as f:
                    meta = f.metadata() or {}
            except Exception:
                continue  # a damaged file is left alone; reading it later would say why
            sid = meta.get("session_id")
            if meta.get("model") == self.fingerprint and sid and file_name(sid) == name:
                # indexed even when its position is not a number: reading it on use refuses it with the
                # reason (and keeps the file), where a crash here would stop the server from starting
                position = meta.get("position", "")
                position = int(position) if position.isascii() and position.isdigit() else 0
                self._entries[sid] = _Entry(None, on_disk=True, position=position)

    # -- requests ------------------------------------------------------------------------------------
    def acquire(self, session_id: str, fork_from: str | None = None) -> None:
        """Marks a session busy for one request (creating it, or forking it, if asked). Raises SessionBusy."""
        with self._lock:
            entry = self._entries.get(session_id)
            if fork_from is not None:
                if entry is not None:
                    raise SessionBusy(f"session {session_id!r} already exists; fork into a new id")
                if fork_from not in self._entries:
                    raise SessionMissing(f"fork_from: no session {fork_from!r}")
            if entry is not None and entry.busy:
                raise SessionBusy(f"session {session_id!r} is in use by another request; retry when it finishes")
            if entry is None:
                entry = self._entries[session_id] = _Entry(None, fork_from=fork_from)
            entry.busy = True

    def load(self, session_id: str) -> SessionData | None:
        """The session's data for a request that acquired it (None for a fresh session). Engine thread."""
        with self._lock:
            source = self._entries[session_id].fork_from
        if source is None:
            data = self._read(session_id)  # it is busy (ours): nothing moves it while we read
            return data.wait() if data is not None else None  # an asynchronous copy out may still run
        data = self._read(source)
        if data is not None:
            data.wait()
            data = SessionData({k: v.clone() for k, v in data.tensors.items()},
                               None if data.logits is None else data.logits.clone(),
                               list(data.history), data.position, [dict(m) for m in data.messages])
        return data

    def _read(self, session_id: str) -> SessionData | None:
        """The session's newest data: in host memory, else read from its file (and kept in memory)."""
        while True:
            with self._lock:
                entry = self._entries.get(session_id)
                if entry is None:
                    raise SessionMissing(f"no session {session_id!r}")
                if entry.data is not None or not entry.on_disk:
                    return entry.data
                version = entry.version
            data = self._read_file(session_id)
            with self._lock:
                if self._entries.get(session_id) is not entry:
                    raise SessionMissing(f"no session {session_id!r}")
                if entry.version == version:  # nothing newer came while the file was read
                    if entry.data is None:
                        entry.data, entry.written = data, data
                    return entry.data
            # a newer state arrived (and perhaps went to disk) meanwhile: read again

    def _read_file(self, session_id: str) -> SessionData:
        path = os.path.join(self.directory, file_name(session_id))
        try:
            valid = read_state_file(path, self.layout)
        except StateFileError as e:  # said to the client: name the session, not the server's folder
            raise StateFileError(f"session {session_id!r}: {str(e).removeprefix(path + ': ')}") from None
        try:
            messages = json.loads(valid.meta.get("messages", "[]"))
        except ValueError:
            raise StateFileError(f"session {session_id!r}: its stored messages are not JSON") from None
        return SessionData(valid.layers, valid.logits, valid.history, valid.position, messages)

    def release(self, session_id: str, data: SessionData | None) -> None:
        """Ends a request: ``data`` is the new state (None: the request failed, keep the old one)."""
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                return
            entry.busy = False
            entry.fork_from = None
            if data is None:
                if entry.data is None and not entry.on_disk:
                    del self._entries[session_id]  # a fresh session whose first request failed
                return
            entry.data, entry.position, entry.last_used = data, data.position, time.monotonic()
            entry.version += 1
        if self._writer is None or self._resident_bytes() > 2 * self.host_budget:
            self._evict()  # no writer, or it is far behind: this thread writes too
        else:
            self._wake.set()

    def _evict(self) -> None:
        """Moves least recently used idle sessions from host memory to disk until under the budget."""
        while True:
            with self._lock:
                resident = [(e.last_used, sid, e) for sid, e in self._entries.items() if e.data is not None]
                # a session being written is on its way out: counted, two evicting threads would both
                # see the same excess and each move a session
                if sum(e.data.nbytes for _, _, e in resident if not e.writing) <= self.host_budget:
                    return
                idle = sorted((t, sid, e) for t, sid, e in resident if not e.busy and not e.writing)
                if not idle:
                    return
                _, sid, entry = idle[0]
            if not self._save(sid, entry, drop=True):
                return  # another thread took it or it is being written: that thread goes on from here

    def _save(self, session_id: str, entry: _Entry, drop: bool) -> bool:
        """Writes the entry's data to its file. ``drop``: then, in the same lock section that records
        the file, leaves host memory if the data is still the newest and no request holds the session
        (else it stays: a request took it meanwhile and reads it there). Returns False if another
        writer has it. A session deleted meanwhile has the file removed again."""
        with self._lock:
            data = entry.data
            if entry.writing or data is None or self._entries.get(session_id) is not entry:
                return False
            if drop and entry.on_disk and entry.written is data:  # the file holds it already (read from there)
                if not entry.busy:
                    entry.data = None
                return True
            entry.writing = True
        path = os.path.join(self.directory, file_name(session_id))
        saved = False
        with self._io:
            try:
                self._write(session_id, data)
                saved = True
            finally:
                with self._lock:
                    entry.writing = False
                    alive = self._entries.get(session_id) is entry
                    if alive and saved:  # one section: the file recorded and the data dropped together
                        entry.on_disk, entry.written = True, data
                        if drop and entry.data is data and not entry.busy:
                            entry.data = None
            if saved and not alive:  # deleted while written: it must not come back (still under _io)
                _remove_file(path)
        return True

    def _write(self, session_id: str, data: SessionData) -> None:
        data.wait()
        tensors = dict(data.tensors)
        tensors["history"] = torch.tensor(data.history, dtype=torch.long)
        if data.logits is not None:
            tensors["logits"] = data.logits
        meta = {**self.meta, "model": self.fingerprint, "position": str(data.position), "session_id": session_id,
                "messages": json.dumps(data.messages)}
        write_state_file(os.path.join(self.directory, file_name(session_id)), tensors, meta)

    # -- management ----------------------------------------------------------------------------------
    def flush(self) -> int:
        """Writes every session held in host memory whose file is not already its newest state to disk
        (shutdown: the writer thread is stopped first, after its write in progress); each stays in
        memory. Returns how many were written."""
        self.close()
        written = 0
        for _ in range(3):  # later passes only for states that changed during a pass (none at shutdown)
            with self._lock:
                todo = [(sid, e) for sid, e in self._entries.items() if e.data is not None and e.written is not e.data]
            for sid, entry in todo:
                written += self._save(sid, entry, drop=False)
            if not todo:
                break
        return written

    def delete(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                raise SessionMissing(f"no session {session_id!r}")
            if entry.busy:
                raise SessionBusy(f"session {session_id!r} is in use by a request")
            del self._entries[session_id]
        with self._io:  # after a write in progress: its writer sees the entry gone and removes the file too
            _remove_file(os.path.join(self.directory, file_name(session_id)))

    def describe(self, session_id: str | None = None) -> list[dict]:
        with self._lock:
            items = self._entries.items() if session_id is None else \
                [(session_id, self._entries[session_id])] if session_id in self._entries else []
            return [{"id": sid, "object": "session", "position": e.position, "busy": e.busy,
                     "tier": "host" if e.data is not None else ("disk" if e.on_disk else "new")}
                    for sid, e in items if e.data is not None or e.on_disk]

    def sizes(self) -> dict[str, tuple[int, int]]:
        """tier -> (sessions, bytes) for the metrics (disk bytes are the files' sizes)."""
        with self._lock:
            host = [e.data.nbytes for e in self._entries.values() if e.data is not None]
            disk = [sid for sid, e in self._entries.items() if e.data is None and e.on_disk]
        disk_bytes = 0
        for sid in disk:
            try:
                disk_bytes += os.path.getsize(os.path.join(self.directory, file_name(sid)))
            except OSError:
                pass
        return {"host": (len(host), sum(host)), "disk": (len(disk), disk_bytes)}


__all__ = ["SessionStore", "SessionData", "SessionBusy", "SessionMissing", "StateFileError", "file_name"]
