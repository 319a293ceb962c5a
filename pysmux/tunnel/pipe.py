"""One TCP connection carried by one stream: a task per direction, the upload one on demand.

What a carried connection gets:

* a task that copies stream to TCP for the whole connection, and a task that
  copies TCP to stream only while bytes arrive: the socket is watched (the
  runtime's :class:`~pysmux.runtime.Launcher`) and a task starts once it is
  readable; once nothing more arrives within the launcher's ``linger`` it ends
  and the socket is watched again. Bytes waiting at the start, and everything
  after the stream has ended, are carried by the connection's own task. An idle
  connection costs one task, not two;
* half-close in both directions: EOF from the TCP side becomes
  ``stream.shutdown(SHUT_WR)`` (a FIN), EOF of the stream becomes
  ``sock.shutdown(SHUT_WR)``, and the other direction carries on;
* a failure (the TCP peer resets, the mux connection dies, the tunnel closes)
  aborts both directions and resets the TCP side (:func:`.net.abort_tcp`): a
  connection cut short is not shown to a TCP peer as a clean EOF. Across the
  mux it travels as a stream reset (``Stream.reset()``): a pysmux tunnel end
  resets its TCP side in turn; a Go smux end, which has no reset, sees a FIN.

Every task the pipe starts is joined before ``run()`` returns.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from ..errors import StreamResetError
from ..runtime import Launch, Launcher, Runtime
from ..stream import Stream
from .net import abort_tcp, reset_and_close

__all__ = ["BUFSIZE", "Pipe", "chunks"]

log = logging.getLogger("pysmux.tunnel")

#: Bytes read from a TCP socket or a stream at once (two frames at the default max_frame_size).
BUFSIZE = 65536


def chunks(source: Any) -> Iterator[bytes]:
    """What ``source.recv`` returns, up to ``BUFSIZE`` bytes at a time, until EOF."""
    while True:
        data = source.recv(BUFSIZE)
        if not data:
            return
        yield data


class Pipe:
    """Copies between one TCP socket and one stream until both directions are done.

    ``run()`` copies stream to TCP in the calling task while upload tasks copy
    TCP to stream (started by ``launcher`` when the socket is readable); once
    the stream has ended it carries the rest of the upload direction itself. It
    returns once both directions are done and every task has been joined, with
    both ends closed. ``abort()`` (thread-safe, idempotent) wakes both
    directions; the TCP side is then closed with a reset.
    """

    __slots__ = (
        "_failed",
        "_inline",
        "_label",
        "_launcher",
        "_launches",
        "_lock",
        "_rt",
        "_sending",
        "_sock",
        "_stream",
        "_up_done",
        "bytes_down",
        "bytes_up",
        "reset_by_peer",
    )

    def __init__(
        self, rt: Runtime, launcher: Launcher, sock: Any, stream: Stream, label: str
    ) -> None:
        self._rt = rt
        self._launcher = launcher
        self._sock = sock
        self._stream = stream
        self._label = label
        self._lock = rt.lock()
        self._failed = False
        self._inline = False  # the connection's own task carries the upload direction
        self._sending = False  # the down task is inside sock.sendall
        self._up_done = False  # TCP EOF passed on as a FIN
        self._launches: list[Launch] = []  # the watch, and upload tasks not yet joined
        self.bytes_up = 0  # TCP -> stream
        self.bytes_down = 0  # stream -> TCP
        self.reset_by_peer = False  # the stream was reset (not ended with a FIN)

    def run(self) -> None:
        try:
            if self._rt.wait_readable(self._sock, 0) and not self._upload_first():
                return  # aborted: ``finally`` ends both directions
            self._watch()
            self._mux_to_tcp()
            self._finish_up()
        except BaseException as exc:  # not an OSError: a bug, or the task being killed
            self.abort(f"stream->tcp: {exc!r}")
            raise
        finally:
            self._join_up()
            self._close()

    # -- stream to TCP: the connection's own task -------------------------------------

    def _mux_to_tcp(self) -> None:
        sock, stream, lock = self._sock, self._stream, self._lock
        try:
            for data in chunks(stream):
                with lock:
                    if self._failed:
                        return
                    self._sending = True
                try:
                    sock.sendall(data)
                finally:
                    with lock:
                        self._sending = False
                self.bytes_down += len(data)
            with lock:
                if self._failed:
                    return
            sock.shutdown(socket.SHUT_WR)
        except StreamResetError as exc:
            self.reset_by_peer = True
            self.abort(f"stream->tcp: {exc}")
        except OSError as exc:
            self.abort(f"stream->tcp: {exc}")

    # -- TCP to stream: tasks on demand ------------------------------------------------

    def _watch(self) -> None:
        """Have the next bytes (or EOF) of the TCP side start an upload task."""
        with self._lock:
            if self._failed or self._up_done or self._inline:
                return
            self._launches = [launch for launch in self._launches if launch.is_alive()]
            try:
                launch = self._launcher.when_readable(
                    self._sock, self._tcp_to_mux, f"pysmux-tunnel-up-{self._label}", self._no_task
                )
            except (OSError, ValueError, RuntimeError) as exc:
                error: BaseException | None = exc
            else:
                self._launches.append(launch)
                return
        self.abort(f"cannot watch the TCP side: {error!r}")

    def _no_task(self, exc: BaseException) -> None:
        """No upload task could start (out of threads): give up this connection only."""
        self.abort(f"cannot start a task: {exc!r}")

    def _upload_first(self) -> bool:
        """Carry the bytes that are already waiting in this task (most clients speak
        first: a request, a TLS hello), saving a task start; False if it failed."""
        try:
            data = self._sock.recv(BUFSIZE)
            if not data:
                self._tcp_eof()
                return True
            self._stream.sendall(data)
            self.bytes_up += len(data)
        except OSError as exc:
            self.abort(f"tcp->stream: {exc}")
            return False
        return True

    def _tcp_to_mux(self) -> None:
        """An upload task (started once the socket is readable): copy while bytes keep
        coming, then hand back to the watch."""
        self._upload(self._launcher.linger)

    def _upload(self, linger: float | None) -> None:
        """Copy TCP to stream until EOF, or until nothing arrives within ``linger``
        seconds (None: wait as long as it takes), then hand back to the watch."""
        sock, stream, rt = self._sock, self._stream, self._rt
        try:
            while True:
                data = sock.recv(BUFSIZE)
                if not data:
                    self._tcp_eof()
                    return
                stream.sendall(data)
                self.bytes_up += len(data)
                if linger is not None and not rt.wait_readable(sock, linger):
                    break
            self._watch()
        except OSError as exc:
            self.abort(f"tcp->stream: {exc}")
        except Exception as exc:  # a bug: never leave the other direction hanging
            log.exception("%s: tcp->stream failed", self._label)
            self.abort(f"tcp->stream: {exc!r}")

    def _tcp_eof(self) -> None:
        with self._lock:
            if self._failed:  # the b"" came from abort() waking us: not an EOF
                return
        self._stream.shutdown(socket.SHUT_WR)
        with self._lock:
            self._up_done = True

    def _finish_up(self) -> None:
        """The download direction is done: this task takes the upload direction over
        (its last bytes and EOF need no task of their own)."""
        self._join_up()
        with self._lock:
            if self._up_done or self._failed:
                return
        self._upload(None)

    def _join_up(self) -> None:
        """Stop watching, and join every upload task (a running one finishes its
        burst; it starts no other)."""
        with self._lock:
            self._inline = True
            launches, self._launches = self._launches, []
        for launch in launches:
            launch.cancel()
            launch.join()

    # -- ending ------------------------------------------------------------------------

    def abort(self, why: str = "tunnel closed") -> None:
        """Stop both directions; the TCP side will be reset, and the stream."""
        with self._lock:
            first = not self._failed
            self._failed = True
            sending = self._sending
        if first:
            log.debug("%s: aborted: %s", self._label, why)
        abort_tcp(self._sock, sending)
        with contextlib.suppress(OSError):
            self._stream.reset()

    def _close(self) -> None:
        if self._failed:
            with contextlib.suppress(OSError):
                self._stream.reset()
            reset_and_close(self._sock)
        else:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._sock.close()
        log.debug(
            "%s: closed (%d bytes up, %d down%s)",
            self._label,
            self.bytes_up,
            self.bytes_down,
            ", reset" if self._failed else "",
        )
