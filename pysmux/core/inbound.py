"""What arrives: bytes in, the rules for every frame the peer sends, reading.

Part of the sans-I/O core (see ``pysmux/core/__init__.py``). The driver reads
the transport into :meth:`Inbound.get_buffer`, reports it with
:meth:`Inbound.buffer_updated` and calls :meth:`Inbound.handle_frames`: one
handler per command decides what the peer may do (docs/design.md section 8 is
the table). The application side of receiving is here too: accepting streams,
taking data (the budget and the UPD decision) and shutting the receive side.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError, SessionClosedError
from ..frame import (
    CMD_FIN,
    CMD_NAMES,
    CMD_NOP,
    CMD_PSH,
    CMD_SYN,
    CMD_UPD,
    HEADER,
    UPD,
)
from .state import MASK, MAX_FRAME, READ_BUFFER, S, SessionState
from .stream import RECV_EOF, RECV_OPEN, RECV_RESET, RECV_SHUT, SEND_OPEN, SEND_RESET

__all__ = ["ACCEPT_STALL_SECONDS", "Inbound"]

log = logging.getLogger("pysmux")

_MAX_WINDOW = 2**31 - 1
#: A PSH for an unknown stream shorter than this counts as junk: it costs the
#: peer little.
_CHEAP_PAYLOAD = 512
#: Refusal FINs queued before reading must wait for the writer to catch up.
_MAX_QUEUED_REFUSALS = 1024
#: How long a SYN that met a full accept queue waits for the application to
#: accept before new streams are refused.
ACCEPT_STALL_SECONDS = 1.0


class Inbound(SessionState[S]):
    """The inbound half of :class:`~pysmux.core.SessionCore`."""

    # -- bytes in --------------------------------------------------------------------

    def get_buffer(self) -> memoryview:
        """Where the next bytes read from the transport go.

        Call it only once every complete frame has been handled (``more_frames``
        false, not ``syn_stalled``): there is then room for a whole frame.
        """
        start, end = self._rstart, self._rend
        if READ_BUFFER - end < MAX_FRAME:
            buf = self._rbuf
            buf[: end - start] = buf[start:end]
            end -= start
            self._rstart, self._rend = 0, end
        return self._rview[end:]

    def buffer_updated(self, count: int, now: float) -> None:
        """``count`` bytes (at least one) were read into ``get_buffer()`` at ``now``."""
        self._rend += count
        self.last_rx = now
        self.bytes_received += count

    def eof_error(self) -> SessionClosedError:
        """The error that ends the session when the transport ends now."""
        where = "inside a frame" if self._rend > self._rstart else "between frames"
        return SessionClosedError(errno.ECONNRESET, f"transport closed by the peer ({where})")

    def may_read(self) -> bool:
        """Whether anyone may read more from the transport now.

        Not while the unread data is over the budget, or while too many refusal
        FINs wait to be written: memory stays bounded.

        Version 2 reads past the budget while a local writer waits for a window
        update: pausing then could deadlock (the UPD sits behind data that the
        waiting writers would read after they wrote). Memory stays bounded by
        the stream windows, which ``_on_psh`` enforces, and no new stream is
        accepted while over the budget.
        """
        if self.refusals_queued > _MAX_QUEUED_REFUSALS:
            return False
        if self.buffered < self.config.max_receive_buffer:
            return True
        return self.version == 2 and self.window_waiters > 0

    def handle_frames(self, now: float, limit: int = 0) -> None:
        """Apply the complete frames in the read buffer: all of them, or at most
        ``limit`` (then ``more_frames`` tells whether some are left).

        Stops early while a SYN waits for room in the accept queue
        (``syn_stalled``). Raises :class:`ProtocolError` at the first frame that
        breaks the protocol.
        """
        self._now = now
        if self.syn_stalled:
            if len(self.accept_queue) >= self.config.accept_backlog and now < self.stall_until:
                return
            self.refusing = now >= self.stall_until
            self.syn_stalled = False
        view, start, end = self._rview, self._rstart, self._rend
        unpack = HEADER.unpack_from
        header_size = HEADER.size
        version = self.version
        handlers = _HANDLERS
        self.more_frames = False
        count = 0
        while end - start >= header_size:
            if limit and count == limit:
                self.more_frames = True
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
            payload_end = start + header_size + length
            if payload_end > end:
                break
            self.frames_received += 1
            handler(self, stream_id, view[start + header_size : payload_end])
            if self.syn_stalled:
                # This SYN waits for room in the accept queue; it is applied (and
                # counted) again once there is some.
                self.frames_received -= 1
                break
            start = payload_end
        if start == end:
            start = self._rend = 0
        self._rstart = start

    def _check_control_length(self, cmd: int, length: int) -> None:
        if cmd == CMD_UPD:
            if self.version == 1:
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
        limit = self.config.max_junk_frames_per_second
        if limit and self._junk > limit:
            now = self._now
            if now - self._junk_since >= 1.0:
                self._junk = 1
                self._junk_since = now
            else:
                raise ProtocolError(
                    errno.EPROTO,
                    f"peer sent more than {limit} frames that carry nothing in one second "
                    f"(last: {what}; Config.max_junk_frames_per_second)",
                )

    def _orphan(self, stream_id: int, what: str) -> None:
        """A frame for a stream not in the table: junk unless we closed it recently."""
        if stream_id not in self._recently_closed:
            self._count_junk(what)

    # -- one handler per command -----------------------------------------------------

    def _on_syn(self, stream_id: int, payload: memoryview) -> None:
        if stream_id == 0 or (stream_id & 1) == (self._next_id & 1):
            raise ProtocolError(
                errno.EPROTO,
                f"peer opened stream {stream_id}, an id reserved for this side's streams",
            )
        if stream_id in self.streams:
            raise ProtocolError(errno.EPROTO, f"peer opened stream {stream_id}, which is open")
        cfg = self.config
        if len(self.streams) >= cfg.max_streams:
            self._refuse(stream_id, "max_streams")
            return
        if self.buffered >= cfg.max_receive_buffer and self.window_waiters:
            # Reading past the budget for writers that wait for a UPD (version
            # 2, see may_read): a new stream could bring another whole window.
            self._refuse(stream_id, "max_receive_buffer")
            return
        if len(self.accept_queue) >= cfg.accept_backlog:
            if not self.refusing:
                # A burst of SYNs larger than the backlog is common (Go clients
                # open many streams at once) and a refused Go stream can hang
                # (docs/design.md 9.1): give the application time to accept.
                self.syn_stalled = True
                self.stall_until = self._now + ACCEPT_STALL_SECONDS
                return
            self._refuse(stream_id, "accept_backlog")
            return
        self._recently_closed.pop(stream_id, None)
        stream = self._new_stream(stream_id)
        self.streams[stream_id] = stream
        self.accept_queue.append(stream)
        self.streams_accepted += 1
        self.arrivals += 1

    def _refuse(self, stream_id: int, limit: str) -> None:
        self.refused_streams += 1
        self._count_junk("refused SYN")
        self.refusals_queued += 1
        log.info("pysmux: refused stream %d: Config.%s reached", stream_id, limit)
        self._queue_frame(CMD_FIN, stream_id)

    def _on_fin(self, stream_id: int, payload: memoryview) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._orphan(stream_id, "FIN for an unknown stream")
            return
        if stream._recv_state != RECV_OPEN:
            return  # a second FIN, or we stopped reading: nothing changes
        if stream._reset_marked:
            # The peer reset the stream: no clean EOF, and nothing more to send.
            stream._recv_state = RECV_RESET
            if stream._send_state == SEND_OPEN:
                stream._send_state = SEND_RESET
        else:
            stream._recv_state = RECV_EOF
        self.changed.append(stream)
        self._unregister_if_done(stream)

    def _on_psh(self, stream_id: int, payload: memoryview) -> None:
        length = len(payload)
        stream = self.streams.get(stream_id)
        if not length:
            if stream is not None and stream._recv_state == RECV_OPEN and not stream._reset_marked:
                stream._reset_marked = True  # a reset: the stream's FIN follows
            else:
                self._count_junk("empty PSH")
            return
        if stream is None or stream._recv_state != RECV_OPEN:
            # After our close or the peer's FIN (old Go writes after FIN): drop.
            self.dropped_frames += 1
            if stream is None and length < _CHEAP_PAYLOAD:
                self._orphan(stream_id, "PSH for an unknown stream")
            return
        held = stream._recv_buffered
        if self.version == 2 and held + length > self._stream_limit:
            raise ProtocolError(
                errno.EPROTO,
                f"peer overran the window of stream {stream_id}: "
                f"{held + length} bytes unread, at most {self._stream_limit} allowed",
            )
        stream._store(payload)
        self.buffered += length
        if not held:
            self.readable.append(stream)

    def _on_nop(self, stream_id: int, payload: memoryview) -> None:
        self._count_junk("NOP")

    def _on_upd(self, stream_id: int, payload: memoryview) -> None:
        stream = self.streams.get(stream_id)
        if stream is None:
            self._orphan(stream_id, "UPD for an unknown stream")
            return
        consumed, window = UPD.unpack(payload)
        advance = (consumed - stream._peer_consumed) & MASK
        if advance >= 2**31:
            return  # older than one we already have: frames can cross, not an error
        inflight = (stream._num_written - stream._peer_consumed) & MASK
        if advance > inflight:
            raise ProtocolError(
                errno.EPROTO,
                f"peer acknowledged {advance} bytes on stream {stream_id}, "
                f"but only {inflight} were in flight",
            )
        stream._peer_consumed = consumed
        stream._peer_window = min(window, _MAX_WINDOW)
        self.changed.append(stream)

    # -- the application side --------------------------------------------------------

    def accept(self) -> S | None:
        """The oldest stream the peer opened, if any; new SYNs are welcome again."""
        if not self.accept_queue:
            return None
        self.refusing = False
        return self.accept_queue.popleft()

    def consumed(self, stream: S, count: int) -> bool:
        """The application took ``count`` bytes from ``stream``: the budget gets
        them back. True when a UPD for the stream was queued (version 2).

        Go's rule: tell the peer on the first read and whenever half the stream
        buffer has been read since the last update.
        """
        self.buffered -= count
        if self.version == 2 and stream._recv_state == RECV_OPEN:
            stream._num_read = (stream._num_read + count) & MASK
            stream._incr += count
            if (
                stream._incr >= self.config.max_stream_buffer // 2 or stream._num_read == count
            ) and not stream._upd_pending:
                stream._incr = 0
                stream._upd_pending = True
                self._queue(stream)
                return True
        return False

    def under_budget(self) -> bool:
        """The unread data is below ``max_receive_buffer``."""
        return self.buffered < self.config.max_receive_buffer

    def shut_recv(self, stream: S) -> None:
        """Local ``shutdown(SHUT_RD)``: drop the buffered data, read ``b""`` from now on."""
        # Also after a reset: a stream shut for reading reads b"", as a socket does.
        stream._recv_state = RECV_SHUT
        self.buffered -= stream._drop_buffer()
        self._unregister_if_done(stream)


#: One handler per command: the only place that decides what a peer may do.
_HANDLERS: dict[int, Callable[[Inbound[Any], int, memoryview], None]] = {
    CMD_SYN: Inbound._on_syn,
    CMD_FIN: Inbound._on_fin,
    CMD_PSH: Inbound._on_psh,
    CMD_NOP: Inbound._on_nop,
    CMD_UPD: Inbound._on_upd,
}
