"""Reaching an smux server as a client: TCP, then TLS and the shared key if asked, then smux.

The tools and clients that are not a tunnel (``pysmux load``, ``pysmux attack``,
:meth:`pysmux.rpc.RpcClient.connect`) reach a server the way the tunnel's client
does, with its code: the same checks of the arguments and the same TLS and key
handshakes (:mod:`pysmux.tunnel.guard`), and the same NOP hello that lets both
ends name a version mismatch at once (:func:`pysmux.tunnel.handshake.start_session`).
A server that requires a key or TLS is reached by giving them here, as to
:class:`~pysmux.tunnel.TunnelClient`::

    dialer = Dialer(key=SharedKey.from_file("key"), tls=client_tls_context("ca.pem"))
    session = dialer.session("server.example:4000")
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from .config import Config
from .runtime import Runtime, get_runtime
from .session import Session
from .tcp import Address, as_address, dial
from .tunnel.guard import Guard
from .tunnel.handshake import describe_end, start_session
from .tunnel.net import format_address, reset_and_close
from .tunnel.security import SharedKey
from .tunnel.service import check_seconds

__all__ = ["Dialer"]

log = logging.getLogger("pysmux.dialer")


class Dialer:
    """Opens client connections to smux servers, secured as a tunnel client's are.

    * ``config``: the sessions' (the server's version); ``runtime`` as for sessions.
    * ``tls``: an ``ssl.SSLContext`` for the client side
      (:func:`~pysmux.tunnel.client_tls_context`); the server's certificate is checked
      for ``server_hostname`` (default: the host of each address dialled).
    * ``key``: the server's shared secret; both ends prove they hold it before smux starts.
    * ``handshake_timeout``: seconds for the TLS and key handshakes together;
      ``connect_timeout``: seconds for the TCP connection.

    Bad arguments raise ``TypeError``/``ValueError`` here, as the tunnel's classes do; a
    server that cannot be reached, or refuses the handshake, raises ``OSError``
    (:class:`~pysmux.tunnel.HandshakeError` for the handshake, saying why). A TLS
    context that verifies nothing logs a warning.
    """

    def __init__(
        self,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        server_hostname: str | None = None,
        handshake_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        if config is not None and not isinstance(config, Config):
            raise TypeError(f"config must be a pysmux.Config, not {type(config).__name__}")
        self.config = config or Config()
        self.runtime = rt = get_runtime(runtime)
        self._guard = Guard.build(rt, tls, key, handshake_timeout, server_side=False)
        if tls is not None and tls.verify_mode == ssl.CERT_NONE:
            log.warning(
                "TLS without verifying the server's certificate: anyone in the path can "
                "pose as the server and read the traffic"
            )
        self._server_hostname = server_hostname
        self.connect_timeout = check_seconds("connect_timeout", connect_timeout)

    @property
    def secured(self) -> bool:
        """True when connections do TLS or the key handshake before smux."""
        return not self._guard.trivial

    def transport(self, address: str | Address) -> Any:
        """A connection to ``address`` ready for smux frames: TCP, then TLS and the key
        handshake when set (a socket of the runtime, blocking; the caller closes it)."""
        addr = as_address(address)
        sock = dial(self.runtime, addr, self.connect_timeout)
        if self._guard.trivial:
            return sock
        holder = [sock]  # the TLS socket replaces the TCP one once it exists
        try:
            return self._guard.client_side(sock, self._server_hostname or addr[0], holder.append)
        except BaseException:
            reset_and_close(holder[-1])
            raise

    def session(self, address: str | Address) -> Session:
        """A client session with the server at ``address`` (see :meth:`transport`)."""
        transport = self.transport(address)
        try:
            return start_session(transport, self.config, self.runtime, is_client=True)
        except BaseException:
            transport.close()
            raise

    @staticmethod
    def misconfigured(session: Session, address: str | Address) -> str | None:
        """Why ``session`` ended, in words a user can act on, when the cause is a setting
        that does not match the server's (a key it asks for, another smux version, a
        port that does not speak smux); None while it is up or for other causes."""
        if not session.closed:
            return None
        where = address if isinstance(address, str) else format_address(address)
        why, misconfigured = describe_end(session, where, "answered with")
        return why if misconfigured else None

    def __repr__(self) -> str:
        return f"<pysmux.Dialer {self._guard!r} v{self.config.version} {self.runtime.name}>"
