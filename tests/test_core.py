"""The sans-I/O core on its own: every smux rule, driven by hand.

No sockets, no threads, no clock: frames are copied into the core's read
buffer (``tests/coredriver.py``), time is a number the test passes in, and what
the core wants written is taken from its control queue. The property-based
tests of the core are in ``tests/test_core_properties.py``.
"""

from __future__ import annotations

import errno

import pytest

from pysmux import ProtocolError, SessionClosedError, SmuxError, StreamResetError
from pysmux.core import StreamCore, state
from pysmux.core.inbound import ACCEPT_STALL_SECONDS
from pysmux.core.outbound import MAX_QUEUED_DATA
from pysmux.core.state import READ_BUFFER
from pysmux.core.stream import (
    INITIAL_PEER_WINDOW,
    RECV_EOF,
    RECV_OPEN,
    RECV_RESET,
    RECV_SHUT,
    SEND_OPEN,
    SEND_RESET,
    SEND_SHUT,
)
from pysmux.frame import CMD_FIN, CMD_NOP, CMD_PSH, CMD_SYN, CMD_UPD, UPD, encode_header
from tests.coredriver import (
    Wire,
    feed,
    fin,
    make,
    nop,
    psh,
    send,
    syn,
    take,
    upd,
    written,
)

pytestmark = pytest.mark.runtime_independent(reason="the sans-I/O core: no runtime, no I/O")


def accepted(core, data=b"", sid=1, version=1):
    """A core with the peer's stream ``sid`` accepted (and ``data`` received on it)."""
    feed(core, syn(sid, version) + (psh(sid, data, version) if data else b""))
    stream = core.accept()
    assert stream is not None and stream.id == sid
    return stream


# -- bytes in ------------------------------------------------------------------------


def test_frames_split_anywhere_are_applied_once_whole():
    core = make()
    data = syn(1) + psh(1, b"hello") + fin(1)
    feed(core, data, piece=1)
    stream = core.accept()
    assert stream._take(100) == b"hello"
    assert stream._recv_state == RECV_EOF
    assert core.frames_received == 3
    assert core.bytes_received == len(data)


def test_the_read_buffer_keeps_a_partial_frame_and_moves_it_to_the_front():
    core = make(max_receive_buffer=1 << 30)
    feed(core, syn(1))
    core.accept()
    big = psh(1, b"x" * 65535)
    # Fill the buffer until less than a whole frame fits behind what is there.
    sent = 0
    while READ_BUFFER - sent >= len(big):
        feed(core, big)
        sent += len(big)
    part = big[:100]
    feed(core, part)  # an incomplete frame stays in the buffer
    assert core.get_buffer().nbytes == READ_BUFFER - len(part)  # moved to the front
    feed(core, big[100:])
    assert core.streams[1]._recv_buffered == 65535 * (sent // len(big) + 1)


def test_eof_says_whether_it_cut_a_frame():
    core = make()
    assert "between frames" in str(core.eof_error())
    feed(core, psh(1, b"abc")[:5])
    error = core.eof_error()
    assert isinstance(error, SessionClosedError) and error.errno == errno.ECONNRESET
    assert "inside a frame" in str(error)


def test_a_frame_limit_leaves_the_rest_for_later():
    core = make()
    data = b"".join(syn(sid) for sid in (1, 3, 5))
    buf = core.get_buffer()
    buf[: len(data)] = data
    core.buffer_updated(len(data), 0.0)
    core.handle_frames(0.0, limit=2)
    assert core.more_frames and len(core.accept_queue) == 2
    core.handle_frames(0.0, limit=2)
    assert not core.more_frames and len(core.accept_queue) == 3
    assert core.arrivals == 3


def test_a_wrong_version_is_a_protocol_error_that_shows_the_bytes():
    core = make(version=1)
    data = b"GET / HTTP/1.1\r\n\r\n"
    with pytest.raises(ProtocolError, match="version 71 frame to a version 1 session") as info:
        feed(core, data)
    assert info.value.received == data


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (encode_header(1, 9, 0, 1), "unknown command 9"),
        (encode_header(1, CMD_UPD, 8, 1) + bytes(8), "UPD in a version 1 session"),
        (encode_header(1, CMD_SYN, 1, 1) + b"x", "SYN with a 1-byte payload"),
        (encode_header(1, CMD_FIN, 2, 1), "FIN with a 2-byte payload"),
        (encode_header(1, CMD_NOP, 3, 0), "NOP with a 3-byte payload"),
    ],
)
def test_bad_headers_are_protocol_errors(frame, message):
    with pytest.raises(ProtocolError, match=message):
        feed(make(version=1), frame)  # judged on the header: the payload may never come


