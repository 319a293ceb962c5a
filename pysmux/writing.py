"""The write side of a session's blocking driver: the transport turn and the writer task.

Writing data needs no hand-off: the calling task takes the *transport turn*
(or queues for it, first come, first served), writes queued control frames
and one data frame with one ``sendmsg``, and hands the turn to the next
waiting stream; a stream with more to send queues again at the back, so
streams share the transport frame by frame. The writer task writes control
frames (SYN, FIN, UPD, NOP) when no one else holds the transport, finishes
writes whose caller left, and runs the keepalive clock. What to write and how
much a stream may send is the core's decision (``pysmux/core/outbound.py``);
this module only does the writing. docs/design.md section 5 has the why.

Every method runs with the session lock held unless it says otherwise; I/O
never happens under the lock.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .core.stream import SEND_OPEN
from .errors import SessionClosedError
from .runtime import bounded_wait

if TYPE_CHECKING:
    from .reading import ReadPath
    from .session import SessionParts
    from .stream import Stream

__all__ = ["WritePath"]

log = logging.getLogger("pysmux")

#: How long the writer task blocks in one transport write before it looks at
#: the keepalive clock again.
_WRITER_SLICE = 1.0

#: What ``WritePath._write`` did: all written; handed to the writer task; failed.
_WRITTEN, _DEFERRED, _FAILED = range(3)


class _Expired(Exception):
    """A write's deadline passed before its last byte went out."""


