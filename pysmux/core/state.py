"""A session's protocol state, shared by the inbound and outbound rules, and its end.

Part of the sans-I/O core (see ``pysmux/core/__init__.py``): no I/O, no locks,
no clock. The fields are documented where they are made, in ``__init__``; a
driver reads them and changes only ``window_waiters``, ``readable``,
``changed`` and ``arrivals`` (see the package docstring).
"""

from __future__ import annotations

import errno
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

from ..config import Config
from ..errors import ProtocolError, SessionClosedError, SmuxError, StreamResetError
from ..frame import HEADER_SIZE, MAX_PAYLOAD, encode_header
from .stream import INITIAL_PEER_WINDOW, RECV_OPEN, RECV_RESET, SEND_OPEN, SEND_RESET, StreamCore

__all__ = ["READ_BUFFER", "SessionState"]

S = TypeVar("S", bound=StreamCore)

MASK = 0xFFFFFFFF
#: The largest frame a peer may send, header included.
MAX_FRAME = HEADER_SIZE + MAX_PAYLOAD
#: The read buffer; the unparsed tail is moved to the front once less than a
#: whole maximal frame fits behind it.
READ_BUFFER = 256 * 1024
#: Ids of streams we closed that the peer may still legally send to (it has
#: not seen our FIN yet, or old Go keeps writing): frames for them are not junk.
_RECENTLY_CLOSED = 4096


