"""The socket-like smux stream, and what it may ask of its session.

A ``Stream`` is the application's handle on one logical connection. Its
protocol state (the two half-states, the receive buffer, the v2 counters; the
table of states is in ``pysmux/core/stream.py``) comes from
:class:`~pysmux.core.StreamCore`, which only the session's core changes. On
top of it the stream keeps what blocking calls need: its timeout, a condition
to wait on, a send lock, and the handle's own ``closed`` flag.

A stream asks its session for everything else through one :class:`StreamHost`,
always under the session's lock (``host.lock``), which all its streams share.
``close()`` marks the handle closed, as a socket's file descriptor, and
releases the stream: it leaves the session's table once neither side is open.
"""

from __future__ import annotations

import errno
import io
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from .core import StreamCore
from .core.stream import INITIAL_PEER_WINDOW, RECV_EOF, RECV_RESET, RECV_SHUT, SEND_SHUT
from .errors import SmuxError, StreamResetError
from .runtime import bounded_wait, check_timeout

if TYPE_CHECKING:
    from .runtime import Condition, Lock, Runtime

# INITIAL_PEER_WINDOW: what a peer may send before our first UPD (v2), as the
# attack tooling needs it.
__all__ = ["INITIAL_PEER_WINDOW", "Stream", "StreamHost", "StreamReads", "StreamWrites"]


class StreamReads(Protocol):
    """What a stream asks of its session's read side (the session lock held)."""

    def await_frames(self, stream: Stream, deadline: float | None) -> None:
        """Wait until frames may have changed ``stream`` (reading the transport
        itself if nobody else is); raise when ``deadline`` passes."""

    def consumed(self, stream: Stream, count: int) -> None:
        """The application took ``count`` bytes from ``stream``."""

    def shut(self, stream: Stream) -> None:
        """Local ``shutdown(SHUT_RD)``: drop ``stream``'s data, read ``b""`` from now on."""


class StreamWrites(Protocol):
    """What a stream asks of its session's write side."""

    def send(self, stream: Stream, data: memoryview, deadline: float | None, whole: bool) -> int:
        """Write ``data`` (all of it if ``whole``, else what can go once the
        stream may write); how many bytes. Called with the lock *not* held."""

    def shut(self, stream: Stream, reset: bool = False) -> None:
        """Local ``shutdown(SHUT_WR)``: queue ``stream``'s FIN once (lock held);
        ``reset``: with the reset marker before it."""


@dataclass(frozen=True, slots=True)
class StreamHost:
    """What a stream may ask of its session: the whole interface between the two."""

    #: The session's lock, which guards every stream's state.
    lock: Lock
    #: Where conditions, locks and the clock come from.
    runtime: Runtime
    reads: StreamReads
    writes: StreamWrites
    #: ``reset_error(stream)``: what a reset stream raises.
    reset_error: Callable[[Stream], StreamResetError]


