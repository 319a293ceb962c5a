"""Keepalive: a healthy idle session lives on; a silent peer is detected in time."""

from __future__ import annotations

import time

import pytest

import pysmux
from tests.rawpeer import RawPeer
from tests.util import recv_exact, sleep, socketpair, spawn

INTERVAL, TIMEOUT = 0.1, 0.3


def test_idle_healthy_session_survives_many_timeout_periods(pair):
    cfg = pysmux.Config(keepalive_interval=INTERVAL, keepalive_timeout=TIMEOUT)
    client, server = pair(cfg)
    st = client.open_stream()
    st.sendall(b"a")
    peer = server.accept_stream(timeout=5)
    assert peer.recv(1) == b"a"
    # Idle for five timeout periods, checking all along that nothing ended.
    end = time.monotonic() + 5 * TIMEOUT
    while time.monotonic() < end:
        assert not client.closed, client.error
        assert not server.closed, server.error
        sleep(0.01)  # observing an idle session for a fixed time, not synchronizing
    peer.sendall(b"still here")
    assert recv_exact(st, 10) == b"still here"
    assert client.error is None and server.error is None


@pytest.mark.parametrize("role", ["client", "server"])
def test_silent_peer_ends_session_within_timeout_plus_interval(runtime, role):
    cfg = pysmux.Config(keepalive_interval=INTERVAL, keepalive_timeout=TIMEOUT)
    mine, silent = socketpair()  # `silent` never reads or writes anything
    with mine, silent:
        t0 = time.monotonic()
        factory = pysmux.client if role == "client" else pysmux.server
        session = factory(mine, config=cfg, runtime=runtime)
        try:
            st = session.open_stream()
            blocked = spawn(st.recv, 10)
            exc = blocked.exception(timeout=5)
            took = blocked.finished_at - t0
            assert isinstance(exc, pysmux.StreamResetError), exc
            assert session.closed
            assert session.error is not None
            # Not before the peer was silent for keepalive_timeout, and not much later.
            assert TIMEOUT - 0.02 <= took <= TIMEOUT + INTERVAL + 0.1, took
            with pytest.raises(pysmux.StreamResetError):
                st.send(b"x")
            with pytest.raises(pysmux.SessionClosedError):
                session.open_stream()
        finally:
            session.close()


def test_keepalive_disabled_silent_peer_is_not_timed_out(runtime):
    cfg = pysmux.Config(keepalive=False, keepalive_interval=0.05, keepalive_timeout=0.1)
    mine, silent = socketpair()
    with mine, silent:
        session = pysmux.client(mine, config=cfg, runtime=runtime)
        try:
            end = time.monotonic() + 0.5
            while time.monotonic() < end:
                assert not session.closed, session.error
                sleep(0.01)  # observing for a fixed time
            silent.settimeout(0.2)
            with pytest.raises(TimeoutError):  # no NOPs were sent either
                silent.recv(100)
        finally:
            session.close()


def test_peer_receives_nops_at_the_interval(runtime):
    cfg = pysmux.Config(keepalive_interval=INTERVAL, keepalive_timeout=10 * INTERVAL)
    mine, theirs = socketpair()
    with mine, theirs:
        session = pysmux.server(mine, config=cfg, runtime=runtime)
        try:
            peer = RawPeer(theirs)
            t0 = time.monotonic()
            frames = [peer.read_frame(timeout=2, skip_nop=False) for _ in range(3)]
            took = time.monotonic() - t0
            assert [f.cmd for f in frames] == [pysmux.frame.CMD_NOP] * 3
            assert all(f.sid == 0 and f.data == b"" for f in frames)
            assert 2 * INTERVAL <= took < 3 * INTERVAL + 0.3, took
            for _ in range(3):
                peer.nop()  # answering keeps the session alive
        finally:
            session.close()
