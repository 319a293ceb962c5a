"""smux over TLS: an ``ssl.SSLSocket`` as the transport, over loopback TCP."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pysmux
from tests.runtimes import current
from tests.util import recv_to_eof, spawn


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A throw-away self-signed certificate for localhost, made with the openssl CLI."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is missing on CI; .ci/run expects Debian's openssl package")
        pytest.skip("the openssl command is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=localhost", "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    yield cert, key


def echo_stream(st: pysmux.Stream) -> None:
    with st:
        while True:
            data = st.recv(65536)
            if not data:
                return
            st.sendall(data)


@pytest.mark.parametrize("version", [1, 2])
def test_streams_over_tls(certificate: tuple[Path, Path], runtime: str, version: int) -> None:
    """A user who wraps the connection in TLS (ssl.SSLSocket, which has no sendmsg; on
    gevent, gevent.ssl.SSLSocket) gets the same streams: 8 concurrent streams of 1 MiB
    each echo back intact, and closing the sessions closes the TLS sockets."""
    harness = current()
    cert, key = certificate
    server_ctx = harness.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = harness.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)
    cfg = pysmux.Config(version=version)
    listener = harness.listen("127.0.0.1")
    listener.settimeout(30)
    tls_server: list[Any] = []

    def serve() -> None:
        conn, _ = listener.accept()
        conn.settimeout(None)
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls_server.append(tls)
        with pysmux.server(tls, config=cfg, runtime=runtime) as session:
            echoers = []
            while True:
                try:
                    st = session.accept_stream(timeout=30)
                except pysmux.SessionClosedError:
                    break
                echoers.append(spawn(echo_stream, st))
            for echoer in echoers:
                echoer.result(30)

    def one_stream(client: pysmux.Session, index: int) -> None:
        payload = hashlib.sha256(bytes([index])).digest() * (1 << 15)  # 1 MiB
        with client.open_stream() as st:
            st.settimeout(30)
            reader = spawn(recv_to_eof, st, 65536, len(payload))
            st.sendall(payload)
            st.shutdown(socket.SHUT_WR)  # the echo ends with our FIN
            assert reader.result(30) == payload

    server_task = spawn(serve)
    try:
        raw = harness.connect(listener.getsockname(), timeout=10)
        tls = client_ctx.wrap_socket(raw, server_hostname="localhost")
        with pysmux.client(tls, config=cfg, runtime=runtime) as client:
            workers = [spawn(one_stream, client, i) for i in range(8)]
            for worker in workers:
                worker.result(60)
            assert client.error is None
        assert tls.fileno() == -1
    finally:
        server_task.join(30)
        listener.close()
    server_task.result(0)
    assert tls_server and tls_server[0].fileno() == -1