class SessionState(Generic[S]):
    """A session's protocol state, and the rules that both directions share.

    ``new_stream(stream_id)`` makes the driver's stream object (a
    :class:`StreamCore` subclass) for a stream opened by either side; ``now``
    is the current time on the driver's monotonic clock.
    """

    def __init__(
        self,
        config: Config,
        *,
        is_client: bool,
        now: float,
        new_stream: Callable[[int], S],
    ) -> None:
        self.config = config
        self.version = config.version
        self.is_client = is_client
        self._new_stream = new_stream
        #: Streams open in at least one direction, by id.
        self.streams: dict[int, S] = {}
        # Go's first ids: client 3, server 2.
        self._next_id = 3 if is_client else 2
        #: Streams the peer opened that the application has not accepted yet.
        self.accept_queue: deque[S] = deque()
        #: A SYN met a full accept queue: frames wait until there is room or
        #: ``stall_until`` passes; then new streams are refused (``refusing``)
        #: until the application accepts again.
        self.syn_stalled = False
        self.stall_until = 0.0
        self.refusing = False
        self.closed = False
        #: Why the session ended (None while open).
        self.error: SmuxError | None = None
        #: Set when a transport write failed: nothing is written any more, while
        #: reading goes on to the end of the transport.
        self.write_error: SmuxError | None = None

        # Receiving.
        self._rbuf = bytearray(READ_BUFFER)
        self._rview = memoryview(self._rbuf)
        self._rstart = self._rend = 0
        #: Complete frames wait in the read buffer (``handle_frames`` hit its limit).
        self.more_frames = False
        #: Bytes received on every stream and not read yet (the v1 budget).
        self.buffered = 0
        #: When something last arrived from the peer.
        self.last_rx = now
        self._now = now
        self._junk = 0
        self._junk_since = now
        self._recently_closed: dict[int, None] = {}  # insertion-ordered set
        #: Local writers waiting for a window update (v2), kept by the driver.
        self.window_waiters = 0
        # Version 2: the most a peer that honours the windows can make one
        # stream hold unread: Go assumes 256 KiB before our first UPD, then
        # the window we advertise.
        self._stream_limit = max(INITIAL_PEER_WINDOW, config.max_stream_buffer)
        self.readable: list[S] = []
        self.changed: list[S] = []
        self.arrivals = 0

        # Sending.
        #: Control frames to write: whole frames, or a stream that owes a UPD
        #: (computed when taken, so several reads cost one UPD).
        self.control: deque[bytes | S] = deque()
        #: Control items queued / taken so far, as running counts.
        self.control_queued = 0
        self.control_taken = 0
        self.refusals_queued = 0
        self._nop_queued = False
        self._queued_data = 0
        self._next_ping = now + config.keepalive_interval

        # What Session.stats() reports.
        self.streams_opened = 0
        self.streams_accepted = 0
        self.refused_streams = 0
        self.frames_sent = 0
        self.bytes_sent = 0  # transport bytes, headers included, once a write starts
        self.frames_received = 0
        self.bytes_received = 0
        self.dropped_frames = 0
        self.protocol_errors = 0

    def stats(self) -> dict[str, int]:
        """The counters and gauges of ``Session.stats()``."""
        return {
            "streams_opened": self.streams_opened,
            "streams_accepted": self.streams_accepted,
            "streams_refused": self.refused_streams,
            "frames_sent": self.frames_sent,
            "bytes_sent": self.bytes_sent,
            "frames_received": self.frames_received,
            "bytes_received": self.bytes_received,
            "dropped_frames": self.dropped_frames,
            "protocol_errors": self.protocol_errors,
            "streams": len(self.streams),
            "buffered_bytes": self.buffered,
        }

    def check_alive(self) -> None:
        """Raise SessionClosedError once the session has ended."""
        if self.closed:
            raise SessionClosedError(errno.ECONNABORTED, f"session is closed: {self.error}")

    def _queue(self, item: bytes | S) -> None:
        """Queue a control item for the driver to write (``control``)."""
        if self.write_error is not None:
            return  # nothing can be written any more
        self.control.append(item)
        self.control_queued += 1

    def _queue_frame(self, cmd: int, stream_id: int) -> None:
        """Queue a frame without payload (SYN, FIN, NOP, the reset marker)."""
        self._queue(encode_header(self.version, cmd, 0, stream_id))

    # -- the end ---------------------------------------------------------------------

    def close(self, error: SmuxError) -> list[S] | None:
        """End the session because of ``error`` (unless a failed write came first:
        that is why it ended). Every stream without the peer's FIN is reset.
        Returns the streams whose waiters must wake; None if it had ended already."""
        if self.closed:
            return None
        self.closed = True
        self.error = error = self.write_error or error
        if isinstance(error, ProtocolError):
            self.protocol_errors += 1
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            if stream._recv_state == RECV_OPEN:
                stream._recv_state = RECV_RESET
            if stream._send_state == SEND_OPEN:
                stream._send_state = SEND_RESET
        # Events not acted on yet: their streams may have left the table.
        streams += self.readable
        streams += self.changed
        self.readable.clear()
        self.changed.clear()
        self.arrivals = 0
        return streams

    def write_failed(self, error: SmuxError) -> list[S] | None:
        """A transport write failed: nothing is written any more; every stream's
        send side is reset. Returns the streams to wake; None if the session
        had ended or stopped writing already."""
        if self.closed or self.write_error is not None:
            return None
        self.write_error = error
        self.control.clear()
        streams = list(self.streams.values())
        for stream in streams:
            if stream._send_state == SEND_OPEN:
                stream._send_state = SEND_RESET
        return streams

    def reset_error(self, stream: S) -> StreamResetError:
        """What a reset stream raises: the peer reset it, or the session ended."""
        if stream._reset_marked:
            return StreamResetError(errno.ECONNRESET, f"stream {stream.id} was reset by the peer")
        cause = self.error or self.write_error
        err = StreamResetError(
            errno.ECONNRESET,
            f"stream {stream.id} was reset: the session ended before the peer closed it ({cause})",
        )
        err.__cause__ = cause
        return err

    def _unregister_if_done(self, stream: S) -> None:
        done = stream._recv_state != RECV_OPEN and stream._send_state != SEND_OPEN
        if done and self.streams.get(stream.id) is stream:
            del self.streams[stream.id]
            recent = self._recently_closed
            recent[stream.id] = None
            if len(recent) > _RECENTLY_CLOSED:
                del recent[next(iter(recent))]
