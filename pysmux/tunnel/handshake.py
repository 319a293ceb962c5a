"""Starting a tunnel's mux session, and saying why one ended in words a user can act on.

smux has no handshake, so a peer of another protocol version, or a port that
does not speak smux at all, shows only when its first frame arrives. Both
ends of the tunnel therefore write one NOP frame (legal at any time, ignored
by every smux peer, Go's included) as soon as the connection is ready for
smux (over TLS and after the key handshake of :mod:`.guard`, when the tunnel
has them): each end then reads the other's version within a round trip,
instead of when the first stream is opened, and both can explain a mismatch.
A peer whose first bytes are a key handshake is told apart from one that
does not speak smux: only the key is missing.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import Config
from ..errors import ProtocolError
from ..frame import CMD_NAMES, CMD_NOP, encode_header
from ..runtime import Runtime
from ..session import Session
from ..session import client as mux_client
from ..session import server as mux_server
from .guard import MAGIC as KEY_MAGIC
from .net import abort_tcp

__all__ = ["describe_bytes", "describe_end", "describe_loss", "start_session"]

log = logging.getLogger("pysmux.tunnel")


def start_session(sock: Any, config: Config, rt: Runtime, *, is_client: bool) -> Session:
    """Write the NOP hello on a connection ready for smux, then start its session.

    ``OSError`` if the hello cannot be written or the session cannot start (out of
    file descriptors, say); the socket is closed then, with a reset (the peer has the
    hello and must not take the close for a clean end) that also wakes a task of the
    half-started session blocked on it (its reader may be running already).
    """
    start = mux_client if is_client else mux_server
    try:
        sock.sendall(encode_header(config.version, CMD_NOP, 0, 0))
        return start(sock, config=config, runtime=rt)
    except BaseException:
        abort_tcp(sock, sending=True)
        sock.close()
        raise


def describe_bytes(data: bytes) -> str:
    """What the first bytes a peer sent look like, for a log message."""
    if data.startswith(b"HTTP/") or data.split(b" ", 1)[0] in _HTTP_METHODS:
        return "bytes that look like HTTP"
    if data.startswith(b"SSH-"):
        return "an SSH banner"
    if len(data) >= 2 and data[0] in (0x15, 0x16) and data[1] == 3:
        return "a TLS record (is it a TLS port?)"
    if data and all(32 <= b < 127 or b in b"\r\n\t" for b in data):
        return f"text: {data[:40]!r}"
    return f"bytes {data[:16].hex(' ')}"


_HTTP_METHODS = frozenset(
    {b"GET", b"POST", b"PUT", b"HEAD", b"DELETE", b"OPTIONS", b"PATCH", b"CONNECT"}
)


def describe_end(session: Session, peer: str, answered: str) -> tuple[str, bool]:
    """Why ``session`` with ``peer`` ended, and whether that is a misconfiguration.

    ``answered`` is the verb for what the peer sent ("answered with" for a
    server, "sent" for a client).
    """
    error = session.error
    received_frames = session.stats()["frames_received"]
    if isinstance(error, ProtocolError) and error.received and not received_frames:
        data = error.received
        if data.startswith(KEY_MAGIC):
            return f"{peer} began a key handshake: give this end the same key", True
        if len(data) >= 2 and data[0] in (1, 2) and data[1] in CMD_NAMES:
            return (
                f"{peer} speaks smux version {data[0]}, this end version "
                f"{session.config.version}: both ends need the same Config.version",
                True,
            )
        return f"{peer} does not speak smux (it {answered} {describe_bytes(data)})", True
    if isinstance(error, ProtocolError):
        return f"{peer} broke the smux protocol: {error}", True
    if not received_frames and "closed by the peer" in str(error):
        return (
            f"{peer} closed the mux connection without sending a single frame "
            f"({error}): is it an smux server with the same Config.version?",
            True,
        )
    return f"{error}", False


def describe_loss(session: Session, remote: str, index: int) -> bool:
    """Log why the client's mux connection ``index`` ended; True if it had been healthy."""
    why, misconfigured = describe_end(session, remote, "answered with")
    log.warning("mux connection %d to %s lost: %s", index, remote, why)
    return not misconfigured and session.stats()["frames_received"] > 0
