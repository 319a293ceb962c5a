"""Sessions over a transport that misbehaves (``tests/faults.py``): tiny and
random short reads and writes, a cut at every byte offset of a short
conversation in both directions, failing reads and writes, and a peer that
never reads.

What must hold whatever the transport does: every call returns or raises a
documented error within a bound; a stream delivers exactly the data of the
frames that reached its session, in order; ``recv`` returns ``b""`` only if
the peer's FIN reached the session, and raises ``StreamResetError`` instead
otherwise; nothing is left running.
"""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import pysmux
from pysmux.frame import CMD_NAMES, HEADER_SIZE
from tests.faults import (
    Cut,
    FaultySocket,
    Splice,
    one_byte,
    seeded_sizes,
    session_runtime,
    stream_view,
)
from tests.rawpeer import parse_frames
from tests.runtimes import current
from tests.util import payload, recv_exact, recv_to_eof, sha256, socketpair, spawn, wait_until

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
REQUEST = b"hello, server"
REPLY = b"hello yourself, client"
#: Bound on any one call in a conversation; a healthy one takes milliseconds.
CALL_TIMEOUT = 5.0
#: Errors a stream call may raise once the transport failed.
DOCUMENTED = (pysmux.SmuxError, BrokenPipeError)


# -- building sessions on faulty transports --------------------------------------------


@dataclass
class Link:
    """A client and a server session, and what the faults in between let through."""

    client: Any
    server: Any
    #: Bytes the client sent that reached the server session, and the reverse.
    to_server: Callable[[], bytes]
    to_client: Callable[[], bytes]
    #: True once the connection was cut.
    was_cut: Callable[[], bool]
    closers: list[Callable[[], None]] = field(default_factory=list)
    #: The client's and the server's transport.
    transports: tuple[Any, Any] = (None, None)

    def both_closed(self) -> bool:
        return bool(self.client.closed and self.server.closed)

    def close(self) -> None:
        for session in (self.client, self.server):
            session.close()
        for close in self.closers:
            close()


@pytest.fixture
def link(runtime: str) -> Iterator[Callable[..., Link]]:
    """Factory: ``link(version, wrap="client"|"server"|"both", **faults)`` -> a
    :class:`Link` over a socketpair; the chosen ends get a ``FaultySocket``
    with ``faults``. Everything is closed at teardown."""
    made: list[Link] = []

    def make(version: int = 1, wrap: str = "client", **faults: Any) -> Link:
        a, b = socketpair()
        ct = FaultySocket(a, **faults) if wrap in ("client", "both") else a
        st = FaultySocket(b, **faults) if wrap in ("server", "both") else b
        cfg = pysmux.Config(version=version, keepalive=False)
        rt = session_runtime(runtime)
        client = server = None
        try:
            client = pysmux.client(ct, config=cfg, runtime=rt)
            server = pysmux.server(st, config=cfg, runtime=rt)
        except BaseException:
            if client is not None:
                client.close()
            a.close()
            b.close()
            raise
        faulty = ct if isinstance(ct, FaultySocket) else st
        if faulty is ct:
            to_server, to_client = (lambda: bytes(ct.written)), (lambda: bytes(ct.delivered))
        else:
            to_server, to_client = (lambda: bytes(st.delivered)), (lambda: bytes(st.written))
        lk = Link(client, server, to_server, to_client, lambda: faulty.broken, [a.close, b.close])
        lk.transports = (ct, st)
        made.append(lk)
        return lk

    yield make
    for lk in reversed(made):
        lk.close()


# -- the scripted conversation ---------------------------------------------------------


@dataclass
class End:
    """What one end of the conversation saw."""

    stream_id: int | None = None
    got: bytearray = field(default_factory=bytearray)
    eof: bool = False
    errors: dict[str, BaseException] = field(default_factory=dict)


def read_all(st: Any, end: End) -> None:
    while True:
        try:
            chunk = st.recv(7)  # small reads: several per frame
        except OSError as exc:
            end.errors["recv"] = exc
            return
        if not chunk:
            end.eof = True
            return
        end.got += chunk


def client_side(session: Any) -> End:
    """Open a stream, send the request, half-close, read the reply, close."""
    end = End()
    try:
        st = session.open_stream()
    except OSError as exc:
        end.errors["open"] = exc
        return end
    end.stream_id = st.id
    st.settimeout(CALL_TIMEOUT)
    try:
        st.sendall(REQUEST)
    except OSError as exc:
        end.errors["send"] = exc
    try:
        st.shutdown(socket.SHUT_WR)
    except OSError as exc:
        end.errors["shutdown"] = exc
    read_all(st, end)
    st.close()
    return end