def test_a_upd_of_the_wrong_length_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="UPD with length 7, not 8"):
        feed(make(version=2), encode_header(2, CMD_UPD, 7, 1))


# -- SYN -----------------------------------------------------------------------------


@pytest.mark.parametrize(("role", "sid"), [("server", 0), ("server", 2), ("client", 1)])
def test_a_syn_with_our_parity_or_id_0_is_a_protocol_error(role, sid):
    with pytest.raises(ProtocolError, match="reserved for this side"):
        feed(make(role=role), syn(sid))


def test_a_syn_for_an_open_stream_is_a_protocol_error():
    with pytest.raises(ProtocolError, match="which is open"):
        feed(make(), syn(1) + syn(1))


def test_syns_out_of_order_are_accepted_in_arrival_order():
    core = make()
    feed(core, syn(5) + syn(3))
    assert [core.accept().id, core.accept().id] == [5, 3]
    assert core.accept() is None
    assert core.streams_accepted == 2


def test_max_streams_refuses_with_a_fin():
    core = make(max_streams=1)
    feed(core, syn(1) + syn(3))
    assert [s.id for s in core.accept_queue] == [1]
    assert [(f.cmd, f.sid) for f in written(core)] == [(CMD_FIN, 3)]
    assert core.refused_streams == 1


def test_a_full_accept_queue_stalls_then_refuses_once_the_time_is_up():
    core = make(accept_backlog=1)
    feed(core, syn(1) + syn(3) + syn(5), now=10.0)
    assert core.syn_stalled and core.stall_until == 10.0 + ACCEPT_STALL_SECONDS
    assert [s.id for s in core.accept_queue] == [1]
    core.handle_frames(10.5)  # no room yet, time not up: nothing moves
    assert core.syn_stalled and len(core.accept_queue) == 1
    core.handle_frames(11.0)  # time is up: refuse from now on
    assert not core.syn_stalled and core.refusing
    assert [f.sid for f in written(core)] == [3, 5]
    assert core.accept().id == 1  # accepting welcomes new streams again
    assert not core.refusing
    feed(core, syn(7), now=12.0)
    assert core.accept().id == 7


def test_a_stalled_syn_goes_on_once_the_application_accepts():
    core = make(accept_backlog=1)
    feed(core, syn(1) + syn(3) + psh(3, b"hi"), now=0.0)
    assert core.syn_stalled
    assert core.accept().id == 1
    core.handle_frames(0.1)
    assert not core.syn_stalled and not core.refusing
    stream = core.accept()
    assert stream.id == 3 and stream._take(2) == b"hi"
    assert core.frames_received == 3  # the stalled SYN is counted once


def test_a_syn_past_the_budget_is_refused_while_writers_wait_for_a_window():
    core = make(version=2, max_receive_buffer=4, max_stream_buffer=4)
    accepted(core, b"full", version=2)
    core.window_waiters = 1  # reading past the budget for a waiting writer
    feed(core, syn(3, 2))
    assert [(f.cmd, f.sid) for f in written(core)] == [(CMD_FIN, 3)]
    core.window_waiters = 0  # without waiting writers a SYN is accepted
    feed(core, syn(5, 2))
    assert core.accept().id == 5


