"""Securing one mux connection before smux starts: TLS, then the shared-key handshake.

Both run within one deadline (``handshake_timeout``); a peer that stalls is
dropped when it passes. The key handshake (version 1), every field fixed size::

    server -> client  HELLO  "PSMXAUTH" | version 1 | server nonce (32 random bytes)
    client -> server  PROOF  "PSMXAUTH" | version 1 | flags | client nonce (32) |
                             HMAC-SHA256(key, "pysmux-auth-1 client" | 0 | server nonce |
                                              client nonce | flags | channel)
    server -> client  OK     HMAC-SHA256(key, "pysmux-auth-1 server" | 0 | the same)

A server that does not like the PROOF closes the connection (with a reset)
instead of sending OK, and logs why; the client checks OK the same way, so
each end knows the other holds the key. Nonces are fresh per connection, so a
recorded exchange cannot be replayed. ``channel`` binds the proofs to the TLS
connection: its ``tls-unique`` value (the first Finished message of the TLS
handshake, the same on both ends; flags bit 0 says it is there), empty over
plain TCP. A man in the middle who terminates TLS with a certificate of its
own (a client running with ``--tls-insecure``, say) has two TLS connections
with different values, so proofs it relays do not verify.

The key proves who is talking; it does not hide what is said. Over plain TCP
everything after the handshake travels in clear text and can be altered by
anyone in the path: use TLS for that.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import ssl
from collections.abc import Callable
from typing import Any

from ..errors import SmuxError
from ..runtime import Runtime
from .security import SharedKey, check_tls_context, wrap_tls
from .service import check_seconds

__all__ = ["Guard", "HandshakeError"]

log = logging.getLogger("pysmux.tunnel")

MAGIC = b"PSMXAUTH"
VERSION = 1
NONCE_SIZE = 32
MAC_SIZE = 32
HELLO_SIZE = len(MAGIC) + 1 + NONCE_SIZE
PROOF_SIZE = len(MAGIC) + 2 + NONCE_SIZE + MAC_SIZE
#: flags bit 0: the proof is bound to a TLS channel.
FLAG_TLS = 0x01


class HandshakeError(SmuxError):
    """A mux connection failed TLS or the key handshake; the message says why."""


#: What an OpenSSL failure reason means, where it is not plain.
_TLS_HINTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "the peer does not trust our certificate's CA",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": "the server requires a client certificate",
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the client sent no certificate",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS",
    "HTTP_REQUEST": "the peer does not speak TLS",
    "UNEXPECTED_EOF_WHILE_READING": "the peer closed the connection (does it speak TLS?)",
}


class _PeerClosed(HandshakeError):
    """The peer closed the connection in the middle of the handshake."""


def _mac(key: SharedKey, role: bytes, server_nonce: bytes, client_nonce: bytes,
         flags: int, channel: bytes) -> bytes:  # fmt: skip
    msg = b"pysmux-auth-1 " + role + b"\x00" + server_nonce + client_nonce + bytes([flags])
    return hmac.new(key.secret, msg + channel, hashlib.sha256).digest()


def _channel(sock: Any) -> bytes:
    """The TLS connection's ``tls-unique`` binding; empty over plain TCP."""
    get = getattr(sock, "get_channel_binding", None)
    if get is None:
        return b""
    value = get("tls-unique")
    return bytes(value) if value else b""


