"""A socket-like smux stream.

A ``Stream`` holds what one logical connection needs: its receive buffer, its
two half-states and, in version 2, its flow-control counters. It shares the
session's lock; every change to that state happens under it. Frames are
written and read by the session (``session.py``); the stream only asks.

The life of a stream is two small state machines, one per direction:

====================  ===========================================  ==========================
receive side          entered when                                 ``recv`` answers
====================  ===========================================  ==========================
``RECV_OPEN``         the stream is created                        buffered data, else waits
``RECV_EOF``          the peer's FIN arrives                       buffered data, then ``b""``
``RECV_RESET``        the session ends before the peer's FIN       buffered data, then reset
``RECV_SHUT``         local ``shutdown(SHUT_RD)`` or ``close()``   ``b""`` (data is dropped)
====================  ===========================================  ==========================

====================  ===========================================  ==========================
send side             entered when                                 ``send`` answers
====================  ===========================================  ==========================
``SEND_OPEN``         the stream is created                        writes
``SEND_SHUT``         local ``shutdown(SHUT_WR)``/``close()``:     ``BrokenPipeError``
                      a FIN is queued exactly once
``SEND_RESET``        the session ends                             ``StreamResetError``
====================  ===========================================  ==========================

A stream leaves the session's table once neither side is open. ``close()``
additionally marks the handle itself closed, as a socket's file descriptor.
"""

from __future__ import annotations

import errno
import io
import socket
from collections import deque
from typing import TYPE_CHECKING, Any

from .errors import SmuxError
from .runtime import bounded_wait, check_timeout

if TYPE_CHECKING:
    from .runtime import Condition
    from .session import Session

__all__ = ["Stream"]

RECV_OPEN, RECV_EOF, RECV_RESET, RECV_SHUT = range(4)
SEND_OPEN, SEND_SHUT, SEND_RESET = range(3)

#: Go's initial assumption about a peer's window before its first UPD (v2).
INITIAL_PEER_WINDOW = 262144


