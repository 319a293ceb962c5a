"""Helpers for the pysmux tests: condition waits with deadlines, worker threads
that hand back results or exceptions, exact reads, seeded payloads."""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "Worker",
    "payload",
    "recv_exact",
    "recv_to_eof",
    "spawn",
    "wait_until",
]


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # poll, bounded
        delay = min(delay * 2, 0.02)


class Worker(threading.Thread):
    """A daemon thread running ``fn(*args)``; ``result()`` returns its value or
    re-raises its exception, and fails if it is not done within ``timeout``."""

    def __init__(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> None:
        super().__init__(name=name or f"test-{getattr(fn, '__name__', 'worker')}", daemon=True)
        self._fn = fn
        self._args = args
        self._value: Any = None
        self.exc: BaseException | None = None
        self.started_call = threading.Event()
        self.finished_at: float | None = None

    def run(self) -> None:
        try:
            self.started_call.set()
            self._value = self._fn(*self._args)
        except BaseException as exc:
            self.exc = exc
        finally:
            self.finished_at = time.monotonic()

    def result(self, timeout: float = 30.0) -> Any:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout}s")
        if self.exc is not None:
            raise self.exc
        return self._value

    def exception(self, timeout: float = 30.0) -> BaseException | None:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout}s")
        return self.exc


def spawn(fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
    w = Worker(fn, *args, name=name)
    w.start()
    return w


def recv_exact(stream: Any, n: int) -> bytes:
    """Read exactly ``n`` bytes; AssertionError on an early EOF."""
    out = bytearray()
    while len(out) < n:
        chunk = stream.recv(n - len(out))
        if not chunk:
            raise AssertionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def recv_to_eof(stream: Any, bufsize: int = 65536, limit: int = 1 << 30) -> bytes:
    out = bytearray()
    while True:
        chunk = stream.recv(bufsize)
        if not chunk:
            return bytes(out)
        out += chunk
        assert len(out) <= limit, "more data than expected"


def payload(size: int, seed: int) -> bytes:
    """``size`` seeded pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
