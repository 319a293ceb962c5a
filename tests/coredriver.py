"""A minimal in-memory driver for the sans-I/O core, for its own tests.

No sockets, threads or clocks: bytes are copied into the core's read buffer by
hand, the time is whatever the test says, and "writing" means taking the
frames the core produced. :class:`Wire` joins two cores back to back.
"""

from __future__ import annotations

from typing import Any

from pysmux import Config
from pysmux.core import SessionCore, StreamCore
from pysmux.frame import CMD_FIN, CMD_NOP, CMD_PSH, CMD_SYN, CMD_UPD, UPD, encode_header
from tests.rawpeer import Frame, parse_frames

__all__ = [
    "Core",
    "Wire",
    "fin",
    "make",
    "nop",
    "psh",
    "send",
    "syn",
    "take",
    "upd",
    "written",
]

Core = SessionCore[StreamCore]


def make(version: int = 1, role: str = "server", now: float = 0.0, **fields: Any) -> Core:
    """A core with plain :class:`StreamCore` streams; ``fields`` go to ``Config``."""
    fields.setdefault("keepalive", False)
    cfg = Config(version=version, **fields)
    return SessionCore(cfg, is_client=role == "client", now=now, new_stream=StreamCore)


def syn(sid: int, version: int = 1) -> bytes:
    return encode_header(version, CMD_SYN, 0, sid)


def fin(sid: int, version: int = 1) -> bytes:
    return encode_header(version, CMD_FIN, 0, sid)


def nop(version: int = 1) -> bytes:
    return encode_header(version, CMD_NOP, 0, 0)


def psh(sid: int, body: bytes, version: int = 1) -> bytes:
    return encode_header(version, CMD_PSH, len(body), sid) + body


def upd(sid: int, consumed: int, window: int) -> bytes:
    return encode_header(2, CMD_UPD, UPD.size, sid) + UPD.pack(consumed, window)


def feed(core: Core, data: bytes, now: float = 0.0, piece: int = 0, limit: int = 0) -> None:
    """Hand ``data`` to ``core`` as a driver would: read into its buffer (in
    pieces of at most ``piece`` bytes, if given), then handle the frames;
    with a ``limit``, as many rounds as ``more_frames`` asks for."""
    view = memoryview(data)
    while view:
        buf = core.get_buffer()
        count = min(len(buf), len(view), piece or len(view))
        buf[:count] = view[:count]
        core.buffer_updated(count, now)
        view = view[count:]
        core.handle_frames(now, limit)
        while core.more_frames:
            core.handle_frames(now, limit)


def written(core: Core) -> list[Frame]:
    """The frames the core wants written now (taken from its control queue)."""
    frames, rest = parse_frames(b"".join(bytes(part) for part in core.take_control()))
    assert rest == b""
    return frames


def send(core: Core, stream: StreamCore, data: bytes) -> bytes:
    """Bytes on the wire for one data frame of ``data`` (as much as may go now),
    behind any queued control frames, as the driver writes them; b"" if the
    window is closed."""
    count = core.send_size(stream, len(data))
    if count <= 0:
        return b""
    parts = core.take_control()
    parts.append(core.data_header(stream, count))
    parts.append(data[:count])
    return b"".join(parts)


def take(core: Core, stream: StreamCore, size: int) -> bytes:
    """What an application ``recv(size)`` gets from buffered data (and tells the core)."""
    data = stream._take(size)
    core.consumed(stream, len(data))
    return data


class Wire:
    """Two cores back to back: whatever one writes, the other reads."""

    def __init__(self, version: int = 1, **fields: Any) -> None:
        self.client = make(version, "client", **fields)
        self.server = make(version, "server", **fields)

    def flush(self, now: float = 0.0) -> None:
        """Carry every queued control frame across, both ways, until none is left."""
        while self.client.control or self.server.control:
            for src, dst in ((self.client, self.server), (self.server, self.client)):
                data = b"".join(src.take_control())
                if data:
                    feed(dst, data, now)

    def carry(self, src: Core, data: bytes, now: float = 0.0) -> None:
        """Deliver bytes that ``src`` wrote to the other core."""
        feed(self.server if src is self.client else self.client, data, now)
