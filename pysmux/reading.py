"""The read side of a session's blocking driver: who reads the transport, and when.

Only one task reads the transport at a time: whoever holds the *read turn*. By
default that is the session's reader task. On threads, a thread blocked in
``recv`` reads the transport itself when no one else is (a *direct read*), and
the reader task stands back for a moment after such reads: a reply then
reaches its reader without a hand-off between threads, which costs tens of
microseconds per message (measured: ping-pong round trip 46 -> 35 us on one
CPU, 134 -> 112 us on two). Threads waiting for frames they do not read
themselves make the reader task read at once. gevent's greenlet switches are
cheap, so there the reader reads all. docs/design.md section 4 has the why.

Whoever reads hands the bytes to the session's core (``pysmux/core/``), which
applies the frames; this module then wakes whoever the frames concern. Every
method here runs with the session lock held unless it says otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import socket
import ssl
from typing import TYPE_CHECKING

from .errors import ProtocolError, SessionClosedError, SmuxError
from .runtime import bounded_wait

if TYPE_CHECKING:
    from .session import SessionParts
    from .stream import Stream
    from .writing import WritePath

__all__ = ["ReadPath"]

log = logging.getLogger("pysmux")

#: After a stream reader read the transport itself, the reader task waits this
#: long before reading in its place (unless someone waits for frames).
_LINGER_SECONDS = 0.002
#: Frames the reader task handles between two chances for other tasks to run:
#: a flood of tiny frames must not keep gevent's hub for long.
_FRAMES_PER_SLICE = 1024


class ReadPath:
    """Reading one session's transport: the reader task, the read turn, direct reads."""

    def __init__(self, parts: SessionParts) -> None:
        self._sock, self._core, self._lock, self._runtime, self._abort = parts
        sock, lock, runtime = parts.sock, parts.lock, parts.runtime
        #: The write side, set by the session once both exist.
        self.writes: WritePath
        self._cond = runtime.condition(lock)  # the reader task waits here
        #: Woken when the peer opened streams (``accept_stream`` waits here).
        self.arrived = runtime.condition(lock)
        #: The reader task stopped reading: the core said no (``may_read``), or
        #: a SYN waits for room in the accept queue.
        self.paused = False
        #: The read turn is taken (by the reader task or a stream reader).
        self.reading = False
        #: The stream whose reader reads the transport directly, if any.
        self.leader: Stream | None = None
        self._followers = 0  # tasks waiting for frames that another task reads
        self._bg_waiting = False
        self._bg_parked = False  # the reader task waits for a stream reader's turn to end
        self._active = 0.0  # when a stream reader last read (or was handed frames)
        self._handed_off = False  # the reader task just woke a stream reader
        #: Whether stream readers may read the transport themselves.
        self.direct = (
            runtime.direct_reads()
            and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
            and hasattr(select, "poll")
            and hasattr(os, "eventfd")
        )
        self._wake_fd = -1
        if self.direct:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
            self._poller.register(self._wake_fd, select.POLLIN)

    # -- what streams and the write side ask -----------------------------------------

    def wake(self) -> None:
        """Let the reader task look again at whether it may read."""
        self._cond.notify_all()

    def await_frames(self, stream: Stream, deadline: float | None) -> None:
        """Wait until frames may have changed ``stream``.

        If nobody is reading the transport, the caller reads it itself: the
        frame it waits for then needs no hand-off from another thread.
        """
        if self.direct and not self.reading and stream._timeout != 0.0 and self._core.may_read():
            self._read_directly(stream, deadline)
            return
        self.wait_for_reader(stream, deadline)

    def wait_for_reader(self, stream: Stream, deadline: float | None) -> None:
        """Wait for frames that another task reads; it must read now."""
        self._followers += 1
        if self._bg_waiting:
            self._cond.notify_all()
        try:
            stream._wait(deadline)
        finally:
            self._followers -= 1

    def consumed(self, stream: Stream, count: int) -> None:
        """The application took ``count`` bytes from ``stream``."""
        core = self._core
        if core.consumed(stream, count):
            self.writes.control_queued()
        if self.paused and core.under_budget():
            self._cond.notify_all()

    def shut(self, stream: Stream) -> None:
        """Local ``shutdown(SHUT_RD)`` of ``stream``."""
        if self.leader is stream:
            os.eventfd_write(self._wake_fd, 1)  # it polls the transport: interrupt it
        core = self._core
        core.shut_recv(stream)
        if self.paused and core.under_budget():
            self._cond.notify_all()
        stream._wake()

    def on_abort(self) -> None:
        """The session ended: wake every task that waits to read or accept."""
        if self.leader is not None:
            os.eventfd_write(self._wake_fd, 1)
        self.arrived.notify_all()
        self._cond.notify_all()

    # -- the reader task (lock not held) ---------------------------------------------

    def run(self) -> None:
        """The reader task: read until the session ends, then close the transport."""
        try:
            self._read_frames()
        except SmuxError as exc:
            self._abort(exc)
        except OSError as exc:
            self._abort(SessionClosedError(errno.ECONNRESET, f"transport read failed: {exc}"))
        except BaseException as exc:  # pragma: no cover - a bug; still wake everyone
            log.exception("pysmux: reader failed")
            self._abort(SessionClosedError(errno.EIO, f"internal error: {exc!r}"))
        finally:
            self._close_transport()

    def _close_transport(self) -> None:
        writes = self.writes
        with self._lock:
            while writes.busy or self.reading:
                writes.wait_idle(None)
            # Nobody reads or writes a closed socket.
            writes.busy = self.reading = True
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)

    def _read_frames(self) -> None:
        """Read whenever no stream reader does it itself."""
        lock = self._lock
        core = self._core
        while True:
            with lock:
                if not self._take_read_turn():
                    return
            try:
                self._fill(None, lead=False)
            finally:
                with lock:
                    try:
                        if not core.closed:
                            self._absorb(_FRAMES_PER_SLICE)
                        if self._handed_off:
                            # The woken reader will likely read the next frame itself.
                            self._handed_off = False
                            self._active = self._runtime.monotonic()
                    finally:
                        self._end_read_turn()
            # A peer that never stops sending must not starve the other
            # greenlets: on gevent a read with data waiting never yields.
            self._runtime.yield_now()

    # -- the read turn (lock held) ---------------------------------------------------

    def _take_read_turn(self) -> bool:
        """Wait until the reader task should read; False once the session is closed.

        It reads at once when direct reads are off, or a task waits for frames
        without reading itself. Otherwise it lingers briefly after a stream
        reader was active: that reader will most likely read the next frame
        itself, with no hand-off between threads. While a stream reader holds
        the read turn it sleeps until that turn ends, so an idle session costs
        no periodic wake-ups.
        """
        rt = self._runtime
        core = self._core
        while not core.closed:
            wait: float | None = None
            if not core.may_read():
                # Applications (unread data) or the transport (refusal FINs not
                # yet written) lag behind: stop reading, memory stays bounded.
                self.paused = True
            elif not self.reading:
                self.paused = False
                idle = rt.monotonic() - self._active
                if not self.direct or self._followers or idle >= _LINGER_SECONDS:
                    self.reading = True
                    return True
                wait = _LINGER_SECONDS - idle
            else:
                self._bg_parked = True  # woken when the stream reader's turn ends
            self._bg_waiting = True
            self._cond.wait(wait)
            self._bg_waiting = self._bg_parked = False
        return False

    def _end_read_turn(self) -> None:
        self.reading = False
        if self._core.closed:
            self.writes.notify_idle()
        elif self._bg_waiting and (self._followers or self._bg_parked):
            self._cond.notify_all()

    def _read_directly(self, stream: Stream, deadline: float | None) -> None:
        if deadline is not None and deadline <= self._runtime.monotonic():
            stream._wait(deadline)  # raises the timeout
        self.reading = True
        self.leader = stream
        error: SmuxError | None = None
        self._lock.release()
        try:
            self._fill(deadline, lead=True)
        except SmuxError as exc:
            error = exc
        except OSError as exc:
            error = SessionClosedError(errno.ECONNRESET, f"transport read failed: {exc}")
        finally:  # also on KeyboardInterrupt: the read turn must be given back
            self._lock.acquire()
            self.leader = None
            self._active = self._runtime.monotonic()
            try:
                if error is None and not self._core.closed:
                    self._absorb()
            except ProtocolError as exc:
                error = exc
            finally:
                self._end_read_turn()
        if error is not None:
            self._lock.release()
            try:
                self._abort(error)
            finally:
                self._lock.acquire()

    def _fill(self, deadline: float | None, lead: bool) -> None:
        """Read what the transport has into the core's buffer (read turn held, lock not held).

        A stream reader (``lead``) polls with its deadline and the wake-up fd,
        so that a timeout or a local close interrupts it; the reader task blocks.
        """
        core = self._core
        if core.more_frames:
            return  # complete frames wait in the buffer: handle them first
        buffer = core.get_buffer()
        if lead:
            if deadline is None:
                timeout_ms = -1
            else:
                wait = bounded_wait(deadline - self._runtime.monotonic())
                assert wait is not None
                timeout_ms = math.ceil(wait * 1000)
            events = self._poller.poll(timeout_ms)
            if not events:
                return
            readable = False
            for fd, _ in events:
                if fd == self._wake_fd:
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(fd)
                else:
                    readable = True
            if not readable:
                return
            try:
                count = self._sock.recv_into(buffer, 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
        else:
            count = self._sock.recv_into(buffer)
        if not count:
            raise core.eof_error()
        # One writer: whoever holds the read turn.
        core.buffer_updated(count, self._runtime.monotonic())

    def _absorb(self, limit: int = 0) -> None:
        """Apply the complete frames read (all, or up to ``limit``: the rest wait in
        the buffer and are handled before the transport is read again), then
        wake whoever they concern (read turn held)."""
        core = self._core
        queued = core.control_queued
        core.handle_frames(self._runtime.monotonic(), limit)
        self._deliver(queued)
        if core.syn_stalled:
            self._wait_for_accept()

    def _deliver(self, queued: int) -> None:
        """Act on what the frames just handled left for the driver (see ``pysmux.core``);
        ``queued``: the core's count of queued control frames before them."""
        core = self._core
        readable = core.readable
        if readable:
            for stream in readable:
                if stream._waiting:
                    stream._wake()
                    self._handed_off = True
            readable.clear()
        changed = core.changed
        if changed:
            for stream in changed:
                stream._wake()
            changed.clear()
        if core.arrivals:
            self.arrived.notify(core.arrivals)
            core.arrivals = 0
        if core.control_queued != queued:
            self.writes.control_queued()  # refusal FINs

    def _wait_for_accept(self) -> None:
        """A SYN met a full accept queue: give the application time to accept
        (until the core's ``stall_until``), then go on, refusing."""
        core = self._core
        rt = self._runtime
        while True:
            self.paused = True
            self._cond.wait(bounded_wait(core.stall_until - rt.monotonic()))
            if core.closed:
                return
            queued = core.control_queued
            core.handle_frames(rt.monotonic())
            self._deliver(queued)
            if not core.syn_stalled:
                return
