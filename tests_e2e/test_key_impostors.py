"""The shared-key handshake against impostors, in-process on both runtimes: a raw peer of
the test plays a client or a server that gets the handshake wrong in one way each. The
tunnel end refuses it, logs why (never the key), and carries nothing for it; and a
listener named by a host name other than ``localhost`` counts as reachable from outside.
The byte layout of the handshake is docs/design.md's (section 10.1)."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import secrets
import socket
from collections.abc import Callable
from typing import Any

import pytest

from pysmux.tunnel import TunnelClient, TunnelServer
from pysmux.tunnel.guard import FLAG_TLS, HELLO_SIZE, MAC_SIZE, MAGIC, NONCE_SIZE, VERSION
from tests.runtimes import current
from tests_e2e import test_cli
from tests_e2e.test_cli import (
    CHILD,
    Cli,
    TcpTarget,
    connect,
    recv_exactly,
    wait_until,
)

cli = test_cli.cli
target = test_cli.target
tunnels = test_cli.tunnels

KEY = "the tunnel's shared key"


def mac(role: bytes, server_nonce: bytes, client_nonce: bytes, flags: int) -> bytes:
    """A proof as an end that knows ``KEY`` makes it over plain TCP."""
    msg = b"pysmux-auth-1 " + role + b"\x00" + server_nonce + client_nonce + bytes([flags])
    return hmac.new(KEY.encode(), msg, hashlib.sha256).digest()


def logged(caplog: pytest.LogCaptureFixture, text: str) -> None:
    wait_until(lambda: any(text in r.getMessage() for r in caplog.records), 10, text)
    assert not [r for r in caplog.records if KEY in r.getMessage()], "the key was logged"


@pytest.mark.parametrize(
    ("flags", "version", "reason"),
    [
        (0, 9, "key handshake version 9, not 1"),
        (FLAG_TLS, VERSION, "the client's TLS connection is not this one"),
    ],
    ids=["version", "tls-flag"],
)
def test_server_refuses_a_proof_of_another_version_or_channel(
    runtime: str,
    flags: int,
    version: int,
    reason: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client proof of another handshake version, or one that claims a TLS channel over
    plain TCP (a proof relayed from another connection), is refused even though its MAC
    is made with the right key: logged, counted, and the target never sees a connection."""
    echo = target()
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=runtime, key=KEY)
    tunnels.append(srv.start())
    sock = connect(srv.address)
    try:
        hello = recv_exactly(sock, HELLO_SIZE)
        server_nonce = hello[len(MAGIC) + 1 :]
        client_nonce = secrets.token_bytes(NONCE_SIZE)
        proof = mac(b"client", server_nonce, client_nonce, flags)
        sock.sendall(MAGIC + bytes([version, flags]) + client_nonce + proof)
        sock.settimeout(10)
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(MAC_SIZE) == b""  # no answer to the proof
    finally:
        sock.close()
    logged(caplog, reason)
    wait_until(lambda: srv.refused == 1, 10, "counted")
    assert echo.conns == []


class ImpostorServer:
    """A listener that answers the key handshake wrongly: a hello of another ``version``,
    or a right hello and then a MAC made without the key."""

    def __init__(self, version: int) -> None:
        self.version = version
        self.harness = current()
        self.listener = self.harness.listen("127.0.0.1")
        self.address = self.listener.getsockname()[:2]
        self.proofs = 0
        self.task = self.harness.spawn(self._serve, name="impostor")

    def _serve(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            with sock, contextlib.suppress(OSError):
                sock.settimeout(10)
                sock.sendall(MAGIC + bytes([self.version]) + secrets.token_bytes(NONCE_SIZE))
                proof = recv_exactly(sock, len(MAGIC) + 2 + NONCE_SIZE + MAC_SIZE)
                assert proof.startswith(MAGIC)
                self.proofs += 1
                sock.sendall(secrets.token_bytes(MAC_SIZE))  # not made with the key
                sock.recv(1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.task.result(10)
        self.listener.close()


@pytest.mark.parametrize(
    ("version", "reason"),
    [
        (9, "the server speaks key handshake version 9, not 1"),
        (VERSION, "the server does not know the key"),
    ],
    ids=["version", "no-key"],
)
def test_client_refuses_a_server_that_does_not_prove_the_key(
    runtime: str,
    version: int,
    reason: str,
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The key authenticates both ends: a server that speaks another handshake version, or
    that takes the client's proof and answers without knowing the key, never gets a mux
    connection. The client logs why, counts a failed dial and backs off, and a TCP
    connection that arrives meanwhile is reset after ``connect_timeout``, never carried."""
    caplog.set_level(logging.WARNING, logger="pysmux.tunnel")
    impostor = ImpostorServer(version)
    try:
        cli_ = TunnelClient(
            "127.0.0.1:0", impostor.address, runtime=runtime, key=KEY,
            connect_timeout=0.5, backoff_initial=0.1, backoff_max=0.2,
        )  # fmt: skip
        tunnels.append(cli_.start())
        logged(caplog, reason)
        wait_until(lambda: cli_.stats()["dial_failures"] >= 1, 10, "a failed dial")
        sock = connect(cli_.address)
        try:
            sock.settimeout(10)
            with pytest.raises(ConnectionResetError):
                sock.sendall(b"for the real server only")
                sock.recv(1)
        finally:
            sock.close()
        assert cli_.connected == 0 and cli_.dials == 0
        cli_.close()
    finally:
        impostor.close()
    if version == VERSION:
        assert impostor.proofs >= 1  # it got as far as the proof, and no further


@CHILD
def test_cli_a_listener_named_by_host_is_not_loopback(
    runtime: str, cli: Callable[..., Cli]
) -> None:
    """``localhost`` is loopback: a client may listen there without ``--allow``. Any other
    host name may resolve to an outside address, so a server listening on one needs a
    key (or ``--no-auth``), as it would on ``0.0.0.0``; the check comes before binding."""
    client = cli("client", "-l", "localhost:0", "-r", "127.0.0.1:1", "-q")
    client.address()
    client.assert_clean_exit()
    server = cli("server", "-l", "tunnel.invalid:0", "-t", "127.0.0.1:1")
    assert server.wait() == 2, server.describe()
    assert "listening on tunnel.invalid:0 with no authentication would let anyone" \
        in server.err[-1], server.describe()  # fmt: skip