def test_a_syn_reusing_a_recently_closed_id_is_a_new_stream():
    core = make()
    stream = accepted(core)
    core.shut_recv(stream)
    core.shut_send(stream)
    assert 1 in core._recently_closed
    feed(core, syn(1))
    assert 1 not in core._recently_closed
    assert core.accept() is not stream


# -- FIN, PSH, NOP, UPD --------------------------------------------------------------


def test_fin_ends_the_receive_side_once():
    core = make()
    stream = accepted(core, b"data")
    core.readable.clear()
    feed(core, fin(1) + fin(1))
    assert stream._recv_state == RECV_EOF
    assert core.changed == [stream]  # the second FIN changes nothing
    assert stream._take(10) == b"data"


def test_a_stream_leaves_the_table_once_both_sides_are_done():
    core = make()
    stream = accepted(core)
    core.shut_send(stream)
    assert 1 in core.streams
    feed(core, fin(1))
    assert 1 not in core.streams and list(core._recently_closed) == [1]


def test_psh_wakes_readers_only_when_the_buffer_was_empty():
    core = make()
    stream = accepted(core)
    feed(core, psh(1, b"a") + psh(1, b"b"))
    assert core.readable == [stream]
    core.readable.clear()
    feed(core, psh(1, b"c"))
    assert core.readable == []
    assert stream._take(10) == b"abc"
    assert core.buffered == 3  # until the application says it took them


def test_psh_after_fin_or_shutdown_is_dropped_without_charging_the_budget():
    core = make()
    stream = accepted(core)
    feed(core, fin(1) + psh(1, b"late"))
    assert core.dropped_frames == 1 and core.buffered == 0
    other = accepted(core, sid=3)
    core.shut_recv(other)
    feed(core, psh(3, b"dropped"))
    assert core.dropped_frames == 2 and core.buffered == 0
    assert stream._recv_buffered == 0


def test_psh_for_an_unknown_stream_is_junk_unless_large_or_recently_closed():
    core = make(max_junk_frames_per_second=2)
    feed(core, psh(9, b"x" * 600))  # large: costs the peer as much as us
    assert core._junk == 0
    stream = accepted(core)
    core.shut_recv(stream)
    core.shut_send(stream)
    feed(core, psh(1, b"x") + fin(1))  # closed recently: not junk
    assert core._junk == 0
    feed(core, psh(9, b"x"))
    assert core._junk == 1 and core.dropped_frames == 3


def test_empty_psh_and_nop_are_junk():
    core = make(max_junk_frames_per_second=10)
    feed(core, psh(1, b"") + nop())
    assert core._junk == 2


@pytest.mark.parametrize("version", [1, 2])
def test_an_empty_psh_then_fin_is_the_peers_reset(version):
    core = make(version=version)
    stream = accepted(core, b"last", version=version)
    feed(core, psh(1, b"", version))
    assert stream._reset_marked and stream._recv_state == RECV_OPEN
    assert core._junk == 0  # the first marker on an open stream is not junk
    feed(core, psh(1, b"", version))
    assert core._junk == 1  # a second one is
    feed(core, fin(1, version))
    assert stream._recv_state == RECV_RESET and stream._send_state == SEND_RESET
    assert stream in core.changed
    assert 1 not in core.streams  # both directions are done: no FIN is owed back
    assert take(core, stream, 100) == b"last"  # data that arrived first is still read
    error = core.reset_error(stream)
    assert isinstance(error, StreamResetError) and error.errno == errno.ECONNRESET
    assert str(error) == "[Errno 104] stream 1 was reset by the peer"


def test_a_reset_after_our_own_fin_leaves_the_send_side_shut():
    core = make()
    stream = accepted(core)
    core.shut_send(stream)
    feed(core, psh(1, b"") + fin(1))
    assert stream._recv_state == RECV_RESET and stream._send_state == SEND_SHUT


