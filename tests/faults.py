"""A fault-injecting transport for pysmux sessions.

:class:`FaultySocket` wraps a connected socket (a plain one, or a gevent one
on the gevent runtime) and offers what a session uses of a transport:
``recv_into``, ``sendmsg`` (optional, see ``sendmsg=``), ``sendall``,
``shutdown``, ``close``, ``settimeout``, ``setsockopt``, ``family`` and
``fileno``. On its way through it can

* cut reads and writes short: ``read_sizes``/``write_sizes`` are functions
  from the number of bytes asked for to the number to move (see
  :func:`one_byte` and :func:`seeded_sizes`);
* cut the connection after exactly ``at`` bytes in one direction
  (:class:`Cut`): the bytes before the cut go through, then the connection
  is dead in both directions, the way a network cut looks to both ends. Our
  side then sees EOF (``mode="eof"``: reads return 0, writes raise
  ``BrokenPipeError``) or a reset (``mode="reset"``: both raise
  ``ConnectionResetError``); the wrapped socket is shut down, so the far end
  sees EOF after the bytes that went through;
* fail a chosen write or read with a chosen error (``write_error``,
  ``read_error``: ``(call_index, exception)``), or every write from a call
  to ``fail_writes()`` on (the peer went away);
* stall every write (``stall_writes``, or from a call to ``stall()`` on):
  the peer reads nothing and the socket buffers are full. A stalled write
  fails once the socket is shut down or closed, as a blocked ``send`` does;
* hold what reads get from a call to ``hold_reads()`` on, until
  ``release_reads()`` or the socket's shutdown or close (a slow reader).

It records what it really moved: ``written`` (bytes that reached the wrapped
socket, so the far end) and ``delivered`` (bytes handed to the session).
Frames in those logs are what each end may act on; :func:`stream_view` says
what one stream carried in them.

Sessions read a ``FaultySocket`` through their reader task (direct reads on
threads are for real ``socket.socket`` objects only), so the splice in
:class:`Splice` puts faults between two real sockets for the other path.
"""

from __future__ import annotations

import contextlib
import errno
import random
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pysmux.frame import CMD_FIN, CMD_PSH, CMD_SYN
from tests.rawpeer import parse_frames
from tests.runtimes import current

__all__ = [
    "Cut",
    "FaultySocket",
    "Splice",
    "StreamView",
    "one_byte",
    "seeded_sizes",
    "session_runtime",
    "stream_view",
]

Sizes = Callable[[int], int]

_LINGER_ZERO = struct.pack("ii", 1, 0)


def one_byte(asked: int) -> int:
    """Move one byte per call."""
    return min(asked, 1)


def seeded_sizes(seed: int, largest: int = 64) -> Sizes:
    """Move a seeded random 1..``largest`` bytes per call."""
    rng = random.Random(seed)
    return lambda asked: min(asked, rng.randint(1, largest))


@dataclass(frozen=True)
class Cut:
    """Cut the connection once ``at`` bytes went ``direction`` ("read" or "write")."""

    direction: str
    at: int
    mode: str = "eof"

    def __post_init__(self) -> None:
        if self.direction not in ("read", "write") or self.mode not in ("eof", "reset"):
            raise ValueError(f"bad cut {self!r}")


