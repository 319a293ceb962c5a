"""The transport write path: partial writes, transports without sendmsg, limits."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
from typing import Any

import pytest

import pysmux
from pysmux import session as session_module


class ChoppyTransport:
    """A socket whose ``sendmsg`` writes only a few bytes per call, as a slow
    kernel or a signal may make it do; everything else is the socket's."""

    def __init__(self, sock: socket.socket, seed: int) -> None:
        self._sock = sock
        self._random = random.Random(seed)
        self.calls = 0

    def sendmsg(self, buffers: list[Any]) -> int:
        self.calls += 1
        data = b"".join(bytes(b) for b in buffers)
        limit = self._random.randint(1, 40)
        return self._sock.send(data[:limit])

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


class SendallOnlyTransport:
    """A transport without ``sendmsg`` (as ``ssl.SSLSocket`` in effect)."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.recv_into = sock.recv_into
        self.sendall = sock.sendall
        self.shutdown = sock.shutdown
        self.close = sock.close
        self.settimeout = sock.settimeout


def transfer(client: pysmux.Session, server: pysmux.Session, size: int) -> None:
    payload = random.Random(size).randbytes(size)
    st = client.open_stream()
    peer = server.accept_stream(timeout=5)
    done: list[bytes] = []

    def read_all() -> None:
        chunks = []
        while True:
            data = peer.recv(65536)
            if not data:
                break
            chunks.append(data)
        done.append(b"".join(chunks))

    reader = threading.Thread(target=read_all)
    reader.start()
    try:
        st.sendall(payload)
        st.shutdown(socket.SHUT_WR)
    finally:
        reader.join(30)
    assert not reader.is_alive()
    assert hashlib.sha256(done[0]).digest() == hashlib.sha256(payload).digest()
    st.close()
    peer.close()


@pytest.mark.parametrize("version", [1, 2])
def test_partial_sendmsg_writes_are_completed(version: int) -> None:
    """A transport that accepts a few bytes per call still gets whole frames in order."""
    a, b = socket.socketpair()
    choppy = ChoppyTransport(a, seed=version)
    cfg = pysmux.Config(version=version)
    client = pysmux.client(choppy, config=cfg)
    server = pysmux.server(b, config=cfg)
    try:
        transfer(client, server, 200_000)
        assert choppy.calls > 200_000 // 40  # the partial-write loop really ran
        assert client.error is None and server.error is None
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("version", [1, 2])
def test_transport_without_sendmsg_uses_sendall(version: int) -> None:
    """Socket-like objects without sendmsg (TLS sockets) carry the same bytes."""
    a, b = socket.socketpair()
    cfg = pysmux.Config(version=version)
    client = pysmux.client(SendallOnlyTransport(a), config=cfg)
    server = pysmux.server(b, config=cfg)
    try:
        transfer(client, server, 1_000_000)
        assert client.error is None and server.error is None
    finally:
        client.close()
        server.close()
    assert a.fileno() == -1  # the session closed the transport it owns


def test_stream_ids_exhausted_is_a_clear_error(pair: Any) -> None:
    """After 2**32 ids a session refuses to open more; existing streams keep working."""
    client, server = pair()
    st = client.open_stream()
    peer = server.accept_stream(timeout=5)
    client._next_id = 2**32 + 1  # white box: skip four billion opens
    with pytest.raises(pysmux.SmuxError, match="stream ids"):
        client.open_stream()
    st.sendall(b"still here")
    assert peer.recv(10) == b"still here"
    assert not client.closed


def test_recently_closed_ids_are_bounded(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory of closed stream ids (frames for them are not junk) has a bound."""
    monkeypatch.setattr(session_module, "_RECENTLY_CLOSED", 8)
    client, server = pair()
    for _ in range(20):
        st = client.open_stream()
        peer = server.accept_stream(timeout=5)
        st.close()
        peer.close()
    assert len(client._recently_closed) == 8
    assert len(server._recently_closed) <= 8