def test_an_empty_psh_after_the_peers_fin_is_junk_and_changes_nothing():
    core = make()
    stream = accepted(core)
    feed(core, fin(1) + psh(1, b""))
    assert not stream._reset_marked and stream._recv_state == RECV_EOF
    assert core._junk == 1


def test_junk_past_the_limit_within_a_second_is_a_protocol_error():
    core = make(max_junk_frames_per_second=3, now=100.0)
    feed(core, nop() * 3, now=100.0)
    with pytest.raises(ProtocolError, match="more than 3 frames that carry nothing"):
        feed(core, nop(), now=100.9)


def test_the_junk_count_starts_again_after_a_second():
    core = make(max_junk_frames_per_second=3, now=100.0)
    feed(core, nop() * 3, now=100.0)
    feed(core, nop(), now=101.0)  # over the limit, but a second passed: count anew
    assert core._junk == 1
    feed(core, nop() * 2, now=101.5)
    with pytest.raises(ProtocolError, match="last: NOP"):
        feed(core, nop(), now=101.5)


def test_junk_limit_zero_turns_the_check_off():
    core = make(max_junk_frames_per_second=0)
    feed(core, nop() * 1000)
    assert core._junk == 1000


def test_fin_and_upd_for_unknown_streams_count_as_junk():
    core = make(version=2, max_junk_frames_per_second=2)
    feed(core, fin(7, 2) + upd(7, 0, 100))
    with pytest.raises(ProtocolError, match="last: FIN for an unknown stream"):
        feed(core, fin(9, 2))


def test_a_refused_syn_counts_as_junk():
    core = make(max_streams=1, max_junk_frames_per_second=1)
    feed(core, syn(1) + syn(3))
    with pytest.raises(ProtocolError, match="last: refused SYN"):
        feed(core, syn(5))


