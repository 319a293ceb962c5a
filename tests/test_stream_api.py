"""The socket-like surface of Stream: timeouts, non-blocking mode, recv_into,
makefile, and accept_stream's timeout."""

from __future__ import annotations

import socket
import time

import pytest

from tests.util import recv_exact, sleep, spawn

INITIAL_WINDOW = 256 * 1024  # what a v2 sender assumes before the first UPD


@pytest.fixture
def streams(pair):
    """A connected (client stream, server stream) over a fresh v1 pair."""
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"?")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"?"
    return st, peer


def test_settimeout_gettimeout_setblocking(streams):
    st, _ = streams
    assert st.gettimeout() is None
    st.settimeout(1.5)
    assert st.gettimeout() == 1.5
    st.settimeout(0)
    assert st.gettimeout() == 0.0
    st.settimeout(None)
    assert st.gettimeout() is None
    st.setblocking(False)
    assert st.gettimeout() == 0.0
    st.setblocking(True)
    assert st.gettimeout() is None
    with pytest.raises(ValueError):
        st.settimeout(-1)


def test_recv_timeout_raises_timeout_error_then_stream_still_works(streams):
    st, peer = streams
    st.settimeout(0.2)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        st.recv(10)
    took = time.monotonic() - t0
    assert 0.15 <= took < 1.0, took
    with pytest.raises(TimeoutError):
        st.recv_into(bytearray(10))
    assert issubclass(TimeoutError, OSError) and socket.timeout is TimeoutError
    peer.sendall(b"late")
    assert recv_exact(st, 4) == b"late"


def test_timeout_wakes_early_when_data_arrives(streams):
    st, peer = streams
    st.settimeout(5)
    w = spawn(st.recv, 10)
    assert w.started_call.wait(5)
    t0 = time.monotonic()
    peer.sendall(b"now")
    assert w.result(5) == b"now"
    assert time.monotonic() - t0 < 1.0


def test_non_blocking_recv_raises_blocking_io_error(streams):
    st, peer = streams
    st.setblocking(False)
    with pytest.raises(BlockingIOError):
        st.recv(10)
    with pytest.raises(BlockingIOError):
        st.recv_into(bytearray(10))
    peer.sendall(b"abc")
    deadline = time.monotonic() + 5  # data arrives asynchronously: poll until a deadline
    while True:
        try:
            assert st.recv(10) == b"abc"
            break
        except BlockingIOError:
            assert time.monotonic() < deadline, "data never arrived"
            sleep(0.001)  # polling a non-blocking stream, as one would a socket


def test_non_blocking_send_raises_blocking_io_error_when_window_is_full(pair):
    client, server = pair(version=2)
    st = client.open_stream()
    server.accept_stream(timeout=5)  # never read: the v2 window fills
    st.settimeout(5)
    st.sendall(b"x" * INITIAL_WINDOW)  # exactly the window a v2 sender assumes
    st.setblocking(False)
    with pytest.raises(BlockingIOError):
        st.send(b"y")
    with pytest.raises(BlockingIOError):
        st.sendall(b"y")


def test_non_blocking_send_succeeds_while_the_window_has_room(pair):
    """As a socket with buffer space: no would-block while the window is open,
    even right after open_stream (when the SYN may be on its way out)."""
    client, server = pair(version=2)
    spurious = 0
    for _ in range(1000):
        st = client.open_stream()
        st.setblocking(False)
        try:
            assert st.send(b"x") == 1
        except BlockingIOError:
            spurious += 1
        st.close()
        peer = server.accept_stream(timeout=5)
        assert peer.recv(2) in (b"x", b"")
        peer.close()
    assert spurious == 0, f"{spurious} of 1000 non-blocking sends would-blocked with an open window"


def test_send_timeout_when_window_is_full(pair):
    client, server = pair(version=2)
    st = client.open_stream()
    server.accept_stream(timeout=5)  # and never read
    st.settimeout(0.3)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        st.sendall(b"x" * (1 << 20))
    assert 0.25 <= time.monotonic() - t0 < 1.5


def test_accept_stream_timeout(pair):
    client, server = pair()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        server.accept_stream(timeout=0.2)
    took = time.monotonic() - t0
    assert 0.15 <= took < 1.0, took
    client.open_stream()
    assert server.accept_stream(timeout=5).id == 3


def test_recv_into_with_nbytes(streams):
    st, peer = streams
    peer.sendall(b"0123456789")
    buf = bytearray(20)
    got = 0
    for _ in range(10):
        got += st.recv_into(memoryview(buf)[got:], 4 if got == 0 else 0)
        if got == 10:
            break
        assert got >= 4 or got == 0
    assert bytes(buf[:10]) == b"0123456789"
    assert st.recv_into(bytearray(0)) == 0


def test_recv_zero_and_negative(streams):
    """As socket.recv(0): b"" at once, even with nothing buffered."""
    st, _ = streams
    st.settimeout(1.0)  # a failure is a TimeoutError, not a hang
    assert st.recv(0) == b""
    with pytest.raises(ValueError):
        st.recv(-1)


def test_send_accepts_bytes_like(streams):
    st, peer = streams
    st.sendall(bytearray(b"ab"))
    st.sendall(memoryview(b"xxcdxx")[2:4])
    assert st.send(b"ef") == 2
    assert recv_exact(peer, 6) == b"abcdef"


def test_makefile_binary_readline_write_flush(streams):
    st, peer = streams
    wfile = st.makefile("wb")
    rfile = peer.makefile("rb")
    wfile.write(b"line one\nline two\npartial")
    wfile.flush()
    assert rfile.readline() == b"line one\n"
    assert rfile.readline() == b"line two\n"
    assert rfile.read(7) == b"partial"
    wfile.write(b"\nlast\n")
    wfile.close()
    st.shutdown(socket.SHUT_WR)
    assert list(rfile) == [b"\n", b"last\n"]
    assert rfile.read() == b""
    rfile.close()


def test_makefile_text_mode(streams):
    st, peer = streams
    w = st.makefile("w", encoding="utf-8", newline="\n")
    r = peer.makefile("r", encoding="utf-8", newline="\n")
    w.write("héllo\nwörld\n")
    w.flush()
    assert r.readline() == "héllo\n"
    assert r.readline() == "wörld\n"
    w.close()
    st.close()
    assert r.read() == ""
    r.close()


def test_makefile_rw_pair_and_close_order(streams):
    """As with sockets, the stream stays usable until its files are closed too."""
    st, peer = streams
    f = peer.makefile("rwb")
    st.sendall(b"ping\n")
    assert f.readline() == b"ping\n"
    peer.close()  # the file still holds the stream open
    f.write(b"pong\n")
    f.flush()
    assert recv_exact(st, 5) == b"pong\n"
    f.close()  # now the stream is really closed: FIN
    assert st.recv(1) == b""


def test_makefile_read_timeout(streams):
    st, _ = streams
    st.settimeout(0.2)
    f = st.makefile("rb")
    with pytest.raises(TimeoutError):
        f.read(1)
    f.close()
