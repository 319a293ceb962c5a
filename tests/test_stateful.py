"""Two connected sessions driven by a Hypothesis state machine.

Rules open streams on either side and accept them on the other, send, shut
down for writing or reading, close, read, and close a whole session; a small model
(bytes each stream end sent and read, who half-closed, who closed, whether a
session ended) says what every call must do:

* ``accept_stream`` returns the streams the other side opened, in order;
* ``recv`` returns the next bytes the peer sent, never more; ``b""`` only
  once the peer shut down or closed and everything before was read; a read
  that must wait is a would-block, not EOF;
* ``send`` after the end's own shutdown or close raises ``BrokenPipeError``,
  ``recv`` after ``shutdown(SHUT_RD)`` returns ``b""``, after close it raises
  ``EBADF``;
* once a session is closed: ``recv`` returns what had arrived, then EOF (if the
  peer's FIN had arrived) or ``StreamResetError``; ``send`` raises
  ``StreamResetError`` (``BrokenPipeError`` if shut down); opening and
  accepting raise ``SessionClosedError``;
* when every stream is closed on both sides, both sessions forget them all.

Every call that may wait has a timeout, so a broken rule fails, not hangs.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import pysmux
from tests.fuzzing import examples
from tests.util import payload, socketpair, spawn, wait_until

SIDES = ("client", "server")
MAX_STREAMS = 6
#: Largest bulk transfer: more than the 256 KiB a v2 sender may send before
#: the first window update.
BULK = 300_000
#: Sizes asked of recv: often less than a frame holds.
READ_SIZES = st.integers(1, 300) | st.integers(1, 5000)
#: Bound on one call that waits for frames in flight; they take milliseconds.
CALL_TIMEOUT = 5.0
#: Timeout of a send to a peer that stopped reading (it may wait for a window forever).
STOPPED_READER_TIMEOUT = 0.2


@dataclass
class End:
    """One end of a stream, and what the model knows about it."""

    stream: Any
    side: str
    peer: End | None = None  # None until the other side accepted
    sent: bytearray = field(default_factory=bytearray)
    received: int = 0  # bytes of peer.sent read so far
    #: Shut down for writing or closed ("before the session closed": a FIN was sent).
    shut: str | None = None
    closed: bool = False
    #: Shut down for reading or closed: recv answers b"", data is dropped (see ``shut``).
    read_shut: str | None = None
    ended: str | None = None  # "eof" or "reset" once recv reported it (after a session close)

    def __repr__(self) -> str:
        return f"End({self.side} {self.stream.id})"

    def unread_by_peer(self) -> int:
        return len(self.sent) - (self.peer.received if self.peer else 0)

    def available(self) -> bytes:
        """What the peer sent that this end has not read."""
        return bytes(self.peer.sent[self.received :]) if self.peer else b""

    def peer_shut(self) -> bool:
        """The peer's FIN is on its way (if the session still lives)."""
        return self.peer is not None and self.peer.shut == "before the session closed"


