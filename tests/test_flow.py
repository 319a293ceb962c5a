"""Flow control: v2 per-stream windows keep a slow stream from stopping the
others; v1's session-wide budget stalls the session (the protocol) but loses
nothing."""

from __future__ import annotations

import socket

import pytest

import pysmux
from tests.util import payload, recv_exact, recv_to_eof, sha256, spawn, wait_until


def test_v2_slow_reader_does_not_stop_another_stream(pair):
    client, server = pair(version=2)
    slow = client.open_stream()
    fast = client.open_stream()
    peers = {s.id: s for s in (server.accept_stream(timeout=5) for _ in range(2))}
    slow_data = payload(4 << 20, seed=1)
    fast_data = payload(8 << 20, seed=2)

    slow_writer = spawn(lambda: (slow.sendall(slow_data), slow.shutdown(socket.SHUT_WR)))
    # The slow stream's reader does nothing; the fast one moves many windows meanwhile.
    fast_writer = spawn(lambda: (fast.sendall(fast_data), fast.shutdown(socket.SHUT_WR)))
    assert sha256(recv_to_eof(peers[fast.id])) == sha256(fast_data)
    fast_writer.result(10)
    assert slow_writer.is_alive(), "4 MiB went through a window nobody read"
    # Now read the slow stream: everything arrives.
    assert sha256(recv_to_eof(peers[slow.id])) == sha256(slow_data)
    slow_writer.result(10)


def test_v2_slow_reader_does_not_stop_the_reverse_direction(pair):
    client, server = pair(version=2)
    st = client.open_stream()
    st.sendall(b"!")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"!"
    w = spawn(st.sendall, payload(2 << 20, seed=3))  # the server does not read
    back = payload(2 << 20, seed=4)
    spawn_back = spawn(lambda: (peer.sendall(back), peer.shutdown(socket.SHUT_WR)))
    assert sha256(recv_to_eof(st)) == sha256(back)
    spawn_back.result(10)
    assert w.is_alive()
    assert len(recv_exact(peer, 2 << 20)) == 2 << 20
    w.result(10)


def test_v1_small_budget_unread_stream_stalls_session_but_loses_nothing(pair):
    budget = 65536
    client, server = pair(version=1, max_receive_buffer=budget, max_stream_buffer=budget)
    unread = client.open_stream()
    other = client.open_stream()
    peers = {s.id: s for s in (server.accept_stream(timeout=5) for _ in range(2))}
    peer_other = peers[other.id]
    big = payload(4 << 20, seed=5)
    # 4 MiB is far more than the budget plus the socket buffers: the server's
    # reader must stop reading, and then nothing on `other` gets through.
    big_writer = spawn(unread.sendall, big)
    peer_other.settimeout(0.3)
    probes = []
    for i in range(100):
        probes.append(spawn(other.sendall, b"%03d" % i))
        try:
            assert recv_exact(peer_other, 3) == b"%03d" % i
        except TimeoutError:
            break  # stalled: the protocol, not a bug
    else:
        raise AssertionError("the session never stalled on the unread stream")
    assert big_writer.is_alive()
    peer_other.settimeout(None)
    assert sha256(recv_exact(peers[unread.id], len(big))) == sha256(big)
    big_writer.result(10)
    for w in probes:
        w.result(10)
    assert recv_exact(peer_other, 3) == b"%03d" % i  # the stalled probe, intact
    other.sendall(b"after")
    assert recv_exact(peer_other, 5) == b"after"
    assert not client.closed and not server.closed