class Stream(StreamCore):
    """One logical, socket-like connection inside a session.

    Blocking by default; ``settimeout``/``setblocking`` behave as on sockets.
    """

    __slots__ = (
        "__weakref__",
        "_closed",
        "_cond",
        "_host",
        "_io_refs",
        "_send_lock",
        "_timeout",
        "_tx_granted",
        "_waiting",
    )

    def __init__(self, host: StreamHost, stream_id: int) -> None:
        super().__init__(stream_id)
        self._host = host
        self._closed = False
        self._io_refs = 0
        self._timeout: float | None = None
        # Created on first wait: an idle stream stays small.
        self._cond: Condition | None = None
        self._waiting = 0
        self._send_lock: Any = None
        self._tx_granted = False  # the transport turn was handed to this stream

    def __repr__(self) -> str:
        recv = ("open", "eof", "reset", "shut")[self._recv_state]
        send = ("open", "shut", "reset")[self._send_state]
        closed = " closed" if self._closed else ""
        return f"<pysmux.Stream id={self.id} recv={recv} send={send}{closed}>"

    # -- waiting (called with the session lock held) -------------------------------

    def _condition(self) -> Condition:
        if self._cond is None:
            host = self._host
            self._cond = host.runtime.condition(host.lock)
        return self._cond

    def _wait(self, deadline: float | None) -> None:
        """Wait for a change of this stream's state; raise if the deadline passed."""
        if deadline is None:
            remaining = None
        else:
            remaining = deadline - self._host.runtime.monotonic()
            if remaining <= 0:
                raise self._expired()
        cond = self._condition()
        self._waiting += 1
        try:
            cond.wait(bounded_wait(remaining))
        finally:
            self._waiting -= 1

    def _expired(self) -> OSError:
        """What a call whose deadline passed raises: as a socket in this mode."""
        if self._timeout == 0.0:
            return BlockingIOError(errno.EAGAIN, "stream operation would block")
        return TimeoutError("timed out")

    def _wake(self) -> None:
        if self._waiting:
            assert self._cond is not None
            self._cond.notify_all()

    def _deadline(self) -> float | None:
        if self._timeout is None:
            return None
        return self._host.runtime.monotonic() + self._timeout

    def _check_open(self) -> None:
        if self._closed and self._io_refs <= 0:
            raise SmuxError(errno.EBADF, f"stream {self.id} is closed")

    # -- receiving -------------------------------------------------------------------

    def recv(self, bufsize: int, flags: int = 0) -> bytes:
        """Up to ``bufsize`` bytes; ``b""`` only once the peer's FIN is drained."""
        if bufsize < 0:
            raise ValueError("negative buffersize in recv")
        if flags:
            raise ValueError("flags are not supported")
        host = self._host
        with host.lock:
            if not self._wait_readable(bufsize):
                return b""
            data = self._take(bufsize)
            host.reads.consumed(self, len(data))
            return data

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """Read into a writable buffer, as ``socket.recv_into``; 0 means EOF."""
        # Every argument is checked before the stream is touched: a bad call
        # must not take data out of the buffer and then fail.
        view = memoryview(buffer).cast("B")
        if view.readonly:
            raise TypeError(
                "recv_into() argument 'buffer' must be read-write bytes-like object, "
                f"not {type(buffer).__name__}"
            )
        if nbytes < 0:
            raise ValueError("negative buffersize in recv_into")
        if nbytes > len(view):
            raise ValueError("buffer too small for requested bytes")
        if flags:
            raise ValueError("flags are not supported")
        if nbytes == 0:
            nbytes = len(view)
        host = self._host
        with host.lock:
            if not self._wait_readable(nbytes):
                return 0
            count = self._take_into(view, nbytes)
            host.reads.consumed(self, count)
            return count

    def _wait_readable(self, want: int = 1) -> bool:
        """True when data is buffered; False at EOF (or for an empty request)."""
        self._check_open()
        deadline = None
        while not self._recv_buffered:
            state = self._recv_state
            if state in (RECV_EOF, RECV_SHUT) or want == 0:
                return False
            if state == RECV_RESET:
                raise self._host.reset_error(self)
            if deadline is None:
                deadline = self._deadline()
            self._host.reads.await_frames(self, deadline)
            self._check_open()
        return want > 0

    # -- sending ---------------------------------------------------------------------

    def send(self, data: Any) -> int:
        """Send what can go without waiting once the stream may write; return the count."""
        return self._send(data, whole=False)

    def sendall(self, data: Any) -> None:
        """Send all of ``data``; the stream's timeout bounds the whole call."""
        self._send(data, whole=True)

    def _send(self, data: Any, whole: bool) -> int:
        view = memoryview(data).cast("B")
        host = self._host
        if self._send_lock is None:
            with host.lock:
                if self._send_lock is None:
                    self._send_lock = host.runtime.lock()
        deadline = self._deadline()
        # One writer per stream at a time, so concurrent sendall calls do not interleave.
        if deadline is None:
            self._send_lock.acquire()
        else:
            clock = host.runtime.monotonic
            while not self._send_lock.acquire(True, bounded_wait(deadline - clock()) or 0.0):
                if clock() >= deadline:
                    raise self._expired()
        try:
            return host.writes.send(self, view, deadline, whole)
        finally:
            self._send_lock.release()

    def _send_error(self) -> OSError:
        """What a send on a stream that may not send raises (session lock held)."""
        if self._closed:
            return BrokenPipeError(errno.EPIPE, f"stream {self.id} is closed")
        if self._send_state == SEND_SHUT:
            return BrokenPipeError(errno.EPIPE, f"stream {self.id} was shut down for writing")
        return self._host.reset_error(self)

    # -- socket-like settings --------------------------------------------------------

    def settimeout(self, value: float | None) -> None:
        """None blocks, 0 is non-blocking, a positive number bounds each call.

        As ``socket.settimeout``: ``ValueError`` for a negative value or NaN;
        a huge value (``1e10``, ``inf``) means "wait that long"."""
        self._timeout = check_timeout(value)

    def gettimeout(self) -> float | None:
        """The timeout in seconds set by ``settimeout`` (None: blocking; 0.0: non-blocking)."""
        return self._timeout

    def setblocking(self, flag: bool) -> None:
        """``setblocking(True)`` is ``settimeout(None)``; ``False`` is ``settimeout(0.0)``."""
        self._timeout = None if flag else 0.0

    # -- closing ---------------------------------------------------------------------

    def shutdown(self, how: int) -> None:
        """``SHUT_WR`` sends FIN (reading goes on); ``SHUT_RD`` drops incoming data."""
        if how not in (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR):
            raise ValueError(f"invalid shutdown mode {how!r}")
        host = self._host
        with host.lock:
            self._check_open()
            if how != socket.SHUT_WR:
                host.reads.shut(self)
            if how != socket.SHUT_RD:
                host.writes.shut(self)

    def close(self) -> None:
        """Send FIN if not sent yet, drop unread data, and release the stream. Idempotent.

        As with ``socket.close()``, files from ``makefile()`` keep the stream
        usable until they are closed too.
        """
        with self._host.lock:
            self._closed = True
            if self._io_refs <= 0:
                self._release()

    def reset(self) -> None:
        """Abort the stream, as closing a socket with ``SO_LINGER`` 0 aborts a TCP
        connection: unread data is dropped, and a pysmux peer's ``recv`` and ``send``
        raise ``StreamResetError`` (after the data that reached it) instead of
        seeing a clean end. A Go smux peer sees a plain FIN (smux has no reset).
        If this end already sent its FIN, only the local close remains. Idempotent.
        """
        with self._host.lock:
            if not self._closed:
                self._host.writes.shut(self, reset=True)
        self.close()

    def _release(self) -> None:
        host = self._host
        host.reads.shut(self)
        host.writes.shut(self)

    def _decref_socketios(self) -> None:
        """Called by ``socket.SocketIO.close`` (the raw file of ``makefile``)."""
        with self._host.lock:
            if self._io_refs > 0:
                self._io_refs -= 1
            if self._closed and self._io_refs <= 0:
                self._release()

    def makefile(
        self,
        mode: str = "r",
        buffering: int | None = None,
        *,
        encoding: str | None = None,
        errors: str | None = None,
        newline: str | None = None,
    ) -> Any:
        """A file object on the stream, exactly as ``socket.socket.makefile``."""
        if not set(mode) <= {"r", "w", "b"}:
            raise ValueError(f"invalid mode {mode!r} (only r, w, b allowed)")
        writing = "w" in mode
        reading = "r" in mode or not writing
        binary = "b" in mode
        rawmode = ("r" if reading else "") + ("w" if writing else "")
        raw = socket.SocketIO(self, rawmode)  # type: ignore[arg-type]
        with self._host.lock:
            self._check_open()
            self._io_refs += 1
        if buffering is None:
            buffering = -1
        if buffering < 0:
            buffering = io.DEFAULT_BUFFER_SIZE
        if buffering == 0:
            if not binary:
                raise ValueError("unbuffered streams must be binary")
            return raw
        buffer: io.BufferedIOBase
        if reading and writing:
            buffer = io.BufferedRWPair(raw, raw, buffering)
        elif reading:
            buffer = io.BufferedReader(raw, buffering)
        else:
            buffer = io.BufferedWriter(raw, buffering)
        if binary:
            return buffer
        text = io.TextIOWrapper(buffer, encoding, errors, newline)  # type: ignore[type-var]
        text.mode = mode  # type: ignore[misc]
        return text

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        """True after ``close()``."""
        return self._closed

    def fileno(self) -> int:
        """Streams have no file descriptor: always -1 (as a closed socket)."""
        return -1
