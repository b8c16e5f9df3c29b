"""Helpers for the server tests: a real ``mhla-serve`` process on a free loopback port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx

START_TIMEOUT_S = 180  # a bound on waiting for start-up on a busy machine, not a timing assertion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, *args, env=None, log=None):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(log, "ab") if log else subprocess.DEVNULL
        cmd = [sys.executable, "-m", "mhla_stream.cli.serve", "--port", str(self.port), *map(str, args)]
        self.proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mhla-serve exited with status {self.proc.returncode} at start-up")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError("mhla-serve did not start")
            time.sleep(0.3)

    def health(self) -> dict:
        return httpx.get(self.base + "/health", timeout=10).json()

    def wait_until(self, predicate, tries: int = 600, delay: float = 0.1) -> dict:
        """Polls /health until predicate(health) holds (a bounded loop); returns the last health."""
        for _ in range(tries):
            h = self.health()
            if predicate(h):
                return h
            time.sleep(delay)
        raise AssertionError(f"server never reached the expected state; last /health: {h}")

    def terminate(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.log is not subprocess.DEVNULL:
            self.log.close()
        return self.proc.returncode
