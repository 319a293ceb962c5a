"""The attacks: each one a way a hostile peer can misuse the smux protocol.

Every attack is bounded by :class:`AttackSettings`: it ends at ``duration``
seconds (sooner when the server has closed all its connections), never writes
more than ``max_bytes``, and opens ``conns`` connections (a default per kind).
Each returns what it saw the server do.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from ..dialer import Dialer
from ..frame import CMD_NOP, CMD_PSH, CMD_SYN, encode_header
from ..stream import INITIAL_PEER_WINDOW
from ..tcp import Address
from .hostile import HostileConn

__all__ = ["KINDS", "AttackSettings", "Run"]

#: Frames in one write of a flood.
_BATCH = 4096
#: The first client stream id, as Go uses.
_FIRST_ID = 3
#: How long an attack waits past its duration for answers still coming in (refusals,
#: closes) from a server that is busy.
_SETTLE_SECONDS = 4.0
#: How long syn-flood waits past its duration for the server to refuse or answer
#: every stream it opened.
_FATE_GRACE = 30.0


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    """Bounds of an attack. ``conns`` None: the kind's own default. ``duration`` does not
    count the time spent opening connections (TLS and key handshakes included)."""

    duration: float = 3.0
    conns: int | None = None
    streams: int = 5000
    max_bytes: int = 64 << 20
    version: int = 1
    connect_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.duration > 0:
            raise ValueError(f"duration={self.duration!r}: must be > 0")
        for name in ("streams", "max_bytes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be > 0")
        if self.conns is not None and self.conns <= 0:
            raise ValueError(f"conns={self.conns!r}: must be > 0")
        if self.version not in (1, 2):
            raise ValueError(f"version={self.version!r}: smux has versions 1 and 2")


class Run:
    """One attack under way: its connections, its clock and its byte budget."""

    def __init__(self, dialer: Dialer, address: Address, settings: AttackSettings) -> None:
        self.dialer = dialer
        self.address = address
        self.settings = settings
        self.began = time.monotonic()
        self.deadline = self.began + settings.duration
        self.conns: list[HostileConn] = []
        self.frames = 0
        self.notes: list[str] = []
        rt = dialer.runtime
        self._nap_cond = rt.condition(rt.lock())

    def connect(self, default: int, count: int | None = None) -> list[HostileConn]:
        """Open ``count`` connections (default: ``conns``, else ``default``); the clock
        stops meanwhile, so that a slow handshake leaves the attack its whole duration."""
        count = count or self.settings.conns or default
        began = time.monotonic()
        new = HostileConn.open_many(self.dialer, self.address, count)
        self.deadline += time.monotonic() - began
        if len(new) < count:
            self.notes.append(f"only {len(new)} of {count} connections could be opened")
        self.conns += new
        return new

    def header(self, cmd: int, length: int = 0, stream_id: int = 0) -> bytes:
        return encode_header(self.settings.version, cmd, length, stream_id)

    def bytes_left(self) -> int:
        return self.settings.max_bytes - sum(c.sent for c in self.conns)

    def nap(self, seconds: float) -> None:
        """Sleep in a way that lets the runtime's other tasks run."""
        with self._nap_cond:
            self._nap_cond.wait(max(0.0, seconds))

    def hold(self) -> None:
        """Wait until the deadline, or until the server has closed every connection."""
        while time.monotonic() < self.deadline and not all(c.closed for c in self.conns):
            self.nap(min(0.05, self.deadline - time.monotonic()))

    def await_close(self, conns: list[HostileConn]) -> None:
        """Give the server until the deadline, plus a grace for a busy server to get to
        the bytes already sent, to close ``conns``."""
        until = max(self.deadline, time.monotonic()) + _SETTLE_SECONDS
        while time.monotonic() < until and not all(c.closed for c in conns):
            self.nap(min(0.05, until - time.monotonic()))

    def flood(self, conn: HostileConn, frame: bytes) -> None:
        """Write ``frame`` over and over until the deadline, the budget or the close."""
        chunk = frame * _BATCH
        while self.bytes_left() >= len(chunk) and conn.send(chunk, self.deadline):
            self.frames += _BATCH

    def observations(self) -> dict[str, Any]:
        closes = [c.closed_at - self.began for c in self.conns if c.closed_at is not None]
        lives = [c.closed_at - c.opened_at for c in self.conns if c.closed_at is not None]
        return {
            "connections": len(self.conns),
            "frames_sent": self.frames,
            "bytes_sent": sum(c.sent for c in self.conns),
            "closed_by_server": len(closes),
            "first_close_s": round(min(closes), 3) if closes else None,
            "last_close_s": round(max(closes), 3) if closes else None,
            # the longest a connection lived before the server closed it
            "slowest_close_s": round(max(lives), 3) if lives else None,
            "refused_streams": sum(c.refused() for c in self.conns),
            "streams_ended": sum(len(c.fins) for c in self.conns),  # refused ones included
            "server_data_bytes": sum(c.data_bytes for c in self.conns),
            "notes": self.notes,
        }

    def close(self) -> None:
        for conn in self.conns:
            conn.close()


