"""Addresses and TCP sockets for the tunnel: parsing, resolving, and ending connections.

A carried connection that fails must reach its TCP peer as a reset, never as a
clean EOF; :func:`abort_tcp` and :func:`reset_and_close` do that, and
:func:`abort_tcp` also wakes a task blocked in ``send`` on the socket.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any

from ..runtime import Runtime

__all__ = [
    "TRANSIENT_ACCEPT_ERRORS",
    "Address",
    "Net",
    "abort_tcp",
    "as_address",
    "format_address",
    "nodelay",
    "parse_address",
    "reset_and_close",
    "shutdown_quietly",
]

#: ``(host, port)``.
Address = tuple[str, int]

#: accept() errors that concern one connection only.
TRANSIENT_ACCEPT_ERRORS = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN})

#: ``SO_LINGER`` on, timeout 0: ``close()`` sends a reset and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)


def parse_address(text: str, default_host: str = "") -> Address:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (host ``default_host``).

    ``ValueError`` names what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address needs brackets, as in [::1]:4000")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 0..65535")
    return (host or default_host, port)


def format_address(addr: Any) -> str:
    """``(host, port, ...)`` as ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def as_address(addr: str | Address, what: str, default_host: str = "") -> Address:
    """``addr`` given as a string or a tuple, checked; ``ValueError`` names ``what``."""
    if isinstance(addr, str):
        return parse_address(addr, default_host)
    host, port = addr
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what}={addr!r}: port must be an int in 0..65535")
    return (str(host), port)


class Net:
    """Sockets of the tunnel's runtime: the stdlib's, or gevent's for ``runtime="gevent"``."""

    def __init__(self, rt: Runtime) -> None:
        self._module = rt.socket_module()
        self._numeric: dict[Address, list[tuple[int, Any]]] = {}  # parsed once

    def socket(self, family: int) -> Any:
        return self._module.socket(family, socket.SOCK_STREAM)

    def resolve(self, addr: Address, passive: bool) -> list[tuple[int, Any]]:
        """``(family, sockaddr)`` candidates; a numeric host needs no resolver."""
        host, port = addr
        if not host and passive:
            return [(socket.AF_INET, ("0.0.0.0", port))]
        known = self._numeric.get(addr)
        if known is not None:
            return known
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.version == 6:
                known = [(socket.AF_INET6, (host, port, 0, 0))]
            else:
                known = [(socket.AF_INET, (host, port))]
            if len(self._numeric) < 64:  # a tunnel dials a target or two
                self._numeric[addr] = known
            return known
        flags = socket.AI_PASSIVE if passive else 0
        infos = self._module.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, flags)
        return [(info[0], info[4]) for info in infos]

    def connect(
        self,
        addr: Address,
        timeout: float,
        track: Callable[[Callable[[], None]], int | None],
        untrack: Callable[[int], None],
        closed: Callable[[], bool],
    ) -> Any:
        """A TCP connection to ``addr`` within ``timeout`` seconds, trying each address.

        While it connects, the socket's shutdown is registered with ``track`` (which
        returns None once the owner is closed) so that the owner's close interrupts it;
        ``ConnectionAbortedError`` once ``closed()``.
        """
        last: OSError | None = None
        for family, sockaddr in self.resolve(addr, passive=False):
            sock = self.socket(family)
            token = track(functools.partial(shutdown_quietly, sock))
            if token is None:
                sock.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "the tunnel is closed")
            try:
                sock.settimeout(timeout)
                sock.connect(sockaddr)
                sock.settimeout(None)
            except OSError as exc:
                untrack(token)
                sock.close()
                last = exc
                continue
            untrack(token)
            if closed():  # a shutdown() can let connect() return without an error
                sock.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "the tunnel is closed")
            nodelay(sock)
            return sock
        if last is None:  # pragma: no cover
            last = OSError(errno.EADDRNOTAVAIL, f"no address for {format_address(addr)}")
        raise last


def nodelay(sock: Any) -> None:
    """Turn Nagle's delay off: carried connections are often interactive."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _load_disconnect() -> Callable[[int], bool] | None:
    """``connect(fd, AF_UNSPEC)``: Linux's abort of a TCP connection, or None elsewhere.

    It sends a reset, drops unsent data and wakes every thread or greenlet
    blocked in ``send`` or ``recv`` on the socket, while the descriptor stays
    open. Nothing in the socket module does that: ``shutdown(SHUT_WR)`` would
    send a FIN first, which the peer reads as a clean EOF.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        connect = libc.connect
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None
    connect.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    connect.restype = ctypes.c_int
    unspec = ctypes.create_string_buffer(16)  # a sockaddr whose family is AF_UNSPEC (0)

    def disconnect(fd: int) -> bool:
        return bool(connect(fd, unspec, len(unspec)) == 0)

    return disconnect


#: Read at each call, so a test can set it to None to take the other path.
_disconnect = _load_disconnect()


def abort_tcp(sock: Any, sending: bool) -> None:
    """Reset a TCP connection now and wake whoever blocks on it; the socket stays open.

    Without ``connect(AF_UNSPEC)``: ``SO_LINGER`` 0, then ``SHUT_RD`` (wakes a
    ``recv``, sends nothing) and, if a ``sendall`` may block (``sending``),
    ``SHUT_WR`` too: its FIN then waits behind the unsent data, and the reset
    at ``close()`` drops both (a peer reading fast may still see that FIN).
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    if _disconnect is not None:
        with contextlib.suppress(OSError, ValueError):
            if _disconnect(sock.fileno()):
                return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR if sending else socket.SHUT_RD)


def reset_and_close(sock: Any) -> None:
    """Close a TCP socket with a reset, not a FIN: the peer must not see a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


def shutdown_quietly(sock: Any) -> None:
    """``shutdown(SHUT_RDWR)``, ignoring errors: wakes a ``connect`` or ``accept``."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
