#!/usr/bin/env python3
"""How often a thread blocked in ``Stream.recv`` reads the transport itself.

    python benchmarks/direct_reads.py              # 60 trials
    python benchmarks/direct_reads.py --trials 200

A diagnostic of the thread runtime's read turn (docs/design.md, direct reads), not a
benchmark of speed: it counts, through the session's private methods, which way each
``recv`` of a ping-pong waited. So it follows the session's internals and must change
with them.

Each trial is the precondition of the refusal-bound test in ``tests/test_trust.py``:
after a stream exchanged "?" the server's application thread answers "p" to each "q",
the client sends rounds of 20 quick "q"s and checks, after each round, whether the
server's thread waits in ``recv`` reading the transport itself (the read leader) or
waits for the reader thread to hand it the frame (a follower). Printed:

* in how many trials, and after how many rounds, the thread became the leader;
* the share of the server thread's waits that were direct reads;
* why the follower waits happened: the reader thread took the read turn because its
  linger ran out (nobody read for 2 ms), or because a follower was still counted
  although the reader had already woken it with its frame (the woken follower then
  comes back to find the reader reading again, and follows again).
"""

from __future__ import annotations

import argparse
import collections
import socket
import sys
import threading
import time
from typing import Any

import pysmux
import pysmux.session as session_module

Session = session_module.Session


class Counts:
    def __init__(self) -> None:
        self.watched: Session | None = None
        self.waits: collections.Counter[str] = collections.Counter()
        self.turn_followers = 0  # followers counted when the reader last took its turn
        self.turn_idle = 0.0  # seconds since a stream reader last read, then


def instrument(counts: Counts) -> None:
    take, follow, direct = Session._take_read_turn, Session._wait_for_reader, Session._read_directly

    def take_read_turn(self: Session) -> bool:
        taken = take(self)
        if taken and self is counts.watched:
            counts.turn_followers = self._followers
            counts.turn_idle = time.monotonic() - self._reader_active
        return taken

    def wait_for_reader(self: Session, stream: Any, deadline: float | None) -> None:
        if self is counts.watched:
            if self._reading and self._leader is None:
                if counts.turn_followers:
                    counts.waits["follower: the reader read for an already woken follower"] += 1
                elif counts.turn_idle >= session_module._LINGER_SECONDS:
                    counts.waits["follower: the reader's linger ran out"] += 1
                else:
                    counts.waits["follower: other"] += 1
            else:
                counts.waits["follower: other"] += 1
        follow(self, stream, deadline)

    def read_directly(self: Session, stream: Any, deadline: float | None) -> None:
        if self is counts.watched:
            counts.waits["direct"] += 1
        direct(self, stream, deadline)

    Session._take_read_turn = take_read_turn  # type: ignore[method-assign]
    Session._wait_for_reader = wait_for_reader  # type: ignore[method-assign]
    Session._read_directly = read_directly  # type: ignore[method-assign]


def trial(counts: Counts, rounds: int) -> int:
    """The round after which the server's thread was the read leader; 0 if never."""
    a, b = socket.socketpair()
    client = pysmux.client(a, config=pysmux.Config(keepalive=False), runtime="thread")
    server = pysmux.server(b, config=pysmux.Config(keepalive=False), runtime="thread")
    counts.watched = server
    st = client.open_stream()
    st.sendall(b"?")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"?"

    def answer() -> None:
        peer.sendall(b"p")
        while peer.recv(1) == b"q":
            peer.sendall(b"p")

    worker = threading.Thread(target=answer)
    worker.start()
    reached = 0
    for n in range(1, rounds + 1):
        for _ in range(20):
            assert st.recv(1) == b"p"
            st.sendall(b"q")
        assert st.recv(1) == b"p"
        deadline = time.monotonic() + 5
        while not (peer._waiting or server._leader is peer):
            assert time.monotonic() < deadline, "the server's thread never waited in recv"
            time.sleep(0.001)
        if server._leader is peer:
            reached = n
            break
        st.sendall(b"q")
    st.sendall(b"x")
    worker.join(5)
    counts.watched = None
    client.close()
    server.close()
    a.close()
    b.close()
    return reached


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=20, help="outer rounds per trial")
    args = parser.parse_args()
    counts = Counts()
    instrument(counts)
    results = [trial(counts, args.rounds) for _ in range(args.trials)]
    total = sum(counts.waits.values())
    tracer = "on" if sys.gettrace() else "off"
    print(f"tracer {tracer}; leader reached in {sum(1 for r in results if r)} of {args.trials}")
    print(f"rounds needed: {sorted(collections.Counter(results).items())} (0: never)")
    print(f"server thread's waits: {total}, direct reads {counts.waits['direct'] / total:.1%}")
    for why, n in sorted(counts.waits.items()):
        if why != "direct":
            print(f"  {why}: {n}")


if __name__ == "__main__":
    main()