def test_v2_unread_stream_fills_only_its_window_not_the_session_budget(pair):
    """v2: an unread stream takes at most the sender's initial window (256 KiB,
    as Go assumes); with a session budget above that the other streams go on.
    (With a budget below 256 KiB v2 stalls like v1, in Go as well.)"""
    client, server = pair(version=2, max_receive_buffer=512 * 1024, max_stream_buffer=65536)
    unread = client.open_stream()
    other = client.open_stream()
    peers = {s.id: s for s in (server.accept_stream(timeout=5) for _ in range(2))}
    big = payload(4 << 20, seed=5)
    big_writer = spawn(unread.sendall, big)
    other_data = payload(2 << 20, seed=6)
    small_writer = spawn(other.sendall, other_data)
    assert sha256(recv_exact(peers[other.id], len(other_data))) == sha256(other_data)
    small_writer.result(10)
    assert big_writer.is_alive()
    assert sha256(recv_exact(peers[unread.id], len(big))) == sha256(big)
    big_writer.result(10)
    assert not client.closed and not server.closed


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_many_streams_share_transport_fairly(pair, version):
    """Writers on several streams all make progress at once (round robin)."""
    client, server = pair(version=version)
    n = 8
    streams = [client.open_stream() for _ in range(n)]
    peers = {s.id: s for s in (server.accept_stream(timeout=5) for _ in range(n))}
    datas = [payload(1 << 20, seed=10 + i) for i in range(n)]
    writers = [
        spawn(lambda s=s, d=d: (s.sendall(d), s.shutdown(socket.SHUT_WR)))
        for s, d in zip(streams, datas, strict=True)
    ]
    readers = [spawn(recv_to_eof, peers[s.id]) for s in streams]
    for r, d in zip(readers, datas, strict=True):
        assert sha256(r.result(30)) == sha256(d)
    for w in writers:
        w.result(10)


@pytest.mark.parametrize("streams", [64, 256])
def test_v2_echo_with_default_config_never_stalls(pair, streams):
    """The v2 stall pattern, with the default Config: echo handlers that write
    each chunk back before they read the next, and a client that starts reading
    the echoes only once every handler is blocked on its window (as a slow
    client would). Every stream may carry 256 KiB before the first UPD, far past
    the 4 MiB session budget; a reader that paused there left every echo
    handler waiting for UPDs queued behind the pause, and nobody read again (a
    deadlock). The session reads on while writers wait, so every byte returns.

    The server, the side under test, has the default Config. The client holds
    every echo until it starts reading, so its budget covers them: it plays a
    slow client, not the session being tested."""
    client, server = pair(
        client_config=pysmux.Config(version=2, max_receive_buffer=(streams + 16) * 256 * 1024),
        server_config=pysmux.Config(version=2),
    )
    size = 512 * 1024  # two initial windows: the handlers must wait for UPDs
    blocked: list[int] = []

    def echo(st) -> int:
        total = 0
        while True:
            chunk = st.recv(65536)
            if not chunk:
                st.close()
                return total
            if total < 256 * 1024 <= total + len(chunk):
                blocked.append(st.id)  # this write fills the window the client gave
            st.sendall(chunk)
            total += len(chunk)

    def serve() -> list[int]:
        handlers = [spawn(echo, server.accept_stream(timeout=10)) for _ in range(streams)]
        return [h.result(60) for h in handlers]

    def send(st, data: bytes) -> None:
        st.sendall(data)
        st.shutdown(socket.SHUT_WR)

    server_task = spawn(serve)
    mine = [client.open_stream() for _ in range(streams)]
    datas = [payload(size, st.id) for st in mine]
    writers = [spawn(send, st, data) for st, data in zip(mine, datas, strict=True)]
    wait_until(lambda: len(blocked) == streams, 30, "every echo handler fills its window")
    readers = [spawn(recv_to_eof, st) for st in mine]
    for w in writers:
        w.result(60)
    for r, data in zip(readers, datas, strict=True):
        assert sha256(r.result(60)) == sha256(data)
    assert server_task.result(60) == [size] * streams
    assert client.error is None and server.error is None


def test_v2_peer_that_overruns_a_window_is_a_protocol_error(runtime):
    """Per-stream windows are the v2 memory bound: a peer that sends more than the
    window allows on a stream nobody reads is ended with ProtocolError."""
    import pysmux
    from pysmux import frame
    from tests.rawpeer import RawPeer
    from tests.util import socketpair

    mine, theirs = socketpair()
    with mine, theirs:
        session = pysmux.server(
            mine, config=pysmux.Config(version=2, keepalive=False), runtime=runtime
        )
        try:
            peer = RawPeer(theirs, version=2)
            peer.syn(3)
            chunk = b"w" * 32768
            for _ in range(8):  # 256 KiB: exactly the window Go assumes
                peer.psh(3, chunk)
            peer.psh(3, b"!")  # one byte past it
            wait_until(lambda: session.closed, 5, "the session ends")
            assert isinstance(session.error, pysmux.ProtocolError)
            assert "overran the window" in str(session.error)
            assert frame.HEADER_SIZE == 8
        finally:
            session.close()