def server_side(session: Any) -> End:
    """Accept, read the request to EOF, send the reply, close."""
    end = End()
    try:
        st = session.accept_stream(timeout=CALL_TIMEOUT)
    except OSError as exc:
        end.errors["accept"] = exc
        return end
    end.stream_id = st.id
    st.settimeout(CALL_TIMEOUT)
    read_all(st, end)
    try:
        st.sendall(REPLY)
    except OSError as exc:
        end.errors["send"] = exc
    st.close()
    return end


def converse(lk: Link) -> tuple[End, End]:
    t0 = time.monotonic()
    server = spawn(server_side, lk.server, name="conversation-server")
    client_end = client_side(lk.client)
    server_end = server.result(CALL_TIMEOUT * 2)
    took = time.monotonic() - t0
    assert took < CALL_TIMEOUT, f"the conversation took {took:.1f}s: something waited for a timeout"
    return client_end, server_end


def check_frames(log: bytes, version: int, what: str) -> None:
    """A session writes only well-formed frames of its version, even when cut."""
    frames, _ = parse_frames(log)
    for f in frames:
        assert f.ver == version and f.cmd in CMD_NAMES, f"{what}: bad frame {f!r}"


def died_writing(session: Any) -> bool:
    """The session ended because a transport write failed."""
    error = session.error
    return isinstance(error, pysmux.SessionClosedError) and error.errno == errno.EPIPE


def check_end(end: End, session: Any, sent: bytes, arrived: bytes, who: str, first: str) -> None:
    """``end`` read the data of the complete frames of its stream in ``arrived``
    (the bytes that reached its session), and EOF only if the peer's FIN was
    among them. ``first`` is the step that gets the stream.

    Exactly that data, and EOF whenever the FIN arrived, unless the session
    ended because a write failed: it then stops reading at once, and frames
    that arrived but were not read yet are lost (see
    ``test_write_failure_keeps_frames_already_received``).
    """
    for step, exc in end.errors.items():
        assert isinstance(exc, DOCUMENTED), f"{who} {step}: undocumented {exc!r}"
        assert not isinstance(exc, TimeoutError), f"{who} {step} timed out: {exc!r}"
    view = stream_view(arrived, 3)
    assert sent.startswith(view.data), f"{who}: the peer put data on the wire it never sent"
    if end.stream_id is None:
        assert isinstance(end.errors.get(first), pysmux.SessionClosedError), end.errors
        return
    assert end.stream_id == 3
    assert view.syn or who == "client", "the server accepted a stream whose SYN never arrived"
    got = bytes(end.got)
    if end.eof:
        assert view.fin, f"{who}: recv returned EOF, but the peer's FIN never arrived"
    else:
        assert isinstance(end.errors.get("recv"), pysmux.StreamResetError), end.errors
    if died_writing(session):
        assert view.data.startswith(got), f"{who} read {got!r}, not a prefix of {view.data!r}"
        return
    assert got == view.data, f"{who} read {got!r}; the frames that reached it carried {view.data!r}"
    assert end.eof or not view.fin, f"{who}: the peer's FIN arrived but recv did not return EOF"


def check_conversation(lk: Link, client_end: End, server_end: End, version: int, cut: bool):
    to_server, to_client = lk.to_server(), lk.to_client()
    check_frames(to_server, version, "client")
    check_frames(to_client, version, "server")
    check_end(server_end, lk.server, REQUEST, to_server, "server", "accept")
    check_end(client_end, lk.client, REPLY, to_client, "client", "open")
    if not cut:
        assert not client_end.errors and not server_end.errors
        assert (bytes(server_end.got), bytes(client_end.got)) == (REQUEST, REPLY)


def run_faults(make: Callable[[int], Link], version: int, what: str) -> int:
    """Run the conversation on ``make(0)``, ``make(1)``, ... until the fault of
    one of them never fires; return that index."""
    for index in range(10_000):
        lk = make(index)
        try:
            client_end, server_end = converse(lk)
            faulted = lk.was_cut()
            if faulted:  # the fault alone must end both sessions
                wait_until(lk.both_closed, 2, "both sessions end")
        finally:
            lk.close()
        try:
            check_conversation(lk, client_end, server_end, version, faulted)
        except AssertionError as exc:
            raise AssertionError(f"{what} {index}: {exc}") from exc
        if not faulted:
            return index
    raise AssertionError("the fault always fired")


# -- cuts at every byte offset -----------------------------------------------------------


@VERSIONS
@pytest.mark.parametrize("mode", ["eof", "reset"])
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("side", ["client", "server"])
def test_cut_at_every_offset(link, side, direction, mode, version):
    """The connection dies after every possible number of bytes, in each
    direction, with an EOF or a reset, as seen by the client or the server."""

    uncut_at = run_faults(
        lambda at: link(version, wrap=side, cut=Cut(direction, at, mode)),
        version,
        f"{mode} cut of the {direction}s at byte",
    )
    # Each way carries at least a data frame and a FIN: every offset up to there was cut.
    assert uncut_at >= 2 * HEADER_SIZE + min(len(REQUEST), len(REPLY))


