"""The transport write path: partial writes, transports without sendmsg, limits."""

from __future__ import annotations

import hashlib
import random
import socket
import time
from typing import Any

import pytest

import pysmux
from pysmux.core import state as core_state
from tests.util import socketpair, spawn, wait_until


def choppy_transport(sock: Any, seed: int) -> Any:
    """``sock`` as a socket whose ``sendmsg`` writes only a few bytes per call, as
    a slow kernel or a signal may make it do. It is of a subclass of the
    socket's own class (plain or gevent), so either runtime accepts it."""

    class ChoppySocket(type(sock)):  # type: ignore[misc]
        def sendmsg(self, buffers: list[Any], *args: Any) -> int:
            self.calls += 1
            data = b"".join(bytes(b) for b in buffers)
            return self.send(data[: self.random.randint(1, 40)])

    choppy = ChoppySocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    choppy.calls = 0
    choppy.random = random.Random(seed)
    return choppy


def sendall_only_transport(sock: Any) -> Any:
    """``sock`` as a transport without ``sendmsg`` (as ``ssl.SSLSocket`` in effect).

    On threads: a plain object with only the methods a session may use. On
    gevent, whose runtime accepts only gevent sockets: a gevent socket subclass
    that hides ``sendmsg`` (gevent sockets also forward unknown names to the
    OS socket, hence both hooks).
    """
    if not type(sock).__module__.startswith("gevent"):
        return SendallOnlyTransport(sock)

    class NoSendmsgSocket(type(sock)):  # type: ignore[misc]
        def __getattribute__(self, name: str) -> Any:
            if name == "sendmsg":
                raise AttributeError(name)
            return super().__getattribute__(name)

        def __getattr__(self, name: str) -> Any:
            if name == "sendmsg":
                raise AttributeError(name)
            return super().__getattr__(name)

    transport = NoSendmsgSocket(sock.family, sock.type, sock.proto, fileno=sock.detach())
    assert not hasattr(transport, "sendmsg")
    return transport


class SendallOnlyTransport:
    """A transport without ``sendmsg``: only what a session needs."""

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

    reader = spawn(read_all)
    try:
        st.sendall(payload)
        st.shutdown(socket.SHUT_WR)
    finally:
        reader.result(30)
    assert hashlib.sha256(done[0]).digest() == hashlib.sha256(payload).digest()
    st.close()
    peer.close()


@pytest.mark.parametrize("version", [1, 2])
def test_partial_sendmsg_writes_are_completed(runtime: str, version: int) -> None:
    """A transport that accepts a few bytes per call still gets whole frames in order."""
    a, b = socketpair()
    choppy = choppy_transport(a, seed=version)
    cfg = pysmux.Config(version=version)
    client = pysmux.client(choppy, config=cfg, runtime=runtime)
    server = pysmux.server(b, config=cfg, runtime=runtime)
    try:
        transfer(client, server, 200_000)
        assert choppy.calls > 200_000 // 40  # the partial-write loop really ran
        assert client.error is None and server.error is None
    finally:
        client.close()
        server.close()


@pytest.mark.parametrize("version", [1, 2])
def test_transport_without_sendmsg_uses_sendall(runtime: str, version: int) -> None:
    """Socket-like objects without sendmsg (TLS sockets) carry the same bytes."""
    a, b = socketpair()
    transport = sendall_only_transport(a)
    cfg = pysmux.Config(version=version)
    client = pysmux.client(transport, config=cfg, runtime=runtime)
    server = pysmux.server(b, config=cfg, runtime=runtime)
    try:
        transfer(client, server, 1_000_000)
        assert client.error is None and server.error is None
    finally:
        client.close()
        server.close()
    owned = a if isinstance(transport, SendallOnlyTransport) else transport
    assert owned.fileno() == -1 and b.fileno() == -1  # the sessions closed their transports


def test_stream_ids_exhausted_is_a_clear_error(pair: Any) -> None:
    """After 2**32 ids a session refuses to open more; existing streams keep working."""
    client, server = pair()
    st = client.open_stream()
    peer = server.accept_stream(timeout=5)
    client._core._next_id = 2**32 + 1  # white box: skip four billion opens
    with pytest.raises(pysmux.SmuxError, match="stream ids"):
        client.open_stream()
    st.sendall(b"still here")
    assert peer.recv(10) == b"still here"
    assert not client.closed


def test_recently_closed_ids_are_bounded(pair: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory of closed stream ids (frames for them are not junk) has a bound."""
    monkeypatch.setattr(core_state, "_RECENTLY_CLOSED", 8)
    client, server = pair()
    ids = []
    for _ in range(20):
        st = client.open_stream()
        peer = server.accept_stream(timeout=5)
        ids.append(st.id)
        st.close()
        peer.close()
    # A stream is released once both FINs crossed; each end then remembers its id.
    wait_until(lambda: client.num_streams == 0 and server.num_streams == 0, 5, "all released")
    # Both ends closed 20 streams, in order: each remembers exactly the last 8.
    assert list(client._core._recently_closed) == ids[-8:]
    assert list(server._core._recently_closed) == ids[-8:]


def test_close_does_not_wait_for_dropped_window_updates(pair: Any) -> None:
    """A UPD queued for a stream that then stopped reading is skipped, and close()
    returns at once instead of waiting out its flush bound for it."""
    client, server = pair(version=2)
    st = client.open_stream()
    st.sendall(b"x" * 10)
    peer = server.accept_stream(timeout=5)
    assert peer.recv(10) == b"x" * 10  # the first read queues a UPD
    peer.shutdown(socket.SHUT_RD)  # ...which is then not needed
    started = time.monotonic()
    server.close()
    assert time.monotonic() - started < 0.25
