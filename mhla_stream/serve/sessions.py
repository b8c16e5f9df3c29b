"""Persistent sessions: a stream's whole history in a constant-size state, kept in tiers.

* device: while a request runs, the session's state lives in an engine slot;
* host: between requests, a CPU copy, up to ``host_budget`` bytes (least recently used leave first);
* disk: beyond that, a state file in ``directory`` in the format of ``StreamingMHLA.save_state``
  (atomic, fingerprinted, checksummed), so a stream can also load it.

A session id is opaque: the file name is a hash of it, never the id itself, so no id can name a
path. The id and the chat messages are kept inside the file's metadata, which is what a restart
reads back. One request at a time per session: ``acquire`` refuses a busy one (the API's 409).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from dataclasses import dataclass, field

import torch

from ..state import MHLAState
from ..state_io import StateFileError, StateLayout, read_state_file, write_state_file

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


def file_name(session_id: str) -> str:
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest() + SUFFIX


class SessionStore:
    def __init__(self, directory: str, host_budget: int, layout: StateLayout, meta: dict[str, str]):
        """``layout``: what one session's state must look like (files are checked against it on read)."""
        self.directory, self.host_budget, self.layout = directory, host_budget, layout
        self.fingerprint = layout.fingerprint
        self.meta = meta  # model name, policy, config: written into each file like save_state does
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        os.makedirs(directory, exist_ok=True)
        self._recover()

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
            entry = self._entries[session_id]
            source = entry.fork_from
            data = entry.data
        if source is not None:
            data = self._read(source)
            if data is not None:
                data.wait()
                data = SessionData({k: v.clone() for k, v in data.tensors.items()},
                                   None if data.logits is None else data.logits.clone(),
                                   list(data.history), data.position, [dict(m) for m in data.messages])
            return data
        if data is None and entry.on_disk:
            data = self._read(session_id)
        return data.wait() if data is not None else None

    def _read(self, session_id: str) -> SessionData | None:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                raise SessionMissing(f"no session {session_id!r}")
            if entry.data is not None or not entry.on_disk:
                return entry.data
        path = os.path.join(self.directory, file_name(session_id))
        try:
            valid = read_state_file(path, self.layout)
        except StateFileError as e:  # said to the client: name the session, not the server's folder
            raise StateFileError(f"session {session_id!r}: {str(e).removeprefix(path + ': ')}") from None
        try:
            messages = json.loads(valid.meta.get("messages", "[]"))
        except ValueError:
            raise StateFileError(f"session {session_id!r}: its stored messages are not JSON") from None
        data = SessionData(valid.layers, valid.logits, valid.history, valid.position, messages)
        with self._lock:
            if entry.data is None:
                entry.data = data
            return entry.data

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
        self._evict()

    def _evict(self) -> None:
        """Moves least recently used idle sessions from host memory to disk until under the budget."""
        while True:
            with self._lock:
                resident = [(e.last_used, sid, e) for sid, e in self._entries.items() if e.data is not None]
                if sum(e.data.nbytes for _, _, e in resident) <= self.host_budget:
                    return
                idle = sorted((t, sid, e) for t, sid, e in resident if not e.busy)
                if not idle:
                    return
                _, sid, entry = idle[0]
                entry.busy = True  # nobody takes it while it is written
                data = entry.data
            try:
                self._write(sid, data)
            finally:
                with self._lock:
                    entry.busy = False
            with self._lock:
                entry.on_disk, entry.data = True, None

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
        """Writes every session held in host memory to disk (shutdown). Returns how many were written."""
        with self._lock:
            resident = [(sid, e.data) for sid, e in self._entries.items() if e.data is not None]
        for sid, data in resident:
            self._write(sid, data)
            with self._lock:
                self._entries[sid].on_disk = True
        return len(resident)

    def delete(self, session_id: str) -> None:
        with self._lock:
            entry = self._entries.get(session_id)
            if entry is None:
                raise SessionMissing(f"no session {session_id!r}")
            if entry.busy:
                raise SessionBusy(f"session {session_id!r} is in use by a request")
            del self._entries[session_id]
        path = os.path.join(self.directory, file_name(session_id))
        if os.path.exists(path):
            os.remove(path)

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
