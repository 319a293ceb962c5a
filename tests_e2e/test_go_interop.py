"""pysmux against Go's xtaci/smux (Debian 1.5.16) over real loopback TCP.

Every scenario runs for protocol versions 1 and 2 and, where it has two
directions, with pysmux as the client of a Go server and as the server of a Go
client. The Go side is tests_e2e/gopeer (see its -mode flag); it reports what
it saw as JSON lines, which is also how the tests synchronise with it.
"""

from __future__ import annotations

import functools
import itertools
import re
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

import pysmux

from .conftest import Net, StartPeer
from .peers import (
    EchoHandler,
    MiB,
    PeerProcess,
    TaskGroup,
    echo_roundtrip,
    parse_addr,
    pattern,
    pattern_sha256,
    read_while_killing,
    recv_exactly,
    recv_to_eof,
    send_pattern,
    wait_until,
)

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])


def go_server(gopeer: StartPeer, version: int, *args: str, **kw: Any) -> tuple[PeerProcess, Any]:
    peer = gopeer("-role=server", f"-version={version}", *args, **kw)
    return peer, parse_addr(peer.wait_for("listening")[0]["addr"])


def py_client(
    gopeer: StartPeer, net: Net, version: int, goargs: tuple[str, ...], **config: Any
) -> tuple[PeerProcess, pysmux.Session]:
    """A Go server with ``goargs`` and a pysmux client session connected to it."""
    peer, addr = go_server(gopeer, version, *goargs)
    return peer, net.client(net.connect(addr), version=version, **config)


def py_server(
    gopeer: StartPeer, net: Net, version: int, goargs: tuple[str, ...], **config: Any
) -> tuple[PeerProcess, pysmux.Session]:
    """A pysmux server session, and a Go client with ``goargs`` connected to it."""
    lsock = net.listen()
    port = lsock.getsockname()[1]
    peer = gopeer("-role=client", f"-version={version}", f"-addr=127.0.0.1:{port}", *goargs)
    sess = net.server(net.accept(lsock), version=version, **config)
    return peer, sess


def wait_session_end(sess: pysmux.Session, timeout: float) -> BaseException:
    """Block (in accept_stream) until the session ends; return what accept_stream raised."""
    with pytest.raises(pysmux.SessionClosedError) as info:
        sess.accept_stream(timeout=timeout)
    assert sess.closed
    assert sess.error is not None
    return info.value


def ping(st: pysmux.Stream) -> None:
    st.sendall(b"ping")
    assert recv_exactly(st, 4) == b"ping"


# ---------------------------------------------------------------------------
# echo: many concurrent streams, one big stream

ECHO_SHAPES = pytest.mark.parametrize(
    ("streams", "size"), [(64, MiB), (1, 64 * MiB)], ids=["64x1MiB", "1x64MiB"]
)


@VERSIONS
@ECHO_SHAPES
def test_echo_pysmux_client_go_server(
    gopeer: StartPeer, net: Net, version: int, streams: int, size: int
) -> None:
    """A pysmux client can push data through a Go smux echo server on many streams at
    once (or one big one) and get back exactly what it sent."""
    peer, sess = py_client(gopeer, net, version, ("-mode=echo",))

    def one_stream(tasks: TaskGroup) -> int:
        st = sess.open_stream()
        with st:
            assert echo_roundtrip(st, st.id, size, tasks) == pattern_sha256(st.id, size)
        return st.id

    with TaskGroup(sess.close) as tasks:
        workers = [tasks.spawn(one_stream, tasks) for _ in range(streams)]
    ids = {w.result(0) for w in workers}
    assert len(ids) == streams
    # Our close (FIN) reached Go as EOF after all the data: it reports each echo done.
    done = peer.wait_for("stream", streams, timeout=30)
    assert {e["id"] for e in done} == ids
    assert all(e["bytes"] == size and e["err"] is None for e in done), done
    assert sess.error is None


