"""pysmux: the smux stream multiplexer (Go's xtaci/smux protocol) in pure Python.

Many socket-like streams over one connected transport::

    session = pysmux.client(sock)
    stream = session.open_stream()
    stream.sendall(b"hello")
"""

from __future__ import annotations

from .config import Config
from .errors import ProtocolError, SessionClosedError, SmuxError, StreamResetError
from .session import Session, client, server
from .stream import Stream

__all__ = [
    "Config",
    "ProtocolError",
    "Session",
    "SessionClosedError",
    "SmuxError",
    "Stream",
    "StreamResetError",
    "client",
    "server",
]

__version__ = "0.1.0.dev0"
