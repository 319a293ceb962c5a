"""The exception tree of pysmux.

Every error is an ``OSError`` so that code written for sockets keeps working:
``except OSError`` catches them all, and the two socket-flavoured subclasses
(``ConnectionError``, ``ConnectionResetError``) mean what they mean for sockets.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "SessionClosedError", "SmuxError", "StreamResetError"]


class SmuxError(OSError):
    """Base class of every pysmux error."""


class ProtocolError(SmuxError):
    """The peer sent something the smux protocol does not allow; the session is closed."""

    #: The first bytes of the offending frame, when its header was the problem
    #: (a wrong version byte): a peer that does not speak smux shows itself there.
    received: bytes = b""


class SessionClosedError(SmuxError, ConnectionError):
    """The session is closed (locally, by the peer, or because of an error)."""


class StreamResetError(SmuxError, ConnectionResetError):
    """The session ended before the peer half-closed this stream: data may be missing."""
