"""An smux session: one transport, many streams; the blocking driver of the core.

The smux rules live in the sans-I/O core (``pysmux/core/``). A ``Session``
runs that core on a blocking transport with the tasks, locks and conditions of
its runtime (threads or greenlets):

* the read side (``reading.py``): the reader task, and on threads the direct
  reads of a stream's own ``recv``; it feeds what it reads to the core;
* the write side (``writing.py``): the transport turn that ``send`` takes to
  write its frames itself, and the writer task that writes control frames and
  runs the keepalive clock;
* the streams (``stream.py``), which ask the session for everything through a
  :class:`~pysmux.stream.StreamHost`.

This module starts them, serves the session's public API and ends the
session. Everything is guarded by one session lock; I/O happens outside it.
docs/design.md sections 2 to 5 describe the whole.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

from .config import Config
from .core import SessionCore
from .errors import SessionClosedError, SmuxError
from .reading import ReadPath
from .runtime import Lock, Runtime, bounded_wait, check_timeout, get_runtime
from .stream import Stream, StreamHost
from .writing import WritePath

__all__ = ["Session", "SessionParts", "client", "server"]

log = logging.getLogger("pysmux")

#: How long close() lets queued control frames (such as FINs) reach the wire.
_CLOSE_FLUSH_SECONDS = 0.5
#: How long close() waits for the session's own tasks to end.
_JOIN_SECONDS = 5.0


class SessionParts(NamedTuple):
    """What the read and the write path of a session share."""

    sock: Any
    core: SessionCore[Stream]
    lock: Lock
    runtime: Runtime
    #: Ends the session (lock not held).
    abort: Callable[[SmuxError], None]


class Session:
    """One smux session over a connected socket-like transport.

    The session owns the transport: ``close()`` closes it. Create one with
    :func:`pysmux.client` or :func:`pysmux.server`.
    """

    def __init__(
        self,
        sock: Any,
        *,
        is_client: bool,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
    ) -> None:
        self._config = cfg = config if config is not None else Config()
        if not isinstance(cfg, Config):
            raise TypeError(f"config must be a pysmux.Config, not {type(cfg).__name__}")
        self._runtime = rt = get_runtime(runtime)
        rt.check_transport(sock)
        self._sock = sock
        self._lock = lock = rt.lock()
        self._core = core = SessionCore(
            cfg, is_client=is_client, now=rt.monotonic(), new_stream=self._new_stream
        )
        parts = SessionParts(sock, core, lock, rt, self._abort)
        self._reads = reads = ReadPath(parts)
        self._writes = writes = WritePath(parts, reads)
        reads.writes = writes
        self._host = StreamHost(lock, rt, reads, writes, core.reset_error)
        self._prepare_transport(sock)
        role = "client" if is_client else "server"
        self._reader = rt.spawn(reads.run, f"pysmux-{role}-reader")
        self._writer = rt.spawn(writes.run, f"pysmux-{role}-writer")

    def _new_stream(self, stream_id: int) -> Stream:
        return Stream(self._host, stream_id)

    @staticmethod
    def _prepare_transport(sock: Any) -> None:
        # The session blocks on the transport itself; a socket timeout would look
        # like a transport failure. Small frames must not wait for Nagle.
        settimeout = getattr(sock, "settimeout", None)
        if settimeout is not None:
            settimeout(None)
        family = getattr(sock, "family", None)
        if family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):  # not every AF_INET socket is TCP
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def __repr__(self) -> str:
        core = self._core
        role = "client" if core.is_client else "server"
        state = "closed" if core.closed else "open"
        return f"<pysmux.Session {role} v{core.version} {state} streams={len(core.streams)}>"

    # -- public API ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The session's settings (as given, or the defaults)."""
        return self._config

    @property
    def closed(self) -> bool:
        """True once the session has ended, for whatever reason."""
        return self._core.closed

    @property
    def error(self) -> SmuxError | None:
        """Why the session ended: None while open, else the error that ended it."""
        return self._core.error

    @property
    def num_streams(self) -> int:
        """Streams the session is tracking (open in at least one direction)."""
        return len(self._core.streams)

    @property
    def dropped_frames(self) -> int:
        """PSH frames dropped: for unknown or closed streams, or after the peer's FIN."""
        return self._core.dropped_frames

    @property
    def refused_streams(self) -> int:
        """Incoming streams refused (with a FIN) because a limit was reached."""
        return self._core.refused_streams

    def stats(self) -> dict[str, int]:
        """This session's counters and gauges, as one consistent snapshot.

        Counters (only grow): ``streams_opened`` (by this side),
        ``streams_accepted`` (opened by the peer), ``streams_refused``,
        ``frames_sent``, ``bytes_sent``, ``frames_received``,
        ``bytes_received`` (transport bytes, headers included),
        ``dropped_frames``, ``protocol_errors`` (0 or 1). Gauges: ``streams``
        (tracked now), ``buffered_bytes`` (received, not yet read).
        """
        with self._lock:
            return self._core.stats()

    def open_stream(self) -> Stream:
        """Open a new stream. The peer learns of it with our first frame."""
        with self._lock:
            stream = self._core.open_stream()
            self._writes.control_queued()
            return stream

    def accept_stream(self, timeout: float | None = None) -> Stream:
        """Wait for the peer to open a stream. TimeoutError after ``timeout`` seconds.

        ``timeout`` is checked as ``socket.settimeout`` checks it (ValueError for
        a negative value or NaN); None waits until a stream arrives or the
        session ends (then SessionClosedError)."""
        rt = self._runtime
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else rt.monotonic() + timeout
        core = self._core
        arrived = self._reads.arrived
        with self._lock:
            while True:
                core.check_alive()
                if core.accept_queue and (core.syn_stalled or core.refusing):
                    self._reads.wake()  # room for new streams again
                stream = core.accept()
                if stream is not None:
                    return stream
                if deadline is None:
                    arrived.wait()
                    continue
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no stream arrived within {timeout} s")
                arrived.wait(bounded_wait(remaining))

    def close(self) -> None:
        """Close the session and its transport; wake every blocked call. Idempotent.

        Control frames already queued (such as the FIN of a stream just closed)
        get a short chance to reach the peer first.
        """
        rt = self._runtime
        with self._lock:
            self._writes.flush(rt.monotonic() + _CLOSE_FLUSH_SECONDS)
        self._abort(SessionClosedError(errno.ECONNABORTED, "session closed locally"))
        for task in (self._writer, self._reader):
            if not rt.current_task_is(task):
                task.join(_JOIN_SECONDS)
                if task.is_alive():  # pragma: no cover - a transport that ignores shutdown
                    log.warning("pysmux: session task did not end within %s s", _JOIN_SECONDS)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- the end ---------------------------------------------------------------------

    def _abort(self, error: SmuxError) -> None:
        """End the session (lock not held): record why, wake everything, shut the
        transport down."""
        with self._lock:
            streams = self._core.close(error)
            if streams is None:
                return  # it had ended already
            error = self._core.error or error
            self._reads.on_abort()
            streams += self._writes.on_abort()
            for stream in streams:
                stream._wake()
        # Every caller learns why (``error``, the exceptions it raises): the
        # owner of the session reports it, not the library a second time.
        log.debug("session ended: %s", error)
        # shutdown (not close) wakes a thread blocked in recv or send on Linux;
        # the reader closes the socket once no one is using it.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)


def client(
    sock: Any, config: Config | None = None, runtime: str | Runtime | None = None
) -> Session:
    """Start the client end of a session on a connected transport (odd stream ids).

    ``runtime``: ``"thread"`` (the default, also for None), ``"gevent"``,
    ``"auto"`` (gevent when the process is monkey-patched) or a runtime object.
    """
    return Session(sock, is_client=True, config=config, runtime=runtime)


def server(
    sock: Any, config: Config | None = None, runtime: str | Runtime | None = None
) -> Session:
    """Start the server end of a session on a connected transport (even stream ids).

    ``runtime``: as for :func:`client`.
    """
    return Session(sock, is_client=False, config=config, runtime=runtime)
