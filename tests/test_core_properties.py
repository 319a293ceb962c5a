"""Properties of the sans-I/O core, checked by Hypothesis without any I/O.

* Whatever a peer sends, in whatever pieces, the core does what the reference
  model of ``tests/test_hostile_peer.py`` (the protocol's rules as the README
  states them) says: the same model the socket-level suite checks a whole
  session against, here applied to the core alone and many more times.
* A stream's receive buffer gives back exactly the bytes it was given, in
  order, however they are stored and taken.
* Version 2 flow control: the first read sends a UPD, every UPD acknowledges
  exactly what was read, and after the control queue is written the peer is
  never more than half a window behind.
* Two cores back to back (``tests/coredriver.py``), driven by a random
  application on each end through a byte pipe in each direction: every byte
  arrives once, in order, on the right stream; half-closes arrive after the
  data; windows and the budget are respected; nobody breaks the protocol.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from pysmux import ProtocolError
from pysmux.core import StreamCore
from pysmux.core.stream import INITIAL_PEER_WINDOW, RECV_EOF, RECV_OPEN, RECV_SHUT, SEND_OPEN
from pysmux.frame import CMD_FIN, CMD_PSH, CMD_UPD, UPD
from tests.coredriver import feed, make, psh, send, syn, take, written
from tests.fuzzing import examples
from tests.rawpeer import parse_frames
from tests.test_hostile_peer import configs, expect, frame_sequences

pytestmark = pytest.mark.runtime_independent(reason="the sans-I/O core: no runtime, no I/O")

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
ROLES = pytest.mark.parametrize("role", ["server", "client"])


# -- a peer's frames against the reference model ---------------------------------------


def run_model(role: str, version: int, data: Any, wire: bytes) -> None:
    cfg = data.draw(configs(version), label="config")
    core = make(version, role, **_fields(cfg))
    pieces = data.draw(st.lists(st.integers(1, 300), max_size=20), label="pieces")
    got: dict[int, bytearray] = {}
    current: dict[int, Any] = {}  # an id used again after a reset is a new stream
    order: list[int] = []
    error: ProtocolError | None = None
    view = memoryview(wire)
    try:
        while view:
            size = pieces.pop() if pieces else len(view)
            feed(core, bytes(view[:size]))
            view = view[size:]
            # The application accepts every stream and reads everything at once.
            while (stream := core.accept()) is not None:
                order.append(stream.id)
                current[stream.id] = stream
                got[stream.id] = bytearray()
            for stream in core.readable:
                while stream._recv_buffered:
                    data_read = take(core, stream, stream._recv_buffered)
                    if current[stream.id] is stream:
                        got[stream.id] += data_read
            core.readable.clear()
    except ProtocolError as exc:
        error = exc
    model = expect(wire, cfg, role)
    assert (error is not None) == model.protocol_error, (error, model)
    if error is not None:
        return
    assert order == model.accepted
    assert got == model.data
    # The application never closes a stream: only the peer's reset ends one.
    eof = {sid for sid, stream in core.streams.items() if stream._recv_state == RECV_EOF}
    assert eof == model.fin
    assert set(order) - set(core.streams) == model.reset
    refused = [f.sid for f in written(core) if f.cmd == CMD_FIN]
    assert refused == model.refused
    assert core.eof_error().strerror.endswith(
        "(inside a frame)" if model.truncated else "(between frames)"
    )


def _fields(cfg: Any) -> dict[str, Any]:
    return {
        name: getattr(cfg, name)
        for name in (
            "max_receive_buffer",
            "max_stream_buffer",
            "max_streams",
            "max_junk_frames_per_second",
        )
    }


@ROLES
@VERSIONS
@settings(max_examples=examples(100))
@given(data=st.data())
def test_frame_sequences_follow_the_model(role, version, data):
    run_model(role, version, data, data.draw(frame_sequences(version, role), label="wire"))


@ROLES
@VERSIONS
@settings(max_examples=examples(100))
@given(data=st.data())
def test_mutated_frame_sequences_follow_the_model(role, version, data):
    wire = bytearray(data.draw(frame_sequences(version, role), label="wire"))
    for _ in range(data.draw(st.integers(1, 3)) if wire else 0):
        wire[data.draw(st.integers(0, len(wire) - 1))] = data.draw(st.integers(0, 255))
    run_model(role, version, data, bytes(wire))


@ROLES
@VERSIONS
@settings(max_examples=examples(100))
@given(data=st.data())
def test_arbitrary_bytes_follow_the_model(role, version, data):
    sid = 1 if role == "server" else 2
    prefix = data.draw(st.sampled_from([b"", syn(sid, version) + psh(sid, b"hi", version)]))
    run_model(role, version, data, prefix + data.draw(st.binary(max_size=300), label="bytes"))


# -- a stream's receive buffer ----------------------------------------------------------


@settings(max_examples=examples(300))
@given(
    payloads=st.lists(st.binary(min_size=1, max_size=3000), max_size=40),
    takes=st.lists(st.tuples(st.integers(1, 5000), st.booleans()), max_size=60),
)
def test_the_receive_buffer_gives_back_what_it_got(payloads, takes):
    stream = StreamCore(1)
    for body in payloads:
        stream._store(memoryview(body))
    expected = b"".join(payloads)
    assert stream._recv_buffered == len(expected)
    out = bytearray()
    for size, into in takes:
        if not stream._recv_buffered:
            break
        if into:
            buf = bytearray(size)
            count = stream._take_into(memoryview(buf), size)
            out += buf[:count]
        else:
            chunk = stream._take(size)
            assert 1 <= len(chunk) <= size
            out += chunk
        assert stream._recv_buffered == len(expected) - len(out)
    assert bytes(out) == expected[: len(out)]


# -- version 2: when UPDs go out -------------------------------------------------------


@settings(max_examples=examples(300))
@given(
    window=st.sampled_from([2, 100, 4096, 65536]),
    steps=st.lists(st.tuples(st.integers(1, 70000), st.booleans()), min_size=1, max_size=40),
)
def test_upds_acknowledge_what_was_read_and_never_lag_half_a_window(window, steps):
    core = make(2, "server", max_stream_buffer=window, max_receive_buffer=1 << 30)
    feed(core, syn(1, 2))
    stream = core.accept()
    total = acked = 0
    first = True
    for size, write in steps:
        body = b"x" * min(size, 65535, INITIAL_PEER_WINDOW - stream._recv_buffered)
        if body:
            feed(core, psh(1, body, 2))
        taken = take(core, stream, size)
        total += len(taken)
        if write or first:
            upds = [f for f in written(core) if f.cmd == CMD_UPD]
            if first and taken:
                assert upds, "the first read sends a UPD"
                first = False
            assert len(upds) <= 1
            for f in upds:
                consumed, advertised = UPD.unpack(f.data)
                assert consumed == total and advertised == window
                acked = consumed
            assert total - acked < max(1, window // 2)


# -- two cores back to back --------------------------------------------------------------


class Pair:
    """One stream as both ends see it, and what the model expects of it."""

    def __init__(self, opener: str, stream: StreamCore) -> None:
        self.ends: dict[str, StreamCore | None] = {"client": None, "server": None}
        self.ends[opener] = stream
        self.id = stream.id
        self.sent = {"client": bytearray(), "server": bytearray()}
        self.got = {"client": bytearray(), "server": bytearray()}
        self.shut_wr = {"client": False, "server": False}
        self.shut_rd = {"client": False, "server": False}


OTHER = {"client": "server", "server": "client"}
SIDES = st.sampled_from(["client", "server"])


class TwoCores(RuleBasedStateMachine):
    """A random application on each end of two cores joined by byte pipes."""

    pairs = Bundle("pairs")

    @initialize(
        version=st.sampled_from([1, 2]),
        frame=st.sampled_from([1, 7, 1000, 32768]),
        window=st.sampled_from([1, 1000, 65536]),
        budget=st.sampled_from([1000, 70000, 4 << 20]),
    )
    def start(self, version: int, frame: int, window: int, budget: int) -> None:
        window = min(window, budget)
        fields = {
            "max_frame_size": frame,
            "max_stream_buffer": window,
            "max_receive_buffer": budget,
            "max_junk_frames_per_second": 0,
        }
        self.version = version
        self.cores = {side: make(version, side, **fields) for side in ("client", "server")}
        self.pipes = {"client": bytearray(), "server": bytearray()}  # written, not delivered
        self.by_id: dict[int, Pair] = {}

    def write_control(self, side: str) -> None:
        self.pipes[side] += b"".join(self.cores[side].take_control())

    @rule(target=pairs, side=SIDES)
    def open(self, side: str) -> Pair:
        stream = self.cores[side].open_stream()
        pair = self.by_id[stream.id] = Pair(side, stream)
        return pair

    @rule(side=SIDES)
    def control(self, side: str) -> None:
        self.write_control(side)

    @rule(pair=pairs, side=SIDES, data=st.binary(min_size=1, max_size=5000))
    def send(self, pair: Pair, side: str, data: bytes) -> None:
        """One data frame (as much as the window and frame size allow)."""
        stream = pair.ends[side]
        if stream is None or stream._send_state != SEND_OPEN:
            return
        wire = send(self.cores[side], stream, data)
        if wire:
            frames, rest = parse_frames(wire)
            assert rest == b"" and frames[-1].cmd == CMD_PSH and frames[-1].sid == stream.id
            assert data.startswith(frames[-1].data)
            pair.sent[side] += frames[-1].data
            self.pipes[side] += wire

    @rule(side=SIDES, size=st.integers(1, 100_000))
    def deliver(self, side: str, size: int) -> None:
        """The other end reads up to ``size`` bytes of what ``side`` wrote, in
        reads of at most 64 KiB, while its core lets anyone read."""
        dst = self.cores[OTHER[side]]
        pipe = self.pipes[side]
        before = {s.id: s._recv_buffered for s in self.streams(OTHER[side])}
        while pipe and size > 0 and dst.may_read():
            chunk = bytes(pipe[: min(size, 65536)])
            del pipe[: len(chunk)]
            size -= len(chunk)
            feed(dst, chunk)
        # The readable event names exactly the streams that got their first bytes.
        known = [*self.streams(OTHER[side]), *dst.accept_queue]
        assert {s.id for s in dst.readable} == {
            s.id for s in known if s._recv_buffered and not before.get(s.id)
        }
        dst.readable.clear()
        dst.changed.clear()
        while (stream := dst.accept()) is not None:
            self.by_id[stream.id].ends[OTHER[side]] = stream
        dst.arrivals = 0

    def streams(self, side: str) -> list[StreamCore]:
        """Every stream this end has seen, also those that left its table."""
        return [s for pair in self.by_id.values() if (s := pair.ends[side]) is not None]

    @rule(pair=pairs, side=SIDES, size=st.integers(1, 100_000))
    def read(self, pair: Pair, side: str, size: int) -> None:
        stream = pair.ends[side]
        if stream is not None and stream._recv_buffered:
            pair.got[side] += take(self.cores[side], stream, size)

    @rule(pair=pairs, side=SIDES, how=st.sampled_from(["read", "write"]))
    def shutdown(self, pair: Pair, side: str, how: str) -> None:
        stream = pair.ends[side]
        if stream is None:
            return
        if how == "write":
            self.cores[side].shut_send(stream)
            pair.shut_wr[side] = True
        else:
            self.cores[side].shut_recv(stream)
            pair.shut_rd[side] = True
            assert stream._recv_state == RECV_SHUT and not stream._recv_buffered

    @invariant()
    def data_arrives_in_order_on_its_stream(self) -> None:
        for pair in self.by_id.values():
            for side in ("client", "server"):
                assert pair.sent[OTHER[side]].startswith(pair.got[side])

    @invariant()
    def unread_data_is_bounded(self) -> None:
        for side, core in self.cores.items():
            held = [s._recv_buffered for s in self.streams(side)]
            held += [s._recv_buffered for s in core.accept_queue]
            assert sum(held) == core.buffered >= 0
            # Reading stops at the budget: past it by at most one read and one frame.
            assert core.buffered <= core.config.max_receive_buffer + 65536 + 65543
            if self.version == 2:
                limit = max(INITIAL_PEER_WINDOW, core.config.max_stream_buffer)
                assert max(held, default=0) <= limit

    @rule()
    def drain(self) -> None:
        """Everything written is delivered and read: every half-close and every
        byte arrives, and a stream done both ways leaves both tables."""
        for _ in range(10_000):
            for side in ("client", "server"):
                self.write_control(side)
            for side in ("client", "server"):
                self.deliver(side, 1 << 30)
            for side in ("client", "server"):
                for pair in self.by_id.values():
                    stream = pair.ends[side]
                    while stream is not None and stream._recv_buffered:
                        self.read(pair, side, 1 << 30)
            if not any(self.pipes.values()) and not any(c.control for c in self.cores.values()):
                break
        else:  # pragma: no cover - a stall is the failure
            raise AssertionError("the cores never went quiet")
        for pair in self.by_id.values():
            for side in ("client", "server"):
                stream = pair.ends[side]
                assert stream is not None  # every SYN arrived
                if pair.shut_rd[side]:
                    continue
                assert pair.got[side] == pair.sent[OTHER[side]]
                if pair.shut_wr[OTHER[side]]:
                    assert stream._recv_state == RECV_EOF
                else:
                    assert stream._recv_state == RECV_OPEN
            for side in ("client", "server"):
                # A stream leaves an end's table once both of its sides are done there.
                gone = pair.shut_wr[side] and (pair.shut_rd[side] or pair.shut_wr[OTHER[side]])
                assert (pair.id in self.cores[side].streams) != gone


def test_two_cores_follow_the_model():
    run_state_machine_as_test(
        TwoCores, settings=settings(max_examples=examples(80), stateful_step_count=40)
    )
