"""Well-behaved traffic must never look hostile, and races between closing and
I/O must end cleanly: every call returns or raises an OSError, nothing hangs."""

from __future__ import annotations

import random
import socket
import time

import pytest

import pysmux
from tests.util import (
    Barrier,
    payload,
    recv_exact,
    recv_to_eof,
    sha256,
    sleep,
    socketpair,
    spawn,
    wait_until,
)


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_peer_writing_to_a_stream_we_closed_does_not_end_the_session(pair, version):
    """smux has no reset: after our FIN the peer may legally keep writing (a FIN
    only says we send no more). Dropping that data must not count as junk."""
    client, server = pair(version=version, max_junk_frames_per_second=500)
    other = client.open_stream()
    other.sendall(b"o")
    st = client.open_stream()
    st.sendall(b"hello")
    peer_other = server.accept_stream(timeout=5)
    peer = server.accept_stream(timeout=5)
    assert peer.recv(5) == b"hello"
    peer.close()
    assert st.recv(1) == b""  # the client got our FIN
    st.settimeout(10)
    for i in range(600):  # 60 kB: within one v2 window, so it never waits for an UPD
        st.sendall(b"%099d" % i)
    other.sendall(b"k")
    assert recv_exact(peer_other, 2) == b"ok"
    assert server.error is None and client.error is None


def test_close_handshake_traffic_is_not_junk(pair):
    """Request/response where the server closes first: the client's FIN arrives
    for a stream the server has already released. That is the normal end of a
    stream, not an orphan frame from a hostile peer."""
    client, server = pair(max_junk_frames_per_second=100)

    def serve():
        for _ in range(300):
            s = server.accept_stream(timeout=5)
            assert s.recv(100) == b"request"
            s.sendall(b"response")
            s.close()

    w = spawn(serve)
    for i in range(300):
        st = client.open_stream()
        st.sendall(b"request")
        assert recv_to_eof(st) == b"response", f"request {i}"
        st.close()
    w.result(10)
    assert server.error is None and client.error is None


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_short_streams_closed_by_both_sides_are_not_junk(pair, version):
    """Many short streams closed by both ends (v2: with UPDs in flight as
    the reader closes): the frames that cross the closes are not junk."""
    client, server = pair(version=version, max_junk_frames_per_second=100)
    for _ in range(300):
        st = client.open_stream()
        st.sendall(b"x" * 40_000)  # v2: the reader answers with UPDs
        peer = server.accept_stream(timeout=5)
        assert len(recv_exact(peer, 40_000)) == 40_000
        peer.close()
        st.close()
    assert server.error is None and client.error is None


def test_stream_closed_just_before_session_close_delivers_its_fin(pair):
    """close() lets a FIN queued just before it reach the peer, so the peer sees
    a clean end of the stream rather than a reset."""
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"last words")
    peer = server.accept_stream(timeout=5)
    st.close()
    client.close()
    assert recv_to_eof(peer) == b"last words"


def test_concurrent_sendall_on_one_stream_does_not_interleave(pair):
    client, server = pair()
    st = client.open_stream()
    size = 1 << 20
    blocks = {b"a": b"a" * size, b"b": b"b" * size, b"c": b"c" * size}
    barrier = Barrier(3)

    def write(block):
        barrier.wait(5)
        st.sendall(block)

    workers = [spawn(write, blk) for blk in blocks.values()]
    peer = server.accept_stream(timeout=5)
    data = recv_exact(peer, 3 * size)
    for w in workers:
        w.result(10)
    runs = [data[i : i + size] for i in range(0, 3 * size, size)]
    assert sorted(r[:1] for r in runs) == [b"a", b"b", b"c"]
    assert all(r == blocks[r[:1]] for r in runs)


def test_shutdown_read_makes_recv_return_eof(pair):
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"x")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"x"
    peer.shutdown(socket.SHUT_RD)
    assert peer.recv(10) == b""
    peer.sendall(b"still writable")
    assert recv_exact(st, 14) == b"still writable"


def test_v1_stalled_session_is_not_a_keepalive_timeout(pair):
    """A reader that stops because the application does not read is not a
    silent peer (Go: no timeout while the token bucket is empty)."""
    client, server = pair(
        version=1,
        max_receive_buffer=65536,
        max_stream_buffer=65536,
        keepalive_interval=0.1,
        keepalive_timeout=0.3,
    )
    st = client.open_stream()
    st.sendall(b"!")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"!"
    data = payload(4 << 20, seed=9)
    w = spawn(st.sendall, data)
    end = time.monotonic() + 1.5  # five keepalive timeouts with the server stalled
    while time.monotonic() < end:
        assert not server.closed, server.error
        assert not client.closed, client.error
        sleep(0.01)  # observing for a fixed time
    assert w.is_alive()
    assert sha256(recv_exact(peer, len(data))) == sha256(data)
    w.result(10)


