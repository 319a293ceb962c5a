"""Session configuration: Go's ``DefaultConfig`` plus the limits pysmux adds."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

__all__ = ["Config"]


@dataclass(frozen=True)
class Config:
    """Settings of one session. Defaults equal xtaci/smux ``DefaultConfig``.

    Both ends of a session must use the same ``version``.

    The fields after ``accept_backlog`` are pysmux's own bounds on what a peer
    may make it hold or do; Go has none of them.
    """

    #: smux protocol version, 1 or 2; both ends must use the same one. Version 2
    #: adds a receive window per stream (UPD frames) to version 1's session budget.
    version: int = 1
    #: Seconds between NOPs sent to keep the session alive (with ``keepalive``).
    keepalive_interval: float = 10.0
    #: Seconds without receiving anything after which the session ends (with
    #: ``keepalive``); at least ``keepalive_interval``.
    keepalive_timeout: float = 30.0
    #: Largest payload of a frame this end sends, 1..65535 (the header's length
    #: field has 16 bits); the peer's frames may be up to 65535 whatever it says.
    max_frame_size: int = 32768
    #: Bytes received and not yet read, summed over every stream, past which the
    #: session stops reading its transport until applications catch up (version
    #: 1's only flow control: one budget for the whole session).
    max_receive_buffer: int = 4 * 1024 * 1024
    #: Version 2: the receive window of each stream, the bytes the peer may send on
    #: one stream that the application has not read yet; at most ``max_receive_buffer``.
    max_stream_buffer: int = 65536
    #: Incoming streams waiting for ``accept_stream``; a SYN past it is refused with a FIN.
    accept_backlog: int = 1024
    #: Send NOPs and end silent sessions (Go's ``KeepAliveDisabled`` inverted).
    keepalive: bool = True
    #: Streams the session holds at once; a SYN past it is refused with a FIN.
    max_streams: int = 65536
    #: Frames per second that carry nothing useful (NOP, empty PSH, frames for
    #: unknown streams, refused SYNs) before the peer is judged hostile and the
    #: session ends with ProtocolError. 0 disables the check.
    max_junk_frames_per_second: int = 50_000

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, why: str) -> None:
            if not ok:
                raise ValueError(f"Config.{name}={getattr(self, name)!r}: {why}")

        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type == "bool":
                check(f.name, isinstance(value, bool), "must be a bool")
            elif f.type == "float":
                check(
                    f.name,
                    isinstance(value, (int, float)) and not isinstance(value, bool),
                    "must be a number of seconds",
                )
                check(
                    f.name,
                    math.isfinite(value),
                    "must be a finite number of seconds (keepalive=False turns keepalive off)",
                )
            else:
                check(
                    f.name, isinstance(value, int) and not isinstance(value, bool), "must be an int"
                )
        check("version", self.version in (1, 2), "smux has versions 1 and 2")
        check("keepalive_interval", self.keepalive_interval > 0, "must be > 0")
        check("keepalive_timeout", self.keepalive_timeout > 0, "must be > 0")
        check(
            "keepalive_timeout",
            self.keepalive_timeout >= self.keepalive_interval,
            f"must be >= keepalive_interval ({self.keepalive_interval})",
        )
        check("max_frame_size", 0 < self.max_frame_size <= 65535, "must be in 1..65535")
        check("max_receive_buffer", self.max_receive_buffer > 0, "must be > 0")
        check("max_stream_buffer", 0 < self.max_stream_buffer < 2**31, "must be in 1..2**31-1")
        check(
            "max_stream_buffer",
            self.max_stream_buffer <= self.max_receive_buffer,
            f"must be <= max_receive_buffer ({self.max_receive_buffer})",
        )
        check("accept_backlog", self.accept_backlog > 0, "must be > 0")
        check("max_streams", self.max_streams > 0, "must be > 0")
        check("max_junk_frames_per_second", self.max_junk_frames_per_second >= 0, "must be >= 0")
