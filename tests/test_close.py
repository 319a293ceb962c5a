"""Closing: sessions, streams (FIN half-close), context managers, and the
transport dying under a session."""

from __future__ import annotations

import errno
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
    socketpair,
    spawn,
    wait_until,
)

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])


def fill_send_window(st):
    """Use up the 256 KiB a v2 sender assumes before the peer's first UPD."""
    st.settimeout(5)
    st.sendall(b"w" * 256 * 1024)
    st.settimeout(None)
    return 256 * 1024


# -- session close ---------------------------------------------------------------


def test_session_close_wakes_every_blocked_call_within_a_second(pair):
    client, server = pair(version=2)
    recv_st = client.open_stream()
    send_st = client.open_stream()
    idle_st = client.open_stream()
    probe = client.open_stream()
    peers = [server.accept_stream(timeout=5) for _ in range(4)]
    sent = fill_send_window(send_st)  # the peer never reads: the v2 window is full
    assert sent > 0

    calls = {
        "client recv": lambda: recv_st.recv(100),
        "client recv_into": lambda: idle_st.recv_into(bytearray(10)),
        "client send": lambda: send_st.sendall(b"x" * (1 << 20)),
        "client accept_stream": lambda: client.accept_stream(),
        # Closing a session sends no FIN for its open streams: the peer sees a reset.
        "server recv": lambda: peers[0].recv(100),
        "server accept_stream": lambda: server.accept_stream(),
    }
    workers = {name: spawn(fn, name=name) for name, fn in calls.items()}
    for w in workers.values():
        assert w.started_call.wait(5)
    # Nothing may finish before the close, not even when traffic that concerns none of
    # them (data and a window update on a fourth stream) has made a round trip: both
    # sessions then read past every frame sent after the calls began.
    probe.sendall(b"ping")
    assert recv_exact(peers[3], 4) == b"ping"
    peers[3].sendall(b"pong")
    assert recv_exact(probe, 4) == b"pong"
    for name, w in workers.items():
        assert w.is_alive(), f"{name} returned before close: {w.exc!r}"

    t0 = time.monotonic()
    client.close()
    close_took = time.monotonic() - t0
    assert close_took < 1.0
    assert client.closed

    for name, w in workers.items():
        exc = w.exception(timeout=2.0)
        assert w.finished_at - t0 < 1.0, f"{name} woke after {w.finished_at - t0:.2f}s"
        assert exc is not None, f"{name} returned normally"
        if "accept_stream" in name:
            assert isinstance(exc, pysmux.SessionClosedError), (name, exc)
        else:
            assert isinstance(exc, pysmux.StreamResetError), (name, exc)

    wait_until(lambda: server.closed, 1.0, "server notices the transport closing")
    with pytest.raises(pysmux.SessionClosedError):
        client.open_stream()
    with pytest.raises(pysmux.SessionClosedError):
        client.accept_stream(timeout=0.1)
    with pytest.raises(pysmux.SessionClosedError):
        server.open_stream()
    for st in (recv_st, send_st, idle_st):
        with pytest.raises(pysmux.StreamResetError):
            st.recv(1)
        with pytest.raises(pysmux.StreamResetError):
            st.send(b"x")


def test_buffered_data_is_readable_after_session_close_then_reset(pair):
    client, server = pair()
    st = client.open_stream()
    marker = client.open_stream()
    st.sendall(b"a")
    marker.sendall(b"b")
    peer = server.accept_stream(timeout=5)
    peer_marker = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"a"
    assert peer_marker.recv(1) == b"b"
    peer.sendall(b"tail")
    peer_marker.sendall(b"m")
    # The server wrote "tail" before "m": once "m" is here, "tail" is buffered.
    assert marker.recv(1) == b"m"
    client.close()
    assert recv_exact(st, 4) == b"tail"
    with pytest.raises(pysmux.StreamResetError):
        st.recv(1)


def test_session_close_idempotent_and_from_many_threads(pair):
    client, server = pair()
    streams = [client.open_stream() for _ in range(10)]
    barrier = Barrier(16)

    def closer():
        barrier.wait(5)
        client.close()

    workers = [spawn(closer, name=f"closer-{i}") for i in range(16)]
    for w in workers:
        w.result(5)
    assert client.closed
    client.close()
    client.close()
    for st in streams:
        with pytest.raises(pysmux.StreamResetError):
            st.recv(1)
    wait_until(lambda: server.closed, 2.0)
    server.close()
    server.close()


def test_session_context_manager_and_closed_flag(runtime):
    a, b = socketpair()
    with a, b:
        with (
            pysmux.client(a, runtime=runtime) as client,
            pysmux.server(b, runtime=runtime) as server,
        ):
            assert client.closed is False
            assert server.closed is False
            st = client.open_stream()
            st.sendall(b"x")
            assert server.accept_stream(timeout=5).recv(1) == b"x"
        assert client.closed is True
        assert server.closed is True