@VERSIONS
@pytest.mark.parametrize("mode", ["eof", "reset"])
@pytest.mark.parametrize("direction", ["read", "write"])
def test_cut_at_every_offset_between_real_sockets(runtime, direction, mode, version):
    """As above with both sessions on real TCP sockets (on threads, stream
    readers then read the transport themselves) and the cut in a splice
    between them; ``reset`` cuts with an RST."""
    harness = current()
    cfg = pysmux.Config(version=version, keepalive=False)
    listener = harness.listen()

    def connect() -> tuple[Any, Any]:
        near = harness.connect(listener.getsockname(), timeout=5)
        far, _ = listener.accept()
        near.settimeout(None)
        far.settimeout(None)
        return near, far

    def make(at: int) -> Link:
        c_sock, splice_a = connect()
        s_sock, splice_b = connect()
        splice = Splice(splice_a, splice_b, Cut(direction, at, mode))
        client = pysmux.client(c_sock, config=cfg, runtime=runtime)
        server = pysmux.server(s_sock, config=cfg, runtime=runtime)
        return Link(
            client,
            server,
            lambda: bytes(splice.a_to_b),
            lambda: bytes(splice.b_to_a),
            lambda: splice.broken,
            [splice.close, c_sock.close, s_sock.close],
        )

    with listener:
        run_faults(make, version, f"{mode} cut of the client's {direction}s at byte")


# -- failing calls --------------------------------------------------------------------

#: What a transport call may raise. (Each call gets a fresh exception.)
TRANSPORT_ERRORS: list[Callable[[], OSError]] = [
    lambda: BrokenPipeError(errno.EPIPE, "Broken pipe"),
    lambda: ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
    lambda: OSError(errno.EIO, "Input/output error"),
    lambda: TimeoutError(errno.ETIMEDOUT, "timed out"),
    lambda: BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
    lambda: OSError(errno.ENOBUFS, "No buffer space available"),
]


@VERSIONS
@pytest.mark.parametrize("direction", ["read", "write"])
@pytest.mark.parametrize("side", ["client", "server"])
def test_failing_transport_call(link, side, direction, version):
    """The 1st, 2nd, ... read (or write) of one end's transport raises an
    OSError: the session ends with SessionClosedError, the other end sees
    the transport close, and every stream call ends with a documented error."""

    def make(call: int) -> Link:
        error = TRANSPORT_ERRORS[call % len(TRANSPORT_ERRORS)]()
        lk = link(version, wrap=side, **{f"{direction}_error": (call + 1, error)})
        faulty = lk.transports[0 if side == "client" else 1]
        lk.was_cut = lambda: getattr(faulty, f"{direction}_calls") > call
        return lk

    run_faults(make, version, f"failing {direction} call number")


# -- short reads and writes -------------------------------------------------------------


def exchange(lk: Link, streams: int, size: int, seed: int) -> None:
    """Client and server send each other ``size`` seeded bytes on each of
    ``streams`` streams at once, half-close, and check what they read."""

    def run_end(st: Any, data: bytes, expect: bytes) -> None:
        st.settimeout(30)
        sender = spawn(lambda: (st.sendall(data), st.shutdown(socket.SHUT_WR)))
        got = recv_to_eof(st)
        sender.result(30)
        assert sha256(got) == sha256(expect), f"stream {st.id}: {len(got)} of {len(expect)} bytes"
        st.close()

    def server_run() -> None:
        workers = []
        for _ in range(streams):
            st = lk.server.accept_stream(timeout=10)
            i = (st.id - 3) // 2
            mine, theirs = payload(size, seed + 100 + i), payload(size, seed + i)
            workers.append(spawn(run_end, st, mine, theirs))
        for w in workers:
            w.result(60)

    server = spawn(server_run)
    client_streams = [lk.client.open_stream() for _ in range(streams)]
    workers = [
        spawn(run_end, st, payload(size, seed + i), payload(size, seed + 100 + i))
        for i, st in enumerate(client_streams)
    ]
    for w in workers:
        w.result(60)
    server.result(60)
    assert lk.client.error is None and lk.server.error is None


@VERSIONS
def test_one_byte_reads_and_writes(link, version):
    lk = link(version, wrap="both", read_sizes=one_byte, write_sizes=one_byte)
    exchange(lk, streams=3, size=3000, seed=1)
    for t in lk.transports:
        assert max(t.read_calls, t.write_calls) > 9000  # it did go byte by byte