@VERSIONS
@ECHO_SHAPES
def test_echo_go_client_pysmux_server(
    gopeer: StartPeer, net: Net, version: int, streams: int, size: int
) -> None:
    """A Go smux client can open many streams (or one big one) to a pysmux server that
    echoes, and reads back exactly what it sent, checksummed on the Go side."""
    # Default settings, v2 included: a Go sender assumes a 256 KiB window per stream
    # before our first UPD, so 64 streams can put 16 MiB in flight against a 4 MiB
    # budget. pysmux reads on past the budget while its echo writers wait for UPDs
    # (docs/design.md 7.3); it used to pause and deadlock about 1 run in 15.
    peer, sess = py_server(
        gopeer,
        net,
        version,
        ("-mode=client-echo", f"-streams={streams}", f"-size={size}", "-hold"),
    )
    handler = EchoHandler(sess)
    try:
        summary = peer.wait_for("summary", timeout=120)[0]
        # Go's Close put each FIN on the wire before the summary; let them arrive.
        handler.wait_finished(streams, timeout=30)
    finally:
        handler.stop()
    assert summary["ok"] == streams and summary["failed"] == 0, peer.describe()
    assert peer.wait() == 0, peer.describe()  # it saw our session close and quit
    assert handler.errors == []
    assert sorted(handler.echoed.values()) == [size] * streams


# ---------------------------------------------------------------------------
# Go writes first, right after accept


@VERSIONS
def test_go_server_writes_first_100_times(gopeer: StartPeer, net: Net, version: int) -> None:
    """When a Go server writes the moment it accepts a stream (before the pysmux client
    sends anything), pysmux loses no byte: registering the stream before sending SYN
    makes the race Go itself has (docs/design.md 9.1) impossible, 100 times in a row."""
    size = 300_000  # more than one v2 window (256 KiB): needs our UPDs too
    peer, sess = py_client(gopeer, net, version, ("-mode=writefirst", f"-size={size}"))
    for i in range(100):
        st = sess.open_stream()
        with st:
            st.settimeout(20)
            got = recv_to_eof(st, limit=size)
            assert got == (size, pattern_sha256(st.id, size)), f"round {i}, stream {st.id}"
    written = peer.wait_for("stream", 100)
    assert all(e["written"] == size and e["err"] is None for e in written)
    assert sess.error is None


# ---------------------------------------------------------------------------
# close semantics


@VERSIONS
def test_go_close_reaches_pysmux_server_as_eof(gopeer: StartPeer, net: Net, version: int) -> None:
    """When a Go client writes and then closes its streams, a pysmux server reads all of
    the data and then a clean EOF (b""), which stays EOF."""
    size = 2 * MiB + 7
    peer, sess = py_server(
        gopeer, net, version, ("-mode=send", "-streams=8", f"-size={size}", "-hold")
    )

    def drain(st: pysmux.Stream) -> None:
        with st:
            st.settimeout(30)
            assert recv_to_eof(st) == (size, pattern_sha256(st.id, size))
            assert st.recv(1) == b""  # EOF is sticky

    with TaskGroup(sess.close) as tasks:
        for _ in range(8):
            tasks.spawn(drain, sess.accept_stream(timeout=20))
    summary = peer.wait_for("summary")[0]
    assert summary["ok"] == 8, peer.describe()
    sent = peer.events("stream")
    assert all(e["written"] == size and e["close_err"] is None for e in sent), sent


def reply_size(version: int) -> int:
    # docs/design.md 9.6: once our FIN arrived, a v2 Go 1.5.16 writer that runs out of
    # window gives up with EOF, so in v2 a Go peer can answer at most one window
    # (max_stream_buffer, 64 KiB by default) after our shutdown(SHUT_WR). v1 has no
    # such limit: 8 MiB also proves our session budget refills while half-closed.
    return 8 * MiB if version == 1 else pysmux.Config().max_stream_buffer


