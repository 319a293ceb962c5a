"""The protocol state of one stream: its two half-states, its receive buffer and,
in version 2, its flow-control counters. No I/O, no locks.

The life of a stream is two small state machines, one per direction:

====================  ===========================================  ==========================
receive side          entered when                                 ``recv`` answers
====================  ===========================================  ==========================
``RECV_OPEN``         the stream is created                        buffered data, else waits
``RECV_EOF``          the peer's FIN arrives                       buffered data, then ``b""``
``RECV_RESET``        the session ends before the peer's FIN, or   buffered data, then reset
                      the peer resets the stream (see below)
``RECV_SHUT``         local ``shutdown(SHUT_RD)`` or ``close()``   ``b""`` (data is dropped)
====================  ===========================================  ==========================

====================  ===========================================  ==========================
send side             entered when                                 ``send`` answers
====================  ===========================================  ==========================
``SEND_OPEN``         the stream is created                        writes
``SEND_SHUT``         local ``shutdown(SHUT_WR)``/``close()``:     ``BrokenPipeError``
                      a FIN is queued exactly once
``SEND_RESET``        the session ends, or the peer resets it      ``StreamResetError``
====================  ===========================================  ==========================

A **reset** is pysmux's abortive close (``Stream.reset()``), which smux itself
lacks: an empty PSH frame, then the FIN. Go smux ignores an empty PSH, so a Go
peer sees a plain FIN; a pysmux peer marks the stream at the empty PSH
(``_reset_marked``) and ends both of its directions with a reset at the FIN.

Only :class:`~pysmux.core.session.SessionCore` changes these states and counters.
A driver's stream class (``pysmux.Stream``) derives from :class:`StreamCore`,
so a frame reaches its stream without an extra object; the driver reads the
states and takes received data with the ``_take`` methods. The attribute names
start with an underscore because they are not part of ``pysmux.Stream``'s API.
"""

from __future__ import annotations

from collections import deque

__all__ = [
    "INITIAL_PEER_WINDOW",
    "RECV_EOF",
    "RECV_OPEN",
    "RECV_RESET",
    "RECV_SHUT",
    "SEND_OPEN",
    "SEND_RESET",
    "SEND_SHUT",
    "StreamCore",
]

RECV_OPEN, RECV_EOF, RECV_RESET, RECV_SHUT = range(4)
SEND_OPEN, SEND_SHUT, SEND_RESET = range(3)

#: Go's initial assumption about a peer's window before its first UPD (v2).
INITIAL_PEER_WINDOW = 262144
#: Payloads shorter than this are appended to the stream's last small-payload
#: buffer (up to _COALESCE_LIMIT bytes) instead of being kept as one object each.
_SMALL_PAYLOAD = 1024
_COALESCE_LIMIT = 65536

_Chunk = bytes | bytearray
_Part = bytes | bytearray | memoryview


class StreamCore:
    """One stream's protocol state (see the module docstring for the states)."""

    __slots__ = (
        "_chunks",
        "_head",
        "_incr",
        "_num_read",
        "_num_written",
        "_peer_consumed",
        "_peer_window",
        "_recv_buffered",
        "_recv_state",
        "_reset_marked",
        "_send_state",
        "_upd_pending",
        "id",
    )

    def __init__(self, stream_id: int) -> None:
        #: The smux stream id (client-opened odd, server-opened even).
        self.id = stream_id
        self._recv_state = RECV_OPEN
        self._send_state = SEND_OPEN
        self._reset_marked = False  # the peer's reset marker arrived: its FIN resets
        # Receive buffer: whole payloads, the first one read from offset _head;
        # made on the first payload, so an idle stream stays small.
        self._chunks: deque[_Chunk] | None = None
        self._head = 0
        self._recv_buffered = 0
        # Version 2 counters, all modulo 2**32 as on the wire.
        self._num_read = 0
        self._incr = 0
        self._upd_pending = False  # a UPD for this stream waits in the control queue
        self._num_written = 0
        self._peer_consumed = 0
        self._peer_window = INITIAL_PEER_WINDOW

    # -- the receive buffer ----------------------------------------------------------

    def _store(self, payload: memoryview) -> None:
        """Keep a received payload (the caller checked every rule first)."""
        chunks = self._chunks
        if chunks is None:
            chunks = self._chunks = deque()
        length = len(payload)
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
        self._recv_buffered += length

    def _take(self, size: int) -> bytes:
        """Up to ``size`` buffered bytes (at least one byte must be buffered)."""
        chunks = self._chunks
        assert chunks is not None  # data is buffered
        first = chunks[0]
        if self._head == 0 and len(first) <= size:
            # The common bulk case: hand out a whole payload without a copy.
            chunks.popleft()
            self._recv_buffered -= len(first)
            return first if type(first) is bytes else bytes(first)
        return b"".join(self._take_parts(size))

    def _take_into(self, view: memoryview, size: int) -> int:
        """Copy up to ``size`` buffered bytes into ``view``; how many."""
        pos = 0
        for part in self._take_parts(size):
            end = pos + len(part)
            view[pos:end] = part
            pos = end
        return pos

    def _take_parts(self, size: int) -> list[_Part]:
        chunks = self._chunks
        assert chunks is not None  # data is buffered
        out: list[_Part] = []
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

    def _drop_buffer(self) -> int:
        """Forget the buffered data; how many bytes it was."""
        dropped = self._recv_buffered
        self._chunks = None
        self._head = 0
        self._recv_buffered = 0
        return dropped
