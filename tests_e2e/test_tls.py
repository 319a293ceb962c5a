"""smux over TLS: an ``ssl.SSLSocket`` as the transport, over loopback TCP."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import pysmux


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
def test_streams_over_tls(certificate: tuple[Path, Path], version: int) -> None:
    """A user who wraps the connection in TLS (ssl.SSLSocket, which has no sendmsg) gets
    the same streams: 8 concurrent streams of 1 MiB each echo back intact, and closing
    the sessions closes the TLS sockets."""
    cert, key = certificate
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.load_verify_locations(cert)
    cfg = pysmux.Config(version=version)
    listener = socket.create_server(("127.0.0.1", 0))
    tls_server: list[ssl.SSLSocket] = []
    errors: list[BaseException] = []

    def serve() -> None:
        conn, _ = listener.accept()
        tls = server_ctx.wrap_socket(conn, server_side=True)
        tls_server.append(tls)
        with pysmux.server(tls, config=cfg) as session:
            echoers = []
            while True:
                try:
                    st = session.accept_stream(timeout=30)
                except pysmux.SessionClosedError:
                    break
                echoer = threading.Thread(target=echo_stream, args=(st,))
                echoer.start()
                echoers.append(echoer)
            for echoer in echoers:
                echoer.join(30)

    def one_stream(client: pysmux.Session, index: int) -> None:
        try:
            payload = hashlib.sha256(bytes([index])).digest() * (1 << 15)  # 1 MiB
            with client.open_stream() as st:
                st.settimeout(30)
                received: list[bytes] = []
                reader = threading.Thread(target=lambda: received.extend(iter(
                    lambda: st.recv(65536), b"")))  # fmt: skip
                reader.start()
                st.sendall(payload)
                st.shutdown(socket.SHUT_WR)  # the echo ends with our FIN
                reader.join(30)
                assert b"".join(received) == payload
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    server_thread = threading.Thread(target=serve)
    server_thread.start()
    try:
        raw = socket.create_connection(listener.getsockname(), timeout=10)
        tls = client_ctx.wrap_socket(raw, server_hostname="localhost")
        with pysmux.client(tls, config=cfg) as client:
            workers = [threading.Thread(target=one_stream, args=(client, i)) for i in range(8)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(60)
            assert client.error is None
        assert tls.fileno() == -1
    finally:
        server_thread.join(30)
        listener.close()
    assert not errors, errors
    assert tls_server and tls_server[0].fileno() == -1
