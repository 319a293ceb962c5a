"""An smux session: one transport, many streams.

Tasks (threads or greenlets, from the runtime):

* the **reader** reads the transport into one reusable buffer, parses every
  complete frame in it and hands each to one handler per command, the only
  place that decides what the peer may do. When the unread total passes
  ``max_receive_buffer`` it stops reading until applications catch up (Go's
  token bucket).

  On threads, a thread blocked in ``recv`` reads the transport itself when no
  one else is (it takes the *read turn*), and the reader task stands back for a
  moment after such reads: a reply then reaches its reader without a hand-off
  between threads, which costs tens of microseconds per message (measured:
  ping-pong round trip 46 -> 35 us on one CPU, 134 -> 112 us on two). Threads
  waiting for frames they do not read themselves make the reader task read at
  once. gevent's greenlet switches are cheap, so there the reader reads all.
* the **writer** writes queued control frames (SYN, FIN, UPD, NOP) when no one
  else is writing, and runs the keepalive clock.

Writing data needs no hand-off: the calling thread takes the transport, flushes
queued control frames first, writes one frame with one ``sendmsg`` and gives the
transport to the next waiting stream (first come, first served: a stream with
more to send queues again at the back, which makes writers share the transport
frame by frame). Control frames wait behind at most the frame being written.

Everything is guarded by one session lock; I/O happens outside it.
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
from collections import deque
from collections.abc import Callable
from typing import Any

from .config import Config
from .errors import ProtocolError, SessionClosedError, SmuxError, StreamResetError
from .frame import (
    CMD_FIN,
    CMD_NAMES,
    CMD_NOP,
    CMD_PSH,
    CMD_SYN,
    CMD_UPD,
    HEADER,
    HEADER_SIZE,
    MAX_PAYLOAD,
    UPD,
    encode_header,
    encode_upd,
)
from .runtime import Runtime, bounded_wait, check_timeout, get_runtime
from .stream import (
    INITIAL_PEER_WINDOW,
    RECV_EOF,
    RECV_OPEN,
    RECV_RESET,
    RECV_SHUT,
    SEND_OPEN,
    SEND_RESET,
    SEND_SHUT,
    Stream,
)

__all__ = ["Session", "client", "server"]

log = logging.getLogger("pysmux")

_MASK = 0xFFFFFFFF
_MAX_WINDOW = 2**31 - 1
#: Read buffer; the unparsed tail is moved to the front once less than a
#: whole maximal frame fits behind it.
_READ_BUFFER = 256 * 1024
_MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD
#: A PSH for an unknown stream shorter than this counts as junk: it costs the
#: peer little.
_CHEAP_PAYLOAD = 512
#: Payloads shorter than this are appended to the stream's last small-payload
#: buffer (up to _COALESCE_LIMIT bytes) instead of being kept as one object each.
_SMALL_PAYLOAD = 1024
_COALESCE_LIMIT = 65536
#: Ids of streams we closed that the peer may still legally send to (it has
#: not seen our FIN yet, or old Go keeps writing): frames for them are not junk.
_RECENTLY_CLOSED = 4096
#: Bytes of non-blocking sends queued while another task holds the transport.
_MAX_QUEUED_DATA = 256 * 1024
#: Refusal FINs queued before the reader waits for the writer to catch up.
_MAX_QUEUED_REFUSALS = 1024
#: After a stream reader read the transport itself, the reader task waits this
#: long before reading in its place (unless someone waits for frames).
_LINGER_SECONDS = 0.002
#: How long the reader waits for the application to make room in a full
#: accept queue before it refuses new streams.
_ACCEPT_STALL_SECONDS = 1.0
#: How long close() lets queued control frames (such as FINs) reach the wire.
_CLOSE_FLUSH_SECONDS = 0.5
#: How long close() waits for the session's own tasks to end.
_JOIN_SECONDS = 5.0

#: Frames the reader task handles between two chances for other tasks to run:
#: a flood of tiny frames must not keep gevent's hub for long.
_FRAMES_PER_SLICE = 1024
#: How long the writer task blocks in one transport write before it looks at
#: the keepalive clock again.
_WRITER_SLICE = 1.0

_ControlItem = bytes | Stream  # a whole frame, or a stream that owes an UPD

#: What ``Session._write`` did: all written; handed to the writer task; failed.
_WRITTEN, _DEFERRED, _FAILED = range(3)


class _Expired(Exception):
    """A write's deadline passed before its last byte went out."""


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
        self._version = cfg.version
        self._is_client = is_client
        self._default_timeout: float | None = None
        self._lock = lock = rt.lock()

        self._streams: dict[int, Stream] = {}
        # Go's first ids: client 3, server 2.
        self._next_id = 3 if is_client else 2
        self._accept_queue: deque[Stream] = deque()
        self._accept_cond = rt.condition(lock)
        # A SYN met a full accept queue: the reader waits for room (as Go does),
        # then refuses until the application accepts again.
        self._syn_stalled = False
        self._refusing = False
        self._closed = False
        self._error: SmuxError | None = None

        # Receive side.
        self._buffered = 0
        self._reader_paused = False
        self._reader_cond = rt.condition(lock)
        # The read turn: the reader task, or a stream reader reading directly.
        self._reading = False
        self._leader: Stream | None = None
        self._followers = 0  # tasks waiting for frames that another task reads
        self._bg_waiting = False
        self._bg_parked = False  # the reader task waits for a stream reader's turn to end
        self._reader_active = 0.0
        self._handed_off = False  # the reader task just woke a stream reader
        self._rbuf = bytearray(_READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        self._more_frames = False  # the reader task handled only part of what it read
        self._direct_reads = (
            rt.direct_reads()
            and isinstance(sock, socket.socket)
            and not isinstance(sock, ssl.SSLSocket)
            and hasattr(select, "poll")
            and hasattr(os, "eventfd")
        )
        self._wake_fd = -1
        if self._direct_reads:
            self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self._poller = select.poll()
            self._poller.register(sock.fileno(), select.POLLIN)
            self._poller.register(self._wake_fd, select.POLLIN)
        self._last_rx = rt.monotonic()
        self._junk = 0
        self._junk_since = rt.monotonic()
        self._dropped_frames = 0
        self._recently_closed: dict[int, None] = {}  # insertion-ordered set
        self._refused_streams = 0
        # Set when a transport write failed: nothing is written any more, while
        # reading goes on to the end of the transport.
        self._write_error: SmuxError | None = None
        # Version 2: local writers waiting for a window update.
        self._window_waiters = 0
        # Version 2: the most a peer that honours the windows can make one
        # stream hold unread: Go assumes 256 KiB before our first UPD, then
        # the window we advertise.
        self._stream_limit = max(INITIAL_PEER_WINDOW, cfg.max_stream_buffer)
        # What stats() reports; plain ints changed under the session lock.
        self._streams_opened = 0
        self._streams_accepted = 0
        self._frames_sent = 0
        self._bytes_sent = 0  # transport bytes, headers included, once a write starts
        self._frames_received = 0
        self._bytes_received = 0
        self._protocol_errors = 0

        # Send side.
        self._tx_busy = False
        self._tx_waiters: deque[Stream] = deque()
        self._control: deque[_ControlItem] = deque()
        # Control frames queued / taken for writing / known written, as counts:
        # close() waits until what was queued before it is written.
        self._control_queued = 0
        self._control_taken = 0
        self._control_written = 0
        self._nop_queued = False
        self._refusals_queued = 0
        self._queued_data = 0
        self._writer_cond = rt.condition(lock)
        self._idle_cond = rt.condition(lock)
        self._idle_waiters = 0
        self._sendmsg: Callable[..., int] | None = getattr(sock, "sendmsg", None)
        self._send: Callable[[Any], int] | None = getattr(sock, "send", None)
        # Waits for room in the transport, for writes bounded by a deadline;
        # None where the transport cannot be written without blocking (TLS).
        self._wait_writable = rt.write_waiter(sock) if self._sendmsg is not None else None
        # The rest of a write whose holder left (deadline, interruption): the
        # writer task holds the transport until it has written it.
        self._unfinished: list[Any] | None = None

        self._prepare_transport(sock)
        self._handlers: dict[int, Callable[[int, memoryview], None]] = {
            CMD_SYN: self._on_syn,
            CMD_FIN: self._on_fin,
            CMD_PSH: self._on_psh,
            CMD_NOP: self._on_nop,
            CMD_UPD: self._on_upd,
        }
        role = "client" if is_client else "server"
        self._reader = rt.spawn(self._read_loop, f"pysmux-{role}-reader")
        self._writer = rt.spawn(self._write_loop, f"pysmux-{role}-writer")

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
        role = "client" if self._is_client else "server"
        state = "closed" if self._closed else "open"
        return f"<pysmux.Session {role} v{self._version} {state} streams={len(self._streams)}>"

    # -- public API ------------------------------------------------------------------

    @property
    def config(self) -> Config:
        return self._config

    @property
    def closed(self) -> bool:
        """True once the session has ended, for whatever reason."""
        return self._closed

    @property
    def error(self) -> SmuxError | None:
        """Why the session ended: None while open, else the error that ended it."""
        return self._error

    @property
    def num_streams(self) -> int:
        """Streams the session is tracking (open in at least one direction)."""
        return len(self._streams)

    @property
    def dropped_frames(self) -> int:
        """PSH frames dropped: for unknown or closed streams, or after the peer's FIN."""
        return self._dropped_frames

    @property
    def refused_streams(self) -> int:
        """Incoming streams refused (with a FIN) because a limit was reached."""
        return self._refused_streams

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
            return {
                "streams_opened": self._streams_opened,
                "streams_accepted": self._streams_accepted,
                "streams_refused": self._refused_streams,
                "frames_sent": self._frames_sent,
                "bytes_sent": self._bytes_sent,
                "frames_received": self._frames_received,
                "bytes_received": self._bytes_received,
                "dropped_frames": self._dropped_frames,
                "protocol_errors": self._protocol_errors,
                "streams": len(self._streams),
                "buffered_bytes": self._buffered,
            }

    def open_stream(self) -> Stream:
        """Open a new stream. The peer learns of it with our first frame."""
        with self._lock:
            self._check_alive()
            if self._write_error is not None:
                raise SessionClosedError(
                    errno.EPIPE, f"session can no longer write: {self._write_error}"
                )
            stream_id = self._next_id
            if stream_id > _MASK:
                raise SmuxError(
                    errno.EMFILE,
                    "this session has used all 2**32 stream ids; open a new session",
                )
            self._next_id += 2
            self._streams_opened += 1
            stream = Stream(self, stream_id)
            # Registered before the SYN is queued: a reply right after the peer's
            # accept finds the stream (Go loses it: docs/design.md section 9.1).
            self._streams[stream_id] = stream
            self._queue_control(encode_header(self._version, CMD_SYN, 0, stream_id))
            return stream

    def accept_stream(self, timeout: float | None = None) -> Stream:
        """Wait for the peer to open a stream. TimeoutError after ``timeout`` seconds.

        ``timeout`` is checked as ``socket.settimeout`` checks it (ValueError for
        a negative value or NaN); None waits until a stream arrives or the
        session ends (then SessionClosedError)."""
        rt = self._runtime
        timeout = check_timeout(timeout)
        deadline = None if timeout is None else rt.monotonic() + timeout
        with self._lock:
            while True:
                self._check_alive()
                if self._accept_queue:
                    if self._syn_stalled or self._refusing:
                        self._refusing = False
                        self._reader_cond.notify_all()
                    return self._accept_queue.popleft()
                if deadline is None:
                    self._accept_cond.wait()
                    continue
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no stream arrived within {timeout} s")
                self._accept_cond.wait(bounded_wait(remaining))

    def close(self) -> None:
        """Close the session and its transport; wake every blocked call. Idempotent.

        Control frames already queued (such as the FIN of a stream just closed)
        get a short chance to reach the peer first.
        """
        rt = self._runtime
        with self._lock:
            deadline = rt.monotonic() + _CLOSE_FLUSH_SECONDS
            target = self._control_queued
            while (
                not self._closed
                and self._write_error is None
                and self._control_written - target < 0
            ):
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    break
                self._wait_idle(remaining)
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

    # -- session state (lock held) ---------------------------------------------------

    def _check_alive(self) -> None:
        if self._closed:
            raise SessionClosedError(errno.ECONNABORTED, f"session is closed: {self._error}")

    def _reset_error(self, stream_id: int) -> StreamResetError:
        cause = self._error or self._write_error
        err = StreamResetError(
            errno.ECONNRESET,
            f"stream {stream_id} was reset: the session ended before the peer "
            f"closed it ({cause})",
        )
        err.__cause__ = cause
        return err

    def _abort(self, error: SmuxError) -> None:
        """End the session: record why, wake everything, shut the transport down."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # A failed write came first: it is why the session ended.
            self._error = error = self._write_error or error
            if isinstance(error, ProtocolError):
                self._protocol_errors += 1
            if self._leader is not None:
                os.eventfd_write(self._wake_fd, 1)
            streams = list(self._streams.values())
            streams.extend(self._tx_waiters)
            self._streams.clear()
            for stream in streams:
                if stream._recv_state == RECV_OPEN:
                    stream._recv_state = RECV_RESET
                if stream._send_state == SEND_OPEN:
                    stream._send_state = SEND_RESET
                stream._wake()
            self._accept_cond.notify_all()
            self._reader_cond.notify_all()
            self._writer_cond.notify_all()
            self._notify_idle()
        # Every caller learns why (``error``, the exceptions it raises): the
        # owner of the session reports it, not the library a second time.
        log.debug("session ended: %s", error)
        # shutdown (not close) wakes a thread blocked in recv or send on Linux;
        # the reader closes the socket once no one is using it.
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def _unregister_if_done(self, stream: Stream) -> None:
        done = stream._recv_state != RECV_OPEN and stream._send_state != SEND_OPEN
        if done and self._streams.get(stream.id) is stream:
            del self._streams[stream.id]
            recent = self._recently_closed
            recent[stream.id] = None
            if len(recent) > _RECENTLY_CLOSED:
                del recent[next(iter(recent))]

    # -- stream requests (lock held) -------------------------------------------------

    def _shut_send(self, stream: Stream) -> None:
        if stream._send_state == SEND_OPEN:
            stream._send_state = SEND_SHUT
            self._queue_control(encode_header(self._version, CMD_FIN, 0, stream.id))
            stream._wake()
            self._unregister_if_done(stream)
        elif stream._send_state == SEND_RESET:
            # The session is gone, so no FIN; but a send after the caller's own
            # shutdown is a broken pipe, as on a socket.
            stream._send_state = SEND_SHUT

    def _shut_recv(self, stream: Stream) -> None:
        if self._leader is stream:
            os.eventfd_write(self._wake_fd, 1)  # it polls the transport: interrupt it
        # Also after a reset: a stream shut for reading reads b"", as a socket does.
        stream._recv_state = RECV_SHUT
        self._return_budget(stream._drop_buffer())
        stream._wake()
        self._unregister_if_done(stream)

    def _consumed(self, stream: Stream, count: int) -> None:
        """The application read ``count`` bytes from ``stream``."""
        self._return_budget(count)
        if self._version == 2 and stream._recv_state == RECV_OPEN:
            # Go's rule: tell the peer on the first read and whenever half the
            # stream buffer has been read since the last update.
            stream._num_read = (stream._num_read + count) & _MASK
            stream._incr += count
            if (
                stream._incr >= self._config.max_stream_buffer // 2 or stream._num_read == count
            ) and not stream._upd_pending:
                stream._incr = 0
                stream._upd_pending = True
                self._queue_control(stream)

    def _return_budget(self, count: int) -> None:
        self._buffered -= count
        if self._reader_paused and self._buffered < self._config.max_receive_buffer:
            self._reader_cond.notify_all()

    # -- writing ---------------------------------------------------------------------

    def _queue_control(self, item: _ControlItem) -> None:
        """Queue a control frame; it never waits behind more than one data frame."""
        if self._write_error is not None:
            return  # nothing can be written any more
        self._control.append(item)
        self._control_queued += 1
        if not self._tx_busy:
            self._writer_cond.notify()

    def _take_control(self) -> list[Any]:
        """All queued control frames as (at most) one buffer, for the next write.

        One buffer, not one per frame: a ``sendmsg`` takes at most IOV_MAX
        (1024 on Linux) buffers, and a burst of opens or closes queues more.
        """
        if not self._control:
            return []
        frames: list[bytes] = []
        window = self._config.max_stream_buffer
        for item in self._control:
            if isinstance(item, Stream):
                item._upd_pending = False
                if item._recv_state == RECV_OPEN:
                    frames.append(encode_upd(self._version, item.id, item._num_read, window))
            else:
                frames.append(item)
        self._control.clear()
        self._frames_sent += len(frames)
        self._bytes_sent += sum(map(len, frames))
        self._control_taken = self._control_queued
        if not frames:  # every item was a UPD nobody needs: nothing left to write
            self._control_written = self._control_taken
            self._notify_idle()
        self._nop_queued = False
        self._queued_data = 0
        if self._refusals_queued:
            self._refusals_queued = 0
            self._reader_cond.notify_all()
        return [b"".join(frames)] if len(frames) > 1 else frames

    def _send_data(
        self, stream: Stream, view: memoryview, deadline: float | None, whole: bool
    ) -> int:
        """Write ``view`` on ``stream`` frame by frame; the stream's send lock is held.

        A frame is committed once its first byte may go out: if the deadline
        passes (or the caller is interrupted) in the middle of it, the writer
        task finishes it, as a kernel finishes a socket's buffered bytes.
        """
        size = len(view)
        sent = 0
        max_frame = self._config.max_frame_size
        lock = self._lock
        while sent < size:
            with lock:
                self._wait_sendable(stream, deadline)
                if stream._timeout == 0.0 and self._tx_busy:
                    # Non-blocking and another task is writing: queue the frame as
                    # a socket would buffer it, up to a bound (then BlockingIOError).
                    sent += self._queue_data(stream, view[sent:])
                    if whole:
                        continue
                    break
                self._acquire_transport(stream, deadline)
                error: OSError | None = None
                count = 0
                if stream._send_state != SEND_OPEN:
                    # Shut down while we queued: the FIN is queued, this data must not follow it.
                    error = stream._send_error()
                else:
                    # A UPD may have shrunk the window while we queued.
                    count = min(size - sent, max_frame, self._window(stream))
                if count > 0:
                    stream._num_written = (stream._num_written + count) & _MASK
                    self._frames_sent += 1
                    self._bytes_sent += HEADER_SIZE + count
                    frames = self._take_control()
                    frames.append(encode_header(self._version, CMD_PSH, count, stream.id))
                    frames.append(view[sent : sent + count])
            if count <= 0:
                self._release_transport(deadline)
                if error is not None:
                    raise error
                continue
            status = self._write(frames, deadline)
            if status == _FAILED:
                with lock:
                    raise stream._send_error()
            sent += count
            if status == _WRITTEN:
                self._release_transport(deadline)
            if not whole:
                break
        return sent

    def _queue_data(self, stream: Stream, view: memoryview) -> int:
        """Queue one data frame behind the transport's holder (lock held)."""
        count = min(len(view), self._config.max_frame_size, self._window(stream))
        if self._queued_data + count > _MAX_QUEUED_DATA:
            raise BlockingIOError(errno.EAGAIN, "stream operation would block")
        stream._num_written = (stream._num_written + count) & _MASK
        header = encode_header(self._version, CMD_PSH, count, stream.id)
        self._queued_data += count
        self._queue_control(header + view[:count])
        return count

    def _window(self, stream: Stream) -> int:
        """Bytes ``stream`` may send now (lock held)."""
        if self._version == 1:
            return _MAX_FRAME
        inflight = (stream._num_written - stream._peer_consumed) & _MASK
        return stream._peer_window - inflight

    def _wait_sendable(self, stream: Stream, deadline: float | None) -> None:
        while True:
            if stream._send_state != SEND_OPEN:
                raise stream._send_error()
            if self._window(stream) > 0:
                return
            # The UPD we need may sit behind data nobody reads yet: while we
            # wait, a v2 reader reads past the session budget (see _may_read).
            self._window_waiters += 1
            if self._reader_paused:
                self._reader_cond.notify_all()
            try:
                self._wait_for_reader(stream, deadline)
            finally:
                self._window_waiters -= 1

    def _acquire_transport(self, stream: Stream, deadline: float | None) -> None:
        """Own the transport, in arrival order behind other streams (lock held)."""
        if not self._tx_busy and not self._tx_waiters:
            self._tx_busy = True
            return
        stream._tx_granted = False
        self._tx_waiters.append(stream)
        try:
            while not stream._tx_granted:
                if self._closed:
                    raise stream._send_error()
                stream._wait(deadline)
        except BaseException:
            if stream._tx_granted:
                # Granted and interrupted at once: the writer task passes it on.
                self._hand_to_writer([])
            elif stream in self._tx_waiters:
                self._tx_waiters.remove(stream)
            raise

    def _wait_idle(self, timeout: float | None) -> None:
        """Wait for progress of the transport (lock held)."""
        self._idle_waiters += 1
        try:
            self._idle_cond.wait(bounded_wait(timeout))
        finally:
            self._idle_waiters -= 1

    def _notify_idle(self) -> None:
        if self._idle_waiters:
            self._idle_cond.notify_all()

    def _release_transport(self, deadline: float | None) -> None:
        """Flush queued control frames, then hand the transport on (lock not held)."""
        while True:
            with self._lock:
                # Whatever was taken before this point has been written.
                if self._control_written != self._control_taken:
                    self._control_written = self._control_taken
                    self._notify_idle()
                frames = self._take_control() if not self._closed else None
                if not frames:
                    if self._tx_waiters and not self._closed:
                        nxt = self._tx_waiters.popleft()
                        nxt._tx_granted = True
                        nxt._wake()
                    else:
                        self._tx_busy = False
                        self._notify_idle()
                    return
            if self._write(frames, deadline) != _WRITTEN:
                return

    def _hand_to_writer(self, parts: list[Any]) -> None:
        """Give the transport, with the rest of a started write, to the writer task (lock held).

        The holder's deadline passed or it was interrupted (``gevent.Timeout``,
        ``kill()``, ``KeyboardInterrupt``): the writer finishes the frame, so the
        framing survives and the caller can leave at once.
        """
        self._unfinished = parts
        self._writer_cond.notify()

    def _write(self, parts: list[Any], deadline: float | None) -> int:
        """Write whole frames (transport held, lock not held): _WRITTEN, _DEFERRED or _FAILED.

        _DEFERRED: the deadline passed first, or this transport cannot bound a
        write (TLS), so the writer task now holds the transport and finishes the
        frames. _FAILED: the transport failed; nothing is written any more
        (``_fail_write``).
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
            self._fail_write(f"transport write failed: {exc}")
            return _FAILED
        except BaseException:
            if self._sendmsg is None and self._send is None:
                # Interrupted inside sendall: how much went out is unknown, so
                # the framing is lost and the session cannot go on.
                self._fail_write("a transport write was interrupted")
            else:
                with self._lock:
                    self._hand_to_writer(parts)
            raise

    def _fail_write(self, why: str) -> None:
        """Stop writing for good after a failed write (lock not held).

        Reading goes on until the transport ends: frames the peer sent before it
        went away (a reply, then its FIN) are still delivered, as a socket
        still returns data that arrived before a failed send. The reader then
        ends the session with this error.
        """
        with self._lock:
            self._tx_busy = False
            self._notify_idle()
            if self._closed or self._write_error is not None:
                return
            self._write_error = SessionClosedError(errno.EPIPE, why)
            self._control.clear()
            for stream in [*self._streams.values(), *self._tx_waiters]:
                if stream._send_state == SEND_OPEN:
                    stream._send_state = SEND_RESET
                stream._wake()
            self._writer_cond.notify_all()
        log.debug("pysmux: %s; reading on until the transport ends", why)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def _transmit(self, parts: list[Any], deadline: float | None) -> None:
        """Put ``parts`` on the wire (transport held, lock not held).

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

    def _write_loop(self) -> None:
        try:
            self._write_control()
        except BaseException as exc:  # a bug, or the task was killed: never half alive
            if not self._closed:
                log.exception("pysmux: writer task failed")
                self._abort(SessionClosedError(errno.EIO, f"writer task failed: {exc!r}"))
            if not isinstance(exc, Exception):
                raise
        finally:
            with self._lock:
                if self._unfinished is not None:  # the session ended before it was written
                    self._unfinished = None
                    self._tx_busy = False
                    self._notify_idle()

    def _write_control(self) -> None:
        """Write control frames while the transport is idle, finish handed-over
        writes, run keepalive."""
        cfg = self._config
        rt = self._runtime
        interval = cfg.keepalive_interval
        next_ping = rt.monotonic() + interval
        lock = self._lock
        lock.acquire()
        try:
            while not self._closed:
                wait: float | None = None
                if cfg.keepalive:
                    now = rt.monotonic()
                    if self._reader_paused:
                        self._last_rx = now  # a paused reader is not a silent peer
                    silent = now - self._last_rx
                    if silent >= cfg.keepalive_timeout:
                        lock.release()
                        try:
                            self._abort(
                                SessionClosedError(
                                    errno.ETIMEDOUT,
                                    f"keepalive timeout: nothing received for {silent:.1f} s "
                                    f"(keepalive_timeout={cfg.keepalive_timeout})",
                                )
                            )
                        finally:
                            lock.acquire()
                        break
                    if now >= next_ping:
                        next_ping = now + interval
                        if not self._nop_queued:
                            self._nop_queued = True
                            self._queue_control(encode_header(self._version, CMD_NOP, 0, 0))
                    wait = min(next_ping, self._last_rx + cfg.keepalive_timeout) - now
                unfinished = self._unfinished
                if unfinished is not None or (self._control and not self._tx_busy):
                    self._unfinished = None
                    self._tx_busy = True
                    # Bounded writes where the transport allows them: a peer that
                    # stops reading must not stop the keepalive clock.
                    deadline = None
                    if self._wait_writable is not None:
                        deadline = rt.monotonic() + _WRITER_SLICE
                    lock.release()
                    holding = True
                    try:
                        if unfinished is None or self._write(unfinished, deadline) == _WRITTEN:
                            self._release_transport(deadline)
                        holding = False  # passed on, handed back to this task, or failed
                    finally:
                        lock.acquire()
                        if holding:  # an exception: this task is about to end
                            self._tx_busy = False
                            self._notify_idle()
                    continue
                self._writer_cond.wait(bounded_wait(wait))
        finally:
            lock.release()

    # -- reading ---------------------------------------------------------------------

    def _read_loop(self) -> None:
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
        with self._lock:
            while self._tx_busy or self._reading:
                self._wait_idle(None)
            # Nobody reads or writes a closed socket.
            self._tx_busy = self._reading = True
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._wake_fd >= 0:
            os.close(self._wake_fd)

    def _read_frames(self) -> None:
        """The reader task: read whenever no stream reader does it itself."""
        lock = self._lock
        while True:
            with lock:
                if not self._take_read_turn():
                    return
            try:
                self._fill(None, lead=False)
            finally:
                with lock:
                    try:
                        if not self._closed:
                            self._absorb(_FRAMES_PER_SLICE)
                        if self._handed_off:
                            # The woken reader will likely read the next frame itself.
                            self._handed_off = False
                            self._reader_active = self._runtime.monotonic()
                    finally:
                        self._end_read_turn()
            # A peer that never stops sending must not starve the other
            # greenlets: on gevent a read with data waiting never yields.
            self._runtime.yield_now()

    def _take_read_turn(self) -> bool:
        """Wait until the reader task should read; False once the session is closed.

        It reads at once when direct reads are off, or a task waits for frames
        without reading itself. Otherwise it lingers briefly after a stream
        reader was active: that reader will most likely read the next frame
        itself, with no hand-off between threads. While a stream reader holds
        the read turn it sleeps until that turn ends, so an idle session costs
        no periodic wake-ups (lock held).
        """
        rt = self._runtime
        while not self._closed:
            wait: float | None = None
            if not self._may_read():
                # Applications (unread data) or the transport (refusal FINs not
                # yet written) lag behind: stop reading, memory stays bounded.
                self._reader_paused = True
            elif not self._reading:
                self._reader_paused = False
                idle = rt.monotonic() - self._reader_active
                if not self._direct_reads or self._followers or idle >= _LINGER_SECONDS:
                    self._reading = True
                    return True
                wait = _LINGER_SECONDS - idle
            else:
                self._bg_parked = True  # woken when the stream reader's turn ends
            self._bg_waiting = True
            self._reader_cond.wait(wait)
            self._bg_waiting = self._bg_parked = False
        return False

    def _may_read(self) -> bool:
        """Whether anyone may read more frames now (lock held): the bounds on
        unread data and on unwritten refusals hold for every reader.

        Version 2 reads past the session budget while a local writer waits for
        a window update: pausing then could deadlock (the UPD sits behind data
        that the waiting writers would read after they wrote). Memory stays
        bounded by the stream windows, which ``_on_psh`` enforces, and no new
        stream is accepted while over the budget.
        """
        if self._refusals_queued > _MAX_QUEUED_REFUSALS:
            return False
        if self._buffered < self._config.max_receive_buffer:
            return True
        return self._version == 2 and self._window_waiters > 0

    def _end_read_turn(self) -> None:
        self._reading = False
        if self._closed:
            self._notify_idle()
        elif self._bg_waiting and (self._followers or self._bg_parked):
            self._reader_cond.notify_all()

    def _fill(self, deadline: float | None, lead: bool) -> None:
        """Read what the transport has into the read buffer (read turn held, lock not held).

        A stream reader (``lead``) polls with its deadline and the wake-up fd,
        so that a timeout or a local close interrupts it; the reader task blocks.
        """
        if self._more_frames:
            return  # complete frames wait in the buffer: handle them first
        buf = self._rbuf
        start, end = self._rstart, self._rend
        if len(buf) - end < _MAX_FRAME:
            buf[: end - start] = buf[start:end]
            end -= start
            self._rstart, self._rend = 0, end
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
                count = self._sock.recv_into(self._rview[end:], 0, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
        else:
            count = self._sock.recv_into(self._rview[end:])
        if not count:
            where = "inside a frame" if end > self._rstart else "between frames"
            raise SessionClosedError(errno.ECONNRESET, f"transport closed by the peer ({where})")
        self._rend = end + count
        self._last_rx = self._runtime.monotonic()
        self._bytes_received += count  # one writer: whoever holds the read turn

    def _absorb(self, limit: int = 0) -> None:
        """Handle the complete frames in the read buffer (read turn and lock held).

        With a ``limit``, at most that many: the rest wait in the buffer
        (``_more_frames``) and are handled before the transport is read again.
        """
        view, end = self._rview, self._rend
        start = self._dispatch(view, self._rstart, end, limit)
        if self._syn_stalled:
            start = self._wait_for_accept(view, start, end)
        if start == end:
            start = self._rend = 0
        self._rstart = start

    def _await_frames(self, stream: Stream, deadline: float | None) -> None:
        """Wait until frames may have changed ``stream`` (lock held).

        If nobody is reading the transport, the caller reads it itself: the
        frame it waits for then needs no hand-off from another thread.
        """
        if (
            self._direct_reads
            and not self._reading
            and stream._timeout != 0.0
            and self._may_read()
        ):
            self._read_directly(stream, deadline)
            return
        self._wait_for_reader(stream, deadline)

    def _wait_for_reader(self, stream: Stream, deadline: float | None) -> None:
        """Wait for frames that another task reads; it must read now (lock held)."""
        self._followers += 1
        if self._bg_waiting:
            self._reader_cond.notify_all()
        try:
            stream._wait(deadline)
        finally:
            self._followers -= 1

    def _read_directly(self, stream: Stream, deadline: float | None) -> None:
        if deadline is not None and deadline <= self._runtime.monotonic():
            stream._wait(deadline)  # raises the timeout
        self._reading = True
        self._leader = stream
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
            self._leader = None
            self._reader_active = self._runtime.monotonic()
            try:
                if error is None and not self._closed:
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

    def _dispatch(self, view: memoryview, start: int, end: int, limit: int = 0) -> int:
        """Handle the complete frames in ``view[start:end]`` (all, or up to ``limit``
        of them); return where the rest begins."""
        unpack = HEADER.unpack_from
        version = self._version
        handlers = self._handlers
        self._more_frames = False
        count = 0
        while end - start >= HEADER_SIZE:
            if limit and count == limit:
                self._more_frames = True
                break
            count += 1
            ver, cmd, length, stream_id = unpack(view, start)
            if ver != version:
                error = ProtocolError(
                    errno.EPROTO,
                    f"peer sent a version {ver} frame to a version {version} session "
                    f"(both ends must use the same Config.version)",
                )
                error.received = bytes(view[start : min(end, start + 64)])
                raise error
            handler = handlers.get(cmd)
            if handler is None:
                raise ProtocolError(errno.EPROTO, f"peer sent unknown command {cmd}")
            if cmd != CMD_PSH:
                self._check_control_length(cmd, length)
            payload_end = start + HEADER_SIZE + length
            if payload_end > end:
                break
            self._frames_received += 1
            handler(stream_id, view[start + HEADER_SIZE : payload_end])
            if self._syn_stalled:
                break  # this SYN waits for room in the accept queue
            start = payload_end
        return start

    def _wait_for_accept(self, view: memoryview, start: int, end: int) -> int:
        """The accept queue is full: wait for room, then refuse (lock held).

        A burst of SYNs larger than the backlog is common (Go clients open many
        streams at once) and a refused Go stream can hang (docs/design.md 9.1), so
        the reader first gives the application time to accept.
        """
        rt = self._runtime
        deadline = rt.monotonic() + _ACCEPT_STALL_SECONDS
        while self._syn_stalled and not self._closed:
            remaining = deadline - rt.monotonic()
            if len(self._accept_queue) < self._config.accept_backlog or remaining <= 0:
                self._refusing = remaining <= 0
                self._syn_stalled = False
                start = self._dispatch(view, start, end)
                deadline = rt.monotonic() + _ACCEPT_STALL_SECONDS
                continue
            self._reader_paused = True
            self._reader_cond.wait(remaining)
        return start

    def _check_control_length(self, cmd: int, length: int) -> None:
        if cmd == CMD_UPD:
            if self._version == 1:
                raise ProtocolError(errno.EPROTO, "peer sent UPD in a version 1 session")
            if length != UPD.size:
                raise ProtocolError(errno.EPROTO, f"peer sent UPD with length {length}, not 8")
        elif length:
            raise ProtocolError(
                errno.EPROTO, f"peer sent {CMD_NAMES[cmd]} with a {length}-byte payload"
            )

    def _count_junk(self, what: str) -> None:
        """Count a frame that carried nothing useful; too many per second is an attack."""
        self._junk += 1
        limit = self._config.max_junk_frames_per_second
        if limit and self._junk > limit:
            now = self._runtime.monotonic()
            if now - self._junk_since >= 1.0:
                self._junk = 1
                self._junk_since = now
            else:
                raise ProtocolError(
                    errno.EPROTO,
                    f"peer sent more than {limit} frames that carry nothing in one second "
                    f"(last: {what}; Config.max_junk_frames_per_second)",
                )

    # -- one handler per command (lock held) -------------------------------------------

    def _on_syn(self, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0 or (stream_id & 1) == (self._next_id & 1):
            raise ProtocolError(
                errno.EPROTO,
                f"peer opened stream {stream_id}, an id reserved for this side's streams",
            )
        if stream_id in self._streams:
            raise ProtocolError(errno.EPROTO, f"peer opened stream {stream_id}, which is open")
        cfg = self._config
        if len(self._streams) >= cfg.max_streams:
            self._refuse(stream_id, "max_streams")
            return
        if self._buffered >= cfg.max_receive_buffer and self._window_waiters:
            # Reading past the budget for writers that wait for a UPD (version
            # 2, see _may_read): a new stream could bring another whole window.
            self._refuse(stream_id, "max_receive_buffer")
            return
        if len(self._accept_queue) >= cfg.accept_backlog:
            if not self._refusing:
                self._syn_stalled = True
                return
            self._refuse(stream_id, "accept_backlog")
            return
        self._recently_closed.pop(stream_id, None)
        stream = Stream(self, stream_id)
        self._streams[stream_id] = stream
        self._accept_queue.append(stream)
        self._streams_accepted += 1
        self._accept_cond.notify()

    def _refuse(self, stream_id: int, limit: str) -> None:
        self._refused_streams += 1
        self._count_junk("refused SYN")
        self._refusals_queued += 1
        log.info("pysmux: refused stream %d: Config.%s reached", stream_id, limit)
        self._queue_control(encode_header(self._version, CMD_FIN, 0, stream_id))

    def _orphan(self, stream_id: int, what: str) -> None:
        """A frame for a stream not in the table: junk unless we closed it recently."""
        if stream_id not in self._recently_closed:
            self._count_junk(what)

    def _on_fin(self, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._orphan(stream_id, "FIN for an unknown stream")
            return
        if stream._recv_state != RECV_OPEN:
            return  # a second FIN, or we stopped reading: nothing changes
        stream._recv_state = RECV_EOF
        stream._wake()
        self._unregister_if_done(stream)

    def _on_psh(self, stream_id: int, payload: memoryview) -> None:
        length = len(payload)
        if not length:
            self._count_junk("empty PSH")
            return
        stream = self._streams.get(stream_id)
        if stream is None or stream._recv_state != RECV_OPEN:
            # After our close or the peer's FIN (old Go writes after FIN): drop.
            self._dropped_frames += 1
            if stream is None and length < _CHEAP_PAYLOAD:
                self._orphan(stream_id, "PSH for an unknown stream")
            return
        if self._version == 2 and stream._recv_buffered + length > self._stream_limit:
            raise ProtocolError(
                errno.EPROTO,
                f"peer overran the window of stream {stream_id}: "
                f"{stream._recv_buffered + length} bytes unread, at most "
                f"{self._stream_limit} allowed",
            )
        chunks = stream._chunks
        if chunks is None:
            chunks = stream._chunks = deque()
        if length >= _SMALL_PAYLOAD:
            chunks.append(bytes(payload))
        else:
            # Small payloads share one growing buffer: a peer's 1-byte frames
            # must cost about a byte each, not a Python object each.
            tail = chunks[-1] if chunks else None
            if type(tail) is bytearray and len(tail) < _COALESCE_LIMIT:
                tail += payload
            else:
                chunks.append(bytearray(payload))
        stream._recv_buffered += length
        self._buffered += length
        if stream._waiting:
            stream._wake()
            self._handed_off = True

    def _on_nop(self, stream_id: int, payload: memoryview) -> None:
        self._count_junk("NOP")

    def _on_upd(self, stream_id: int, payload: memoryview) -> None:
        stream = self._streams.get(stream_id)
        if stream is None:
            self._orphan(stream_id, "UPD for an unknown stream")
            return
        consumed, window = UPD.unpack(payload)
        advance = (consumed - stream._peer_consumed) & _MASK
        if advance >= 2**31:
            return  # older than one we already have: frames can cross, not an error
        inflight = (stream._num_written - stream._peer_consumed) & _MASK
        if advance > inflight:
            raise ProtocolError(
                errno.EPROTO,
                f"peer acknowledged {advance} bytes on stream {stream_id}, "
                f"but only {inflight} were in flight",
            )
        stream._peer_consumed = consumed
        stream._peer_window = min(window, _MAX_WINDOW)
        stream._wake()


def client(
    sock: Any, config: Config | None = None, runtime: str | Runtime | None = None
) -> Session:
    """Start the client end of a session on a connected transport (odd stream ids)."""
    return Session(sock, is_client=True, config=config, runtime=runtime)


def server(
    sock: Any, config: Config | None = None, runtime: str | Runtime | None = None
) -> Session:
    """Start the server end of a session on a connected transport (even stream ids)."""
    return Session(sock, is_client=False, config=config, runtime=runtime)
