"""Who may use a tunnel: TLS contexts, the shared key, and the source filter.

Three independent locks, each optional, all checked before a mux session starts:

* **Source filter** (``allow=``): a connection from an address outside the
  allowed networks is closed at accept, before any handshake.
* **TLS** (an :class:`ssl.SSLContext`): encrypts the mux connection and, with
  certificates, authenticates the server to the client and, with a client CA
  (mutual TLS), the client to the server. TLS 1.2 at least.
* **Shared key** (:class:`SharedKey`): a challenge and response over the
  connection (plain TCP or TLS) before smux starts; see :mod:`.guard`. It
  authenticates both ends; it does not encrypt anything.

:func:`server_tls_context` and :func:`client_tls_context` build the contexts
from PEM files the way the ``pysmux`` command does.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
from collections.abc import Iterable
from typing import Any

from ..runtime import Runtime

__all__ = [
    "KEY_ENV",
    "Allow",
    "Network",
    "SharedKey",
    "check_tls_context",
    "client_tls_context",
    "is_loopback",
    "server_tls_context",
    "wrap_tls",
]

log = logging.getLogger("pysmux.tunnel")

#: The environment variable the ``pysmux`` command reads the shared key from.
KEY_ENV = "PYSMUX_KEY"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class SharedKey:
    """A secret both ends know. Never shown: ``repr()`` and ``str()`` say only that it is set.

    ``secret`` is bytes, or a str (encoded as UTF-8); it must not be empty.
    """

    __slots__ = ("_secret",)

    def __init__(self, secret: bytes | str) -> None:
        if isinstance(secret, str):
            secret = secret.encode()
        if not isinstance(secret, bytes):
            raise TypeError(f"a key must be bytes or str, not {type(secret).__name__}")
        if not secret:
            raise ValueError("the key is empty")
        self._secret = secret

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> SharedKey:
        """The key in a file, without the line break an editor adds at its end."""
        with open(path, "rb") as f:
            secret = f.read().rstrip(b"\r\n")
        if not secret:
            raise ValueError(f"{os.fspath(path)}: the key file is empty")
        return cls(secret)

    @classmethod
    def coerce(cls, key: SharedKey | bytes | str | None) -> SharedKey | None:
        if key is None or isinstance(key, SharedKey):
            return key
        return cls(key)

    @property
    def secret(self) -> bytes:
        return self._secret

    def __repr__(self) -> str:
        return "<pysmux.tunnel.SharedKey (hidden)>"

    __str__ = __repr__


class Allow:
    """The networks a listener accepts connections from (``None``: every address)."""

    __slots__ = ("networks",)

    def __init__(self, networks: Iterable[str | Network]) -> None:
        parsed: list[Network] = []
        for net in networks:
            if isinstance(net, str):
                try:
                    net = ipaddress.ip_network(net.strip(), strict=False)
                except ValueError:
                    raise ValueError(
                        f"allow: {net!r} is not a network (as in 10.0.0.0/8, 192.0.2.7, ::1/128)"
                    ) from None
            if not isinstance(net, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
                raise TypeError(f"allow: {net!r} is not a network")
            parsed.append(net)
        if not parsed:
            raise ValueError("allow: no network given (leave allow=None to accept any address)")
        self.networks = tuple(parsed)

    def admits(self, peer: Any) -> bool:
        """True if the peer address ``(host, port, ...)`` is in an allowed network."""
        try:
            ip = ipaddress.ip_address(str(peer[0]).split("%", 1)[0])
        except (ValueError, IndexError, TypeError):
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients this way
        return any(ip in net for net in self.networks)

    def __repr__(self) -> str:
        return f"Allow({[str(n) for n in self.networks]!r})"


def is_loopback(host: str) -> bool:
    """True if ``host`` names only this machine (127.0.0.0/8, ::1, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def check_tls_context(ctx: Any, server_side: bool) -> ssl.SSLContext:
    """``ctx`` if it is a usable TLS context for that side; else ``TypeError``/``ValueError``."""
    if not isinstance(ctx, ssl.SSLContext):
        raise TypeError(f"tls must be an ssl.SSLContext, not {type(ctx).__name__}")
    want = ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT
    if ctx.protocol not in (want, ssl.PROTOCOL_TLS):
        raise ValueError(f"tls: a {'server' if server_side else 'client'} context needs {want!r}")
    if ctx.minimum_version < ssl.TLSVersion.TLSv1_2 or ctx.minimum_version in (
        ssl.TLSVersion.MINIMUM_SUPPORTED,
    ):
        raise ValueError("tls: the context allows TLS below 1.2; set minimum_version = TLSv1_2")
    return ctx


def server_tls_context(
    certfile: str | os.PathLike[str],
    keyfile: str | os.PathLike[str],
    client_ca: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """A server context: this certificate chain and key; with ``client_ca``, mutual TLS
    (a client must present a certificate that CA signed)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(certfile, keyfile)
    if client_ca is not None:
        ctx.load_verify_locations(cafile=client_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def client_tls_context(
    ca: str | os.PathLike[str] | None = None,
    certfile: str | os.PathLike[str] | None = None,
    keyfile: str | os.PathLike[str] | None = None,
    *,
    insecure: bool = False,
) -> ssl.SSLContext:
    """A client context that verifies the server against ``ca`` (else the system's CAs),
    and presents ``certfile`` (with ``keyfile``) if given. ``insecure`` verifies nothing:
    anyone in the path can then read and change the traffic."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if certfile is not None:
        ctx.load_cert_chain(certfile, keyfile)
    if insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def wrap_tls(
    rt: Runtime, ctx: ssl.SSLContext, sock: Any, server_side: bool, server_hostname: str | None
) -> Any:
    """``sock`` wrapped in TLS, handshake not yet done, as a socket of runtime ``rt``.

    gevent needs its own ``SSLSocket`` class (a stdlib one would block the hub);
    it accepts any ``ssl.SSLContext``. Only this function knows that.
    """
    if rt.name == "gevent":
        import gevent.ssl

        return gevent.ssl.SSLSocket(
            sock=sock,
            server_side=server_side,
            do_handshake_on_connect=False,
            server_hostname=server_hostname,
            _context=ctx,
        )
    return ctx.wrap_socket(
        sock,
        server_side=server_side,
        do_handshake_on_connect=False,
        server_hostname=server_hostname,
    )