class Stream:
    """One logical, socket-like connection inside a session.

    Blocking by default; ``settimeout``/``setblocking`` behave as on sockets.
    """

    __slots__ = (
        "__weakref__",
        "_chunks",
        "_closed",
        "_cond",
        "_head",
        "_incr",
        "_io_refs",
        "_num_read",
        "_num_written",
        "_peer_consumed",
        "_peer_window",
        "_recv_buffered",
        "_recv_state",
        "_send_lock",
        "_send_state",
        "_session",
        "_timeout",
        "_tx_granted",
        "_upd_pending",
        "_waiting",
        "id",
    )

    def __init__(self, session: Session, stream_id: int) -> None:
        self._session = session
        #: The smux stream id (client-opened odd, server-opened even).
        self.id = stream_id
        self._recv_state = RECV_OPEN
        self._send_state = SEND_OPEN
        self._closed = False
        self._io_refs = 0
        self._timeout: float | None = session._default_timeout
        # Receive buffer: whole payloads, the first one read from offset _head;
        # made on the first payload, so an idle stream stays small.
        # Small payloads are coalesced into bytearrays (see Session._on_psh).
        self._chunks: deque[bytes | bytearray] | None = None
        self._head = 0
        self._recv_buffered = 0
        # Created on first wait: an idle stream stays small.
        self._cond: Condition | None = None
        self._waiting = 0
        self._send_lock: Any = None
        self._tx_granted = False
        # Version 2 counters, all modulo 2**32 as on the wire.
        self._num_read = 0
        self._incr = 0
        self._upd_pending = False
        self._num_written = 0
        self._peer_consumed = 0
        self._peer_window = INITIAL_PEER_WINDOW

    def __repr__(self) -> str:
        recv = ("open", "eof", "reset", "shut")[self._recv_state]
        send = ("open", "shut", "reset")[self._send_state]
        closed = " closed" if self._closed else ""
        return f"<pysmux.Stream id={self.id} recv={recv} send={send}{closed}>"

    # -- waiting (called with the session lock held) -------------------------------

    def _condition(self) -> Condition:
        if self._cond is None:
            self._cond = self._session._runtime.condition(self._session._lock)
        return self._cond

    def _wait(self, deadline: float | None) -> None:
        """Wait for a change of this stream's state; raise if the deadline passed."""
        if deadline is None:
            remaining = None
        else:
            remaining = deadline - self._session._runtime.monotonic()
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
        return self._session._runtime.monotonic() + self._timeout

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
        with self._session._lock:
            if not self._wait_readable(bufsize):
                return b""
            data = self._take(bufsize)
            self._session._consumed(self, len(data))
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
        with self._session._lock:
            if not self._wait_readable(nbytes):
                return 0
            count = self._take_into(view, nbytes)
            self._session._consumed(self, count)
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
                raise self._session._reset_error(self.id)
            if deadline is None:
                deadline = self._deadline()
            self._session._await_frames(self, deadline)
            self._check_open()
        return want > 0

    def _take(self, size: int) -> bytes:
        chunks = self._chunks
        assert chunks is not None  # data is buffered
        first = chunks[0]
        head = self._head
        if head == 0 and len(first) <= size:
            # The common bulk case: hand out a whole payload without a copy.
            chunks.popleft()
            self._recv_buffered -= len(first)
            return first if type(first) is bytes else bytes(first)
        out = self._take_into_list(size)
        return b"".join(out)

    def _take_into_list(self, size: int) -> list[bytes | bytearray | memoryview]:
        chunks = self._chunks
        assert chunks is not None  # data is buffered
        out: list[bytes | bytearray | memoryview] = []
        while size and chunks:
            first = chunks[0]
            avail = len(first) - self._head
            if avail <= size:
                out.append(memoryview(first)[self._head :] if self._head else first)
                chunks.popleft()
                self._head = 0
                size -= avail
                self._recv_buffered -= avail
            else:
                out.append(memoryview(first)[self._head : self._head + size])
                self._head += size
                self._recv_buffered -= size
                size = 0
        return out

    def _take_into(self, view: memoryview, size: int) -> int:
        pos = 0
        for part in self._take_into_list(size):
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        return pos

    def _drop_buffer(self) -> int:
        dropped = self._recv_buffered
        self._chunks = None
        self._head = 0
        self._recv_buffered = 0
        return dropped

    # -- sending ---------------------------------------------------------------------

    def send(self, data: Any) -> int:
        """Send what can go without waiting once the stream may write; return the count."""
        return self._send(data, whole=False)

    def sendall(self, data: Any) -> None:
        """Send all of ``data``; the stream's timeout bounds the whole call."""
        self._send(data, whole=True)

    def _send(self, data: Any, whole: bool) -> int:
        view = memoryview(data).cast("B")
        session = self._session
        if self._send_lock is None:
            with session._lock:
                if self._send_lock is None:
                    self._send_lock = session._runtime.lock()
        deadline = self._deadline()
        # One writer per stream at a time, so concurrent sendall calls do not interleave.
        if deadline is None:
            self._send_lock.acquire()
        else:
            clock = session._runtime.monotonic
            while not self._send_lock.acquire(True, bounded_wait(deadline - clock()) or 0.0):
                if clock() >= deadline:
                    raise self._expired()
        try:
            return session._send_data(self, view, deadline, whole)
        finally:
            self._send_lock.release()

    def _send_error(self) -> OSError:
        """What a send on a stream that may not send raises (session lock held)."""
        if self._closed:
            return BrokenPipeError(errno.EPIPE, f"stream {self.id} is closed")
        if self._send_state == SEND_SHUT:
            return BrokenPipeError(errno.EPIPE, f"stream {self.id} was shut down for writing")
        return self._session._reset_error(self.id)

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
        session = self._session
        with session._lock:
            self._check_open()
            if how != socket.SHUT_WR:
                session._shut_recv(self)
            if how != socket.SHUT_RD:
                session._shut_send(self)

    def close(self) -> None:
        """Send FIN if not sent yet, drop unread data, and release the stream. Idempotent.

        As with ``socket.close()``, files from ``makefile()`` keep the stream
        usable until they are closed too.
        """
        with self._session._lock:
            self._closed = True
            if self._io_refs <= 0:
                self._release()

    def _release(self) -> None:
        self._session._shut_recv(self)
        self._session._shut_send(self)

    def _decref_socketios(self) -> None:
        """Called by ``socket.SocketIO.close`` (the raw file of ``makefile``)."""
        with self._session._lock:
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
        with self._session._lock:
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
