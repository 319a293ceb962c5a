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

    version: int = 1
    keepalive_interval: float = 10.0
    keepalive_timeout: float = 30.0
    max_frame_size: int = 32768
    max_receive_buffer: int = 4 * 1024 * 1024
    max_stream_buffer: int = 65536
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