class SessionsMachine(RuleBasedStateMachine):
    runtime = "thread"
    version = 1

    def __init__(self) -> None:
        super().__init__()
        self.sessions: dict[str, Any] = {}
        self.socks: tuple[Any, ...] = ()
        self.ends: list[End] = []
        # Streams opened by one side that the other has not accepted yet.
        self.unaccepted: dict[str, deque[End]] = {side: deque() for side in SIDES}
        self.dead = False  # a session was closed
        self.steps = 0
        self.max_unread = 0

    @initialize(
        max_frame_size=st.sampled_from([100, 32768]),
        max_stream_buffer=st.sampled_from([8192, 65536]),
    )
    def start(self, max_frame_size: int, max_stream_buffer: int) -> None:
        cfg = pysmux.Config(
            version=self.version,
            keepalive=False,
            max_frame_size=max_frame_size,
            max_stream_buffer=max_stream_buffer,
        )
        # Unread bytes the model lets pile up on a stream, so that a send never
        # waits for the reader. v2: the reader owes a window update only after
        # reading half its window, so half of it can be in flight unannounced.
        self.max_unread = max_stream_buffer // 2 if self.version == 2 else 60_000
        a, b = socketpair()
        self.socks = (a, b)
        self.sessions["client"] = pysmux.client(a, config=cfg, runtime=self.runtime)
        self.sessions["server"] = pysmux.server(b, config=cfg, runtime=self.runtime)

    def teardown(self) -> None:
        try:
            if self.sessions and not self.dead:
                self.check_everything_closes()
        finally:
            for session in self.sessions.values():
                session.close()
            for sock in self.socks:
                sock.close()

    def check_everything_closes(self) -> None:
        for side in SIDES:
            while self.unaccepted[side]:
                self.accept_on(side)
        for end in self.ends:
            end.stream.close()
        for session in self.sessions.values():
            wait_until(lambda s=session: s.num_streams == 0, CALL_TIMEOUT, "streams forgotten")
            assert session.error is None, repr(session.error)

    def when(self) -> str:
        return "after the session closed" if self.dead else "before the session closed"

    def end(self, index: int) -> End:
        return self.ends[index % len(self.ends)]

    # -- rules ----------------------------------------------------------------------------

    @precondition(lambda self: not self.dead and len(self.ends) < MAX_STREAMS)
    @rule(side=st.sampled_from(SIDES), accept_now=st.booleans())
    def open_stream(self, side: str, accept_now: bool) -> None:
        stream = self.sessions[side].open_stream()
        stream.settimeout(CALL_TIMEOUT)
        end = End(stream, side)
        self.ends.append(end)
        other = SIDES[1 - SIDES.index(side)]
        self.unaccepted[other].append(end)
        if accept_now:
            self.accept_on(other)

    @precondition(lambda self: any(self.unaccepted.values()))
    @rule(data=st.data())
    def accept(self, data: Any) -> None:
        self.accept_on(data.draw(st.sampled_from([s for s in SIDES if self.unaccepted[s]])))

    def accept_on(self, side: str) -> None:
        session = self.sessions[side]
        if self.dead:
            with pytest.raises(pysmux.SessionClosedError):
                session.accept_stream(timeout=0)
            self.unaccepted[side].clear()
            return
        opener = self.unaccepted[side].popleft()
        stream = session.accept_stream(timeout=CALL_TIMEOUT)
        assert stream.id == opener.stream.id, "streams accepted out of order"
        stream.settimeout(CALL_TIMEOUT)
        end = End(stream, side, peer=opener)
        opener.peer = end
        self.ends.append(end)

    @precondition(lambda self: self.ends)
    @rule(index=st.integers(0, MAX_STREAMS - 1), data=st.binary(min_size=1, max_size=3000))
    def send(self, index: int, data: bytes) -> None:
        end = self.end(index)
        if end.closed or end.shut == "before the session closed":
            with pytest.raises(BrokenPipeError):
                end.stream.sendall(data)
        elif end.shut:
            # Shut down after its session closed: the README promises
            # BrokenPipeError, pysmux raises StreamResetError (see
            # test_shutdown_of_a_reset_stream_is_not_ignored).
            with pytest.raises((BrokenPipeError, pysmux.StreamResetError)):
                end.stream.sendall(data)
        elif self.dead:
            with pytest.raises(pysmux.StreamResetError):
                end.stream.sendall(data)
        elif end.peer is not None and end.peer.read_shut:
            # The peer drops what comes, and v2 sends no window update for it
            # (nor for data it read just before): once the window is used up, a
            # send waits, as for any reader that stops reading (smux has no reset).
            end.stream.settimeout(STOPPED_READER_TIMEOUT)
            try:
                end.stream.sendall(data)
            except TimeoutError:
                assert self.version == 2, "v1 has no window to wait for"
            finally:
                end.stream.settimeout(CALL_TIMEOUT)
        elif end.unread_by_peer() + len(data) <= self.max_unread:
            end.stream.sendall(data)
            end.sent += data

    def talking(self) -> list[End]:
        """Ends of accepted streams that may send, whose peer reads."""
        if self.dead:
            return []
        return [e for e in self.ends if e.peer and not e.shut and not e.peer.read_shut]

    @precondition(lambda self: self.talking())
    @rule(data=st.data(), payload=st.binary(min_size=1, max_size=3000))
    def send_and_read(self, data: Any, payload: bytes) -> None:
        """Send on a live stream and read it all on the other end."""
        end = data.draw(st.sampled_from(self.talking()), label="end")
        assert end.peer is not None
        index = self.ends.index(end)
        self.send(index, payload)
        into = data.draw(st.booleans(), label="into")
        self.recv(self.ends.index(end.peer), len(end.peer.available()), into)
        assert not end.peer.available()

    @precondition(lambda self: self.talking())
    @rule(data=st.data(), size=st.integers(1, BULK), seed=st.integers(0, 2**32))
    def bulk(self, data: Any, size: int, seed: int) -> None:
        """Send more than a window while the other end reads it in random pieces."""
        end = data.draw(st.sampled_from(self.talking()), label="end")
        assert end.peer is not None
        if end.peer.available():  # read what came before first
            self.recv(self.ends.index(end.peer), len(end.peer.available()), False)
        chunk = payload(size, seed)
        sender = spawn(end.stream.sendall, chunk, name="bulk-sender")
        rng = random.Random(seed)
        got = bytearray()
        while len(got) < size:
            piece = read(end.peer.stream, rng.randint(1, 70_000), rng.random() < 0.5)
            assert piece, f"{end.peer}: EOF in the middle of a bulk transfer"
            got += piece
        sender.result(CALL_TIMEOUT)
        assert bytes(got) == chunk, f"{end.peer}: read other bytes than the peer sent"
        end.sent += chunk
        end.peer.received += size

    @precondition(lambda self: self.ends)
    @rule(index=st.integers(0, MAX_STREAMS - 1), how=st.sampled_from(["SHUT_WR", "SHUT_RD"]))
    def shutdown(self, index: int, how: str) -> None:
        end = self.end(index)
        if end.closed:
            with pytest.raises(pysmux.SmuxError) as info:
                end.stream.shutdown(getattr(socket, how))
            assert info.value.errno == errno.EBADF
            return
        end.stream.shutdown(getattr(socket, how))
        if how == "SHUT_WR":
            end.shut = end.shut or self.when()
        else:
            end.read_shut = end.read_shut or self.when()

    @precondition(lambda self: self.ends)
    @rule(index=st.integers(0, MAX_STREAMS - 1))
    def close(self, index: int) -> None:
        end = self.end(index)
        end.stream.close()
        end.closed = True
        end.shut = end.shut or self.when()
        end.read_shut = end.read_shut or self.when()

    @precondition(lambda self: self.ends)
    @rule(index=st.integers(0, MAX_STREAMS - 1), size=READ_SIZES, into=st.booleans())
    def recv(self, index: int, size: int, into: bool) -> None:
        end = self.end(index)
        if end.closed:
            with pytest.raises(pysmux.SmuxError) as info:
                read(end.stream, size, into)
            assert info.value.errno == errno.EBADF
            return
        if end.read_shut == "before the session closed":
            assert read(end.stream, size, into) == b"", f"{end}: data after shutdown(SHUT_RD)"
            return
        if end.read_shut:
            # Shut down after its session closed: b"" as on a socket, but pysmux
            # raises StreamResetError (test_shutdown_of_a_reset_stream_is_not_ignored).
            with contextlib.suppress(pysmux.StreamResetError):
                assert read(end.stream, size, into) == b"", f"{end}: data after SHUT_RD"
            return
        if self.dead:
            self.recv_after_session_close(end, size, into)
            return
        available = end.available()
        if available:
            event("recv: data")
            want = available[:size]
            got = bytearray()
            while len(got) < len(want):  # frames may still be on their way
                chunk = read(end.stream, len(want) - len(got), into)
                assert chunk, f"{end}: EOF with {len(available) - len(got)} bytes unread"
                got += chunk
            assert bytes(got) == want, f"{end}: read other bytes than the peer sent"
            end.received += len(got)
        elif end.peer_shut():
            event("recv: EOF")
            assert read(end.stream, size, into) == b"", f"{end}: data after the peer's FIN"
        else:  # nothing may come: a read must wait (would block), not see EOF or data
            event("recv: would block")
            end.stream.settimeout(0)
            try:
                with pytest.raises(BlockingIOError):
                    read(end.stream, size, into)
            finally:
                end.stream.settimeout(CALL_TIMEOUT)

    def readable(self) -> list[End]:
        """Ends with data or an EOF to read. (Not after a session closed: what
        had arrived by then is timing, and what a rule draws must not be.)"""
        if self.dead:
            return []
        return [e for e in self.ends if not e.read_shut and (e.available() or e.peer_shut())]

    @precondition(lambda self: self.readable())
    @rule(data=st.data(), size=READ_SIZES, into=st.booleans())
    def recv_something(self, data: Any, size: int, into: bool) -> None:
        """Read on an end that has something to read (``recv`` picks any end)."""
        end = data.draw(st.sampled_from(self.readable()), label="end")
        self.recv(self.ends.index(end), size, into)

    def recv_after_session_close(self, end: End, size: int, into: bool) -> None:
        """Data that had arrived, then EOF if the FIN had arrived, else a reset."""
        if end.ended == "reset":
            with pytest.raises(pysmux.StreamResetError):
                read(end.stream, size, into)
            return
        try:
            chunk = read(end.stream, size, into)
        except pysmux.StreamResetError:
            assert end.ended is None, f"{end}: a reset after EOF"
            end.ended = "reset"
            return
        available = end.available()
        if chunk:
            assert available.startswith(chunk), f"{end}: read other bytes than the peer sent"
            end.received += len(chunk)
        else:
            assert end.peer_shut() and not available, f"{end}: EOF it never got"
            end.ended = "eof"

    # Late in a run, so that most runs have streams with data in flight to reset.
    @precondition(lambda self: not self.dead and self.steps >= 15)
    @rule(side=st.sampled_from(SIDES))
    def close_session(self, side: str) -> None:
        self.sessions[side].close()
        self.dead = True
        wait_until(
            lambda: all(s.closed for s in self.sessions.values()),
            CALL_TIMEOUT,
            "the other session sees the transport close",
        )
        for session in self.sessions.values():
            with pytest.raises(pysmux.SessionClosedError):
                session.open_stream()

    @invariant()
    def sessions_live_until_closed(self) -> None:
        self.steps += 1
        for side, session in self.sessions.items():
            assert session.closed == self.dead, repr(session.error)
            if not self.dead and not self.unaccepted[side]:  # and no stream comes from nowhere
                with pytest.raises(TimeoutError):
                    session.accept_stream(timeout=0)


def read(stream: Any, size: int, into: bool) -> bytes:
    if not into:
        return bytes(stream.recv(size))
    buf = bytearray(size)
    count = stream.recv_into(buf)
    return bytes(buf[:count])


@pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
def test_two_sessions_follow_the_model(runtime, version):
    machine = type("Sessions", (SessionsMachine,), {"runtime": runtime, "version": version})
    run_state_machine_as_test(
        machine,
        settings=settings(max_examples=examples(40), stateful_step_count=40),
    )


@pytest.mark.parametrize("how", ["SHUT_WR", "SHUT_RD"])
def test_shutdown_of_a_reset_stream_is_not_ignored(pair, how):
    """As after close(), and as on a socket: after the stream's own
    shutdown(SHUT_WR) a send is a broken pipe, after shutdown(SHUT_RD) recv
    returns b"", also when the session had ended before the shutdown."""
    client, _server = pair()
    st = client.open_stream()
    client.close()
    st.shutdown(getattr(socket, how))
    if how == "SHUT_WR":
        with pytest.raises(BrokenPipeError):
            st.send(b"x")
    else:
        assert st.recv(1) == b""