def syn_flood(run: Run) -> None:
    """Open streams (SYNs) far past the server's accept backlog and stream limits,
    never sending on them until the end. Expected: the excess refused with a FIN, the
    rest held until the connection ends; nothing else slowed down.

    Then the fate of each stream the server has not ended is asked for: a line with one
    byte (``?``) on it. A stream the server holds answers it (an echo server echoes it,
    an RPC server answers it with a parse error) and stays held; one it refuses ends with
    a FIN and no data, however late the refusal comes. Counting goes on until every
    stream has answered or ended (at most 30 s): a busy server is waited for, not guessed
    at. A held stream that never answers the byte is reported as unanswered."""
    ids = range(_FIRST_ID, _FIRST_ID + 2 * run.settings.streams, 2)
    opened: list[tuple[HostileConn, int]] = []
    for conn in run.connect(1):
        count = 0
        for start in range(0, len(ids), _BATCH):
            batch = b"".join(run.header(CMD_SYN, 0, i) for i in ids[start : start + _BATCH])
            if run.bytes_left() < len(batch) or not conn.send(batch, run.deadline):
                break
            count += len(ids[start : start + _BATCH])
        run.frames += count
        opened.append((conn, count))
    run.hold()
    until = time.monotonic() + _FATE_GRACE
    for conn, count in opened:
        # Not a FIN: a held stream that ended would free its slot for a stream the
        # server has not refused yet, and the count would no longer be the server's.
        asking = [i for i in ids[:count] if i not in conn.fins]
        batch = b"".join(run.header(CMD_PSH, 2, i) + b"?\n" for i in asking)
        if run.bytes_left() >= len(batch):
            conn.send(batch, until)
    while time.monotonic() < until and not all(
        conn.closed or len(conn.fins | conn.data_streams) >= count for conn, count in opened
    ):
        run.nap(0.05)
    refused = sum(conn.refused() for conn, _ in opened)
    answered = sum(len(conn.data_streams) for conn, _ in opened)
    silent = sum(max(0, count - len(conn.fins | conn.data_streams)) for conn, count in opened)
    closed = sum(conn.closed for conn, _ in opened)
    run.notes.append(
        f"{run.frames} SYNs sent on {len(opened)} connection(s); the server refused "
        f"{refused} of them (ended with no data), held {answered} (they answered a byte), "
        f"left {silent} unanswered, and closed {closed} connection(s)"
    )


def nop_flood(run: Run) -> None:
    """Keepalive frames (NOP) as fast as the connection takes them. Expected: the
    server ends the connection past its junk-frame rate limit."""
    conns = run.connect(1)
    for conn in conns:
        run.flood(conn, run.header(CMD_NOP))
    run.await_close(conns)
    run.notes.append(f"{run.frames} NOPs sent")


def psh_flood(run: Run) -> None:
    """One stream, data in 1-byte frames (9 wire bytes per payload byte). Expected:
    the server's memory stays bounded by its receive budget; it may end the stream
    or the connection."""
    for conn in run.connect(1):
        if conn.send(run.header(CMD_SYN, 0, _FIRST_ID), run.deadline):
            run.frames += 1
            run.flood(conn, run.header(CMD_PSH, 1, _FIRST_ID) + b"x")
    run.hold()
    run.notes.append(f"{run.frames} frames sent, most of them 1-byte PSH")