@VERSIONS
def test_pysmux_client_shutdown_reaches_go_as_eof(
    gopeer: StartPeer, net: Net, version: int
) -> None:
    """A pysmux client that half-closes (shutdown(SHUT_WR)) after sending a request makes
    a Go server see EOF after all the data, and can still read the whole reply."""
    size, reply = 3 * MiB + 1, reply_size(version)
    peer, sess = py_client(gopeer, net, version, ("-mode=sink", f"-reply={reply}"))
    st = sess.open_stream()
    with st:
        st.settimeout(30)
        send_pattern(st, st.id, size)  # Go does not read while we send: no deadlock
        st.shutdown(socket.SHUT_WR)
        with pytest.raises(BrokenPipeError):
            st.send(b"x")
        got = recv_to_eof(st, limit=reply)
        seen = peer.wait_for("stream")[0]
        assert (seen["bytes"], seen["sha256"], seen["err"]) == (
            size,
            pattern_sha256(st.id, size),
            None,
        ), peer.describe()
        assert seen["written"] == reply and seen["write_err"] is None, seen
        assert got == (reply, pattern_sha256(st.id, reply))
    assert sess.error is None


@VERSIONS
def test_pysmux_reset_reaches_go_as_eof_and_the_session_goes_on(
    gopeer: StartPeer, net: Net, version: int
) -> None:
    """Go smux has no stream reset: pysmux's (an empty PSH, then the FIN) reaches a Go
    server as a plain EOF after all the data, and the session carries on."""
    size = 100_000
    peer, sess = py_client(gopeer, net, version, ("-mode=sink", "-reply=0"))
    for _ in range(2):
        st = sess.open_stream()
        st.settimeout(30)
        send_pattern(st, st.id, size)
        st.reset()
        seen = peer.wait_for("stream", where=lambda e, sid=st.id: e["id"] == sid)[0]
        assert (seen["bytes"], seen["sha256"], seen["err"]) == (
            size,
            pattern_sha256(st.id, size),
            None,
        ), peer.describe()
    assert sess.error is None


@VERSIONS
def test_pysmux_server_shutdown_reaches_go_client_as_eof(
    gopeer: StartPeer, net: Net, version: int
) -> None:
    """A pysmux server that half-closes a stream a Go client opened makes the Go client
    see EOF after all the data, and still reads the reply the Go client sends after it."""
    size, reply = 3 * MiB + 1, reply_size(version)
    peer, sess = py_server(gopeer, net, version, ("-mode=readreply", f"-reply={reply}", "-hold"))
    st = sess.accept_stream(timeout=20)
    with st:
        st.settimeout(30)
        assert st.recv(1) == b"h"  # the Go client registered the stream (docs/design.md 9.1)
        with TaskGroup(sess.close) as tasks:
            reader = tasks.spawn(recv_to_eof, st, reply)
            send_pattern(st, st.id, size)
            st.shutdown(socket.SHUT_WR)
            got = reader.result(60)
        seen = peer.wait_for("stream")[0]
        assert (seen["bytes"], seen["sha256"], seen["err"]) == (
            size,
            pattern_sha256(st.id, size),
            None,
        ), peer.describe()
        assert seen["written"] == reply, seen
        assert got == (reply, pattern_sha256(st.id, reply))


# ---------------------------------------------------------------------------
# keepalive

FAST_KA = {"keepalive_interval": 0.1, "keepalive_timeout": 0.4}
GO_FAST_KA = ("-ka-interval=100ms", "-ka-timeout=400ms")


