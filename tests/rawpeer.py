"""A hand-driven smux peer: writes frames made with ``pysmux.frame`` on a raw
socket and parses the 8-byte headers of what the pysmux session writes back.

Used as a fake (possibly hostile) peer in the protocol tests.
"""

from __future__ import annotations

import socket
import time
from typing import NamedTuple

from pysmux import frame

__all__ = ["Frame", "RawPeer", "parse_frames"]


class Frame(NamedTuple):
    ver: int
    cmd: int
    sid: int
    data: bytes

    def __repr__(self) -> str:
        name = frame.CMD_NAMES.get(self.cmd, str(self.cmd))
        return f"Frame(v{self.ver} {name} sid={self.sid} len={len(self.data)})"


class RawPeer:
    """One end of a socketpair speaking smux by hand."""

    def __init__(self, sock: socket.socket, version: int = 1) -> None:
        self.sock = sock
        self.version = version
        self._buf = bytearray()
        self.eof = False

    # -- writing -------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def encode(
        self,
        cmd: int,
        sid: int,
        payload: bytes = b"",
        *,
        ver: int | None = None,
        length: int | None = None,
    ) -> bytes:
        """A frame's bytes; ``ver``/``length`` override the honest values."""
        ver = self.version if ver is None else ver
        length = len(payload) if length is None else length
        return frame.encode_header(ver, cmd, length, sid) + payload

    def send(self, cmd: int, sid: int, payload: bytes = b"", **kw: int | None) -> None:
        self.send_raw(self.encode(cmd, sid, payload, **kw))

    def syn(self, sid: int) -> None:
        self.send(frame.CMD_SYN, sid)

    def fin(self, sid: int) -> None:
        self.send(frame.CMD_FIN, sid)

    def psh(self, sid: int, data: bytes) -> None:
        self.send(frame.CMD_PSH, sid, data)

    def nop(self) -> None:
        self.send(frame.CMD_NOP, 0)

    def upd(self, sid: int, consumed: int, window: int) -> None:
        self.send_raw(frame.encode_upd(self.version, sid, consumed, window))

    # -- reading -------------------------------------------------------------

    def _fill(self, n: int, deadline: float) -> bool:
        """Buffer at least ``n`` bytes; False on EOF. TimeoutError past deadline."""
        while len(self._buf) < n:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"raw peer: no {n} bytes in time (have {len(self._buf)})")
            self.sock.settimeout(remaining)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                raise TimeoutError(
                    f"raw peer: no {n} bytes in time (have {len(self._buf)})"
                ) from None
            if not chunk:
                self.eof = True
                return False
            self._buf += chunk
        return True

    def read_frame(self, timeout: float = 5.0, *, skip_nop: bool = True) -> Frame:
        """The next frame the session wrote. EOFError if the session closed the transport."""
        deadline = time.monotonic() + timeout
        while True:
            if not self._fill(frame.HEADER_SIZE, deadline):
                raise EOFError("raw peer: transport closed")
            ver, cmd, length, sid = frame.HEADER.unpack_from(self._buf)
            if not self._fill(frame.HEADER_SIZE + length, deadline):
                raise EOFError("raw peer: transport closed inside a frame")
            data = bytes(self._buf[frame.HEADER_SIZE : frame.HEADER_SIZE + length])
            del self._buf[: frame.HEADER_SIZE + length]
            if skip_nop and cmd == frame.CMD_NOP:
                continue
            return Frame(ver, cmd, sid, data)

    def expect(self, cmd: int, sid: int, timeout: float = 5.0) -> Frame:
        """Read frames until one with ``cmd`` for ``sid``; SYNs, UPDs and NOPs on
        the way are skipped, any other frame is an assertion error."""
        deadline = time.monotonic() + timeout
        while True:
            f = self.read_frame(max(0.0, deadline - time.monotonic()))
            if f.cmd == cmd and f.sid == sid:
                return f
            if f.cmd in (frame.CMD_SYN, frame.CMD_UPD, frame.CMD_NOP):
                continue
            raise AssertionError(f"expected {frame.CMD_NAMES.get(cmd, cmd)} sid={sid}, got {f!r}")

    def read_data(self, sid: int, n: int, timeout: float = 5.0) -> bytes:
        """Collect ``n`` bytes of PSH payload for ``sid`` (other frames: see ``expect``)."""
        deadline = time.monotonic() + timeout
        out = bytearray()
        while len(out) < n:
            f = self.expect(frame.CMD_PSH, sid, max(0.0, deadline - time.monotonic()))
            out += f.data
        assert len(out) == n, f"got {len(out)} bytes, wanted {n}"
        return bytes(out)

    def wait_closed(self, timeout: float = 1.0) -> float:
        """Wait until the session closes its end; return the seconds it took.

        Frames written before the close are discarded. On a socketpair, Linux
        reports ECONNRESET instead of EOF when the closing end had unread data,
        so a reset counts as closed too.
        """
        start = time.monotonic()
        deadline = start + timeout
        try:
            while True:
                self._buf.clear()
                if not self._fill(1, deadline):
                    break
        except ConnectionResetError:
            pass
        return time.monotonic() - start


def parse_frames(data: bytes) -> tuple[list[Frame], bytes]:
    """The complete frames at the start of ``data`` (headers are not checked),
    and the bytes of the incomplete frame after them."""
    frames = []
    pos = 0
    while len(data) - pos >= frame.HEADER_SIZE:
        ver, cmd, length, sid = frame.HEADER.unpack_from(data, pos)
        end = pos + frame.HEADER_SIZE + length
        if end > len(data):
            break
        frames.append(Frame(ver, cmd, sid, data[pos + frame.HEADER_SIZE : end]))
        pos = end
    return frames, data[pos:]