def test_v2_psh_past_the_window_is_a_protocol_error():
    core = make(version=2, max_stream_buffer=1000, max_receive_buffer=1 << 30)
    accepted(core, version=2)
    body = b"x" * 65535
    feed(core, psh(1, body, 2) * (INITIAL_PEER_WINDOW // len(body)), now=0.0)
    with pytest.raises(ProtocolError, match="overran the window of stream 1"):
        feed(core, psh(1, b"x" * (INITIAL_PEER_WINDOW % len(body) + 1), 2))


def test_v1_has_no_stream_window():
    core = make(version=1, max_receive_buffer=1 << 30)
    stream = accepted(core)
    feed(core, psh(1, b"x" * 65535) * 5)
    assert stream._recv_buffered == 5 * 65535


def test_upd_moves_the_window_and_wakes_writers():
    core = make(version=2, role="client")
    stream = core.open_stream()
    send(core, stream, b"x" * 1000)
    assert core.window(stream) == INITIAL_PEER_WINDOW - 1000
    feed(core, upd(stream.id, 1000, 5000))
    assert core.window(stream) == 5000
    assert core.changed == [stream]


def test_a_stale_upd_is_ignored():
    core = make(version=2, role="client")
    stream = core.open_stream()
    send(core, stream, b"x" * 1000)
    feed(core, upd(stream.id, 1000, 5000))
    core.changed.clear()
    feed(core, upd(stream.id, 2**32 - 10, 9))  # older than 1000, modulo 2**32
    assert core.window(stream) == 5000 and core.changed == []


def test_a_upd_acknowledging_too_much_is_a_protocol_error():
    core = make(version=2, role="client")
    stream = core.open_stream()
    send(core, stream, b"x" * 10)
    with pytest.raises(ProtocolError, match="acknowledged 11 bytes on stream 3, but only 10"):
        feed(core, upd(stream.id, 11, 100))


def test_a_huge_window_is_clamped():
    core = make(version=2, role="client")
    stream = core.open_stream()
    feed(core, upd(stream.id, 0, 2**32 - 1))
    assert core.window(stream) == 2**31 - 1


# -- the budget and reading ----------------------------------------------------------


def test_may_read_follows_the_budget():
    core = make(max_receive_buffer=4, max_stream_buffer=4)
    assert core.may_read()
    stream = accepted(core, b"abcd")
    assert not core.may_read() and not core.under_budget()
    take(core, stream, 1)
    assert core.may_read() and core.under_budget()


def test_v2_reads_past_the_budget_only_while_a_writer_waits_for_a_window():
    core = make(version=2, max_receive_buffer=4, max_stream_buffer=4)
    accepted(core, b"abcd", version=2)
    assert not core.may_read()
    core.window_waiters = 1
    assert core.may_read()


def test_too_many_unwritten_refusals_stop_reading():
    core = make(max_streams=1, max_junk_frames_per_second=0)
    feed(core, b"".join(syn(sid) for sid in range(1, 2 * 1026 + 1, 2)))
    assert core.refusals_queued == 1025 and not core.may_read()
    assert len(written(core)) == 1025  # one buffer, all the FINs
    assert core.refusals_queued == 0 and core.may_read()


def test_v2_sends_a_upd_on_the_first_read_and_after_half_the_buffer():
    core = make(version=2, max_stream_buffer=100)
    stream = accepted(core, b"x" * 100, version=2)
    assert take(core, stream, 10) == b"x" * 10
    assert [UPD.unpack(f.data) for f in written(core)] == [(10, 100)]
    take(core, stream, 40)
    assert written(core) == []  # 40 < 50 since the last UPD
    take(core, stream, 10)
    assert [UPD.unpack(f.data) for f in written(core)] == [(60, 100)]


def test_reads_while_a_upd_is_pending_share_it():
    core = make(version=2, max_stream_buffer=100)
    stream = accepted(core, b"x" * 100, version=2)
    assert core.consumed(stream, len(stream._take(60)))
    assert not core.consumed(stream, len(stream._take(40)))  # already owed: one UPD
    assert [UPD.unpack(f.data) for f in written(core)] == [(100, 100)]


def test_a_upd_for_a_stream_that_stopped_reading_is_dropped():
    core = make(version=2)
    stream = accepted(core, b"abc", version=2)
    take(core, stream, 1)
    taken_before = core.control_taken
    core.shut_recv(stream)
    assert core.take_control() == []  # nothing to write
    assert core.control_taken == taken_before + 1 and not stream._upd_pending


def test_v1_and_closed_streams_owe_no_upd():
    core = make(version=1)
    stream = accepted(core, b"abc")
    assert not core.consumed(stream, len(stream._take(3)))
    core2 = make(version=2)
    stream2 = accepted(core2, b"abc", version=2)
    feed(core2, fin(1, 2))
    assert not core2.consumed(stream2, len(stream2._take(3)))
    assert written(core2) == []


def test_shut_recv_drops_the_buffer_and_returns_the_budget():
    core = make()
    stream = accepted(core, b"abc")
    core.shut_recv(stream)
    assert stream._recv_state == RECV_SHUT and core.buffered == 0
    assert stream._recv_buffered == 0 and stream._chunks is None


# -- the receive buffer of a stream ----------------------------------------------------


def test_small_payloads_share_buffers_and_large_ones_stay_whole():
    stream = StreamCore(1)
    stream._store(memoryview(b"a" * 1024))  # large: kept as bytes
    stream._store(memoryview(b"b"))
    stream._store(memoryview(b"c"))
    assert [type(c) for c in stream._chunks] == [bytes, bytearray]
    filler = memoryview(b"d" * 1023)
    for _ in range(66):  # once a buffer holds 64 KiB, a new one starts
        stream._store(filler)
    assert [type(c) for c in stream._chunks] == [bytes, bytearray, bytearray]
    assert [len(c) for c in stream._chunks] == [1024, 2 + 65 * 1023, 1023]


def test_take_hands_out_whole_payloads_or_joins_pieces():
    stream = StreamCore(1)
    stream._store(memoryview(b"x" * 2000))
    stream._store(memoryview(b"yz"))
    first = stream._take(5000)
    assert first == b"x" * 2000 and type(first) is bytes
    assert stream._take(1) == b"y"  # a piece of a bytearray
    assert stream._take(10) == b"z"  # the rest, from an offset
    stream._store(memoryview(b"abc"))
    assert stream._take(10) == b"abc"  # a whole bytearray, converted
    assert stream._recv_buffered == 0


def test_take_into_copies_across_payloads():
    stream = StreamCore(1)
    stream._store(memoryview(b"a" * 1500))
    stream._store(memoryview(b"b" * 1500))
    out = bytearray(2000)
    assert stream._take_into(memoryview(out), 2000) == 2000
    assert out == b"a" * 1500 + b"b" * 500
    out = bytearray(5000)
    assert stream._take_into(memoryview(out), 5000) == 1000
    assert out[:1000] == b"b" * 1000 and stream._recv_buffered == 0


# -- application calls -----------------------------------------------------------------


def test_open_stream_registers_before_the_syn_goes_out():
    core = make(role="client")
    stream = core.open_stream()
    assert stream.id == 3 and core.streams[3] is stream
    assert core.open_stream().id == 5
    assert [(f.cmd, f.sid) for f in written(core)] == [(CMD_SYN, 3), (CMD_SYN, 5)]
    assert make(role="server").open_stream().id == 2


def test_open_stream_after_the_end_or_a_failed_write_raises():
    core = make(role="client")
    core.write_failed(SessionClosedError(errno.EPIPE, "broken"))
    with pytest.raises(SessionClosedError, match=r"can no longer write: .* broken"):
        core.open_stream()
    core.close(SessionClosedError(errno.ECONNABORTED, "closed"))
    with pytest.raises(SessionClosedError, match="session is closed"):
        core.open_stream()


def test_open_stream_past_the_last_id_is_a_clear_error():
    core = make(role="client")
    core._next_id = 2**32 + 1
    with pytest.raises(SmuxError, match="all 2\\*\\*32 stream ids") as info:
        core.open_stream()
    assert info.value.errno == errno.EMFILE


def test_shut_send_queues_exactly_one_fin():
    core = make(role="client")
    stream = core.open_stream()
    written(core)
    assert core.shut_send(stream)
    assert not core.shut_send(stream)
    assert stream._send_state == SEND_SHUT
    assert core.send_size(stream, 10) == 0  # no data follows the FIN
    assert [(f.cmd, f.sid) for f in written(core)] == [(CMD_FIN, stream.id)]


@pytest.mark.parametrize("version", [1, 2])
def test_shut_send_with_reset_queues_the_marker_then_the_fin_once(version):
    core = make(version=version, role="client")
    stream = core.open_stream()
    written(core)
    assert core.shut_send(stream, reset=True)
    assert not core.shut_send(stream, reset=True)
    frames = written(core)
    assert [(f.cmd, f.sid, len(f.data)) for f in frames] == [
        (CMD_PSH, stream.id, 0),
        (CMD_FIN, stream.id, 0),
    ]


def test_shut_send_after_the_end_is_a_broken_pipe_not_a_reset():
    core = make(role="client")
    stream = core.open_stream()
    core.close(SessionClosedError(errno.ECONNABORTED, "gone"))
    assert stream._send_state == SEND_RESET
    assert not core.shut_send(stream)
    assert stream._send_state == SEND_SHUT


def test_send_size_is_bounded_by_frame_size_and_window():
    core = make(version=2, role="client", max_frame_size=1000)
    stream = core.open_stream()
    assert core.send_size(stream, 5000) == 1000
    assert core.send_size(stream, 10) == 10
    feed(core, upd(stream.id, 0, 300))
    assert core.send_size(stream, 5000) == 300
    wire = send(core, stream, b"x" * 5000)
    assert len(wire) == 8 + 8 + 300  # the SYN, then the data frame
    assert core.window(stream) == 0 and core.send_size(stream, 1) == 0
    assert core.frames_sent == 2 and core.bytes_sent == len(wire)


def test_v1_window_is_never_the_limit():
    core = make(version=1, role="client")
    stream = core.open_stream()
    assert core.send_size(stream, 1 << 20) == core.config.max_frame_size


def test_queued_data_is_bounded():
    core = make(role="client", max_frame_size=65535)
    stream = core.open_stream()
    data = memoryview(b"q" * 65535)
    for _ in range(MAX_QUEUED_DATA // 65535):
        assert core.queue_data(stream, data) == 65535
    with pytest.raises(BlockingIOError) as info:
        core.queue_data(stream, data)
    assert info.value.errno == errno.EAGAIN
    frames = written(core)  # taking the queue makes room again
    assert [f.cmd for f in frames] == [CMD_SYN] + [CMD_PSH] * (MAX_QUEUED_DATA // 65535)
    assert core.queue_data(stream, data[:10]) == 10


def test_take_control_joins_frames_into_one_buffer():
    core = make(role="client")
    assert core.take_control() == []
    core.open_stream()
    assert len(core.take_control()) == 1
    core.open_stream()
    core.open_stream()
    parts = core.take_control()
    assert len(parts) == 1 and len(parts[0]) == 16
    assert core.control_taken == core.control_queued == 3


# -- time ----------------------------------------------------------------------------


def test_keepalive_off_never_needs_the_clock():
    assert make(keepalive=False).keepalive(1e9, False) is None


def test_keepalive_queues_one_nop_per_interval():
    core = make(keepalive=True, keepalive_interval=10, keepalive_timeout=30, now=0.0)
    assert core.keepalive(1.0, False) == 9.0
    assert core.keepalive(10.0, False) == 10.0
    assert [f.cmd for f in written(core)] == [CMD_NOP]
    core.last_rx = 15.0
    assert core.keepalive(20.0, False) == 10.0
    assert core.keepalive(30.0, False) == 10.0  # due, but one NOP is still queued
    assert len(core.control) == 1


def test_keepalive_ends_a_silent_session():
    core = make(keepalive=True, keepalive_interval=10, keepalive_timeout=30, now=0.0)
    feed(core, nop(), now=5.0)
    assert core.last_rx == 5.0
    with pytest.raises(SessionClosedError, match=r"nothing received for 30\.0 s") as info:
        core.keepalive(35.0, False)
    assert info.value.errno == errno.ETIMEDOUT


def test_a_paused_reader_is_not_a_silent_peer():
    core = make(keepalive=True, keepalive_interval=10, keepalive_timeout=30, now=0.0)
    assert core.keepalive(100.0, True) == 10.0
    assert core.last_rx == 100.0


# -- the end ---------------------------------------------------------------------------


def test_close_resets_what_the_peer_did_not_finish():
    core = make(role="client")
    done = core.open_stream()
    feed(core, fin(done.id))
    open_ = core.open_stream()
    core.shut_send(done)  # done leaves the table
    core.changed.clear()  # the driver acted on the FIN
    assert core.close(ProtocolError(errno.EPROTO, "bad")) == [open_]
    assert open_._recv_state == RECV_RESET and open_._send_state == SEND_RESET
    assert done._recv_state == RECV_EOF
    assert core.closed and core.protocol_errors == 1 and not core.streams
    assert core.close(SessionClosedError(errno.ECONNABORTED, "again")) is None
    assert isinstance(core.error, ProtocolError)


def test_close_returns_streams_with_events_not_acted_on():
    core = make()
    stream = accepted(core)
    core.shut_send(stream)
    feed(core, psh(1, b"x") + fin(1))  # stream leaves the table with events pending
    assert 1 not in core.streams
    woken = core.close(SessionClosedError(errno.ECONNABORTED, "closed"))
    assert stream in woken
    assert core.readable == core.changed == [] and core.arrivals == 0


def test_a_failed_write_came_first_and_is_why_the_session_ended():
    core = make(role="client", max_streams=2)
    stream = core.open_stream()
    core.shut_recv(stream)
    other = core.open_stream()
    core.shut_send(other)
    write_error = SessionClosedError(errno.EPIPE, "write failed")
    assert core.write_failed(write_error) == [stream, other]
    assert stream._send_state == SEND_RESET and other._send_state == SEND_SHUT
    assert not core.control
    assert core.write_failed(SessionClosedError(errno.EPIPE, "twice")) is None
    core.shut_send(stream)
    feed(core, syn(2))  # refused (max_streams), but its FIN can never be written
    assert core.refused_streams == 1
    assert not core.control  # nothing is queued once writing failed
    core.close(SessionClosedError(errno.ECONNRESET, "transport closed"))
    assert core.error is write_error and core.protocol_errors == 0
    assert core.write_failed(write_error) is None


def test_reset_error_names_the_cause():
    core = make()
    cause = SessionClosedError(errno.ECONNRESET, "peer went away")
    core.close(cause)
    error = core.reset_error(StreamCore(7))
    assert isinstance(error, StreamResetError) and error.__cause__ is cause
    assert "stream 7 was reset" in str(error) and "peer went away" in str(error)
    failed = make()
    failed.write_failed(cause)
    assert failed.reset_error(StreamCore(1)).__cause__ is cause


def test_check_alive():
    core = make()
    core.check_alive()
    core.close(SessionClosedError(errno.ECONNABORTED, "closed locally"))
    with pytest.raises(SessionClosedError, match="closed locally"):
        core.check_alive()


def test_recently_closed_ids_are_bounded(monkeypatch):
    monkeypatch.setattr(state, "_RECENTLY_CLOSED", 2)
    core = make()
    for sid in (1, 3, 5):
        stream = accepted(core, sid=sid)
        core.shut_recv(stream)
        core.shut_send(stream)
    assert list(core._recently_closed) == [3, 5]


def test_a_stream_not_in_the_table_is_not_unregistered_twice():
    core = make()
    stream = accepted(core)
    core.close(SessionClosedError(errno.ECONNABORTED, "closed"))
    core.shut_recv(stream)
    core.shut_send(stream)
    assert not core._recently_closed


def test_stats_and_repr():
    wire = Wire()
    stream = wire.client.open_stream()
    wire.flush()
    wire.carry(wire.client, send(wire.client, stream, b"hello"))
    peer = wire.server.accept()
    stats = wire.server.stats()
    assert stats["streams_accepted"] == 1 and stats["buffered_bytes"] == 5
    assert stats["frames_received"] == 2 and stats["bytes_received"] == 8 + 8 + 5
    assert wire.client.stats()["streams_opened"] == 1
    assert take(wire.server, peer, 5) == b"hello"
    assert repr(wire.client) == "<SessionCore client v1 open streams=1>"
    wire.server.close(SessionClosedError(errno.ECONNABORTED, "x"))
    assert repr(wire.server) == "<SessionCore server v1 closed streams=0>"


def test_two_cores_talk():
    """A whole exchange between two cores: open, data both ways, half-closes."""
    wire = Wire(version=2)
    st = wire.client.open_stream()
    wire.flush()
    peer = wire.server.accept()
    assert peer.id == st.id and peer._recv_state == RECV_OPEN
    wire.carry(wire.client, send(wire.client, st, b"ping"))
    assert take(wire.server, peer, 10) == b"ping"
    wire.flush()  # the server's UPD
    assert wire.client.window(st) == wire.server.config.max_stream_buffer
    wire.carry(wire.server, send(wire.server, peer, b"pong"))
    wire.server.shut_send(peer)
    wire.flush()
    assert take(wire.client, st, 10) == b"pong"
    assert st._recv_state == RECV_EOF and st._send_state == SEND_OPEN
    wire.client.shut_send(st)
    wire.flush()
    assert not wire.client.streams and not wire.server.streams
