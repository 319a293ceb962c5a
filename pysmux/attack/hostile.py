"""A hostile peer's connection: frames written by hand, and a record of what the
server does about them.

A :class:`HostileConn` is a raw connection to an smux server (TCP, or TLS, after
the key handshake when the server requires one: the attack is on smux). The attack
writes bytes of its choosing (:meth:`send` never blocks past a deadline, so a
server that stops reading cannot hang the attack); a reader task parses the
frames the server sends back (FINs, data, window updates) and notes when and
how the server closed the connection.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from ..dialer import Dialer
from ..frame import CMD_FIN, CMD_PSH, CMD_UPD, HEADER, HEADER_SIZE, UPD
from ..tcp import Address

__all__ = ["HostileConn"]

#: Longest a single blocked ``send`` waits before the deadline is checked again.
_SEND_SLICE = 0.2


class HostileConn:
    """A raw connection to ``address``; ``closed_at`` is set once the server ends it."""

    def __init__(self, dialer: Dialer, address: Address) -> None:
        self.sock = dialer.transport(address)
        self.opened_at = time.monotonic()
        self.sent = 0  # bytes written
        self.closed_at: float | None = None  # when the server ended the connection
        self.close_how = ""  # "EOF", or the error that ended reading
        self.fins: set[int] = set()  # streams the server sent FIN for
        self.data_streams: set[int] = set()  # streams the server sent data on
        self.data_bytes = 0
        self.consumed: dict[int, int] = {}  # v2: the server's latest UPD per stream
        self.windows: dict[int, int] = {}
        self._stopping = False
        self._reader = dialer.runtime.spawn(self._read, "pysmux-attack-reader")

    @property
    def closed(self) -> bool:
        return self.closed_at is not None

    def refused(self) -> int:
        """Streams the server ended without a byte of data: refused or dropped at once."""
        return len(self.fins - self.data_streams)

    def send(self, data: bytes | memoryview, deadline: float) -> bool:
        """Write ``data`` unless the deadline passes or the connection ends first; True
        when all of it was written."""
        view = memoryview(data)
        while view:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return False
            try:
                self.sock.settimeout(min(left, _SEND_SLICE))
                count = self.sock.send(view)
            except TimeoutError:
                continue  # the server is not reading: check the deadline again
            except OSError:
                return False
            view = view[count:]
            self.sent += count
        return True

    def _read(self) -> None:
        buf = bytearray()
        while True:
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:  # send() sets a timeout on the shared socket
                continue
            except (OSError, ValueError) as exc:  # ValueError: a TLS socket closed meanwhile
                if not self._stopping:
                    self._ended(f"{type(exc).__name__}: {exc}")
                return
            if not chunk:
                if not self._stopping:
                    self._ended("EOF")
                return
            buf += chunk
            start = self._parse(buf)
            del buf[:start]

    def _ended(self, how: str) -> None:
        self.closed_at = time.monotonic()
        self.close_how = how

    def _parse(self, buf: bytearray) -> int:
        """Note every whole frame in ``buf``; where the rest begins."""
        start = 0
        while len(buf) - start >= HEADER_SIZE:
            _, cmd, length, stream_id = HEADER.unpack_from(buf, start)
            end = start + HEADER_SIZE + length
            if end > len(buf):
                break
            if cmd == CMD_FIN:
                self.fins.add(stream_id)
            elif cmd == CMD_PSH and length:
                self.data_streams.add(stream_id)
                self.data_bytes += length
            elif cmd == CMD_UPD and length == UPD.size:
                consumed, window = UPD.unpack_from(buf, start + HEADER_SIZE)
                self.consumed[stream_id] = consumed
                self.windows[stream_id] = window
            start = end
        return start

    def close(self) -> None:
        """Drop the connection (if the server has not) and end the reader task. Idempotent."""
        self._stopping = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(10)
        self.sock.close()

    @staticmethod
    def open_many(dialer: Dialer, address: Address, count: int) -> list[Any]:
        """``count`` connections; fewer if the server refuses some (it is allowed to)."""
        conns = []
        for _ in range(count):
            try:
                conns.append(HostileConn(dialer, address))
            except OSError:
                break
        return conns