class FaultySocket:
    """A socket-like transport that injects faults; see the module docstring."""

    def __init__(
        self,
        inner: Any,
        *,
        read_sizes: Sizes | None = None,
        write_sizes: Sizes | None = None,
        cut: Cut | None = None,
        read_error: tuple[int, OSError] | None = None,
        write_error: tuple[int, OSError] | None = None,
        stall_writes: bool = False,
        sendmsg: str = "yes",
    ) -> None:
        if sendmsg not in ("yes", "no", "unsupported"):
            raise ValueError(f"sendmsg={sendmsg!r}")
        self.inner = inner
        self.read_sizes = read_sizes
        self.write_sizes = write_sizes
        self.cut = cut
        self.read_error = read_error
        self.write_error = write_error
        self.written = bytearray()
        self.delivered = bytearray()
        self.broken = False  # the cut happened
        self.read_calls = 0
        self.write_calls = 0
        self.stalled_writes = 0
        self._stalling = stall_writes
        self._holding = False
        self._failing = False
        self._ended = current().Event()  # set once shut down or closed
        self._released = current().Event()  # set by release_reads(), or as _ended
        if sendmsg == "yes":
            self.sendmsg = self._sendmsg
        elif sendmsg == "unsupported":  # as TLS sockets: the session falls back to sendall
            self.sendmsg = self._sendmsg_unsupported

    # -- what a session uses of a socket ------------------------------------------

    @property
    def family(self) -> int:
        return int(self.inner.family)

    def fileno(self) -> int:
        return int(self.inner.fileno())

    def settimeout(self, value: float | None) -> None:
        self.inner.settimeout(value)

    def setsockopt(self, *args: Any) -> None:
        self.inner.setsockopt(*args)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        view = memoryview(buffer).cast("B")
        size = nbytes or len(view)
        self.read_calls += 1
        if self.read_error is not None and self.read_calls == self.read_error[0]:
            raise self.read_error[1]
        if self.broken:
            return self._dead_read()
        if self.read_sizes is not None:
            size = max(1, self.read_sizes(size))
        if self.cut is not None and self.cut.direction == "read":
            left = self.cut.at - len(self.delivered)
            if left <= 0:
                self._break()
                return self._dead_read()
            size = min(size, left)
        count = int(self.inner.recv_into(view[:size], size, flags))
        if self._holding:  # read from the socket, but not handed over yet
            self._released.wait()
        if count == 0 and self.broken:
            return self._dead_read()
        self.delivered += view[:count]
        self._check_cut("read", len(self.delivered))
        return count

    def _sendmsg(self, buffers: Any, *args: Any) -> int:
        return self._send_some([memoryview(b).cast("B") for b in buffers])

    def _sendmsg_unsupported(self, buffers: Any, *args: Any) -> int:
        raise NotImplementedError("sendmsg is not supported (as on TLS sockets)")

    def send(self, data: Any, flags: int = 0) -> int:
        return self._send_some([memoryview(data).cast("B")])

    def sendall(self, data: Any, flags: int = 0) -> None:
        view = memoryview(data).cast("B")
        while view:
            view = view[self._send_some([view]) :]

    def shutdown(self, how: int) -> None:
        self._end()
        self.inner.shutdown(how)

    def close(self) -> None:
        self._end()
        self.inner.close()

    # -- faults -----------------------------------------------------------------------

    def _send_some(self, buffers: list[memoryview]) -> int:
        self.write_calls += 1
        if self.write_error is not None and self.write_calls == self.write_error[0]:
            raise self.write_error[1]
        if self._failing:
            raise BrokenPipeError(errno.EPIPE, "Broken pipe (injected)")
        if self._stalling:
            self.stalled_writes += 1
            self._ended.wait()
            raise BrokenPipeError(errno.EPIPE, "stalled write: the socket was shut down")
        if self.broken:
            raise self._dead_write()
        size = sum(len(b) for b in buffers)
        if self.write_sizes is not None:
            size = max(1, self.write_sizes(size))
        if self.cut is not None and self.cut.direction == "write":
            left = self.cut.at - len(self.written)
            if left <= 0:
                self._break()
                raise self._dead_write()
            size = min(size, left)
        data = bytearray()
        for b in buffers:  # only the bytes this call moves: one-byte writes stay cheap
            data += b[: size - len(data)]
            if len(data) >= size:
                break
        count = int(self.inner.send(data))
        self.written += data[:count]
        self._check_cut("write", len(self.written))
        return count

    def _check_cut(self, direction: str, moved: int) -> None:
        if self.cut is not None and self.cut.direction == direction and moved >= self.cut.at:
            self._break()

    def _break(self) -> None:
        if self.broken:
            return
        self.broken = True
        with contextlib.suppress(OSError):
            self.inner.shutdown(socket.SHUT_RDWR)

    def _dead_read(self) -> int:
        assert self.cut is not None
        if self.cut.mode == "reset":
            raise ConnectionResetError(errno.ECONNRESET, "connection reset (injected cut)")
        return 0

    def _dead_write(self) -> OSError:
        assert self.cut is not None
        if self.cut.mode == "reset":
            return ConnectionResetError(errno.ECONNRESET, "connection reset (injected cut)")
        return BrokenPipeError(errno.EPIPE, "broken pipe (injected cut)")

    def stall(self) -> None:
        """From now on, writes stall until the socket is shut down or closed."""
        self._stalling = True

    def hold_reads(self) -> None:
        """From now on, what a read gets is handed over only after
        ``release_reads()``, or once the socket is shut down or closed (a slow reader)."""
        self._holding = True

    def release_reads(self) -> None:
        self._released.set()

    def fail_writes(self) -> None:
        """From now on, writes raise ``BrokenPipeError`` (the peer went away)."""
        self._failing = True

    def _end(self) -> None:
        self._ended.set()
        self._released.set()


