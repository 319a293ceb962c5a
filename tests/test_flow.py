"""Flow control: v2 per-stream windows keep a slow stream from stopping the
others; v1's session-wide budget stalls the session (the protocol) but loses
nothing."""

from __future__ import annotations

import socket

import pytest

from tests.util import payload, recv_exact, recv_to_eof, sha256, spawn


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