@VERSIONS
@pytest.mark.parametrize("py_role", ["client", "server"])
def test_keepalive_keeps_idle_session_up(
    gopeer: StartPeer, net: Net, version: int, py_role: str
) -> None:
    """With short keepalive settings on both ends, an idle session between pysmux and Go
    stays up across several timeout periods: each side's NOPs satisfy the other."""
    if py_role == "client":
        peer, sess = py_client(gopeer, net, version, ("-mode=echo", *GO_FAST_KA), **FAST_KA)
    else:
        peer, sess = py_server(gopeer, net, version, ("-mode=idle", *GO_FAST_KA), **FAST_KA)
    idle = 6 * FAST_KA["keepalive_timeout"]
    with pytest.raises(TimeoutError):  # the wait itself: nothing arrives, nothing ends
        sess.accept_stream(timeout=idle)
    assert not sess.closed, sess.error
    assert peer.events("session-end") == [], peer.describe()
    with sess.open_stream() as st:
        st.settimeout(10)
        ping(st)
    assert peer.events("session-end") == []


@VERSIONS
@pytest.mark.parametrize("py_role", ["client", "server"])
def test_keepalive_ends_session_with_stopped_go_peer(
    gopeer: StartPeer, net: Net, version: int, py_role: str
) -> None:
    """If the Go peer freezes (SIGSTOP: its kernel still ACKs, but no frame comes), the
    pysmux session ends within keepalive_timeout plus one interval, and a stream blocked
    in recv raises StreamResetError instead of hanging."""
    interval, timeout = 0.2, 1.0
    config = {"keepalive_interval": interval, "keepalive_timeout": timeout}
    go_ka = ("-ka-interval=200ms", "-ka-timeout=1s")
    if py_role == "client":
        peer, sess = py_client(gopeer, net, version, ("-mode=echo", *go_ka), **config)
    else:
        peer, sess = py_server(gopeer, net, version, ("-mode=idle", *go_ka), **config)
    st = sess.open_stream()
    with st:
        st.settimeout(10)
        ping(st)
        peer.send_signal(signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(pysmux.StreamResetError):
            st.recv(1)
        elapsed = time.monotonic() - t0
    # The last frame from Go arrived at most one Go interval before the stop.
    assert timeout - interval - 0.1 <= elapsed <= timeout + interval + 0.5, elapsed
    assert sess.closed
    assert "keepalive" in str(sess.error), sess.error
    with pytest.raises(pysmux.SessionClosedError):
        sess.open_stream()


# ---------------------------------------------------------------------------
# version mismatch


@pytest.mark.parametrize(("py_version", "go_version"), [(1, 2), (2, 1)], ids=["py1-go2", "py2-go1"])
@pytest.mark.parametrize("py_role", ["client", "server"])
def test_version_mismatch_is_protocol_error(
    gopeer: StartPeer, net: Net, py_version: int, go_version: int, py_role: str
) -> None:
    """Connecting a v1 end to a v2 end fails fast and clearly: the pysmux session ends
    with a ProtocolError that names both versions, and nothing hangs."""
    # Go sends a NOP after 100 ms; it stays half-alive after its own protocol error
    # (docs/design.md 9.5) and -linger keeps its connection open, so ours sees that NOP.
    go_args = ("-ka-interval=100ms", "-ka-timeout=5s", "-linger=5s")
    t0 = time.monotonic()
    if py_role == "client":
        _peer, addr = go_server(gopeer, go_version, "-mode=echo", *go_args)
        sess = net.client(net.connect(addr), version=py_version)
        st = sess.open_stream()  # Go will choke on this SYN; we on its NOP
    else:
        lsock = net.listen()
        port = lsock.getsockname()[1]
        gopeer(
            "-role=client",
            f"-version={go_version}",
            f"-addr=127.0.0.1:{port}",
            "-mode=idle",
            *go_args,
        )
        sess = net.server(net.accept(lsock), version=py_version)
        st = None
    wait_session_end(sess, timeout=10)
    assert time.monotonic() - t0 < 5
    err = sess.error
    assert isinstance(err, pysmux.ProtocolError), repr(err)
    message = err.strerror or str(err)
    assert re.search(rf"(?<!\d){py_version}(?!\d)", message), message
    assert re.search(rf"(?<!\d){go_version}(?!\d)", message), message
    if st is not None:
        st.settimeout(5)
        with pytest.raises(pysmux.SmuxError):
            st.recv(1)
        st.close()
    with pytest.raises(pysmux.SessionClosedError):
        sess.open_stream()


# ---------------------------------------------------------------------------
# the Go peer dies


@VERSIONS
@pytest.mark.parametrize("py_role", ["client", "server"])
def test_go_peer_killed_mid_transfer_resets_streams(
    gopeer: StartPeer, net: Net, version: int, py_role: str
) -> None:
    """If the Go peer dies (SIGKILL) in the middle of sending, pysmux streams deliver
    what had arrived and then raise StreamResetError: never a clean EOF, which would
    make a truncated transfer look complete."""
    nstreams = 4
    if py_role == "client":
        peer, sess = py_client(gopeer, net, version, ("-mode=writefirst", "-size=-1"))
        get_stream = sess.open_stream
    else:
        peer, sess = py_server(
            gopeer, net, version, ("-mode=send", f"-streams={nstreams}", "-size=-1")
        )
        get_stream = functools.partial(sess.accept_stream, timeout=20)
    for st, exc in read_while_killing(sess, peer, get_stream, nstreams):
        assert isinstance(exc, pysmux.StreamResetError), repr(exc)
        with pytest.raises(pysmux.StreamResetError):  # and it stays reset
            st.recv(1)
        st.close()
    wait_session_end(sess, timeout=10)


@VERSIONS
def test_go_client_abandons_streams(gopeer: StartPeer, net: Net, version: int) -> None:
    """A Go client that closes its session without closing its streams leaves a pysmux
    server with all the data it sent and then a reset (not EOF) on every stream."""
    size = 100_000
    peer, sess = py_server(gopeer, net, version, ("-mode=abandon", "-streams=8", f"-size={size}"))
    streams = [sess.accept_stream(timeout=20) for _ in range(8)]
    for st in streams:
        st.settimeout(20)
        assert recv_exactly(st, size) == pattern(st.id, size)
    peer.wait_for("abandoned")
    peer.command("close")
    for st in streams:
        with st, pytest.raises(pysmux.StreamResetError):
            st.recv(1)
    wait_session_end(sess, timeout=10)
    assert peer.wait() == 0


# ---------------------------------------------------------------------------
# many streams from a Go client


def answer_openmany(
    sess: pysmux.Session, order: list[int], until: Callable[[], bool], timeout: float = 60
) -> None:
    """Serve streams of gopeer's openmany mode (echo the 4-byte id, close) until
    ``until()`` holds. Accepted ids go to ``order``, in accept (= SYN) order."""
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, f"only {len(order)} streams in {timeout}s"
        try:
            st = sess.accept_stream(timeout=0.1)  # re-check until() at least this often
        except TimeoutError:
            continue
        order.append(st.id)
        with st:
            st.settimeout(20)
            msg = recv_exactly(st, 4)
            assert struct.unpack("<I", msg)[0] == st.id
            st.sendall(msg)


def served(peer: PeerProcess, ids: set[int], timeout: float = 30) -> None:
    """Wait until Go reported every stream in ``ids`` echoed correctly."""
    peer.wait_for(
        "stream",
        len(ids),
        timeout,
        where=lambda e: e.get("id") in ids and e["err"] is None and not e["refused"],
    )


def odd_ids(n: int) -> list[int]:
    """The ids of a Go client's first ``n`` streams."""
    return list(range(3, 3 + 2 * n, 2))


@VERSIONS
def test_out_of_order_syns_all_accepted(gopeer: StartPeer, net: Net, version: int) -> None:
    """Go opens streams from many goroutines at once and puts their SYNs on the wire out
    of id order; pysmux accepts every one of them (ids need not increase)."""
    n = 256
    # Goroutine scheduling decides the order: about 1 run in 40 comes out sorted, so
    # a run proves something only once some SYN arrived out of order (up to 4 runs).
    for _ in range(4):
        peer, sess = py_server(
            gopeer, net, version, ("-mode=openmany", f"-streams={n}", f"-workers={n}")
        )
        order: list[int] = []
        with TaskGroup(sess.close) as tasks:
            tasks.spawn(answer_openmany, sess, order, lambda got=order: len(got) == n)
        assert sorted(order) == odd_ids(n)
        summary = peer.wait_for("summary")[0]
        assert summary["ok"] == n and summary["failed"] == 0, peer.describe()
        assert not any(e.get("refused") for e in peer.events("stream"))
        assert sess.refused_streams == 0
        if any(b < a for a, b in itertools.pairwise(order)):
            return
    pytest.fail("Go sent its SYNs in order in every run: the test proved nothing")


@VERSIONS
@pytest.mark.parametrize("backlog", [None, 2000], ids=["default-backlog", "backlog-2000"])
def test_go_client_opens_2000_streams(
    gopeer: StartPeer, net: Net, version: int, backlog: int | None
) -> None:
    """A Go client opening 2,000 streams as fast as it can is served without stalling
    the session: every stream is accepted, or, only while more than accept_backlog wait
    at once, refused with a FIN; the session keeps working afterwards."""
    n = 2000
    config = {} if backlog is None else {"accept_backlog": backlog}
    peer, sess = py_server(
        gopeer,
        net,
        version,
        ("-mode=openmany", f"-streams={n}", f"-workers={n}", "-hold"),
        **config,
    )
    limit = sess.config.accept_backlog
    order: list[int] = []
    with TaskGroup(sess.close) as tasks:
        tasks.spawn(answer_openmany, sess, order, lambda: len(order) + sess.refused_streams >= n)
    accepted = set(order)
    assert len(accepted) == len(order) and accepted <= set(odd_ids(n))
    assert len(order) + sess.refused_streams == n
    assert len(order) >= min(n, limit), f"{sess.refused_streams} refused"
    served(peer, accepted)
    assert sess.error is None
    with sess.open_stream() as st:  # the session still carries data
        st.settimeout(10)
        ping(st)
    # Go sees a refusal as EOF before any byte, or never sees it at all: a Go client
    # drops frames that arrive before it registered its stream (docs/design.md 9.1).
    events = peer.events("stream")
    assert not [e for e in events if "open_err" in e], peer.describe()
    assert all(e["id"] in accepted for e in events if not e["refused"] and e["err"] is None)
    if limit >= n:  # room for all: nothing refused, and Go agrees
        assert sess.refused_streams == 0
        summary = peer.wait_for("summary")[0]
        assert summary["ok"] == n and summary["failed"] == 0, peer.describe()


@VERSIONS
def test_streams_past_accept_backlog_are_refused(gopeer: StartPeer, net: Net, version: int) -> None:
    """When more streams arrive than accept_backlog while the application does not
    accept, pysmux refuses the extra ones with a FIN instead of growing a queue or
    ending the session; the queued ones are served once accepted."""
    n, backlog = 300, 16
    peer, sess = py_server(
        gopeer,
        net,
        version,
        ("-mode=openmany", f"-streams={n}", f"-workers={n}", "-hold"),
        accept_backlog=backlog,
    )
    # Accept nothing until every SYN past the backlog was refused.
    wait_until(lambda: sess.closed or sess.refused_streams >= n - backlog, timeout=20)
    assert sess.error is None, sess.error
    assert sess.refused_streams == n - backlog
    order: list[int] = []
    answer_openmany(sess, order, lambda: len(order) == backlog)
    with pytest.raises(TimeoutError):  # nothing else was queued
        sess.accept_stream(timeout=0.2)
    accepted = set(order)
    served(peer, accepted)
    # Go saw (most) refusals as EOF before any byte; docs/design.md 9.1 says why not all.
    refused = [e["id"] for e in peer.events("stream") if e["refused"]]
    assert refused and not accepted & set(refused)
    assert sess.refused_streams == n - backlog
    assert sess.error is None
    with sess.open_stream() as st:
        st.settimeout(10)
        ping(st)