def window_abuse(run: Run) -> None:
    """Version 2: write on a stream without waiting for window updates, past the window
    the server advertised, and never read (the server's replies get no window either).
    Expected: the server ends the connection (a window overrun is a protocol error), or
    at least stops reading at its session budget."""
    if run.settings.version != 2:
        run.notes.append("skipped: windows exist in smux version 2 only (--smuxver 2)")
        return
    frame = run.header(CMD_PSH, 32768, _FIRST_ID) + bytes(32768)
    stalled_at = None
    for conn in run.connect(1):
        if not conn.send(run.header(CMD_SYN, 0, _FIRST_ID), run.deadline):
            continue
        while run.bytes_left() >= len(frame) and time.monotonic() < run.deadline:
            if not conn.send(frame, min(run.deadline, time.monotonic() + 0.5)):
                stalled_at = conn.sent  # nothing moved for half a second
                break
            run.frames += 1
        payload = run.frames * 32768
        allowed = conn.consumed.get(_FIRST_ID, 0) + conn.windows.get(_FIRST_ID, INITIAL_PEER_WINDOW)
        run.notes.append(f"{payload} bytes written, {max(0, payload - allowed)} past the window")
        if stalled_at is not None and not conn.closed:
            run.notes.append(f"the server stopped reading after {stalled_at} bytes")
        if _FIRST_ID in conn.fins and not conn.closed:
            run.notes.append("the server ended the stream (what came after it was dropped)")
    run.hold()


def slowloris(run: Run) -> None:
    """Many connections, each sending half a frame header, then silence. Expected: the
    server holds them within its limits and ends them at its keepalive timeout."""
    conns = run.connect(50)
    half = run.header(CMD_SYN, 0, _FIRST_ID)[:4]
    for conn in conns:
        conn.send(half, run.deadline)
    run.hold()
    run.notes.append(f"{len(conns)} connections sent 4 of a header's 8 bytes, then nothing")


def garbage_version(run: Run) -> None:
    """A frame whose version byte is neither 1 nor 2, on fresh connections one after
    the other. Expected: each closed at once (a protocol error)."""
    garbage = bytes([0x7F, CMD_NOP]) + bytes(6)
    for k in range(run.settings.conns or 3):
        if k and time.monotonic() >= run.deadline:
            break
        run.connect(1, count=1)  # one at a time: the attack waits for each to be closed
        conn = run.conns[-1]
        if conn.send(garbage, run.deadline):
            run.frames += 1
        run.await_close([conn])


def huge_length(run: Run) -> None:
    """Headers declaring the largest length a frame can have (65535): on a NOP, whose
    length must be 0 (expected: closed at once), and on a PSH whose payload never
    comes (expected: nothing allocated for it; the connection ends at the keepalive
    timeout, other connections unaffected)."""
    conns = run.connect(2)
    for k, conn in enumerate(conns):
        if k % 2 == 0:
            conn.send(run.header(CMD_NOP, 0xFFFF), run.deadline)
            run.frames += 1
        else:
            start = run.header(CMD_SYN, 0, _FIRST_ID) + run.header(CMD_PSH, 0xFFFF, _FIRST_ID)
            conn.send(start + bytes(1024), run.deadline)
            run.frames += 2
    run.await_close(conns[0::2])
    run.hold()
    nop_closed = sum(c.closed for c in conns[0::2])
    psh_closed = sum(c.closed for c in conns[1::2])
    run.notes.append(
        f"NOP declaring 65535 bytes: {nop_closed} of {len(conns[0::2])} connection(s) "
        f"closed; PSH declaring 65535 bytes, 1024 sent: {psh_closed} of "
        f"{len(conns[1::2])} closed by the end"
    )


#: name -> (attack, one-line description)
KINDS: dict[str, tuple[Callable[[Run], None], str]] = {
    "syn-flood": (syn_flood, "open streams past the server's limits (--streams)"),
    "nop-flood": (nop_flood, "keepalive frames as fast as possible"),
    "psh-flood": (psh_flood, "data in 1-byte frames"),
    "window-abuse": (window_abuse, "v2: write past the advertised window, never read"),
    "slowloris": (slowloris, "many connections with half a header, then silence"),
    "garbage-version": (garbage_version, "a frame with a version byte of 0x7f"),
    "huge-length": (huge_length, "headers declaring 65535 bytes that never come"),
}
