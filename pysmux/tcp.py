"""TCP listeners and connections by ``HOST:PORT``, made of a runtime's sockets.

Plain sockets on threads, ``gevent.socket`` sockets on gevent (a session on
gevent needs them). A numeric host is used as it is; only a name goes to the
resolver (gevent's resolver would start threads of its own).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from typing import Any

from .runtime import Runtime
from .tunnel import parse_address
from .tunnel.net import Net

__all__ = ["Address", "as_address", "dial", "listen"]

#: ``(host, port)``.
Address = tuple[str, int]


def as_address(addr: str | Address, default_host: str = "127.0.0.1") -> Address:
    """``"HOST:PORT"`` (``":PORT"``: ``default_host``) or a tuple, checked."""
    if isinstance(addr, str):
        return parse_address(addr, default_host)
    host, port = addr
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{addr!r}: the port must be an int in 0..65535")
    return (str(host) or default_host, port)


def _first(rt: Runtime, addr: Address, passive: bool, setup: Callable[[Any, Any], None]) -> Any:
    """A socket on which ``setup(sock, sockaddr)`` succeeded, for the first address of
    ``addr`` that works; the last ``OSError`` if none does."""
    last: OSError | None = None
    for family, sockaddr in Net(rt).resolve(addr, passive):
        sock = rt.socket_module().socket(family, socket.SOCK_STREAM)
        try:
            setup(sock, sockaddr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return sock
    raise last or OSError(errno.EADDRNOTAVAIL, f"no address for {addr}")


def listen(rt: Runtime, addr: Address, backlog: int = 128) -> Any:
    """A listening TCP socket (``SO_REUSEADDR``); ``OSError`` if no address can be bound."""

    def setup(sock: Any, sockaddr: Any) -> None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(backlog)

    return _first(rt, addr, True, setup)


def dial(rt: Runtime, addr: Address, timeout: float | None) -> Any:
    """A connected TCP socket in blocking mode; ``OSError`` if every address fails."""

    def setup(sock: Any, sockaddr: Any) -> None:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
        sock.settimeout(None)

    return _first(rt, addr, False, setup)
