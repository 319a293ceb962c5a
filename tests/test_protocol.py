"""Bad and unusual input from the peer (docs/design.md section 8).

A raw socketpair end plays the peer (a client, so its stream ids are odd) and
writes hand-made frames to a pysmux server session. PE = protocol error: the
session ends with ``Session.error`` a ``ProtocolError`` and closes its
transport, which the fake peer sees within a second.
"""

from __future__ import annotations

import contextlib
import itertools
import socket
import time

import pytest

import pysmux
from pysmux.frame import CMD_FIN, CMD_NOP, CMD_PSH, CMD_SYN, CMD_UPD, encode_header
from tests.util import recv_exact, recv_to_eof, sleep, spawn, unread_bytes, wait_until


def assert_protocol_error(session, peer, within=1.0):
    """The session ended with a ProtocolError and closed the peer's transport
    within ``within`` seconds."""
    took = peer.wait_closed(timeout=within)  # raises TimeoutError if still open
    assert took < within
    wait_until(lambda: session.closed, 1.0, "session closed")
    assert isinstance(session.error, pysmux.ProtocolError), repr(session.error)
    with pytest.raises(pysmux.SessionClosedError):
        session.accept_stream(timeout=0.1)
    with pytest.raises(pysmux.SessionClosedError):
        session.open_stream()


_fresh_ids = itertools.count(1001, 2)


def assert_alive(session, peer):
    """Frames sent so far were handled, and the session still works: a new
    stream carries data both ways. (No other stream may wait to be accepted.)"""
    sid = next(_fresh_ids)
    peer.syn(sid)
    peer.psh(sid, b"ping")
    st = session.accept_stream(timeout=5)
    assert st.id == sid
    assert recv_exact(st, 4) == b"ping"
    st.sendall(b"pong")
    assert peer.read_data(sid, 4) == b"pong"
    st.close()
    peer.expect(CMD_FIN, sid)
    peer.fin(sid)
    assert not session.closed, session.error
    assert session.error is None


def accept(session, *sids):
    got = {s.id: s for s in (session.accept_stream(timeout=5) for _ in sids)}
    assert sorted(got) == sorted(sids)
    return got[sids[0]] if len(sids) == 1 else got


# -- protocol errors ----------------------------------------------------------------


@pytest.mark.parametrize(("version", "wrong"), [(1, 2), (2, 1), (1, 0), (1, 7), (2, 255)], ids=str)
def test_wrong_version_byte(raw_session, version, wrong):
    session, peer = raw_session(version=version)
    peer.send(CMD_SYN, 3, ver=wrong)
    assert_protocol_error(session, peer)


def test_wrong_version_after_good_frames(raw_session):
    session, peer = raw_session(version=1)
    peer.syn(3)
    peer.psh(3, b"fine")
    st = accept(session, 3)
    assert recv_exact(st, 4) == b"fine"
    peer.send(CMD_PSH, 3, b"bad", ver=2)
    assert_protocol_error(session, peer)
    with pytest.raises(pysmux.StreamResetError):
        st.recv(10)


@pytest.mark.parametrize("cmd", [5, 6, 127, 255])
def test_unknown_command(raw_session, cmd):
    session, peer = raw_session()
    peer.send(cmd, 3)
    assert_protocol_error(session, peer)


def test_upd_in_v1_session(raw_session):
    session, peer = raw_session(version=1)
    peer.syn(3)
    accept(session, 3)
    peer.upd(3, 0, 65536)
    assert_protocol_error(session, peer)


@pytest.mark.parametrize("length", [0, 4, 7, 9, 16])
def test_upd_with_length_other_than_8(raw_session, length):
    session, peer = raw_session(version=2)
    peer.syn(3)
    accept(session, 3)
    peer.send(CMD_UPD, 3, b"\0" * length)
    assert_protocol_error(session, peer)


@pytest.mark.parametrize(("cmd", "sid"), [(CMD_SYN, 3), (CMD_FIN, 3), (CMD_NOP, 0)], ids=str)
@pytest.mark.parametrize("length", [1, 8, 100])
def test_syn_fin_nop_with_payload(raw_session, cmd, sid, length):
    session, peer = raw_session()
    if cmd == CMD_FIN:
        peer.syn(3)
        accept(session, 3)
    peer.send(cmd, sid, b"\0" * length)
    assert_protocol_error(session, peer)


