"""``Session.stats()``: what a session counts, exactly, on both runtimes."""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

from pysmux.errors import ProtocolError
from pysmux.frame import HEADER_SIZE
from tests.util import recv_exact, recv_to_eof, socketpair, wait_until


def test_stats_count_streams_frames_and_bytes(runtime: str, pair: Callable[..., Any]) -> None:
    """An operator reading a session's figures sees exactly what happened: 3 streams opened
    by the client and accepted by the server, every byte each side wrote counted as the
    other side read it (headers included), data frames and control frames counted, the
    unread bytes as buffered, and the streams gone from the gauge once closed."""
    client, server = pair(keepalive=False)
    streams = [client.open_stream() for _ in range(3)]
    for i, stream in enumerate(streams):
        stream.sendall(bytes([i]) * 1000)
    accepted = [server.accept_stream(5) for _ in range(3)]
    for i, stream in enumerate(accepted):
        assert recv_exact(stream, 1000) == bytes([i]) * 1000
    accepted[0].sendall(b"x" * 500)  # left unread by the client for a while
    wait_until(lambda: client.stats()["buffered_bytes"] == 500, 5, "reply buffered")

    cs, ss = client.stats(), server.stats()
    assert (cs["streams_opened"], cs["streams_accepted"]) == (3, 0)
    assert (ss["streams_opened"], ss["streams_accepted"]) == (0, 3)
    assert cs["streams"] == ss["streams"] == 3
    # 3 SYN + 3 PSH from the client; 1 PSH from the server.
    assert cs["frames_sent"] == ss["frames_received"] == 6
    assert cs["bytes_sent"] == ss["bytes_received"] == 6 * HEADER_SIZE + 3000
    assert ss["frames_sent"] == cs["frames_received"] == 1
    assert ss["bytes_sent"] == cs["bytes_received"] == HEADER_SIZE + 500
    assert cs["protocol_errors"] == ss["protocol_errors"] == 0

    assert recv_exact(streams[0], 500) == b"x" * 500
    assert client.stats()["buffered_bytes"] == 0
    for a, b in zip(streams, accepted, strict=True):
        a.shutdown(socket.SHUT_WR)
        b.shutdown(socket.SHUT_WR)
        assert recv_to_eof(b) == b""
        assert recv_to_eof(a) == b""
        a.close()
        b.close()
    wait_until(lambda: client.stats()["streams"] == server.stats()["streams"] == 0, 5, "gone")
    assert set(client.stats()) == {
        "streams_opened", "streams_accepted", "streams_refused", "frames_sent", "bytes_sent",
        "frames_received", "bytes_received", "dropped_frames", "protocol_errors", "streams",
        "buffered_bytes",
    }  # fmt: skip


def test_stats_count_refusals_and_protocol_errors(runtime: str, pair: Callable[..., Any]) -> None:
    """Streams refused past a limit and a session ended by a protocol violation show in the
    counters; the error keeps the offending bytes, so a caller can say what the peer is."""
    client, server = pair(keepalive=False, max_streams=2)
    kept = [client.open_stream() for _ in range(3)]
    for stream in kept:
        stream.sendall(b"hi")
    wait_until(lambda: server.stats()["streams_refused"] == 1, 5, "third stream refused")
    assert server.stats()["streams_accepted"] == 2
    assert recv_to_eof(kept[2]) == b""  # the refusal's FIN


def test_protocol_error_keeps_the_offending_bytes(runtime: str) -> None:
    """A session whose peer answers with something that is not smux ends with a
    ``ProtocolError`` that keeps the first bytes received, so a caller can say what the peer
    is (here an HTTP server), and the error is counted."""
    import pysmux

    ours, theirs = socketpair()
    try:
        session = pysmux.server(ours, config=pysmux.Config(keepalive=False), runtime=runtime)
        theirs.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        wait_until(lambda: session.closed, 5, "session ended")
        error = session.error
        assert isinstance(error, ProtocolError)
        assert error.received.startswith(b"HTTP/1.1 400")
        stats = session.stats()
        assert (stats["protocol_errors"], stats["frames_received"]) == (1, 0)
        session.close()
    finally:
        theirs.close()