def test_num_streams_counts_open_streams(pair):
    client, server = pair()
    assert client.num_streams == 0
    assert server.num_streams == 0
    streams = [client.open_stream() for _ in range(3)]
    assert client.num_streams == 3
    peers = [server.accept_stream(timeout=5) for _ in range(3)]
    assert server.num_streams == 3
    for st, peer in zip(streams, peers, strict=True):
        st.close()
        assert peer.recv(1) == b""
        peer.close()
    wait_until(lambda: client.num_streams == 0, 2, "client num_streams == 0")
    wait_until(lambda: server.num_streams == 0, 2, "server num_streams == 0")


# -- stream close ----------------------------------------------------------------


@VERSIONS
def test_half_close_other_direction_keeps_sending(pair, version):
    client, server = pair(version=version)
    st = client.open_stream()
    st.sendall(b"request")
    st.shutdown(socket.SHUT_WR)
    peer = server.accept_stream(timeout=5)
    assert recv_to_eof(peer) == b"request"
    assert peer.recv(10) == b""  # EOF is sticky
    # 2 MiB is many v2 windows: the half-closed side must keep sending UPDs.
    reply = payload(2 << 20, seed=5)
    w = spawn(lambda: (peer.sendall(reply), peer.close()))
    assert sha256(recv_to_eof(st)) == sha256(reply)
    w.result(10)


def test_send_after_shutdown_raises_broken_pipe(pair):
    client, server = pair()
    st = client.open_stream()
    st.shutdown(socket.SHUT_WR)
    with pytest.raises(BrokenPipeError):
        st.send(b"x")
    with pytest.raises(BrokenPipeError):
        st.sendall(b"x")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b""
    peer.sendall(b"still open")
    assert recv_exact(st, 10) == b"still open"


def test_send_after_close_raises_broken_pipe_and_recv_ebadf(pair):
    client, server = pair()
    st = client.open_stream()
    st.close()
    with pytest.raises(BrokenPipeError):
        st.send(b"x")
    with pytest.raises(BrokenPipeError):
        st.sendall(b"x")
    with pytest.raises(OSError) as info:
        st.recv(1)
    assert info.value.errno == errno.EBADF
    st.close()  # idempotent
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b""


def test_recv_returns_eof_only_after_peer_fin(pair):
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"data")
    peer = server.accept_stream(timeout=5)
    assert recv_exact(peer, 4) == b"data"
    peer.settimeout(0.2)
    with pytest.raises(TimeoutError):
        peer.recv(1)
    st.shutdown(socket.SHUT_WR)
    peer.settimeout(5)
    assert peer.recv(1) == b""


def test_stream_context_manager_closes_and_sends_fin(pair):
    client, server = pair()
    with client.open_stream() as st:
        st.sendall(b"abc")
    with pytest.raises(BrokenPipeError):
        st.send(b"x")
    with server.accept_stream(timeout=5) as peer:
        assert recv_to_eof(peer) == b"abc"


def test_close_after_peer_fin_frees_stream_on_both_sides(pair):
    client, server = pair(version=2)
    st = client.open_stream()
    st.sendall(b"x" * 100_000)
    st.close()
    peer = server.accept_stream(timeout=5)
    assert len(recv_to_eof(peer)) == 100_000
    peer.close()
    wait_until(lambda: client.num_streams == 0 and server.num_streams == 0, 2)


# -- the transport dies under the session -----------------------------------------


def test_transport_death_resets_streams_after_buffered_data(pair):
    p = pair()
    client, server = p
    unfinished = client.open_stream()
    finished = client.open_stream()
    marker = client.open_stream()
    unfinished.sendall(b"u" * 1000)
    finished.sendall(b"done")
    finished.shutdown(socket.SHUT_WR)
    marker.sendall(b"m")
    peers = {s.id: s for s in (server.accept_stream(timeout=5) for _ in range(3))}
    # Frames are handled in order: once "m" is here, the rest is buffered.
    assert peers[marker.id].recv(1) == b"m"

    p.client_sock.shutdown(socket.SHUT_RDWR)  # the transport dies under both sessions
    wait_until(lambda: server.closed and client.closed, 2, "both sessions see the death")

    assert recv_exact(peers[unfinished.id], 1000) == b"u" * 1000
    with pytest.raises(pysmux.StreamResetError):
        peers[unfinished.id].recv(1)
    with pytest.raises(pysmux.StreamResetError):  # and it stays reset
        peers[unfinished.id].recv(1)
    # A stream that got its FIN before the death reads to a clean EOF.
    assert recv_to_eof(peers[finished.id]) == b"done"
    with pytest.raises(pysmux.StreamResetError):
        peers[marker.id].recv(1)
    for s in (unfinished, finished, marker):
        with pytest.raises(pysmux.StreamResetError):
            s.recv(1)
    for s in (unfinished, marker):
        with pytest.raises(pysmux.StreamResetError):
            s.send(b"x")
    with pytest.raises(BrokenPipeError):  # shut down locally before the death
        finished.send(b"x")


