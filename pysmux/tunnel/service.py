"""What both ends of the tunnel share: a listener, the tasks it starts, and ``close()``.

:class:`Service` binds its listen address, accepts connections in a task of
its own and hands each to the subclass (``_accepted``). It counts every task
it starts, every mux session it holds and every carried connection, so that
``close()`` can end them all and join every task. Everything is bounded:
``max_conns`` carried connections at once (more are refused at once), at most
two tasks per carried connection (one while it is idle).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import socket
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ..config import Config
from ..runtime import Launcher, Runtime, Task, get_runtime
from ..session import Session
from ..stream import Stream
from .net import (
    TRANSIENT_ACCEPT_ERRORS,
    Address,
    Net,
    as_address,
    format_address,
    reset_and_close,
)
from .pipe import Pipe
from .security import Allow, Network

__all__ = ["MAX_SECONDS", "SESSION_GAUGES", "Service", "check_seconds"]

log = logging.getLogger("pysmux.tunnel")

#: How long ``close()`` waits for the tasks of a tunnel to end.
_CLOSE_SECONDS = 10.0
#: Pause after a failed ``accept`` (out of file descriptors, say) before the next one;
#: it doubles while accept keeps failing, up to the second figure.
_ACCEPT_ERROR_PAUSE = 0.1
_ACCEPT_ERROR_PAUSE_MAX = 1.0

#: What ``Session.stats()`` reports that is a level now, not a running total.
SESSION_GAUGES = frozenset({"streams", "buffered_bytes"})

_S = TypeVar("_S", bound="Service")
_T = TypeVar("_T")


#: The longest wait a tunnel takes (11.6 days): OS timeouts overflow not far above
#: (``threading.TIMEOUT_MAX``), and a task whose wait overflows would die.
MAX_SECONDS = 1e6


def check_seconds(name: str, value: float) -> float:
    """``value`` as a float if in (0, ``MAX_SECONDS``]; else ``ValueError`` naming ``name``."""
    if not 0 < value <= MAX_SECONDS:
        raise ValueError(f"{name}={value!r}: must be > 0 and at most {MAX_SECONDS:g} seconds")
    return float(value)


class Service:
    """A listener, the tasks it starts, and what ``close()`` must end."""

    #: The host of a listen address given as ``":PORT"``.
    _default_host = ""
    #: The tunnel's own running totals (see ``stats()``).
    _COUNTERS: tuple[str, ...] = (
        "connections_carried",
        "connections_refused",
        "connections_not_allowed",
        "sessions_opened",
    )

    def __init__(
        self,
        listen: str | Address,
        *,
        config: Config | None,
        runtime: str | Runtime | None,
        max_conns: int,
        backlog: int,
        allow: Iterable[str | Network] | None = None,
    ) -> None:
        self._listen_addr = as_address(listen, "listen", self._default_host)
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a pysmux.Config, not {type(config).__name__}")
        self._config = config
        if not (isinstance(max_conns, int) and max_conns > 0):
            raise ValueError(f"max_conns={max_conns!r}: must be an int > 0")
        if not (isinstance(backlog, int) and backlog > 0):
            raise ValueError(f"backlog={backlog!r}: must be an int > 0")
        self._max_conns = max_conns
        self._backlog = backlog
        self._allow = None if allow is None else Allow(allow)
        self._rt = rt = get_runtime(runtime)
        for need in ("launcher", "wait_readable"):
            if not callable(getattr(rt, need, None)):
                raise TypeError(f"runtime {rt!r} has no {need}(), which a tunnel needs")
        self._net = Net(rt)
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._started = False
        self._closed = False
        self._listener: Any = None
        self._address: Address | None = None
        self._ids = itertools.count(1)
        # Running tasks by id (None until spawn returned), and ended ones not yet joined.
        self._tasks: dict[int, Task | None] = {}
        self._ended: list[Task] = []
        # What close() ends: sessions first, then connections and dials.
        self._sessions: dict[int, Session] = {}
        self._aborts: dict[int, Callable[[], None]] = {}
        self._active = 0  # carried connections (including those being set up)
        self._draining = False
        self._accepting = False
        # Running totals: the tunnel's own, and those of its sessions that ended.
        self._counts: dict[str, int] = dict.fromkeys(self._COUNTERS, 0)
        self._ended_sessions: dict[str, int] = {}
        # Starts the upload tasks of carried connections (made with the first one).
        self._launcher: Launcher | None = None

    # -- public --------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The address the listener is bound to (the real port when 0 was asked for)."""
        if self._address is None:
            raise RuntimeError("not listening: call start() first")
        return self._address

    @property
    def closed(self) -> bool:
        """True once ``close()`` has been called."""
        return self._closed

    @property
    def connections(self) -> int:
        """Connections being carried now (TCP connection <-> stream)."""
        return self._active

    @property
    def config(self) -> Config:
        """The session config of every mux connection (both ends must use the same version)."""
        return self._config

    @property
    def draining(self) -> bool:
        """True once ``drain()`` began: no new connections or streams are taken."""
        return self._draining

    def stats(self) -> dict[str, int]:
        """Everything the tunnel counts, as one dict of ints.

        The sessions' counters (``Session.stats()``) summed over every mux
        connection, those that ended included, plus the tunnel's own:
        ``connections_carried``, ``connections_refused``,
        ``connections_not_allowed`` (``allow``), ``sessions_opened`` (and per
        kind: ``handshake_failures`` on a server, ``target_connect_failures``
        on a ``TunnelServer``, ``reconnects``, ``dial_failures`` and
        ``expired`` on a ``TunnelClient``). Levels now: ``sessions``,
        ``connections``, ``streams``, ``buffered_bytes``, ``draining`` (0 or 1).
        """
        with self._lock:
            sessions = list(self._sessions.values())
            totals = {**self._counts}
            for key, value in self._ended_sessions.items():
                totals[key] = totals.get(key, 0) + value
            totals["connections"] = self._active
            totals["draining"] = int(self._draining)
        totals["sessions"] = len(sessions)
        for key in SESSION_GAUGES:
            totals.setdefault(key, 0)
        for session in sessions:  # outside the tunnel's lock: each takes its own
            for key, value in session.stats().items():
                totals[key] = totals.get(key, 0) + value
        return totals

    def start(self: _S) -> _S:
        """Bind and listen, then serve in background tasks. Returns ``self``.

        ``OSError`` if the address cannot be bound (nothing is left running).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the tunnel is closed")
            if self._started:
                raise RuntimeError("the tunnel is already started")
            self._started = True
        listener = self._bind()
        with self._lock:
            self._listener = listener
            host, port = listener.getsockname()[:2]
            self._address = (str(host), int(port))
        log.info("%s listening on %s", type(self).__name__, format_address(self._address))
        self._start_tasks()
        with self._lock:
            self._accepting = True
        if not self._spawn(self._accept_loop, "pysmux-tunnel-accept"):
            self.close()
            raise RuntimeError("the tunnel was closed while starting, or no task could start")
        return self

    def drain(self, timeout: float) -> bool:
        """Stop taking work, let the connections carried finish, then ``close()``.

        The listener closes at once (new TCP or mux connections are refused)
        and new streams are refused; connections in flight get up to
        ``timeout`` seconds to end by themselves, then whatever is left is
        reset as by ``close()``. True if every connection finished in time.
        Do not call it from a task of the tunnel.
        """
        rt = self._rt
        deadline = rt.monotonic() + max(0.0, timeout)
        with self._lock:
            already = self._draining or self._closed
            self._draining = True
            self._cond.notify_all()
            listener = self._listener
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        with self._lock:
            # The accept loop closes the listener as it ends: new connections are refused.
            while self._accepting and rt.monotonic() < deadline:
                self._cond.wait(deadline - rt.monotonic())
        if not already:
            log.info(
                "%s draining: up to %g s for %d connection(s)",
                type(self).__name__,
                timeout,
                self._active,
            )
        with self._lock:
            while self._active and not self._closed:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            left = self._active
        if left:
            log.warning("%s: drain timeout: resetting %d connection(s)", type(self).__name__, left)
        self.close()
        return not left

    def close(self) -> None:
        """Stop listening, end every mux session and connection, join every task.

        Idempotent and thread-safe; do not call it from a task of the tunnel.
        """
        rt = self._rt
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            listener = self._listener
            sessions = list(self._sessions.values())
        deadline = rt.monotonic() + _CLOSE_SECONDS
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        # Sessions first: the peer then sees its streams reset, not cleanly ended.
        for session in sessions:
            session.close()
        with self._lock:
            aborts = list(self._aborts.values())
        for abort in aborts:
            abort()
        with self._lock:
            while self._tasks:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            stuck = len(self._tasks)
            ended, self._ended = self._ended, []
        for task in ended:
            task.join(max(0.0, deadline - rt.monotonic()))
        if self._launcher is not None:
            self._launcher.close()
        if stuck:  # pragma: no cover - a task ignoring every wake-up
            log.warning("%s: %d task(s) still running after close()", type(self).__name__, stuck)
        if listener is not None:
            listener.close()

    def __enter__(self: _S) -> _S:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = format_address(self._address) if self._address else "not started"
        state = "closed" if self._closed else "open"
        return f"<pysmux.tunnel.{type(self).__name__} {where} {state} conns={self._active}>"

    # -- for subclasses ----------------------------------------------------------------

    def _start_tasks(self) -> None:
        """Start tasks other than the accept loop (before it starts)."""

    def _accepted(self, sock: Any, peer: Any) -> None:
        raise NotImplementedError

    # -- tasks ---------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], None], name: str) -> bool:
        """Run ``fn`` in a tracked task; False (nothing started) once closed."""
        with self._lock:
            if self._closed:
                return False
            tid = next(self._ids)
            self._tasks[tid] = None
            if self._ended:  # keep the list short: drop the ones already over
                self._ended = [t for t in self._ended if t.is_alive()]

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s: task %s failed", type(self).__name__, name)
            finally:
                with self._lock:
                    task = self._tasks.pop(tid, None)
                    if task is not None:
                        self._ended.append(task)
                    self._cond.notify_all()

        try:
            task = self._rt.spawn(run, name)
        except BaseException as exc:
            with self._lock:  # nothing started: close() must not wait for it
                self._tasks.pop(tid, None)
                self._cond.notify_all()
            if not isinstance(exc, RuntimeError):
                raise
            # "can't start new thread": refuse this piece of work
            log.error("%s: cannot start a task for %s: %s", type(self).__name__, name, exc)
            return False
        with self._lock:
            if tid in self._tasks:
                self._tasks[tid] = task
            else:
                self._ended.append(task)
        return True

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` or until closed; True if closed."""
        rt = self._rt
        deadline = rt.monotonic() + seconds
        with self._lock:
            while not self._closed:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _track(self, abort: Callable[[], None]) -> int | None:
        """Have ``close()`` call ``abort``; None (not tracked) if already closed."""
        return self._register(self._aborts, abort)

    def _untrack(self, token: int) -> None:
        with self._lock:
            self._aborts.pop(token, None)

    def _track_session(self, session: Session) -> int | None:
        """Have ``close()`` close ``session`` (before any abort); None if already closed.

        ``_end_session`` ends it and keeps its counters."""
        token = self._register(self._sessions, session)
        if token is not None:
            self._count("sessions_opened")
        return token

    def _register(self, table: dict[int, _T], item: _T) -> int | None:
        with self._lock:
            if self._closed:
                return None
            token = next(self._ids)
            table[token] = item
            return token

    def _end_session(self, token: int) -> None:
        """Close a tracked session and keep its counters for ``stats()``."""
        with self._lock:
            session = self._sessions.get(token)
        if session is None:
            return
        session.close()
        counts = session.stats()
        with self._lock:
            if self._sessions.pop(token, None) is not None:
                ended = self._ended_sessions
                for key, value in counts.items():
                    if key not in SESSION_GAUGES:
                        ended[key] = ended.get(key, 0) + value
            self._cond.notify_all()

    def _count(self, key: str, amount: int = 1) -> None:
        with self._lock:
            self._counts[key] += amount

    def _reserve_conn(self) -> bool:
        """Count one more carried connection, unless ``max_conns`` are carried or draining."""
        with self._lock:
            if self._active >= self._max_conns or self._draining:
                self._counts["connections_refused"] += 1
                return False
            self._active += 1
            self._counts["connections_carried"] += 1
            return True

    def _release_conn(self) -> None:
        with self._lock:
            self._active -= 1
            self._cond.notify_all()

    # -- sockets -------------------------------------------------------------------------

    def _bind(self) -> Any:
        last: OSError | None = None
        for family, sockaddr in self._net.resolve(self._listen_addr, passive=True):
            sock = self._net.socket(family)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(self._backlog)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock
        if last is None:  # pragma: no cover - getaddrinfo returns at least one or raises
            last = OSError(errno.EADDRNOTAVAIL, "no address to listen on")
        raise last

    def _accept_loop(self) -> None:
        try:
            self._accept_all()
        finally:
            if self._draining:
                self._listener.close()
            with self._lock:
                self._accepting = False
                self._cond.notify_all()

    def _accept_all(self) -> None:
        listener = self._listener
        pause = _ACCEPT_ERROR_PAUSE
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._closed or self._draining:
                    return
                if exc.errno not in TRANSIENT_ACCEPT_ERRORS:
                    # EMFILE and friends: the process is short of something; the
                    # connections already carried go on, new ones wait. Linux fails
                    # accept() at once while no descriptor is free, connection or not:
                    # wait longer each time (up to a second), not to spin or flood the log.
                    hint = ""
                    if exc.errno in (errno.EMFILE, errno.ENFILE):
                        hint = " (raise the open-file limit, ulimit -n, or lower max_conns)"
                    log.error("accept on %s failed: %s%s", format_address(self.address), exc, hint)
                    if self._pause(pause):
                        return
                    pause = min(pause * 2, _ACCEPT_ERROR_PAUSE_MAX)
                continue
            pause = _ACCEPT_ERROR_PAUSE
            sock.settimeout(None)
            if self._draining:  # accepted just before the listener shut
                self._count("connections_refused")
                reset_and_close(sock)
                return
            if self._allow is not None and not self._allow.admits(peer):
                log.warning("connection from %s refused: address not allowed", format_address(peer))
                self._count("connections_not_allowed")
                reset_and_close(sock)
                continue
            try:
                self._accepted(sock, peer)
            except Exception:  # a bug; one connection must not end the accept loop
                log.exception("serving the connection from %s failed", format_address(peer))
                reset_and_close(sock)

    def _dial(self, addr: Address, timeout: float) -> Any:
        """A TCP connection to ``addr`` within ``timeout`` seconds; ``close()`` interrupts it."""
        return self._net.connect(addr, timeout, self._track, self._untrack, lambda: self._closed)

    def _carry(self, sock: Any, stream: Stream, label: str) -> Pipe | None:
        """Copy between ``sock`` and ``stream`` until both are done (or aborted);
        the pipe that did it (None: nothing was carried)."""
        try:
            with self._lock:
                if self._launcher is None and not self._closed:
                    self._launcher = self._rt.launcher()
                launcher = self._launcher
        except OSError as exc:  # no descriptor left for an epoll, say: retried next time
            log.error("%s: reset: cannot watch connections: %s", label, exc)
            launcher = None
        if launcher is None:  # or closed before the first connection
            reset_and_close(sock)
            stream.reset()
            return None
        pipe = Pipe(self._rt, launcher, sock, stream, label)
        token = self._track(pipe.abort)
        if token is None:
            pipe.abort()
        try:
            pipe.run()
        finally:
            if token is not None:
                self._untrack(token)
        return pipe
