"""What leaves: opening and shutting streams, data frames, the control queue, keepalive.

Part of the sans-I/O core (see ``pysmux/core/__init__.py``). Nothing here
writes: control frames (SYN, FIN, UPD, NOP, data queued by a non-blocking send)
wait in ``control`` until the driver takes them with
:meth:`Outbound.take_control`, and the driver builds each data frame with
:meth:`Outbound.data_header` once it holds the transport, sending at most
:meth:`Outbound.send_size` bytes in it.
"""

from __future__ import annotations

import errno

from ..errors import SessionClosedError, SmuxError
from ..frame import (
    CMD_FIN,
    CMD_NOP,
    CMD_PSH,
    CMD_SYN,
    HEADER_SIZE,
    encode_header,
    encode_upd,
)
from .state import MASK, MAX_FRAME, S, SessionState
from .stream import RECV_OPEN, SEND_OPEN, SEND_RESET, SEND_SHUT

__all__ = ["MAX_QUEUED_DATA", "Outbound"]

#: Bytes of non-blocking sends queued while another task holds the transport.
MAX_QUEUED_DATA = 256 * 1024


class Outbound(SessionState[S]):
    """The outbound half of :class:`~pysmux.core.SessionCore`."""

    # -- application calls -----------------------------------------------------------

    def open_stream(self) -> S:
        """Open a stream: registered at once, its SYN queued."""
        self.check_alive()
        if self.write_error is not None:
            raise SessionClosedError(
                errno.EPIPE, f"session can no longer write: {self.write_error}"
            )
        stream_id = self._next_id
        if stream_id > MASK:
            raise SmuxError(
                errno.EMFILE,
                "this session has used all 2**32 stream ids; open a new session",
            )
        self._next_id += 2
        self.streams_opened += 1
        stream = self._new_stream(stream_id)
        # Registered before the SYN is queued: a reply right after the peer's
        # accept finds the stream (Go loses it: docs/design.md section 9.1).
        self.streams[stream_id] = stream
        self._queue_frame(CMD_SYN, stream_id)
        return stream

    def shut_send(self, stream: S, reset: bool = False) -> bool:
        """Local ``shutdown(SHUT_WR)``; True when this queued the stream's FIN.

        ``reset``: the reset marker (an empty PSH) goes just before the FIN."""
        if stream._send_state == SEND_OPEN:
            stream._send_state = SEND_SHUT
            if reset:
                self._queue_frame(CMD_PSH, stream.id)
            self._queue_frame(CMD_FIN, stream.id)
            self._unregister_if_done(stream)
            return True
        if stream._send_state == SEND_RESET:
            # The session is gone, so no FIN; but a send after the caller's own
            # shutdown is a broken pipe, as on a socket.
            stream._send_state = SEND_SHUT
        return False

    def window(self, stream: S) -> int:
        """Bytes ``stream`` may send now; 0 or less: wait for a UPD (version 2)."""
        if self.version == 1:
            return MAX_FRAME
        inflight = (stream._num_written - stream._peer_consumed) & MASK
        return stream._peer_window - inflight

    def send_size(self, stream: S, want: int) -> int:
        """How much of ``want`` bytes goes in ``stream``'s next data frame; 0 or
        less: none (its send side is shut or reset: no data follows a FIN; or
        the window closed)."""
        if stream._send_state != SEND_OPEN:
            return 0
        return min(want, self.config.max_frame_size, self.window(stream))

    def data_header(self, stream: S, count: int) -> bytes:
        """The header of a ``count``-byte data frame that is about to be written."""
        stream._num_written = (stream._num_written + count) & MASK
        self.frames_sent += 1
        self.bytes_sent += HEADER_SIZE + count
        return encode_header(self.version, CMD_PSH, count, stream.id)

    def queue_data(self, stream: S, data: memoryview) -> int:
        """Queue one data frame as a control frame (a non-blocking send while
        another task writes); how many bytes of ``data`` it carries.

        Raises BlockingIOError past ``MAX_QUEUED_DATA`` queued bytes, as a
        socket whose buffer is full. The stream's window must be open.
        """
        count = min(len(data), self.config.max_frame_size, self.window(stream))
        if self._queued_data + count > MAX_QUEUED_DATA:
            raise BlockingIOError(errno.EAGAIN, "stream operation would block")
        stream._num_written = (stream._num_written + count) & MASK
        header = encode_header(self.version, CMD_PSH, count, stream.id)
        self._queued_data += count
        self._queue(header + data[:count])
        return count

    # -- bytes out -------------------------------------------------------------------

    def take_control(self) -> list[bytes]:
        """Every queued control frame, as (at most) one buffer, for the next write.

        One buffer, not one per frame: a ``sendmsg`` takes at most IOV_MAX
        (1024 on Linux) buffers, and a burst of opens or closes queues more.
        Empty when nothing is queued, or when every item was a UPD for a stream
        that stopped reading.
        """
        if not self.control:
            return []
        frames: list[bytes] = []
        window = self.config.max_stream_buffer
        version = self.version
        for item in self.control:
            if isinstance(item, bytes):
                frames.append(item)
            else:
                item._upd_pending = False
                if item._recv_state == RECV_OPEN:
                    frames.append(encode_upd(version, item.id, item._num_read, window))
        self.control.clear()
        self.frames_sent += len(frames)
        self.bytes_sent += sum(map(len, frames))
        self.control_taken = self.control_queued
        self._nop_queued = False
        self._queued_data = 0
        self.refusals_queued = 0
        return [b"".join(frames)] if len(frames) > 1 else frames

    # -- time ------------------------------------------------------------------------

    def keepalive(self, now: float, paused: bool) -> float | None:
        """Run the keepalive clock at ``now``: queue a NOP when one is due.

        ``paused``: the driver is not reading because of the session's own
        budget, which is no sign of a silent peer. Returns the seconds until
        the clock next needs to run (None: keepalive is off). Raises
        SessionClosedError when nothing arrived for ``keepalive_timeout``.
        """
        cfg = self.config
        if not cfg.keepalive:
            return None
        if paused:
            self.last_rx = now
        silent = now - self.last_rx
        if silent >= cfg.keepalive_timeout:
            raise SessionClosedError(
                errno.ETIMEDOUT,
                f"keepalive timeout: nothing received for {silent:.1f} s "
                f"(keepalive_timeout={cfg.keepalive_timeout})",
            )
        if now >= self._next_ping:
            self._next_ping = now + cfg.keepalive_interval
            if not self._nop_queued:
                self._nop_queued = True
                self._queue_frame(CMD_NOP, 0)
        return min(self._next_ping, self.last_rx + cfg.keepalive_timeout) - now