@VERSIONS
def test_peer_transport_closed_mid_transfer_never_clean_eof(pair, version):
    p = pair(version=version)
    client, server = p
    st = client.open_stream()
    data = payload(16 << 20, seed=3)
    writer = spawn(st.sendall, data)
    peer = server.accept_stream(timeout=5)
    got = 0
    first = recv_exact(peer, 1 << 20)
    got += len(first)
    # Kill the client's end of the transport while data is still flowing.
    p.client_sock.shutdown(socket.SHUT_RDWR)  # (closed by the fixture, once unused)
    with pytest.raises(pysmux.StreamResetError):
        for _ in range(len(data)):
            chunk = peer.recv(65536)
            assert chunk, "clean EOF reported although no FIN was sent"
            got += len(chunk)
    assert got < len(data)
    exc = writer.exception(5)
    assert isinstance(exc, OSError), exc
    with pytest.raises(pysmux.StreamResetError):
        st.send(b"x")
    wait_until(lambda: client.closed and server.closed, 2)


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_transport_dies_while_a_data_frame_is_being_written(runtime, version):
    """The writer is blocked inside the transport write when the peer goes away:
    the send fails, the session ends, and close() is prompt and leaves no thread."""
    import array
    import fcntl
    import termios

    mine, theirs = socketpair()
    with mine, theirs:
        cfg = pysmux.Config(version=version, keepalive=False)
        session = pysmux.client(mine, config=cfg, runtime=runtime)
        try:
            st = session.open_stream()
            writer = spawn(st.sendall, b"x" * (8 << 20))  # nobody reads `theirs`

            def queued():
                n = array.array("i", [0])
                fcntl.ioctl(theirs, termios.FIONREAD, n)
                return n[0]

            wait_until(lambda: queued() >= 100_000, 5, "the transport fills up")
            theirs.close()  # the peer goes away mid-write
            assert isinstance(writer.exception(2), OSError)
            wait_until(lambda: session.closed, 1, "session ends")
        finally:
            t0 = time.monotonic()
            session.close()
            took = time.monotonic() - t0
        assert took < 1.0, f"close() took {took:.1f}s"


def test_streams_of_a_dead_session_can_still_be_closed_and_inspected(pair):
    client, _server = pair()
    st = client.open_stream()
    client.close()
    assert isinstance(client.error, pysmux.SmuxError)
    st.close()
    st.close()
    with pytest.raises(OSError) as info:
        st.recv(1)
    assert info.value.errno == errno.EBADF
    with pytest.raises(BrokenPipeError):
        st.send(b"x")


def test_stream_closed_by_the_peer_before_accept_is_still_delivered(pair):
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"short life")
    st.close()
    marker = client.open_stream()
    marker.sendall(b"m")
    first = server.accept_stream(timeout=5)
    second = server.accept_stream(timeout=5)
    assert (first.id, second.id) == (st.id, marker.id)
    assert recv_to_eof(first) == b"short life"
    assert second.recv(1) == b"m"
    first.close()
    wait_until(lambda: client.num_streams == 1 and server.num_streams == 1, 2)


# -- reset (abortive close) ------------------------------------------------------


@VERSIONS
def test_reset_reaches_the_peer_as_a_reset_after_the_data_sent_before_it(pair, version):
    client, server = pair(version=version)
    st = client.open_stream()
    st.sendall(b"last words")
    peer = server.accept_stream(timeout=5)
    st.reset()
    assert st.closed
    st.reset()  # idempotent
    with pytest.raises(OSError):
        st.send(b"x")
    assert recv_exact(peer, 10) == b"last words"  # what came first is still delivered
    peer.settimeout(5)
    with pytest.raises(pysmux.StreamResetError, match="reset by the peer") as caught:
        peer.recv(10)
    assert caught.value.errno == errno.ECONNRESET
    with pytest.raises(pysmux.StreamResetError, match="reset by the peer"):
        peer.sendall(b"reply")
    # Both ends let go of the stream at once: no FIN is owed back.
    wait_until(lambda: client.num_streams == 0 and server.num_streams == 0, 5, "streams freed")
    peer.close()
    assert client.error is None and server.error is None  # the session goes on
    again = client.open_stream()
    again.sendall(b"ok")
    assert recv_exact(server.accept_stream(timeout=5), 2) == b"ok"


def test_reset_wakes_a_peer_blocked_in_recv(pair):
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"?")
    peer = server.accept_stream(timeout=5)
    assert recv_exact(peer, 1) == b"?"
    blocked = spawn(lambda: peer.recv(10), name="blocked-recv")
    assert blocked.started_call.wait(5)
    st.reset()
    with pytest.raises(pysmux.StreamResetError):
        blocked.result(5)


def test_reset_after_shutdown_is_a_plain_close(pair):
    """The marker must come before the FIN: once the FIN went, the peer sees EOF."""
    client, server = pair()
    st = client.open_stream()
    st.shutdown(socket.SHUT_WR)
    peer = server.accept_stream(timeout=5)
    st.reset()
    peer.settimeout(5)
    assert peer.recv(10) == b""