class Guard:
    """What one end demands of a new mux connection: TLS (``tls``), the key (``key``),
    both, or neither, all within ``timeout`` seconds.

    ``server_side(sock, where)`` / ``client_side(sock, server_hostname)`` return
    the transport to run smux on (``sock``, or its TLS socket) or raise
    :class:`HandshakeError` (or ``OSError``). ``on_transport`` is told each
    socket object the connection is carried by, so that another task can
    abort it.
    """

    def __init__(
        self,
        rt: Runtime,
        tls: ssl.SSLContext | None,
        key: SharedKey | None,
        timeout: float,
    ) -> None:
        self._rt = rt
        self.tls = tls
        self.key = key
        self.timeout = timeout

    @classmethod
    def build(
        cls,
        rt: Runtime,
        tls: ssl.SSLContext | None,
        key: SharedKey | bytes | str | None,
        timeout: float,
        server_side: bool,
    ) -> Guard:
        """A guard of the arguments a tunnel class takes, each checked (``ValueError``)."""
        return cls(
            rt,
            None if tls is None else check_tls_context(tls, server_side),
            SharedKey.coerce(key),
            check_seconds("handshake_timeout", timeout),
        )

    @property
    def trivial(self) -> bool:
        """True when there is nothing to check: plain smux."""
        return self.tls is None and self.key is None

    def __repr__(self) -> str:
        parts = ["tls" if self.tls else "tcp", "key" if self.key else "no key"]
        return f"<Guard {', '.join(parts)} {self.timeout:g}s>"

    # -- the two sides -----------------------------------------------------------------

    def server_side(self, sock: Any, on_transport: Callable[[Any], None]) -> Any:
        deadline = self._rt.monotonic() + self.timeout
        sock = self._tls(sock, True, None, deadline, on_transport)
        if self.key is not None:
            self._key_server(sock, self.key, deadline)
        sock.settimeout(None)
        return sock

    def client_side(
        self, sock: Any, server_hostname: str, on_transport: Callable[[Any], None]
    ) -> Any:
        deadline = self._rt.monotonic() + self.timeout
        sock = self._tls(sock, False, server_hostname, deadline, on_transport)
        if self.key is not None:
            self._key_client(sock, self.key, deadline)
        sock.settimeout(None)
        return sock

    # -- TLS -------------------------------------------------------------------------------

    def _tls(
        self,
        sock: Any,
        server_side: bool,
        server_hostname: str | None,
        deadline: float,
        on_transport: Callable[[Any], None],
    ) -> Any:
        if self.tls is None:
            return sock
        tls = wrap_tls(self._rt, self.tls, sock, server_side, server_hostname)
        on_transport(tls)
        try:
            self._settimeout(tls, deadline, "the TLS handshake")
            tls.do_handshake()
        except ssl.SSLCertVerificationError as exc:
            tls.close()
            whose = "the client's" if server_side else "the server's"
            why = exc.verify_message or exc.reason or exc
            raise HandshakeError(f"TLS: certificate verify failed: {whose}: {why}") from None
        except ssl.SSLError as exc:
            tls.close()
            reason = exc.reason or str(exc)
            hint = _TLS_HINTS.get(reason)
            raise HandshakeError(f"TLS: {hint} ({reason})" if hint else f"TLS: {reason}") from None
        except TimeoutError:
            tls.close()
            raise HandshakeError(f"TLS handshake not done within {self.timeout:g} s") from None
        except OSError as exc:
            tls.close()
            raise HandshakeError(f"TLS handshake: {exc.strerror or exc}") from None
        return tls

    # -- the key ---------------------------------------------------------------------------

    def _key_server(self, sock: Any, key: SharedKey, deadline: float) -> None:
        server_nonce = secrets.token_bytes(NONCE_SIZE)
        self._send(sock, MAGIC + bytes([VERSION]) + server_nonce, deadline)
        try:
            # The magic first: a client without a key sends only a short smux hello.
            proof = self._recv(sock, len(MAGIC), deadline, "the client's key proof")
            if proof != MAGIC:
                raise HandshakeError("no key proof: not a pysmux client, or one without a key")
            proof += self._recv(sock, PROOF_SIZE - len(MAGIC), deadline, "the client's key proof")
        except _PeerClosed:
            raise HandshakeError(
                "the client closed the connection without a key proof (has it no key?)"
            ) from None
        if proof[len(MAGIC)] != VERSION:
            raise HandshakeError(f"key handshake version {proof[len(MAGIC)]}, not {VERSION}")
        flags = proof[len(MAGIC) + 1]
        client_nonce = proof[len(MAGIC) + 2 : -MAC_SIZE]
        channel = _channel(sock)
        if bool(flags & FLAG_TLS) != bool(channel):
            raise HandshakeError(
                "the client's TLS connection is not this one "
                "(a TLS proxy or a man in the middle between the two ends?)"
            )
        want = _mac(key, b"client", server_nonce, client_nonce, flags, channel)
        if not hmac.compare_digest(proof[-MAC_SIZE:], want):
            raise HandshakeError("wrong key")
        self._send(sock, _mac(key, b"server", server_nonce, client_nonce, flags, channel), deadline)

    def _key_client(self, sock: Any, key: SharedKey, deadline: float) -> None:
        # The magic first: a server without a key sends only its short smux hello.
        hello = self._recv(sock, len(MAGIC), deadline, "the server's key challenge")
        if hello != MAGIC:
            raise HandshakeError("the server sent no key challenge: is it running without a key?")
        hello += self._recv(sock, HELLO_SIZE - len(MAGIC), deadline, "the server's key challenge")
        if hello[len(MAGIC)] != VERSION:
            raise HandshakeError(
                f"the server speaks key handshake version {hello[len(MAGIC)]}, not {VERSION}"
            )
        server_nonce = hello[len(MAGIC) + 1 :]
        client_nonce = secrets.token_bytes(NONCE_SIZE)
        channel = _channel(sock)
        flags = FLAG_TLS if channel else 0
        mac = _mac(key, b"client", server_nonce, client_nonce, flags, channel)
        self._send(sock, MAGIC + bytes([VERSION, flags]) + client_nonce + mac, deadline)
        try:
            ok = self._recv(sock, MAC_SIZE, deadline, "the server's answer to the key proof")
        except (_PeerClosed, ConnectionError, ssl.SSLError):
            raise HandshakeError("the server refused the key proof (a different key?)") from None
        want = _mac(key, b"server", server_nonce, client_nonce, flags, channel)
        if not hmac.compare_digest(ok, want):
            raise HandshakeError("the server does not know the key")

    # -- I/O within the deadline ---------------------------------------------------------

    def _settimeout(self, sock: Any, deadline: float, what: str) -> None:
        remaining = deadline - self._rt.monotonic()
        if remaining <= 0:
            raise HandshakeError(f"{what}: not done within {self.timeout:g} s")
        sock.settimeout(remaining)

    def _send(self, sock: Any, data: bytes, deadline: float) -> None:
        self._settimeout(sock, deadline, "sending the key handshake")
        try:
            sock.sendall(data)
        except TimeoutError:
            raise HandshakeError(f"key handshake not done within {self.timeout:g} s") from None

    def _recv(self, sock: Any, size: int, deadline: float, what: str) -> bytes:
        data = bytearray()
        while len(data) < size:
            self._settimeout(sock, deadline, f"waiting for {what}")
            try:
                chunk = sock.recv(size - len(data))
            except TimeoutError:
                raise HandshakeError(
                    f"waiting for {what}: not done within {self.timeout:g} s"
                ) from None
            if not chunk:
                raise _PeerClosed(f"waiting for {what}: connection closed")
            data += chunk
        return bytes(data)