@VERSIONS
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_short_reads_and_writes(link, version, seed):
    # v2: 300 kB per stream need window updates (256 KiB before the first UPD).
    lk = link(
        version,
        wrap="both",
        read_sizes=seeded_sizes(seed, 3000),
        write_sizes=seeded_sizes(seed + 50, 3000),
    )
    exchange(lk, streams=3, size=300_000, seed=seed)


@pytest.mark.parametrize("sendmsg", ["no", "unsupported"])
@VERSIONS
def test_transport_without_sendmsg(link, version, sendmsg):
    """Transports without a (working) sendmsg, such as TLS sockets, get whole
    frames through sendall."""
    lk = link(version, wrap="both", sendmsg=sendmsg, write_sizes=seeded_sizes(7, 5000))
    exchange(lk, streams=2, size=100_000, seed=9)


# -- a peer that never reads --------------------------------------------------------------


@VERSIONS
def test_stalled_transport_blocks_neither_reads_nor_close(link, version):
    """The server stops reading: the client's transport writes block. Other
    streams still receive (v2: the window updates they owe queue up, they do
    not block recv; so the server can send one window), and close() ends
    everything at once."""
    lk = link(version, wrap="client")
    faulty = lk.transports[0]
    writing, reading = lk.client.open_stream(), lk.client.open_stream()
    reading.sendall(b"x")
    writing.sendall(b"x")
    peer_reading, peer_writing = (lk.server.accept_stream(timeout=5) for _ in range(2))
    faulty.stall()
    stuck = spawn(writing.sendall, b"w" * 100_000)
    wait_until(lambda: faulty.stalled_writes, 5, "a write stalls")
    peer_writing.settimeout(5)
    for i in range(8):  # 240 kB, within the 256 KiB a v2 sender may send before an UPD
        data = payload(30_000, i)
        peer_writing.sendall(data)
        assert recv_exact(reading, len(data)) == data
    assert stuck.is_alive()
    t0 = time.monotonic()
    lk.client.close()
    assert time.monotonic() - t0 < 1.0
    assert isinstance(stuck.exception(1), pysmux.StreamResetError)
    assert stuck.finished_at - t0 < 1.0
    assert peer_reading.recv(10) == b"x"


@pytest.mark.parametrize(
    ("transport", "version"),
    # v2's window stops a sender before an unread socketpair fills up: v1 only there.
    [("stalled wrapper", 1), ("stalled wrapper", 2), ("unread socketpair", 1)],
    ids=str,
)
def test_send_timeout_bounds_a_write_stuck_in_the_transport(link, transport, version):
    """A stream's timeout bounds ``sendall`` as a socket's does, also while the
    transport write under it cannot progress (keepalive off, so nothing else
    ends the session)."""
    lk = link(version, wrap="client")
    st = lk.client.open_stream()
    st.sendall(b"x")
    lk.server.accept_stream(timeout=5)
    if transport == "stalled wrapper":
        lk.transports[0].stall()
        data = b"y" * 1000
    else:
        data = b"y" * (8 << 20)  # more than the peer session's budget and the socket buffers
    st.settimeout(0.3)

    def send_until_timeout() -> None:
        # A frame the transport has not taken yet is committed to the session
        # (its writer task finishes it), as a socket's kernel buffer takes bytes:
        # a small sendall may return. The next one finds the transport still
        # held and times out.
        for _ in range(3):
            st.sendall(data)

    t0 = time.monotonic()
    sender = spawn(send_until_timeout)
    sender.join(2.5)
    assert not sender.is_alive(), "sendall with a 0.3 s timeout still blocked after 2.5 s"
    assert isinstance(sender.exc, TimeoutError), repr(sender.exc)
    assert sender.finished_at - t0 < 3 * 0.3 + 0.5


@VERSIONS
def test_write_failure_keeps_frames_already_received(link, version):
    """The peer replies, half-closes and goes away; our next write fails with
    EPIPE before our reader got to the reply. A socket still returns data that
    arrived before a failed send; a stream must too, then EOF (Go's session
    also keeps reading after a write error)."""
    lk = link(version, wrap="client")
    faulty = lk.transports[0]
    st = lk.client.open_stream()
    st.sendall(b"request")
    peer = lk.server.accept_stream(timeout=5)
    assert recv_exact(peer, 7) == b"request"
    faulty.hold_reads()  # our reader is slow from here on
    peer.sendall(b"reply")
    peer.close()
    lk.server.close()  # the peer goes away (its FIN is written first)
    faulty.fail_writes()
    with pytest.raises(OSError):
        st.sendall(b"more")  # the write fails
    faulty.release_reads()  # the reply and the FIN were in the socket all along
    st.settimeout(5)
    assert recv_to_eof(st) == b"reply"
