"""Races: many threads (greenlets on gevent) call send, recv, shutdown and
close on shared streams, open and accept streams, and close whole sessions,
all at seeded random moments.

Whatever the interleaving: every call returns or raises one of the errors
the README documents (``SmuxError`` and its subclasses, ``BrokenPipeError``,
``TimeoutError``, ``BlockingIOError``), never something like an
AttributeError or AssertionError from inside pysmux; every task ends soon
after the sessions close; well-behaved ends never see a protocol error from
each other; nothing is left running. A run that hangs dumps every stack
(``faulthandler``) before pytest's timeout.
"""

from __future__ import annotations

import faulthandler
import random
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pysmux
from tests.util import Event, sleep, spawn, wait_until

#: What the README says a stream or session call may raise.
DOCUMENTED = (pysmux.SmuxError, BrokenPipeError, TimeoutError, BlockingIOError)
#: Seconds every task gets to end once both sessions are closed.
WIND_DOWN = 3.0
#: Seconds after which a run that has not finished dumps every stack.
HANG_DUMP = 60.0
SHUT_MODES = (socket.SHUT_RD, socket.SHUT_WR, socket.SHUT_RDWR)


@pytest.fixture(autouse=True)
def _dump_stacks_if_hung() -> Iterator[None]:
    faulthandler.dump_traceback_later(HANG_DUMP, exit=False, file=sys.stderr)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


class Chaos:
    """Tasks calling random operations on shared streams and sessions."""

    def __init__(self, client: Any, server: Any, streams: list[Any], seed: int) -> None:
        self.sessions = (client, server)
        self.streams = streams  # grows as tasks open and accept streams
        self.seed = seed
        self.stop = Event()
        self.undocumented: list[str] = []
        self.calls = 0

    def operations(self, rng: random.Random) -> list[Callable[[], object]]:
        st = rng.choice(self.streams)
        session = rng.choice(self.sessions)
        data = b"r" * rng.choice([1, 100, 5000, 70_000])
        return [
            lambda: st.send(data),
            lambda: st.sendall(data),
            lambda: st.recv(rng.choice([1, 1000, 100_000])),
            lambda: st.recv_into(bytearray(rng.choice([1, 4096]))),
            lambda: st.settimeout(rng.choice([0.0, 0.001, 0.01, 0.05])),
            # Rarer: they end streams, and later calls on an ended stream only fail.
            lambda: st.shutdown(rng.choice(SHUT_MODES)) if rng.random() < 0.3 else None,
            lambda: st.close() if rng.random() < 0.2 else None,
            lambda: self.streams.append(session.open_stream()),
            lambda: self.streams.append(session.accept_stream(timeout=rng.choice([0, 0.02]))),
            lambda: session.close() if rng.random() < 0.002 else None,
        ]

    def task(self, index: int) -> None:
        rng = random.Random(self.seed * 1000 + index)
        for _ in range(200):
            if self.stop.is_set():
                return
            op = rng.choice(self.operations(rng))
            self.calls += 1
            try:
                op()
            except DOCUMENTED:
                pass
            except Exception:
                self.undocumented.append(traceback.format_exc())


def run_chaos(pair: Any, seed: int, tasks: int, streams: int) -> Chaos:
    rng = random.Random(seed)
    p = pair(version=1 + seed % 2)
    client, server = p
    opened = [client.open_stream() for _ in range(streams)]
    accepted = [server.accept_stream(timeout=5) for _ in range(streams)]
    for st in opened + accepted:
        st.settimeout(0.05)
    chaos = Chaos(client, server, opened + accepted, seed)
    workers = [spawn(chaos.task, i, name=f"chaos-{i}") for i in range(tasks)]
    deadline = time.monotonic() + rng.uniform(0.05, 0.4)
    while time.monotonic() < deadline and any(w.is_alive() for w in workers):
        sleep(0.005)  # letting the tasks run for a random time
    for session in rng.sample([client, server], 2):
        session.close()
    t0 = time.monotonic()
    chaos.stop.set()
    for w in workers:
        w.join(max(0.0, t0 + WIND_DOWN - time.monotonic()))
    still = [w.name for w in workers if w.is_alive()]
    assert not still, f"still running {WIND_DOWN}s after both sessions closed: {still}"
    for w in workers:
        assert w.exc is None, repr(w.exc)
    assert not chaos.undocumented, "\n".join(chaos.undocumented[:3])
    for session in (client, server):
        assert session.closed
        assert not isinstance(session.error, pysmux.ProtocolError), repr(session.error)
    return chaos


@pytest.mark.parametrize("seed", range(6))
def test_many_tasks_on_one_stream(pair, seed):
    """Eight tasks share one stream's two ends (and its sessions)."""
    chaos = run_chaos(pair, seed, tasks=8, streams=1)
    assert chaos.calls >= 8


@pytest.mark.parametrize("seed", range(6))
def test_many_tasks_on_many_streams(pair, seed):
    """Twelve tasks, six streams, streams opened and accepted as they go."""
    chaos = run_chaos(pair, seed, tasks=12, streams=6)
    assert chaos.calls >= 12


class Interrupted(Exception):
    """Raised into a greenlet by a gevent.Timeout in the middle of a call."""


@pytest.mark.runtimes("gevent", reason="only a greenlet can be interrupted in the middle of a call")
@pytest.mark.parametrize("seed", range(8))
def test_calls_interrupted_by_gevent_timeout_never_corrupt_the_wire(pair, seed):
    """gevent.Timeout interrupts sends and recvs at random points, also inside
    a transport write. A frame cut in half must end the session rather than
    reach the peer as garbage: the peer never sees a protocol error, and if
    both sessions live on, a new stream still carries data intact."""
    import gevent

    rng = random.Random(seed)
    client, server = pair(version=1 + seed % 2)
    pairs = [(client.open_stream(), server.accept_stream(timeout=5)) for _ in range(4)]
    interrupted = 0

    def chaos(index: int) -> None:
        nonlocal interrupted
        r = random.Random(seed * 100 + index)
        mine, theirs = pairs[index % len(pairs)]
        for _ in range(30):
            call = r.choice(
                [
                    lambda: mine.sendall(b"i" * r.choice([10, 40_000, 300_000])),
                    lambda: theirs.recv(r.choice([10, 100_000])),
                    lambda: theirs.sendall(b"o" * r.choice([10, 40_000])),
                    lambda: mine.recv(r.choice([10, 100_000])),
                ]
            )
            try:
                with gevent.Timeout(r.uniform(0, 0.005), Interrupted):
                    call()
            except Interrupted:
                interrupted += 1
            except DOCUMENTED:
                return

    workers = [spawn(chaos, i, name=f"interrupted-{i}") for i in range(8)]
    for w in workers:
        w.result(20)
    assert interrupted > 0
    for session in (client, server):
        assert not isinstance(session.error, pysmux.ProtocolError), repr(session.error)
    if client.closed or server.closed:  # an interrupted write ended one: the other follows
        wait_until(lambda: client.closed and server.closed, 2, "both sessions end")
    else:
        st = client.open_stream()
        st.settimeout(5)
        data = rng.randbytes(100_000)
        st.sendall(data)
        peer = server.accept_stream(timeout=5)
        peer.settimeout(5)
        got = bytearray()
        while len(got) < len(data):
            got += peer.recv(len(data) - len(got))
        assert bytes(got) == data
    for session in (client, server):
        assert not isinstance(session.error, pysmux.ProtocolError), repr(session.error)
