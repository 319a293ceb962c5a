"""Serve every stream of every mux connection: the machinery under a stream server.

A :class:`StreamService` runs ``handler(stream)`` in a task of its own (a
thread, or a greenlet on gevent) for every stream a peer opens, on sessions it
accepts from a TCP listener (``start()``) or on sessions handed to
``serve_session()``. It bounds what peers can make it hold: ``max_sessions``
mux connections and ``max_streams`` streams served at once, at most
``max_session_streams`` of them from one session (so that one peer cannot take
every slot); a connection or stream past a bound is closed at once.
``close()`` stops the listener, closes every session (which wakes every
handler blocked on a stream), and joins every task it started.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import logging
import socket
from collections.abc import Callable
from typing import Any, TypeVar

from .config import Config
from .runtime import Runtime, Task, get_runtime
from .session import Session
from .session import server as mux_server
from .stream import Stream
from .tcp import Address, as_address, listen
from .tunnel import format_address

__all__ = ["StreamService"]

log = logging.getLogger("pysmux.serving")

#: How long ``close()`` waits for the tasks to end.
_CLOSE_SECONDS = 10.0
#: Pause after an ``accept`` error that is not about one connection (EMFILE).
_ACCEPT_ERROR_PAUSE = 0.1
_TRANSIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}
#: At most one "limit reached" warning per this many seconds.
_WARN_EVERY = 10.0

_S = TypeVar("_S", bound="StreamService")


class StreamService:
    """Run ``handler(stream)`` in a task for every stream of the sessions it serves.

    ``listen`` (``"host:port"``, ``":port"`` for every IPv4 interface, or a
    tuple) is needed by ``start()`` only. ``name`` is used in task names and logs.
    """

    def __init__(
        self,
        handler: Callable[[Stream], None],
        *,
        listen: str | Address | None = None,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        max_sessions: int = 1024,
        max_streams: int = 4096,
        max_session_streams: int = 1024,
        backlog: int = 128,
        name: str = "pysmux",
    ) -> None:
        self._handler = handler
        self._listen = None if listen is None else as_address(listen, "0.0.0.0")
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a pysmux.Config, not {type(config).__name__}")
        self._config = config
        for what, value in (("max_sessions", max_sessions), ("max_streams", max_streams),
                            ("max_session_streams", max_session_streams),
                            ("backlog", backlog)):  # fmt: skip
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what}={value!r}: must be an int > 0")
        self._max_sessions = max_sessions
        self._max_streams = max_streams
        self._max_session_streams = max_session_streams
        self._backlog = backlog
        self._name = name
        self._rt = rt = get_runtime(runtime)
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._ids = itertools.count(1)
        self._started = False
        self._closed = False
        self._listener: Any = None
        self._address: Address | None = None
        self._tasks: dict[int, Task | None] = {}  # running; None until spawn returned
        self._ended: list[Task] = []  # finished, not joined yet
        self._sessions: dict[int, Session] = {}
        self._streams = 0
        self._warned_at = -_WARN_EVERY

    # -- public ----------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """Where it listens (the real port when 0 was asked for)."""
        if self._address is None:
            raise RuntimeError("not listening: call start() first")
        return self._address

    @property
    def config(self) -> Config:
        return self._config

    @property
    def runtime(self) -> Runtime:
        return self._rt

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sessions(self) -> int:
        """Sessions being served now."""
        return len(self._sessions)

    @property
    def streams(self) -> int:
        """Streams being served now."""
        return self._streams

    def start(self: _S) -> _S:
        """Listen and serve in background tasks; returns ``self``. ``OSError`` if the
        address cannot be bound."""
        if self._listen is None:
            raise RuntimeError(f"{self._name}: no listen address given")
        with self._lock:
            if self._closed or self._started:
                raise RuntimeError(f"{self._name}: already started or closed")
            self._started = True
        listener = listen(self._rt, self._listen, self._backlog)
        host, port = listener.getsockname()[:2]
        with self._lock:
            self._listener = listener
            self._address = (str(host), int(port))
        log.info("%s listening on %s", self._name, format_address(self._address))
        if not self.spawn(self._accept_loop, f"{self._name}-accept"):
            self.close()
            raise RuntimeError(f"{self._name}: closed while starting, or no task could start")
        return self

    def serve_session(self, session: Session) -> None:
        """Serve the streams ``session``'s peer opens until it ends (blocks).

        ``close()`` closes it. Handlers of its streams may still run on return.
        """
        token = self._register(session)
        if token is not None:
            self._serve(session, token)

    def _register(self, session: Session) -> int | None:
        """Count ``session`` as served (close() closes it); None, and closed, once closed."""
        with self._lock:
            if not self._closed:
                token = next(self._ids)
                self._sessions[token] = session
                return token
        session.close()
        return None

    def _serve(self, session: Session, token: int) -> None:
        served = [0]  # this session's streams being served
        try:
            while True:
                try:
                    stream = session.accept_stream()
                except OSError:
                    return
                self._dispatch(stream, served)
        finally:
            with self._lock:
                self._sessions.pop(token, None)
                self._cond.notify_all()
            session.close()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds``, or less if ``close()`` is called; True once closed."""
        rt = self._rt
        deadline = rt.monotonic() + seconds
        with self._lock:
            while not self._closed:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def close(self) -> None:
        """Stop listening, close every session, join every task. Idempotent; not from
        a task of this service."""
        rt = self._rt
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            listener = self._listener
            sessions = list(self._sessions.values())
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        for session in sessions:
            session.close()
        deadline = rt.monotonic() + _CLOSE_SECONDS
        with self._lock:
            while self._tasks and deadline > rt.monotonic():
                self._cond.wait(deadline - rt.monotonic())
            stuck = len(self._tasks)
            ended, self._ended = self._ended, []
        for task in ended:
            task.join(max(0.0, deadline - rt.monotonic()))
        if stuck:  # pragma: no cover - a handler that ignores its stream being closed
            log.warning("%s: %d task(s) still running after close()", self._name, stuck)
        if listener is not None:
            listener.close()

    def __enter__(self: _S) -> _S:
        if not self._started and self._listen is not None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def spawn(self, fn: Callable[[], None], name: str) -> bool:
        """Run ``fn`` in a task that ``close()`` joins; False (not started) once closed."""
        with self._lock:
            if self._closed:
                return False
            tid = next(self._ids)
            self._tasks[tid] = None
            self._ended = [t for t in self._ended if t.is_alive()]

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s: task %s failed", self._name, name)
            finally:
                with self._lock:
                    task = self._tasks.pop(tid, None)
                    if task is not None:
                        self._ended.append(task)
                    self._cond.notify_all()

        try:
            task = self._rt.spawn(run, name)
        except RuntimeError as exc:  # "can't start new thread": refuse this piece of work
            log.error("%s: cannot start a task for %s: %s", self._name, name, exc)
            with self._lock:
                self._tasks.pop(tid, None)
                self._cond.notify_all()
            return False
        with self._lock:
            if tid in self._tasks:
                self._tasks[tid] = task
            else:
                self._ended.append(task)
        return True

    # -- internals -------------------------------------------------------------------

    def _warn_limit(self, what: str) -> None:
        now = self._rt.monotonic()
        if now - self._warned_at >= _WARN_EVERY:
            self._warned_at = now
            log.warning(
                "%s: %s (more are closed quietly for %.0f s)", self._name, what, _WARN_EVERY
            )

    def _dispatch(self, stream: Stream, served: list[int]) -> None:
        with self._lock:
            if self._streams >= self._max_streams:
                full = f"max_streams={self._max_streams}"
            elif served[0] >= self._max_session_streams:
                full = f"max_session_streams={self._max_session_streams}"
            else:
                full = ""
                self._streams += 1
                served[0] += 1
        if full:
            self._warn_limit(f"stream refused: {full} reached")
            stream.close()
            return
        run = functools.partial(self._run_handler, stream, served)
        if not self.spawn(run, f"{self._name}-stream"):
            self._stream_done(served)
            stream.close()

    def _stream_done(self, served: list[int]) -> None:
        with self._lock:
            self._streams -= 1
            served[0] -= 1

    def _run_handler(self, stream: Stream, served: list[int]) -> None:
        try:
            self._handler(stream)
        except OSError as exc:
            log.debug("%s: stream %d: %s", self._name, stream.id, exc)
        finally:
            stream.close()
            self._stream_done(served)

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    log.error("%s: accept failed: %s", self._name, exc)
                    if self.pause(_ACCEPT_ERROR_PAUSE):
                        return
                continue
            where = format_address(peer)
            sock.settimeout(None)
            if len(self._sessions) >= self._max_sessions:
                self._warn_limit(f"mux connection refused: max_sessions={self._max_sessions}")
                sock.close()
                continue
            try:
                session = mux_server(sock, config=self._config, runtime=self._rt)
            except Exception:  # a bug; one connection must not end the accept loop
                log.exception("%s: cannot serve the connection from %s", self._name, where)
                sock.close()
                continue
            log.debug("%s: mux connection from %s", self._name, where)
            token = self._register(session)
            if token is None:
                return
            serve = functools.partial(self._serve, session, token)
            if not self.spawn(serve, f"{self._name}-session-{where}"):
                with self._lock:
                    self._sessions.pop(token, None)
                session.close()