class WritePath:
    """Writing one session's transport: the transport turn, the writer task."""

    def __init__(self, parts: SessionParts, reads: ReadPath) -> None:
        self._sock, self._core, self._lock, self._runtime, self._abort = parts
        self._reads = reads
        sock, lock, runtime = parts.sock, parts.lock, parts.runtime
        #: The transport turn is taken (by a stream's writer or the writer task).
        self.busy = False
        #: Streams queued for the transport turn, in arrival order.
        self.waiters: deque[Stream] = deque()
        #: Control items known written (the core counts those queued and taken):
        #: ``close()`` waits until what was queued before it is written.
        self.written = 0
        self._cond = runtime.condition(lock)  # the writer task waits here
        self._idle_cond = runtime.condition(lock)
        self._idle_waiters = 0
        self._sendmsg: Callable[..., int] | None = getattr(sock, "sendmsg", None)
        self._send: Callable[[Any], int] | None = getattr(sock, "send", None)
        # Waits for room in the transport, for writes bounded by a deadline;
        # None where the transport cannot be written without blocking (TLS).
        self._wait_writable = runtime.write_waiter(sock) if self._sendmsg is not None else None
        # The rest of a write whose holder left (deadline, interruption): the
        # writer task holds the transport until it has written it.
        self._unfinished: list[Any] | None = None

    # -- what the session and its streams ask ----------------------------------------

    def control_queued(self) -> None:
        """The core queued control frames: the writer task writes them if nobody
        else holds the transport."""
        if not self.busy:
            self._cond.notify()

    def shut(self, stream: Stream, reset: bool = False) -> None:
        """Local ``shutdown(SHUT_WR)`` of ``stream``: its FIN is queued once
        (``reset``: after the reset marker)."""
        if self._core.shut_send(stream, reset):
            self.control_queued()
            stream._wake()

    def wait_idle(self, timeout: float | None) -> None:
        """Wait for progress of the transport (either turn ended, frames written)."""
        self._idle_waiters += 1
        try:
            self._idle_cond.wait(bounded_wait(timeout))
        finally:
            self._idle_waiters -= 1

    def notify_idle(self) -> None:
        if self._idle_waiters:
            self._idle_cond.notify_all()

    def flush(self, deadline: float) -> None:
        """Wait until the control frames queued so far are written, or ``deadline``."""
        core = self._core
        target = core.control_queued
        while not core.closed and core.write_error is None and self.written - target < 0:
            remaining = deadline - self._runtime.monotonic()
            if remaining <= 0:
                break
            self.wait_idle(remaining)

    def on_abort(self) -> list[Stream]:
        """The session ended: wake the writer task; the queued streams to wake."""
        self._cond.notify_all()
        self.notify_idle()
        return list(self.waiters)

    # -- data (the stream's send lock held, the session lock not held) ---------------

    def send(self, stream: Stream, view: memoryview, deadline: float | None, whole: bool) -> int:
        """Write ``view`` on ``stream`` frame by frame.

        A frame is committed once its first byte may go out: if the deadline
        passes (or the caller is interrupted) in the middle of it, the writer
        task finishes it, as a kernel finishes a socket's buffered bytes.
        """
        size = len(view)
        sent = 0
        core = self._core
        lock = self._lock
        while sent < size:
            with lock:
                self._wait_sendable(stream, deadline)
                if stream._timeout == 0.0 and self.busy:
                    # Non-blocking and another task is writing: queue the frame as
                    # a socket would buffer it, up to a bound (then BlockingIOError).
                    sent += core.queue_data(stream, view[sent:])
                    if whole:
                        continue
                    break
                self._acquire(stream, deadline)
                # Shut down while we queued (then _wait_sendable raises), or a
                # UPD shrank the window: nothing to send after all.
                count = core.send_size(stream, size - sent)
                if count > 0:
                    frames = self._take_control() if core.control else []
                    frames.append(core.data_header(stream, count))
                    frames.append(view[sent : sent + count])
            if count <= 0:
                self._release(deadline)
                continue
            status = self._write(frames, deadline)
            if status == _FAILED:
                with lock:
                    raise stream._send_error()
            sent += count
            if status == _WRITTEN:
                self._release(deadline)
            if not whole:
                break
        return sent

    def _wait_sendable(self, stream: Stream, deadline: float | None) -> None:
        core = self._core
        while True:
            if stream._send_state != SEND_OPEN:
                raise stream._send_error()
            if core.window(stream) > 0:
                return
            # The UPD we need may sit behind data nobody reads yet: while we
            # wait, a v2 reader reads past the session budget (see may_read).
            core.window_waiters += 1
            reads = self._reads
            if reads.paused:
                reads.wake()
            try:
                reads.wait_for_reader(stream, deadline)
            finally:
                core.window_waiters -= 1

    # -- the transport turn ----------------------------------------------------------

    def _acquire(self, stream: Stream, deadline: float | None) -> None:
        """Own the transport, in arrival order behind other streams."""
        if not self.busy and not self.waiters:
            self.busy = True
            return
        stream._tx_granted = False
        self.waiters.append(stream)
        try:
            while not stream._tx_granted:
                # After a failed write nobody holds the turn to pass it on, and the
                # session ends only once its reader reaches the transport's end.
                if self._core.closed or self._core.write_error is not None:
                    raise stream._send_error()
                stream._wait(deadline)
        except BaseException:
            if stream._tx_granted:
                # Granted and interrupted at once: the writer task passes it on.
                self._hand_to_writer([])
            elif stream in self.waiters:
                self.waiters.remove(stream)
            raise

    def _take_control(self) -> list[Any]:
        """The queued control frames, for the next write (see ``take_control``)."""
        core = self._core
        refusals = core.refusals_queued
        frames: list[Any] = core.take_control()
        if refusals:
            self._reads.wake()  # it may have stopped reading for them
        if not frames:  # every item was a UPD nobody needs: nothing left to write
            self.written = core.control_taken
            self.notify_idle()
        return frames

    def _release(self, deadline: float | None) -> None:
        """Flush queued control frames, then hand the transport on (lock not held)."""
        core = self._core
        while True:
            with self._lock:
                taken = core.control_taken  # whatever was taken so far is written
                if self.written != taken:
                    self.written = taken
                    self.notify_idle()
                frames = self._take_control() if core.control and not core.closed else None
                if not frames:
                    if self.waiters and not core.closed:
                        nxt = self.waiters.popleft()
                        nxt._tx_granted = True
                        nxt._wake()
                    else:
                        self.busy = False
                        self.notify_idle()
                    return
            if self._write(frames, deadline) != _WRITTEN:
                return

    def _hand_to_writer(self, parts: list[Any]) -> None:
        """Give the transport, with the rest of a started write, to the writer task.

        The holder's deadline passed or it was interrupted (``gevent.Timeout``,
        ``kill()``, ``KeyboardInterrupt``): the writer finishes the frame, so the
        framing survives and the caller can leave at once.
        """
        self._unfinished = parts
        self._cond.notify()

    # -- transport writes (transport turn held, lock not held) -----------------------

    def _write(self, parts: list[Any], deadline: float | None) -> int:
        """Write whole frames: _WRITTEN, _DEFERRED or _FAILED.

        _DEFERRED: the deadline passed first, or this transport cannot bound a
        write (TLS), so the writer task now holds the transport and finishes the
        frames. _FAILED: the transport failed; nothing is written any more
        (``_fail``).
        """
        try:
            if deadline is not None and self._wait_writable is None:
                raise _Expired
            self._transmit(parts, deadline)
            return _WRITTEN
        except _Expired:
            with self._lock:
                self._hand_to_writer(parts)
            return _DEFERRED
        except OSError as exc:
            self._fail(f"transport write failed: {exc}")
            return _FAILED
        except BaseException:
            if self._sendmsg is None and self._send is None:
                # Interrupted inside sendall: how much went out is unknown, so
                # the framing is lost and the session cannot go on.
                self._fail("a transport write was interrupted")
            else:
                with self._lock:
                    self._hand_to_writer(parts)
            raise

    def _fail(self, why: str) -> None:
        """Stop writing for good after a failed write.

        Reading goes on until the transport ends: frames the peer sent before it
        went away (a reply, then its FIN) are still delivered, as a socket
        still returns data that arrived before a failed send. The reader then
        ends the session with this error.
        """
        with self._lock:
            self.busy = False
            self.notify_idle()
            streams = self._core.write_failed(SessionClosedError(errno.EPIPE, why))
            if streams is None:
                return
            for stream in [*streams, *self.waiters]:
                stream._wake()
            self._cond.notify_all()
        log.debug("pysmux: %s; reading on until the transport ends", why)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _transmit(self, parts: list[Any], deadline: float | None) -> None:
        """Put ``parts`` on the wire.

        ``parts`` shrinks as bytes go out: after an exception it holds exactly
        what is left, so another task can finish the frames. With a deadline,
        writes do not block and ``_Expired`` is raised once it passes.
        """
        while parts:
            count = self._send_some(parts, deadline is not None)
            if count == 0 and deadline is not None:
                assert self._wait_writable is not None
                remaining = deadline - self._runtime.monotonic()
                if remaining <= 0 or not self._wait_writable(remaining):
                    raise _Expired
                continue
            while parts and count >= len(parts[0]):
                count -= len(parts.pop(0))
            if count:
                parts[0] = memoryview(parts[0])[count:]

    def _send_some(self, parts: list[Any], nowait: bool) -> int:
        """One write call; how many bytes of ``parts`` went out (0: would block)."""
        sendmsg = self._sendmsg
        if sendmsg is not None:
            try:
                if not nowait:
                    return int(sendmsg(parts))
                try:
                    return int(sendmsg(parts, (), socket.MSG_DONTWAIT))
                except BlockingIOError:
                    return 0
            except NotImplementedError:  # TLS sockets, gevent's included
                self._sendmsg = None
                self._wait_writable = None
        if len(parts) > 1:
            parts[:] = [b"".join(parts)]
        if self._send is not None:
            return int(self._send(parts[0]))
        self._sock.sendall(parts[0])  # a minimal transport: all or an error
        return len(parts[0])

    # -- the writer task (lock not held) ---------------------------------------------

    def run(self) -> None:
        """The writer task: control frames, handed-over writes, keepalive."""
        try:
            self._write_control()
        except BaseException as exc:  # a bug, or the task was killed: never half alive
            if not self._core.closed:
                log.exception("pysmux: writer task failed")
                self._abort(SessionClosedError(errno.EIO, f"writer task failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                if self._unfinished is not None:  # the session ended before it was written
                    self._unfinished = None
                    self.busy = False
                    self.notify_idle()

    def _write_control(self) -> None:
        core = self._core
        rt = self._runtime
        lock = self._lock
        lock.acquire()
        try:
            while not core.closed:
                try:
                    wait = core.keepalive(rt.monotonic(), self._reads.paused)
                except SessionClosedError as exc:  # the peer went silent
                    lock.release()
                    try:
                        self._abort(exc)
                    finally:
                        lock.acquire()
                    break
                unfinished = self._unfinished
                if unfinished is not None or (core.control and not self.busy):
                    self._unfinished = None
                    self.busy = True
                    # Bounded writes where the transport allows them: a peer that
                    # stops reading must not stop the keepalive clock.
                    deadline = None
                    if self._wait_writable is not None:
                        deadline = rt.monotonic() + _WRITER_SLICE
                    lock.release()
                    holding = True
                    try:
                        if unfinished is None or self._write(unfinished, deadline) == _WRITTEN:
                            self._release(deadline)
                        holding = False  # passed on, handed back to this task, or failed
                    finally:
                        lock.acquire()
                        if holding:  # an exception: this task is about to end
                            self.busy = False
                            self.notify_idle()
                    continue
                self._cond.wait(bounded_wait(wait))
        finally:
            lock.release()
