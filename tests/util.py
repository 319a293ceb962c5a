"""Helpers for the pysmux tests: condition waits with deadlines, workers (threads
or greenlets, per the test's runtime) that hand back results or exceptions,
exact reads, seeded payloads.

The concurrency helpers (``spawn``, ``Event``, ``Queue``, ``Barrier``,
``sleep``, ``socketpair``, ``wait_until``) act on the runtime of the running
test (``tests/runtimes.py``): threads and plain sockets on ``thread``,
greenlets and gevent sockets on ``gevent``.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from typing import Any

from tests.runtimes import Worker, current

__all__ = [
    "Barrier",
    "Event",
    "Queue",
    "Worker",
    "payload",
    "recv_exact",
    "recv_to_eof",
    "sleep",
    "socketpair",
    "spawn",
    "unread_bytes",
    "wait_until",
]


def wait_until(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` until true; AssertionError after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    harness = current()
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not met within {timeout}s: {what or predicate}")
        harness.sleep(min(delay, max(0.0, deadline - time.monotonic())))  # poll, bounded
        delay = min(delay * 2, 0.02)


def spawn(fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
    """Run ``fn(*args)`` in a new thread (or greenlet, on gevent)."""
    return current().spawn(fn, *args, name=name)


def sleep(seconds: float) -> None:
    """``time.sleep``, or ``gevent.sleep`` on gevent. Never a way to synchronise."""
    current().sleep(seconds)


def Event() -> Any:
    return current().Event()


def Queue() -> Any:
    return current().Queue()


def Barrier(parties: int) -> Any:
    return current().Barrier(parties)


def socketpair() -> tuple[Any, Any]:
    """A connected pair of sockets of the test's runtime."""
    return current().socketpair()


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


def unread_bytes(sock: Any) -> int:
    """Bytes waiting in a socket's receive queue (``FIONREAD``), read by nobody yet."""
    import array
    import fcntl
    import termios

    count = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, count)
    return count[0]


def payload(size: int, seed: int) -> bytes:
    """``size`` seeded pseudo-random bytes."""
    return random.Random(seed).randbytes(size)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