def test_syn_for_an_open_id(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    st = accept(session, 3)
    peer.syn(3)
    assert_protocol_error(session, peer)
    with pytest.raises(pysmux.StreamResetError):
        st.recv(1)


def test_syn_for_an_id_waiting_in_the_accept_queue(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    peer.syn(3)
    assert_protocol_error(session, peer)


@pytest.mark.parametrize(
    ("role", "sid"),
    [("server", 0), ("server", 2), ("server", 4), ("client", 0), ("client", 3), ("client", 5)],
    ids=str,
)
def test_syn_with_own_parity_or_id_zero(raw_session, role, sid):
    session, peer = raw_session(role=role)
    peer.syn(sid)
    assert_protocol_error(session, peer)


def test_upd_acknowledging_more_than_was_sent(raw_session):
    session, peer = raw_session(version=2)
    peer.syn(3)
    st = accept(session, 3)
    st.sendall(b"x" * 10)
    assert peer.read_data(3, 10) == b"x" * 10
    peer.upd(3, 10, 65536)  # all of it: fine
    assert_alive(session, peer)
    peer.upd(3, 11, 65536)  # one byte more than ever sent
    assert_protocol_error(session, peer)


def test_stale_upd_is_not_an_error(raw_session):
    session, peer = raw_session(version=2)
    peer.syn(3)
    st = accept(session, 3)
    st.sendall(b"x" * 100)
    assert peer.read_data(3, 100) == b"x" * 100
    peer.upd(3, 100, 65536)
    peer.upd(3, 40, 65536)  # older than the last one: frames can cross
    assert_alive(session, peer)
    st.sendall(b"more")
    assert peer.read_data(3, 4) == b"more"


@pytest.mark.parametrize(
    "junk",
    ["nop", "empty_psh", "orphan_psh", "orphan_fin", "orphan_upd", "refused_syn"],
)
def test_flood_of_junk_frames_past_the_limit(raw_session, junk):
    limit = 100
    version = 2 if junk == "orphan_upd" else 1
    session, peer = raw_session(version=version, max_junk_frames_per_second=limit, accept_backlog=1)
    peer.syn(3)  # fills the accept backlog
    one = {
        "nop": peer.encode(CMD_NOP, 0),
        "empty_psh": peer.encode(CMD_PSH, 3),
        "orphan_psh": peer.encode(CMD_PSH, 99, b"j"),
        "orphan_fin": peer.encode(CMD_FIN, 99),
        "orphan_upd": pysmux.frame.encode_upd(2, 99, 0, 65536),
    }.get(junk)
    if one is not None:
        data = one * (20 * limit)
    else:
        data = b"".join(peer.encode(CMD_SYN, 5 + 2 * i) for i in range(20 * limit))
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        peer.send_raw(data)  # the session may hang up before reading it all
    # Refusals may start only after a grace period in which the session waits
    # for the application to make room in the accept queue (about a second).
    assert_protocol_error(session, peer, within=3.0 if junk == "refused_syn" else 1.0)


def test_junk_below_the_limit_is_fine(raw_session):
    session, peer = raw_session(max_junk_frames_per_second=100)
    peer.syn(3)
    accept(session, 3)
    peer.send_raw(peer.encode(CMD_NOP, 0) * 40 + peer.encode(CMD_PSH, 3) * 40)
    assert_alive(session, peer)


def test_protocol_error_wakes_blocked_calls(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    st = accept(session, 3)
    blocked_recv = spawn(st.recv, 10)
    blocked_accept = spawn(session.accept_stream)
    assert blocked_recv.started_call.wait(5) and blocked_accept.started_call.wait(5)
    t0 = time.monotonic()
    peer.send(99, 3)  # unknown command
    assert isinstance(blocked_recv.exception(2), pysmux.StreamResetError)
    assert isinstance(blocked_accept.exception(2), pysmux.SessionClosedError)
    assert blocked_recv.finished_at - t0 < 1.0
    assert blocked_accept.finished_at - t0 < 1.0
    assert_protocol_error(session, peer)
    with pytest.raises(pysmux.StreamResetError):
        st.send(b"x")


# -- tolerated input -------------------------------------------------------------------


def test_psh_to_unknown_stream_is_dropped_and_its_payload_consumed(raw_session):
    session, peer = raw_session()
    # Payloads that would be protocol errors if parsed as headers.
    bad_headers = encode_header(9, 99, 0, 0) * 100
    peer.psh(99, bad_headers)
    peer.psh(101, bad_headers[:13])
    peer.psh(103, b"\xff" * 65535)
    peer.syn(3)
    peer.psh(3, b"after")
    st = accept(session, 3)
    assert recv_exact(st, 5) == b"after"
    assert_alive(session, peer)


def test_fin_and_upd_for_unknown_ids_and_second_fin_are_ignored(raw_session):
    session, peer = raw_session(version=2)
    peer.fin(99)
    peer.upd(99, 12345, 65536)
    peer.fin(0)
    peer.syn(3)
    st = accept(session, 3)
    peer.psh(3, b"ab")
    peer.fin(3)
    peer.fin(3)  # a second FIN
    peer.upd(2, 0, 0)  # an id of our parity that we never opened
    assert_alive(session, peer)
    assert recv_to_eof(st) == b"ab"


def test_out_of_order_syn_ids_are_accepted(raw_session):
    session, peer = raw_session()
    for sid in (7, 3, 5, 11, 9):
        peer.syn(sid)
        peer.psh(sid, b"%d" % sid)
    got = [session.accept_stream(timeout=5) for _ in range(5)]
    assert [s.id for s in got] == [7, 3, 5, 11, 9]
    for s in got:
        assert s.recv(10) == b"%d" % s.id
    assert_alive(session, peer)


def test_syn_reusing_a_closed_id_is_accepted(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    peer.psh(3, b"first")
    peer.fin(3)
    st = accept(session, 3)
    assert recv_to_eof(st) == b"first"
    st.close()
    peer.expect(CMD_FIN, 3)
    wait_until(lambda: session.num_streams == 0, 2)
    peer.syn(3)
    peer.psh(3, b"second")
    again = accept(session, 3)
    assert again is not st
    assert recv_exact(again, 6) == b"second"
    assert_alive(session, peer)


def test_accept_backlog_overflow_is_refused_with_fin(raw_session):
    session, peer = raw_session(accept_backlog=2)
    for sid in (3, 5, 7):
        peer.syn(sid)
    peer.psh(7, b"to a refused stream")
    peer.expect(CMD_FIN, 7)
    assert not session.closed
    first, second = (session.accept_stream(timeout=5) for _ in range(2))
    assert (first.id, second.id) == (3, 5)
    with pytest.raises(TimeoutError):
        session.accept_stream(timeout=0.2)  # 7 was forgotten
    peer.syn(9)  # room again
    assert session.accept_stream(timeout=5).id == 9


def test_stream_count_cap_is_refused_with_fin(raw_session):
    session, peer = raw_session(max_streams=2)
    peer.syn(3)
    peer.syn(5)
    accept(session, 3, 5)
    peer.syn(7)
    peer.expect(CMD_FIN, 7)
    assert not session.closed
    assert session.num_streams == 2


def test_psh_after_fin_is_dropped(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    st = accept(session, 3)
    peer.psh(3, b"abc")
    peer.fin(3)
    peer.psh(3, b"after the end")  # old Go does this
    assert_alive(session, peer)
    assert recv_exact(st, 3) == b"abc"
    assert st.recv(100) == b""
    assert st.recv(100) == b""


def test_psh_with_length_zero_is_ignored(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    st = accept(session, 3)
    peer.psh(3, b"")
    assert_alive(session, peer)
    st.settimeout(0.2)
    with pytest.raises(TimeoutError):  # no data, and certainly no EOF
        st.recv(10)
    peer.psh(3, b"abc")
    st.settimeout(5)
    assert st.recv(10) == b"abc"


def test_psh_longer_than_our_max_frame_size_is_accepted(raw_session):
    session, peer = raw_session(max_frame_size=1024)
    peer.syn(3)
    data = bytes(range(256)) * 255 + b"end"  # 65283 bytes in one frame
    peer.psh(3, data)
    peer.psh(3, b"\x00" * 65535)
    st = accept(session, 3)
    assert recv_exact(st, len(data)) == data
    assert recv_exact(st, 65535) == b"\x00" * 65535


def test_frames_split_into_single_bytes(raw_session):
    session, peer = raw_session()
    wire = peer.encode(CMD_SYN, 3) + peer.encode(CMD_PSH, 3, b"x" * 50) + peer.encode(CMD_FIN, 3)
    for i in range(len(wire)):
        peer.send_raw(wire[i : i + 1])
    st = accept(session, 3)
    assert recv_to_eof(st) == b"x" * 50


def test_upd_window_zero_blocks_the_writer_until_opened(raw_session):
    session, peer = raw_session(version=2)
    peer.syn(3)
    st = accept(session, 3)
    peer.upd(3, 0, 0)
    assert_alive(session, peer)
    st.setblocking(False)
    with pytest.raises(BlockingIOError):
        st.send(b"x")
    st.settimeout(0.2)
    with pytest.raises(TimeoutError):
        st.sendall(b"x")
    peer.upd(3, 0, 100)
    st.settimeout(5)
    st.sendall(b"y" * 100)
    assert peer.read_data(3, 100) == b"y" * 100
    st.setblocking(False)
    with pytest.raises(BlockingIOError):  # 100 in flight, window 100
        st.send(b"z")
    peer.upd(3, 100, 100)
    st.settimeout(5)
    st.sendall(b"z" * 100)
    assert peer.read_data(3, 100) == b"z" * 100


def test_upd_huge_window_is_clamped_not_an_error(raw_session):
    session, peer = raw_session(version=2)
    peer.syn(3)
    st = accept(session, 3)
    peer.upd(3, 0, 0xFFFFFFFF)
    assert_alive(session, peer)
    w = spawn(st.sendall, b"q" * 300_000)  # more than the 256 KiB initial window
    assert peer.read_data(3, 300_000) == b"q" * 300_000
    w.result(5)


def test_v2_receiver_sends_upd_as_the_application_reads(raw_session):
    session, peer = raw_session(version=2, max_stream_buffer=65536)
    peer.syn(3)
    st = accept(session, 3)
    peer.psh(3, b"a" * 1000)
    assert recv_exact(st, 1000) == b"a" * 1000
    f = peer.read_frame()
    assert (f.cmd, f.sid) == (CMD_UPD, 3)
    consumed, window = pysmux.frame.UPD.unpack(f.data)
    assert (consumed, window) == (1000, 65536)  # first read: Go sends an UPD at once


# -- transport EOF ---------------------------------------------------------------------


def test_transport_eof_inside_a_frame(raw_session):
    session, peer = raw_session()
    peer.syn(3)
    peer.syn(5)
    streams = accept(session, 3, 5)
    finished, unfinished = streams[3], streams[5]
    peer.psh(3, b"abc")
    peer.fin(3)
    peer.psh(5, b"def")
    peer.send_raw(encode_header(1, CMD_PSH, 100, 5) + b"0123456789")  # truncated
    peer.sock.shutdown(socket.SHUT_WR)
    wait_until(lambda: session.closed, 2, "session sees EOF")
    assert recv_to_eof(finished) == b"abc"
    assert recv_exact(unfinished, 3) == b"def"
    with pytest.raises(pysmux.StreamResetError):
        unfinished.recv(100)
    assert peer.wait_closed(1.0) < 1.0


def test_transport_eof_between_frames(raw_session):
    session, peer = raw_session(version=2)
    peer.syn(3)
    peer.syn(5)
    streams = accept(session, 3, 5)
    finished, unfinished = streams[3], streams[5]
    peer.psh(3, b"abc")
    peer.fin(3)
    peer.psh(5, b"def")
    peer.sock.shutdown(socket.SHUT_WR)
    wait_until(lambda: session.closed, 2, "session sees EOF")
    assert not isinstance(session.error, pysmux.ProtocolError)
    assert recv_to_eof(finished) == b"abc"
    assert recv_exact(unfinished, 3) == b"def"
    with pytest.raises(pysmux.StreamResetError):
        unfinished.recv(100)


def test_window_shrinking_while_a_sender_waits_for_the_transport(raw_session):
    """v2: a sender saw room in its window, then waits for the transport (another
    stream is writing); meanwhile an UPD shrinks the window below what is in
    flight. It must wait for room, not write a frame of negative length."""
    session, peer = raw_session(role="client", version=2)
    # A send buffer smaller than a frame: the hog below then blocks in the middle of a
    # frame's write, where nobody else may write, and a partial frame shows it.
    session._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    a = session.open_stream()  # id 3
    hog_stream = session.open_stream()  # id 5
    w = spawn(a.sendall, b"x" * (262144 - 100))  # leaves 100 bytes of a's window
    assert peer.read_data(3, 262144 - 100) == b"x" * (262144 - 100)
    w.result(5)

    hog = spawn(hog_stream.sendall, b"h" * 262144)  # more than the socket buffer holds
    frame_bytes = pysmux.frame.HEADER_SIZE + session.config.max_frame_size
    last = [-1]

    def hog_blocked():
        # The peer's unread byte count stopped growing inside a frame. (At a frame
        # boundary the hog could be between two writes, and the fair write path would
        # rightly let the sender's frame go in between.)
        now = unread_bytes(peer.sock)
        stable, last[0] = now == last[0] and now % frame_bytes != 0, now
        return stable

    wait_until(hog_blocked, 5, "the hog blocks inside a transport write")
    sender = spawn(a.send, b"y" * 50)  # room in the window: waits for the transport only
    assert sender.started_call.wait(5)

    peer.upd(3, 1000, 1000)  # in flight 261044, window 1000: no room any more
    peer.syn(2)  # barrier: once stream 2's data is read, the UPD was handled
    peer.psh(2, b"sync")
    sync = session.accept_stream(timeout=5)
    assert recv_exact(sync, 4) == b"sync"
    assert sender.is_alive(), f"send did not wait for the busy transport: {sender.exc!r}"

    assert peer.read_data(5, 262144) == b"h" * 262144  # the transport frees up
    hog.result(5)
    # The transport is free now; what the session writes next is stream 2's reply, and
    # read_data fails on a data frame of stream 3 before it: the sender wrote nothing.
    sync.sendall(b"ack")
    assert peer.read_data(2, 3) == b"ack"
    assert sender.is_alive(), f"send did not wait for window room: {sender.exc!r}"
    peer.upd(3, 262144 - 100, 65536)  # everything read: room again
    assert sender.result(5) == 50
    assert peer.read_data(3, 50) == b"y" * 50
    assert session.error is None


@pytest.mark.parametrize("version", [1], ids=["v1"])
def test_peer_ignoring_flow_control_cannot_make_the_session_buffer_more(raw_session, version):
    """A v1 peer that pushes data nobody reads is stopped by the session budget:
    the session stops reading the transport. (In v2 the stream window stops it
    first, with a ProtocolError: test_flow.py's window-overrun test.)"""
    budget = 1 << 20
    session, peer = raw_session(version=version, max_receive_buffer=budget)
    peer.syn(3)
    st = accept(session, 3)
    frame_bytes = peer.encode(CMD_PSH, 3, b"f" * 32768)
    peer.sock.setblocking(False)
    pushed = 0
    idle_polls = 0
    for _ in range(100_000):
        try:
            pushed += peer.sock.send(frame_bytes)
            idle_polls = 0
        except BlockingIOError:
            idle_polls += 1
            if idle_polls >= 20:  # nothing went in for ~200 ms: the session stopped reading
                break
            sleep(0.01)  # polling a full non-blocking socket
        assert pushed < 64 << 20, "the session keeps reading unread data without a bound"
    else:
        raise AssertionError("never stopped")
    peer.sock.setblocking(True)
    buffered_bound = budget + 4 * 65536 + (2 << 20)  # budget + one read + socket buffers
    assert pushed < buffered_bound, pushed
    # Nothing is lost: read it all back (only whole frames count as sent).
    whole = pushed // len(frame_bytes) * 32768
    partial = pushed % len(frame_bytes)
    if partial:
        peer.send_raw(frame_bytes[partial:])
        whole += 32768
    assert recv_exact(st, whole) == b"f" * whole
    assert session.error is None
