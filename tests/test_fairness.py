"""The write path seen on the wire: streams take turns frame by frame, and a FIN
never overtakes data written earlier on its stream."""

from __future__ import annotations

import socket

import pytest

from pysmux.frame import CMD_FIN, CMD_PSH
from tests.util import payload, spawn, wait_until


def longest_run(ids: list[int]) -> int:
    longest = run = 0
    previous = None
    for sid in ids:
        run = run + 1 if sid == previous else 1
        previous = sid
        longest = max(longest, run)
    return longest


@pytest.mark.parametrize("version", [1, 2])
def test_writers_take_turns_frame_by_frame(raw_session, version):
    """Two streams writing bulk at once alternate on the wire once both wait for the
    transport: neither gets more than two frames in a row while the other has data."""
    session, peer = raw_session(role="client", version=version)
    streams = [session.open_stream() for _ in range(2)]
    frames_each = 64
    data = payload(frames_each * session.config.max_frame_size, seed=version)
    writers = [spawn(st.sendall, data) for st in streams]
    # The peer reads nothing until both writers wait on the transport.
    wait_until(lambda: len(session._writes.waiters) == 1, what="a writer queued for the transport")
    if version == 2:
        for st in streams:  # open the windows wide: only the transport limits the writers
            peer.upd(st.id, 0, 1 << 30)
    order: list[int] = []
    done = {st.id: 0 for st in streams}
    while min(done.values()) < len(data):
        f = peer.read_frame(timeout=10)
        if f.cmd == CMD_PSH:
            order.append(f.sid)
            done[f.sid] += len(f.data)
    for w in writers:
        w.result(10)
    # Skip what the transport buffered before the second writer queued, and stop
    # where the first stream finished: in between, strict turns.
    first_done = min(max(i for i, sid in enumerate(order) if sid == st.id) for st in streams)
    both_seen = max(order.index(st.id) for st in streams)
    middle = order[both_seen + 16 : first_done]
    assert len(middle) > frames_each // 2, order
    assert longest_run(middle) <= 2, order


def test_fin_never_overtakes_data(raw_session):
    """shutdown(SHUT_WR) from another task during a long sendall: the FIN goes on the
    wire after every data frame already written, and no data frame follows it."""
    session, peer = raw_session(role="client")
    st = session.open_stream()
    data = payload(256 * session.config.max_frame_size, seed=7)
    errors: list[BaseException] = []

    def write() -> None:
        try:
            st.sendall(data)
        except BrokenPipeError as exc:
            errors.append(exc)

    writer = spawn(write)
    received = 0
    while received < 8 * session.config.max_frame_size:
        f = peer.read_frame(timeout=10)
        if f.cmd == CMD_PSH:
            received += len(f.data)
    st.shutdown(socket.SHUT_WR)
    while True:
        f = peer.read_frame(timeout=10)
        if f.sid != st.id:
            continue
        if f.cmd == CMD_FIN:
            break
        assert f.cmd == CMD_PSH
        received += len(f.data)
    writer.result(10)
    assert errors, "sendall went on after shutdown(SHUT_WR)"
    assert received < len(data)
    # After the FIN: nothing more for this stream (a NOP-free, quiet transport).
    session.open_stream().shutdown(socket.SHUT_WR)  # a marker frame pair: SYN, FIN
    marker = peer.read_frame(timeout=5)
    assert marker.sid != st.id, marker