@pytest.mark.parametrize("seed", range(6))
def test_session_close_during_busy_io_ends_every_call_with_oserror(pair, seed):
    rng = random.Random(seed)
    version = 1 + seed % 2
    client, server = pair(version=version)
    n = 12
    streams = [client.open_stream() for _ in range(n)]
    peers = [server.accept_stream(timeout=5) for _ in range(n)]

    def pump(stream, k):
        """Random sends and receives until a call fails; "closed" if it closed its own
        stream first (1 in 100 calls), which ends its part cleanly."""
        r = random.Random(k)
        for _ in range(100_000):
            if r.random() < 0.5:
                stream.sendall(b"z" * r.randint(1, 100_000))
            else:
                stream.recv(r.randint(1, 100_000))
            if r.random() < 0.01:
                stream.close()
                return "closed"
        return "every call succeeded, even after the session closed"

    workers = [spawn(pump, s, i) for i, s in enumerate(streams + peers)]
    # Let traffic flow, then close one side at a random moment.
    deadline = time.monotonic() + rng.uniform(0.05, 0.3)
    while time.monotonic() < deadline:
        sleep(0.01)  # letting the traffic run for a random time
    t0 = time.monotonic()
    (client if rng.random() < 0.5 else server).close()
    for w in workers:
        exc = w.exception(timeout=3)
        if exc is None:
            assert w.result(0) == "closed"
        else:
            assert isinstance(exc, OSError), repr(exc)
        assert w.finished_at - t0 < 1.0
    wait_until(lambda: client.closed and server.closed, 2)
    assert not isinstance(client.error, pysmux.ProtocolError), client.error
    assert not isinstance(server.error, pysmux.ProtocolError), server.error


def test_stream_close_wakes_a_blocked_recv_and_send_on_that_stream(pair):
    client, server = pair(version=2)
    st = client.open_stream()
    st.settimeout(5)
    st.sendall(b"w" * 256 * 1024)  # the v2 window is full: the next send blocks
    st.settimeout(None)
    server.accept_stream(timeout=5)
    blocked_recv = spawn(st.recv, 10)
    blocked_send = spawn(st.sendall, b"more")
    assert blocked_recv.started_call.wait(5) and blocked_send.started_call.wait(5)
    # Data and a window update on another stream, a round trip: wakes neither call.
    other = client.open_stream()
    other.sendall(b"ping")
    other_peer = server.accept_stream(timeout=5)
    assert recv_exact(other_peer, 4) == b"ping"
    other_peer.sendall(b"pong")
    assert recv_exact(other, 4) == b"pong"
    assert blocked_recv.is_alive() and blocked_send.is_alive()
    t0 = time.monotonic()
    st.close()
    assert isinstance(blocked_recv.exception(2), OSError)
    assert isinstance(blocked_send.exception(2), BrokenPipeError)
    assert max(blocked_recv.finished_at, blocked_send.finished_at) - t0 < 1.0
    assert not client.closed


def test_send_of_nothing(pair):
    client, server = pair()
    st = client.open_stream()
    assert st.send(b"") == 0
    st.sendall(b"")
    st.sendall(b"x")
    assert server.accept_stream(timeout=5).recv(10) == b"x"


def test_keepalive_ends_a_session_whose_transport_write_is_stuck(runtime):
    """The peer neither answers nor reads: a writer blocked inside the transport
    write is woken when the keepalive ends the session."""
    cfg = pysmux.Config(keepalive_interval=0.1, keepalive_timeout=0.3)
    mine, silent = socketpair()
    with mine, silent:
        t0 = time.monotonic()
        session = pysmux.client(mine, config=cfg, runtime=runtime)
        try:
            st = session.open_stream()
            writer = spawn(st.sendall, b"x" * (8 << 20))
            exc = writer.exception(timeout=5)
            assert isinstance(exc, OSError), exc
            assert writer.finished_at - t0 < 0.3 + 0.1 + 0.2
            assert session.closed
        finally:
            session.close()


@pytest.mark.parametrize(
    ("version", "fields", "size"),
    [
        (1, {"max_frame_size": 1}, 20_000),
        (2, {"max_frame_size": 1}, 20_000),
        (1, {"max_frame_size": 65535}, 4 << 20),
        (2, {"max_frame_size": 65535}, 4 << 20),
        (2, {"max_stream_buffer": 1}, 5_000),
        (2, {"max_stream_buffer": 1 << 20}, 8 << 20),
        (2, {"max_stream_buffer": 100, "max_frame_size": 7}, 50_000),
    ],
    ids=str,
)
def test_frame_size_and_window_extremes(pair, version, fields, size):
    client, server = pair(version=version, **fields)
    data = payload(size, seed=size)
    st = client.open_stream()
    w = spawn(lambda: (st.sendall(data), st.shutdown(socket.SHUT_WR)))
    back = spawn(lambda: recv_to_eof(server.accept_stream(timeout=5)))
    assert sha256(back.result(60)) == sha256(data)
    w.result(10)
