"""pysmux against pysmux over real loopback TCP (not socketpair): the core stories end to end."""

from __future__ import annotations

import functools
import socket

import pytest

import pysmux

from .conftest import Net, StartPeer
from .peers import (
    EchoHandler,
    TaskGroup,
    echo_roundtrip,
    parse_addr,
    pattern_sha256,
    read_while_killing,
    recv_exactly,
)

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])


@VERSIONS
def test_hello_world_over_tcp(net: Net, version: int) -> None:
    """Two programs connected by TCP can open a stream, say hello, get an answer, and see
    each other's half-close as EOF, exactly as the README shows."""
    lsock = net.listen()
    csock = net.connect(lsock.getsockname())
    client = net.client(csock, version=version)
    server = net.server(net.accept(lsock), version=version)

    st = client.open_stream()
    st.settimeout(10)
    st.sendall(b"hello, world")
    peer = server.accept_stream(timeout=10)
    peer.settimeout(10)
    assert peer.id == st.id == 3
    assert recv_exactly(peer, 12) == b"hello, world"
    st.shutdown(socket.SHUT_WR)
    assert peer.recv(1) == b""  # our FIN, after the data
    peer.sendall(b"hi there")
    peer.close()
    assert recv_exactly(st, 8) == b"hi there"
    assert st.recv(1) == b""
    st.close()
    # The server can open streams too (even ids).
    back = server.open_stream()
    assert back.id == 2
    back.sendall(b"ping")
    got = client.accept_stream(timeout=10)
    got.settimeout(10)
    assert recv_exactly(got, 4) == b"ping"
    back.close()
    got.close()
    assert client.error is None and server.error is None


@VERSIONS
def test_concurrent_clients_each_with_own_session(net: Net, version: int) -> None:
    """One server socket serves 8 clients at once, each with its own TCP connection and
    smux session carrying several streams; every byte comes back to the right stream."""
    nclients, nstreams, size = 8, 4, 256 * 1024
    lsock = net.listen()
    handlers: list[EchoHandler] = []

    def serve() -> None:
        for _ in range(nclients):
            handlers.append(EchoHandler(net.server(net.accept(lsock), version=version)))

    def run_client() -> None:
        sess = net.client(net.connect(lsock.getsockname()), version=version)
        with TaskGroup(sess.close) as streams:
            for _ in range(nstreams):
                streams.spawn(one_stream, sess, streams)
        assert sess.error is None

    def one_stream(sess: pysmux.Session, tasks: TaskGroup) -> None:
        with sess.open_stream() as st:
            st.settimeout(30)
            assert echo_roundtrip(st, st.id, size, tasks) == pattern_sha256(st.id, size)

    try:
        with TaskGroup(*(s.close for s in net.sessions)) as tasks:
            tasks.spawn(serve, name="serve")
            for i in range(nclients):
                tasks.spawn(run_client, name=f"client-{i}")
        # Each client closed its streams (FIN) after reading its echoes: let every
        # FIN reach the server before its session is closed, or the echo is reset.
        for h in handlers:
            h.wait_finished(nstreams, timeout=30)
    finally:
        for h in handlers:
            h.stop()
    assert len(handlers) == nclients
    for h in handlers:
        assert h.errors == []
        assert sorted(h.echoed.values()) == [size] * nstreams


@VERSIONS
@pytest.mark.parametrize("py_role", ["client", "server"])
def test_python_peer_killed_mid_transfer_resets_streams(
    net: Net, pypeer: StartPeer, version: int, py_role: str
) -> None:
    """When the peer process (pysmux in another Python) is killed while it is sending,
    our streams deliver what arrived and then raise StreamResetError, never a clean EOF."""
    nstreams = 3
    if py_role == "client":
        peer = pypeer("server", f"--version={version}", f"--streams={nstreams}")
        addr = parse_addr(peer.wait_for("listening")[0]["addr"])
        sess = net.client(net.connect(addr), version=version)
        get_stream = sess.open_stream
    else:
        lsock = net.listen()
        port = lsock.getsockname()[1]
        peer = pypeer(
            "client", f"--addr=127.0.0.1:{port}", f"--version={version}", f"--streams={nstreams}"
        )
        sess = net.server(net.accept(lsock), version=version)
        get_stream = functools.partial(sess.accept_stream, timeout=20)
    for st, exc in read_while_killing(sess, peer, get_stream, nstreams):
        assert isinstance(exc, pysmux.StreamResetError), repr(exc)
        st.close()
    with pytest.raises(pysmux.SessionClosedError):
        sess.accept_stream(timeout=10)
