"""The edges of the socket-like Stream API: arguments a socket refuses are refused
without touching the stream, ``makefile`` in every mode a socket offers (and the modes
it refuses), what ``repr``, ``closed`` and ``fileno`` say, and frames dropped after a
close being counted. Everything goes through the public API."""

from __future__ import annotations

import errno
import io
import socket
from typing import Any

import pytest

import pysmux
from pysmux import frame
from tests import test_stream_api
from tests.util import recv_exact, wait_until

# A connected (client stream, server stream) over a fresh v1 pair.
streams = test_stream_api.streams


def test_flags_are_refused_and_the_data_stays(streams: tuple[pysmux.Stream, pysmux.Stream]) -> None:
    """recv/recv_into with flags (MSG_PEEK, ...) raise ValueError before taking any byte:
    the data is still there for the next plain call."""
    st, peer = streams
    st.sendall(b"kept")
    assert peer.recv(1) == b"k"  # one frame: the other three bytes are buffered now
    with pytest.raises(ValueError, match="flags are not supported"):
        peer.recv(3, socket.MSG_PEEK)
    buf = bytearray(3)
    with pytest.raises(ValueError, match="flags are not supported"):
        peer.recv_into(buf, 3, socket.MSG_PEEK)
    assert buf == bytearray(3)
    assert recv_exact(peer, 3) == b"ept"


def test_invalid_shutdown_mode_is_refused_and_changes_nothing(
    streams: tuple[pysmux.Stream, pysmux.Stream],
) -> None:
    st, peer = streams
    with pytest.raises(ValueError, match="invalid shutdown mode 7"):
        st.shutdown(7)
    st.sendall(b"still open")  # neither direction was shut
    assert recv_exact(peer, 10) == b"still open"
    peer.sendall(b"back")
    assert recv_exact(st, 4) == b"back"


def test_repr_closed_and_fileno_say_what_a_socket_says(
    streams: tuple[pysmux.Stream, pysmux.Stream],
) -> None:
    """``repr`` shows the id and the state of each direction; ``closed`` turns True on
    close; ``fileno()`` is -1 (a stream has no descriptor, like a closed socket)."""
    st, peer = streams
    assert repr(st) == f"<pysmux.Stream id={st.id} recv=open send=open>"
    assert st.fileno() == -1
    assert not st.closed
    st.shutdown(socket.SHUT_WR)
    assert repr(st) == f"<pysmux.Stream id={st.id} recv=open send=shut>"
    assert peer.recv(1) == b""  # the FIN, drained
    assert repr(peer) == f"<pysmux.Stream id={peer.id} recv=eof send=open>"
    peer.shutdown(socket.SHUT_RD)
    assert repr(peer) == f"<pysmux.Stream id={peer.id} recv=shut send=open>"
    st.close()
    assert st.closed
    assert repr(st).endswith(" closed>")
    assert st.fileno() == -1


def test_repr_after_the_session_ends_shows_a_reset(pair: Any) -> None:
    client, _server = pair()
    st = client.open_stream()
    client.close()
    assert repr(st) == f"<pysmux.Stream id={st.id} recv=reset send=reset>"


def test_makefile_refuses_modes_a_socket_refuses(
    streams: tuple[pysmux.Stream, pysmux.Stream],
) -> None:
    """A mode other than r/w/b, and unbuffered text, raise ValueError as on a socket; the
    stream is not held open by the file that was never made: close() still sends FIN."""
    st, peer = streams
    with pytest.raises(ValueError, match=r"invalid mode 'rt'"):
        st.makefile("rt")
    with pytest.raises(ValueError, match="unbuffered streams must be binary"):
        st.makefile("r", buffering=0)
    st.close()
    assert peer.recv(1) == b""


def test_makefile_on_a_closed_stream_raises_ebadf(
    streams: tuple[pysmux.Stream, pysmux.Stream],
) -> None:
    st, peer = streams
    st.close()
    with pytest.raises(OSError) as info:
        st.makefile("rb")
    assert info.value.errno == errno.EBADF
    assert peer.recv(1) == b""  # closed once, cleanly


def test_makefile_unbuffered_binary_is_the_raw_file(
    streams: tuple[pysmux.Stream, pysmux.Stream],
) -> None:
    """``makefile("rwb", buffering=0)`` is a raw file: each write is a send, each
    readinto a recv; the stream stays open until both it and the file are closed."""
    st, peer = streams
    raw = peer.makefile("rwb", buffering=0)
    assert isinstance(raw, io.RawIOBase)
    assert raw.readable() and raw.writable()
    assert raw.write(b"raw out") == 7
    assert recv_exact(st, 7) == b"raw out"
    st.sendall(b"raw in")
    buf = bytearray(6)
    got = 0
    while got < 6:
        got += raw.readinto(memoryview(buf)[got:])
    assert buf == b"raw in"
    peer.close()
    raw.write(b"!")  # the file holds the stream open
    assert recv_exact(st, 1) == b"!"
    raw.close()
    assert st.recv(1) == b""


@pytest.mark.parametrize("buffering", [None, -1, 7])
def test_makefile_buffer_sizes(
    streams: tuple[pysmux.Stream, pysmux.Stream], buffering: int | None
) -> None:
    """The default (None or -1) and an explicit size give a buffered file that carries
    every byte, as on a socket."""
    st, peer = streams
    w = st.makefile("wb", buffering=buffering)
    r = peer.makefile("rb", buffering=buffering)
    data = bytes(range(256)) * 40
    w.write(data)
    w.close()
    st.shutdown(socket.SHUT_WR)
    assert r.read() == data
    r.close()


def test_frames_after_a_close_are_dropped_and_counted(raw_session: Any) -> None:
    """Data the peer sends to a stream after we closed it (old Go keeps writing after
    our FIN) is dropped, counted in ``dropped_frames`` and in ``stats()``, and does not
    disturb the session."""
    session, peer = raw_session()
    peer.syn(3)
    st = session.accept_stream(timeout=5)
    st.close()
    peer.expect(frame.CMD_FIN, 3)
    assert session.dropped_frames == 0
    peer.psh(3, b"late")
    peer.psh(3, b"later")
    wait_until(lambda: session.dropped_frames == 2, 5, "both frames dropped")
    assert session.stats()["dropped_frames"] == 2
    peer.syn(5)
    other = session.accept_stream(timeout=5)
    peer.psh(5, b"fine")
    assert recv_exact(other, 4) == b"fine"
    assert not session.closed
