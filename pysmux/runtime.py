"""The only module that knows whether pysmux runs on threads or on gevent.

A session asks its runtime object for every lock, condition, task and clock it
uses, so the rest of the library is the same code on both.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

__all__ = [
    "MAX_WAIT",
    "GeventRuntime",
    "Launch",
    "LaunchError",
    "LaunchTarget",
    "Launcher",
    "Runtime",
    "Task",
    "ThreadRuntime",
    "bounded_wait",
    "check_timeout",
    "get_runtime",
    "gevent_patched",
]

#: The longest single wait pysmux asks of a lock, condition or poll. Longer
#: timeouts (``settimeout(1e10)``, ``inf``) are waited for in steps of this
#: size: every wait sits in a loop that checks its own deadline, and the
#: primitives underneath overflow on very large values.
MAX_WAIT = 3600.0


def bounded_wait(seconds: float | None) -> float | None:
    """``seconds`` clamped to ``0 .. MAX_WAIT``; None (forever) stays None."""
    if seconds is None:
        return None
    return min(max(seconds, 0.0), MAX_WAIT)


def check_timeout(value: float | None) -> float | None:
    """A timeout argument as ``socket.settimeout`` takes it: None, or seconds >= 0."""
    if value is None:
        return None
    seconds = float(value)
    if not seconds >= 0:  # also NaN
        raise ValueError("Timeout value out of range")
    return seconds


#: ``wait_writable(timeout) -> bool``: True once the transport takes bytes again.
WriteWaiter = Callable[[float], bool]


class Task(Protocol):
    """A running background task (a thread or a greenlet)."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class _Held(Protocol):
    """Usable in ``with``: held inside the block."""

    def __enter__(self) -> bool: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class Lock(_Held, Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...


class Condition(_Held, Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...

    def notify(self, n: int = 1) -> None: ...

    def notify_all(self) -> None: ...


#: What a :class:`Launcher` runs in a new task, and whom it tells if none could start.
LaunchTarget = Callable[[], None]
LaunchError = Callable[[BaseException], None]


class Launch(Protocol):
    """A task that a :class:`Launcher` starts once a socket is readable (at most once)."""

    def cancel(self) -> None:
        """Never start the task, unless it has started already."""

    def join(self, timeout: float | None = None) -> None:
        """Wait for the task, if it started."""

    def is_alive(self) -> bool:
        """True while the task may still start, or runs."""


class Launcher(Protocol):
    """Starts a task for a socket once it is readable, with no task waiting meanwhile.

    A tunnel keeps thousands of mostly idle TCP connections: their upload
    direction needs a task only while bytes arrive.
    """

    def when_readable(
        self, sock: Any, target: LaunchTarget, name: str, on_error: LaunchError
    ) -> Launch:
        """Run ``target`` in a new task once ``sock`` is readable (or at EOF, or in
        error). ``on_error(exc)`` is called instead if no task can be started."""

    def close(self) -> None:
        """Start nothing more; end the launcher's own task, if it has one."""

    #: How long a task it started should wait for more input before it ends and the
    #: socket is watched again: long where a task start costs much (a thread), zero
    #: where it costs less than a timed wait (a greenlet).
    linger: float


class Runtime(Protocol):
    """What a session needs from its concurrency model."""

    name: str

    def lock(self) -> Lock: ...

    def condition(self, lock: Lock) -> Condition: ...

    def spawn(self, target: Callable[[], None], name: str) -> Task: ...

    def current_task_is(self, task: Task) -> bool: ...

    def monotonic(self) -> float: ...

    def check_transport(self, sock: object) -> None: ...

    def direct_reads(self) -> bool: ...

    def socket_module(self) -> Any: ...

    def write_waiter(self, sock: Any) -> WriteWaiter | None: ...

    def yield_now(self) -> None: ...

    def wait_readable(self, sock: Any, timeout: float) -> bool: ...

    def launcher(self) -> Launcher: ...


def _plain(sock: Any) -> bool:
    # TLS records cannot be written with MSG_DONTWAIT (stdlib and gevent TLS
    # sockets both have getpeercert): the session hands such writes with a
    # deadline to its writer task instead.
    return not hasattr(sock, "getpeercert") and hasattr(socket, "MSG_DONTWAIT")


class ThreadRuntime:
    """Plain OS threads (the default)."""

    name = "thread"

    def lock(self) -> Lock:
        return threading.Lock()

    def condition(self, lock: Lock) -> Condition:
        return threading.Condition(lock)  # type: ignore[arg-type]

    def spawn(self, target: Callable[[], None], name: str) -> Task:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def current_task_is(self, task: Task) -> bool:
        return threading.current_thread() is task

    monotonic = staticmethod(time.monotonic)

    def direct_reads(self) -> bool:
        """Stream readers may read the transport themselves: a thread hand-off
        costs tens of microseconds. Not in a monkey-patched process, where
        threads are greenlets and ``select.poll`` is gone."""
        return not gevent_patched()

    def socket_module(self) -> Any:
        """Where sockets that this runtime can wait on come from."""
        return socket

    def yield_now(self) -> None:
        """Let other tasks run. OS threads are preempted; patched threads are
        greenlets and must yield (the patched ``time.sleep`` does)."""
        if gevent_patched():
            time.sleep(0)

    def write_waiter(self, sock: Any) -> WriteWaiter | None:
        """How to wait for room in ``sock``'s send buffer, when it is a plain socket."""
        if not isinstance(sock, socket.socket) or not _plain(sock):
            return None
        fileno = sock.fileno()

        def wait_writable(timeout: float) -> bool:
            # Looked up at call time: monkey-patching removes select.poll, and
            # the patched select.select cooperates.
            poll = getattr(select, "poll", None)
            if poll is None:
                return bool(select.select([], [fileno], [], bounded_wait(timeout))[1])
            poller = poll()
            poller.register(fileno, select.POLLOUT)
            wait = bounded_wait(timeout)
            assert wait is not None
            return bool(poller.poll(math.ceil(wait * 1000)))

        return wait_writable

    def wait_readable(self, sock: Any, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds until ``sock`` has bytes, EOF or an error."""
        if gevent_patched():  # threads are greenlets; poll is gone, select stops at fd 1023
            return get_runtime("gevent").wait_readable(sock, timeout)
        wait = bounded_wait(timeout)
        assert wait is not None
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(math.ceil(wait * 1000)))

    def launcher(self) -> Launcher:
        """One epoll thread that starts the tasks. In a monkey-patched process threads
        are greenlets: the hub watches (gevent's launcher). Without epoll (not
        Linux), a task per socket that waits."""
        from .launch import EpollLauncher, WaitingLauncher

        if gevent_patched():
            return get_runtime("gevent").launcher()
        if hasattr(select, "epoll"):
            return EpollLauncher(self)
        return WaitingLauncher(self)

    def check_transport(self, sock: object) -> None:
        """A gevent socket works on threads only when threads are greenlets (patched)."""
        gsocket = sys.modules.get("gevent.socket")
        if gsocket is not None and isinstance(sock, gsocket.socket) and not gevent_patched():
            raise ValueError(
                "a gevent socket needs runtime='gevent' (or a monkey-patched process); "
                "runtime='thread' would read it from a native thread"
            )


class _GreenletTask:
    """A greenlet seen as a Task."""

    __slots__ = ("greenlet",)

    def __init__(self, greenlet: Any) -> None:
        self.greenlet = greenlet

    def join(self, timeout: float | None = None) -> None:
        self.greenlet.join(timeout)

    def is_alive(self) -> bool:
        return not self.greenlet.dead


class _GeventCondition:
    """A condition variable for gevent, which ships none (docs/design.md section 13).

    The stdlib one would block the hub when gevent is not monkey-patched.
    """

    __slots__ = ("_lock", "_semaphore", "_waiters")

    def __init__(self, lock: Lock, semaphore: Callable[[int], Any]) -> None:
        self._lock = lock
        self._semaphore = semaphore
        self._waiters: deque[Any] = deque()

    def __enter__(self) -> bool:
        return self._lock.__enter__()

    def __exit__(self, *exc_info: Any) -> None:
        self._lock.__exit__(*exc_info)

    def wait(self, timeout: float | None = None) -> bool:
        waiter = self._semaphore(0)
        self._waiters.append(waiter)
        self._lock.release()
        got = False
        try:
            # None means forever: gevent reads a negative timeout as "do not wait".
            got = bool(waiter.acquire(True, None if timeout is None else max(timeout, 0.0)))
            return got
        finally:  # also on gevent.Timeout or kill()
            self._lock.acquire()
            if not got:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)

    def notify(self, n: int = 1) -> None:
        waiters = self._waiters
        while waiters and n > 0:
            waiters.popleft().release()
            n -= 1

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


class GeventRuntime:
    """gevent greenlets. The transport must be a cooperative (gevent) socket."""

    name = "gevent"

    def __init__(self) -> None:
        import gevent
        import gevent.lock
        import gevent.socket
        from gevent.monkey import get_original

        self._gevent = gevent
        self._semaphore = gevent.lock.Semaphore
        self._bounded = gevent.lock.BoundedSemaphore
        self._gsocket = gevent.socket
        self._socket_type = gevent.socket.socket
        self._wait_write = gevent.socket.wait_write
        self._wait_read = gevent.socket.wait_read
        # The OS's poll even when monkey-patched: select() fails above fd 1023.
        self._os_poll = get_original("select", "poll")

    def lock(self) -> Lock:
        lock: Lock = self._bounded(1)
        return lock

    def condition(self, lock: Lock) -> Condition:
        return _GeventCondition(lock, self._semaphore)

    def spawn(self, target: Callable[[], None], name: str) -> Task:
        greenlet = self._gevent.spawn(target)
        greenlet.name = name
        return _GreenletTask(greenlet)

    def current_task_is(self, task: Task) -> bool:
        return isinstance(task, _GreenletTask) and task.greenlet is self._gevent.getcurrent()

    monotonic = staticmethod(time.monotonic)

    def direct_reads(self) -> bool:
        """Greenlet switches are cheap: the reader greenlet reads everything."""
        return False

    def socket_module(self) -> Any:
        """Cooperative sockets: a plain one would block the hub."""
        return self._gsocket

    def yield_now(self) -> None:
        """Let the other greenlets run (a socket with data waiting never yields)."""
        self._gevent.sleep(0)

    def write_waiter(self, sock: Any) -> WriteWaiter | None:
        """How to wait cooperatively for room in ``sock``'s send buffer."""
        if not isinstance(sock, self._socket_type) or not _plain(sock):
            return None
        fileno = sock.fileno()
        wait_write = self._wait_write

        def wait_writable(timeout: float) -> bool:
            try:
                wait_write(fileno, timeout=bounded_wait(timeout))
            except TimeoutError:
                return False
            return True

        return wait_writable

    def wait_readable(self, sock: Any, timeout: float) -> bool:
        """Wait cooperatively up to ``timeout`` seconds until ``sock`` has bytes, EOF
        or an error."""
        if timeout <= 0:  # a look, not a wait: no watcher, no switch to the hub
            poller = self._os_poll()
            poller.register(sock.fileno(), select.POLLIN)
            return bool(poller.poll(0))
        try:
            self._wait_read(sock.fileno(), timeout=bounded_wait(timeout))
        except TimeoutError:
            return False
        return True

    def launcher(self) -> Launcher:
        """An I/O watcher of the hub per socket: no greenlet waits meanwhile."""
        from .launch import GeventLauncher

        return GeventLauncher(self, self._gevent.get_hub().loop)

    def check_transport(self, sock: object) -> None:
        """A blocking OS socket would freeze every greenlet: refuse it."""
        if not isinstance(sock, self._socket_type):
            raise ValueError(
                f"runtime='gevent' needs a gevent socket, got {type(sock).__module__}."
                f"{type(sock).__qualname__}: create it with gevent.socket, or call "
                "gevent.monkey.patch_all() before creating sockets"
            )


def gevent_patched() -> bool:
    """True when gevent has monkey-patched ``socket`` in this process."""
    monkey = sys.modules.get("gevent.monkey")
    return monkey is not None and bool(monkey.is_module_patched("socket"))


_THREAD = ThreadRuntime()
_GEVENT: list[GeventRuntime] = []


def get_runtime(runtime: str | Runtime | None) -> Runtime:
    """Resolve the ``runtime=`` argument of ``pysmux.client``/``pysmux.server``.

    ``None`` and ``"thread"`` mean threads; ``"gevent"`` means greenlets;
    ``"auto"`` means gevent when the process is monkey-patched, else threads.
    """
    if runtime == "auto":
        runtime = "gevent" if gevent_patched() else "thread"
    if runtime is None or runtime == "thread":
        return _THREAD
    if runtime == "gevent":
        if not _GEVENT:
            try:
                _GEVENT.append(GeventRuntime())
            except ImportError as exc:
                raise ValueError(
                    "runtime='gevent' needs gevent: pip install 'pysmux[gevent]'"
                ) from exc
        return _GEVENT[0]
    if isinstance(runtime, str):
        raise ValueError(f"runtime={runtime!r}: expected 'thread', 'gevent' or 'auto'")
    return runtime
