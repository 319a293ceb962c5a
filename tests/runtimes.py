"""The test side of the two runtimes: one small API over threads and greenlets.

Every test runs once per runtime (see the root ``conftest.py``). The runtime
fixture activates a :class:`Harness` for the test; the helpers a test uses to
run work concurrently (``spawn``), to wait (``Event``, ``Queue``,
``Condition``, ``Barrier``, ``sleep``) and to make transports (``socketpair``,
``listen``, ``connect``) come from it, so one test body serves both runtimes:

* ``thread``: OS threads, ``threading`` primitives, plain sockets. Sessions
  get ``runtime="thread"``.
* ``gevent``: greenlets, ``gevent`` primitives, ``gevent.socket`` sockets.
  Sessions get ``runtime="gevent"``. The process is not monkey-patched in the
  default run, so a test that blocked in a ``threading`` primitive or a plain
  socket would freeze the hub: everything here is cooperative. The same code
  also serves a run under ``python -m gevent.monkey --module pytest``.

Nothing is created at import: gevent is imported only when its harness is.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = [
    "ALL_RUNTIMES",
    "GeventHarness",
    "Harness",
    "ThreadHarness",
    "Worker",
    "activate",
    "configured_runtimes",
    "current",
    "deactivate",
    "gevent_available",
    "gevent_patched",
    "harness_for",
    "in_ci",
    "live_greenlets",
]

ALL_RUNTIMES = ("thread", "gevent")

#: Environment variable choosing the runtimes of a run: "thread", "gevent" or
#: "thread,gevent". Unset: gevent only in a monkey-patched process, else both.
ENV_VAR = "PYSMUX_TEST_RUNTIME"


def gevent_patched() -> bool:
    """True when gevent has monkey-patched ``socket`` in this process."""
    monkey = __import__("sys").modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


def gevent_available() -> bool:
    try:
        import gevent  # noqa: F401
    except ImportError:
        return False
    return True


def in_ci() -> bool:
    """True under ``CI=true``: there a missing dependency fails the run instead of
    skipping the tests that need it (a green CI must have run everything)."""
    return os.environ.get("CI", "").lower() == "true"


def configured_runtimes() -> tuple[str, ...]:
    """The runtimes this run tests, from ``PYSMUX_TEST_RUNTIME``."""
    raw = os.environ.get(ENV_VAR, "").strip()
    if not raw:
        return ("gevent",) if gevent_patched() else ALL_RUNTIMES
    names = tuple(dict.fromkeys(n.strip() for n in raw.split(",") if n.strip()))
    unknown = [n for n in names if n not in ALL_RUNTIMES]
    if unknown or not names:
        raise ValueError(f"{ENV_VAR}={raw!r}: expected a comma list of {', '.join(ALL_RUNTIMES)}")
    return names


class Worker:
    """A task running ``fn(*args)`` (a thread or a greenlet).

    ``result()`` returns its value or re-raises its exception, and fails if it
    is not done within ``timeout``; ``exception()`` returns the exception (or
    None). ``started_call`` is set just before ``fn`` is called, and
    ``finished_at`` is the monotonic time it returned or raised.
    """

    name: str
    exc: BaseException | None
    finished_at: float | None
    started_call: Any

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], started_call: Any) -> None:
        self._fn = fn
        self._args = args
        self._value: Any = None
        self.exc = None
        self.finished_at = None
        self.started_call = started_call

    def _run(self) -> None:
        try:
            self.started_call.set()
            self._value = self._fn(*self._args)
        except BaseException as exc:  # handed to whoever asks for the result
            self.exc = exc
        finally:
            self.finished_at = time.monotonic()

    def join(self, timeout: float | None = None) -> None:
        raise NotImplementedError

    def is_alive(self) -> bool:
        raise NotImplementedError

    def _wait_done(self, timeout: float) -> None:
        self.join(timeout)
        if self.is_alive():
            raise AssertionError(f"{self.name} still running after {timeout}s\n{self._where()}")

    def _where(self) -> str:
        """Where the task is now (its stack), for the failure message."""
        return ""

    def result(self, timeout: float = 30.0) -> Any:
        self._wait_done(timeout)
        if self.exc is not None:
            raise self.exc
        return self._value

    def exception(self, timeout: float = 30.0) -> BaseException | None:
        self._wait_done(timeout)
        return self.exc


class _ThreadWorker(Worker):
    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], name: str) -> None:
        super().__init__(fn, args, threading.Event())
        self.name = name
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _where(self) -> str:
        frame = sys._current_frames().get(self._thread.ident or -1)
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


class Harness:
    """What a test needs from a runtime; one instance per runtime name."""

    #: The runtime's name, also what sessions get as ``runtime=``.
    name: str

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
        raise NotImplementedError

    def sleep(self, seconds: float) -> None:
        raise NotImplementedError

    def Event(self) -> Any:
        raise NotImplementedError

    def Queue(self) -> Any:
        raise NotImplementedError

    def Condition(self) -> Any:
        raise NotImplementedError

    def Barrier(self, parties: int) -> Any:
        raise NotImplementedError

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Any:
        raise NotImplementedError

    def socketpair(self) -> tuple[Any, Any]:
        raise NotImplementedError

    def listen(self, host: str = "127.0.0.1", backlog: int = 128) -> Any:
        """A TCP socket listening on an ephemeral loopback port."""
        sock = self.socket()
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, 0))
            sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
        return sock

    def connect(self, addr: tuple[str, int], timeout: float | None = None) -> Any:
        """A TCP connection to a numeric address (no resolver, so no resolver threads)."""
        sock = self.socket()
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except BaseException:
            sock.close()
            raise
        return sock

    def read_fd(self, fd: int, size: int) -> bytes:
        """``os.read`` that lets other tasks run while it waits (pipes of child processes)."""
        raise NotImplementedError

    def SSLContext(self, protocol: int) -> Any:
        """An ``ssl.SSLContext`` whose ``wrap_socket`` makes sockets of this runtime."""
        raise NotImplementedError


class ThreadHarness(Harness):
    name = "thread"

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
        return _ThreadWorker(fn, args, name or f"test-{getattr(fn, '__name__', 'worker')}")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def Event(self) -> Any:
        return threading.Event()

    def Queue(self) -> Any:
        import queue

        return queue.Queue()

    def Condition(self) -> Any:
        return threading.Condition()

    def Barrier(self, parties: int) -> Any:
        return threading.Barrier(parties)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Any:
        return socket.socket(family, type)

    def socketpair(self) -> tuple[Any, Any]:
        return socket.socketpair()

    def read_fd(self, fd: int, size: int) -> bytes:
        if gevent_patched():  # threads are greenlets, and gevent made the pipe non-blocking
            import gevent.os

            return bytes(gevent.os.nb_read(fd, size))
        return os.read(fd, size)

    def SSLContext(self, protocol: int) -> Any:
        import ssl

        return ssl.SSLContext(protocol)


class _GreenWorker(Worker):
    def __init__(self, gevent: Any, fn: Callable[..., Any], args: tuple[Any, ...], name: str):
        import gevent.event

        super().__init__(fn, args, gevent.event.Event())
        self.name = name
        self._greenlet = gevent.Greenlet(self._run)
        self._greenlet.name = name
        self._greenlet.start()

    def join(self, timeout: float | None = None) -> None:
        self._greenlet.join(timeout)

    def is_alive(self) -> bool:
        return not self._greenlet.dead

    def _where(self) -> str:
        frame = self._greenlet.gr_frame
        return "".join(traceback.format_stack(frame)) if frame is not None else ""


class _GreenCondition:
    """``threading.Condition`` for greenlets (gevent has none; docs/design.md 13)."""

    def __init__(self, semaphore: Any) -> None:
        self._semaphore = semaphore
        self._lock = semaphore(1)
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> _GreenCondition:
        self._lock.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        waiter = self._semaphore(0)
        self._waiters.append(waiter)
        self._lock.release()
        try:
            # None waits forever; gevent reads a negative timeout as "do not wait".
            return bool(waiter.acquire(True, None if timeout is None else max(0.0, timeout)))
        finally:
            self._lock.acquire()
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    def wait_for(self, predicate: Callable[[], Any], timeout: float | None = None) -> Any:
        deadline = None if timeout is None else time.monotonic() + timeout
        result = predicate()
        while not result:
            if deadline is None:
                self.wait()
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self.wait(remaining)
            result = predicate()
        return result

    def notify(self, n: int = 1) -> None:
        while self._waiters and n > 0:
            self._waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


class _GreenBarrier:
    """A one-shot ``threading.Barrier`` for greenlets."""

    def __init__(self, event: Any, parties: int) -> None:
        self._event = event
        self._parties = parties
        self._count = 0

    def wait(self, timeout: float | None = None) -> int:
        index = self._count
        self._count += 1
        if self._count >= self._parties:
            self._event.set()
        if not self._event.wait(timeout):
            raise threading.BrokenBarrierError
        return index


class GeventHarness(Harness):
    name = "gevent"

    def __init__(self) -> None:
        import gevent
        import gevent.event
        import gevent.lock
        import gevent.os
        import gevent.queue
        import gevent.socket

        self.gevent = gevent
        self._event = gevent.event.Event
        self._queue = gevent.queue.Queue
        self._semaphore = gevent.lock.Semaphore
        self._gsocket = gevent.socket
        self._gos = gevent.os

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> Worker:
        return _GreenWorker(
            self.gevent, fn, args, name or f"test-{getattr(fn, '__name__', 'worker')}"
        )

    def sleep(self, seconds: float) -> None:
        self.gevent.sleep(seconds)

    def Event(self) -> Any:
        return self._event()

    def Queue(self) -> Any:
        return self._queue()

    def Condition(self) -> Any:
        return _GreenCondition(self._semaphore)

    def Barrier(self, parties: int) -> Any:
        return _GreenBarrier(self._event(), parties)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Any:
        # Not gevent.socket.create_server: it is the stdlib function and makes a plain socket.
        return self._gsocket.socket(family, type)

    def socketpair(self) -> tuple[Any, Any]:
        return self._gsocket.socketpair()

    def read_fd(self, fd: int, size: int) -> bytes:
        self._gos.make_nonblocking(fd)
        return bytes(self._gos.nb_read(fd, size))

    def SSLContext(self, protocol: int) -> Any:
        import gevent.ssl

        return gevent.ssl.SSLContext(protocol)


_HARNESSES: dict[str, Harness] = {}
_active: list[Harness] = []


def harness_for(name: str) -> Harness:
    """The harness of runtime ``name`` (created once)."""
    if name not in _HARNESSES:
        if name == "thread":
            _HARNESSES[name] = ThreadHarness()
        elif name == "gevent":
            _HARNESSES[name] = GeventHarness()
        else:
            raise ValueError(f"unknown runtime {name!r}")
    return _HARNESSES[name]


def activate(name: str) -> Harness:
    """Make ``name`` the runtime of the running test (done by the ``runtime`` fixture)."""
    harness = harness_for(name)
    _active[:] = [harness]
    return harness


def deactivate() -> None:
    _active.clear()


def current() -> Harness:
    """The harness of the running test."""
    if not _active:
        raise RuntimeError("no test runtime is active: request the `runtime` fixture")
    return _active[0]


def live_greenlets() -> list[Any]:
    """Every ``gevent.Greenlet`` that has not finished (none if gevent was never imported)."""
    import gc
    import sys

    gevent = sys.modules.get("gevent")
    if gevent is None:
        return []
    greenlet_type = gevent.Greenlet
    return [o for o in gc.get_objects() if isinstance(o, greenlet_type) and not o.dead]