def session_runtime(name: str) -> Any:
    """What to pass as ``runtime=`` for a session on a :class:`FaultySocket`.

    The gevent runtime refuses transports that are not gevent sockets (a plain
    one would block the hub); a ``FaultySocket`` is cooperative when the socket
    it wraps is, so the gevent runtime used here checks that socket instead.
    """
    if name != "gevent":
        return name
    from pysmux.runtime import GeventRuntime

    class WrapperAwareGevent(GeventRuntime):
        def check_transport(self, sock: object) -> None:
            super().check_transport(sock.inner if isinstance(sock, FaultySocket) else sock)

    return WrapperAwareGevent()


@dataclass
class StreamView:
    """What the complete frames of one byte log carried for one stream."""

    syn: bool
    data: bytes
    fin: bool


def stream_view(log: bytes | bytearray, sid: int) -> StreamView:
    """The SYN, PSH payloads (up to the FIN) and FIN of ``sid`` in ``log``."""
    frames, _rest = parse_frames(bytes(log))
    syn = fin = False
    data = bytearray()
    for f in frames:
        if f.sid != sid:
            continue
        if f.cmd == CMD_SYN:
            syn = True
        elif f.cmd == CMD_FIN:
            fin = True
        elif f.cmd == CMD_PSH and not fin:
            data += f.data
    return StreamView(syn, bytes(data), fin)


class Splice:
    """Two tasks that copy bytes between two sockets, with an optional cut.

    ``a`` and ``b`` are the splice's own ends of two connections; a session
    sits on the far end of each. ``cut`` counts bytes going a -> b
    (``direction="write"``) or b -> a (``"read"``), as seen from the session
    behind ``a``. At the cut the splice shuts both sockets down (``eof``) or
    closes them with an RST (``reset``, TCP only). ``a_to_b``/``b_to_a`` log
    the bytes forwarded. ``close()`` stops the tasks and closes both ends.
    """

    def __init__(self, a: Any, b: Any, cut: Cut | None = None) -> None:
        self.a, self.b, self.cut = a, b, cut
        self.a_to_b = bytearray()
        self.b_to_a = bytearray()
        self.broken = False
        self._closed = False
        self._lock = current().Condition()  # serialises forwarding with the cut
        self._tasks = [
            current().spawn(self._pump, a, b, self.a_to_b, "write", name="splice-a-b"),
            current().spawn(self._pump, b, a, self.b_to_a, "read", name="splice-b-a"),
        ]

    def _pump(self, src: Any, dst: Any, log: bytearray, direction: str) -> None:
        cut = self.cut if self.cut is not None and self.cut.direction == direction else None
        while True:
            if cut is not None and len(log) >= cut.at:
                self._break()
                return
            try:
                chunk = src.recv(65536)
            except OSError:
                chunk = b""
            with self._lock:
                if self.broken or self._closed:
                    return
                if not chunk:  # the session behind src closed: pass the EOF on
                    with contextlib.suppress(OSError):
                        dst.shutdown(socket.SHUT_WR)
                    return
                if cut is not None:
                    chunk = chunk[: cut.at - len(log)]
                try:
                    dst.sendall(chunk)
                except OSError:
                    return
                log += chunk

    def _break(self) -> None:
        with self._lock:
            if self.broken:
                return
            self.broken = True
            assert self.cut is not None
            reset = self.cut.mode == "reset"
            for sock in (self.a, self.b):
                with contextlib.suppress(OSError):
                    if reset:
                        # SO_LINGER 0: close() sends an RST instead of a FIN;
                        # SHUT_RD wakes a pump blocked in recv and sends nothing.
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                        sock.shutdown(socket.SHUT_RD)
                    else:
                        sock.shutdown(socket.SHUT_RDWR)
            if reset:
                self.a.close()
                self.b.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
        for sock in (self.a, self.b):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for task in self._tasks:
            task.result(5)
        self.a.close()
        self.b.close()
