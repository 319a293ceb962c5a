"""One TCP connection carried by one stream: a copy task per direction.

What a carried connection gets:

* two copy tasks (threads, or greenlets with ``runtime="gevent"``): TCP to
  stream and stream to TCP, ended and joined when the connection ends;
* half-close in both directions: EOF from the TCP side becomes
  ``stream.shutdown(SHUT_WR)`` (a FIN), EOF of the stream becomes
  ``sock.shutdown(SHUT_WR)``, and the other direction carries on;
* a failure (the TCP peer resets, the mux connection dies, the tunnel closes)
  aborts both directions and resets the TCP side (:func:`.net.abort_tcp`): a
  connection cut short is not shown to a TCP peer as a clean EOF. smux has no
  stream reset, so across the mux a failure travels as a FIN.
"""

from __future__ import annotations

import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import Any

from ..runtime import Runtime
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

    ``run()`` copies stream to TCP in the calling task and TCP to stream in a
    task of its own, joins it, and closes both ends. ``abort()`` (thread-safe,
    idempotent) wakes both directions; the TCP side is then closed with a reset.
    """

    __slots__ = (
        "_failed",
        "_label",
        "_lock",
        "_rt",
        "_sending",
        "_sock",
        "_stream",
        "bytes_down",
        "bytes_up",
    )

    def __init__(self, rt: Runtime, sock: Any, stream: Stream, label: str) -> None:
        self._rt = rt
        self._sock = sock
        self._stream = stream
        self._label = label
        self._lock = rt.lock()
        self._failed = False
        self._sending = False  # the down task is inside sock.sendall
        self.bytes_up = 0  # TCP -> stream
        self.bytes_down = 0  # stream -> TCP

    def run(self) -> None:
        try:
            up = self._rt.spawn(self._tcp_to_mux, f"pysmux-tunnel-up-{self._label}")
        except BaseException as exc:  # out of threads: give up this connection only
            self.abort(f"cannot start a task: {exc!r}")
            self._close()
            raise
        try:
            self._mux_to_tcp()
        except BaseException as exc:  # not an OSError: a bug, or the task being killed
            self.abort(f"stream->tcp: {exc!r}")
            raise
        finally:
            up.join()
            self._close()

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
        except OSError as exc:
            self.abort(f"stream->tcp: {exc}")

    def _tcp_to_mux(self) -> None:
        sock, stream = self._sock, self._stream
        try:
            for data in chunks(sock):
                stream.sendall(data)
                self.bytes_up += len(data)
            with self._lock:
                if self._failed:  # the b"" came from abort() waking us: not an EOF
                    return
            stream.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.abort(f"tcp->stream: {exc}")
        except Exception as exc:  # a bug: never leave the other direction hanging
            log.exception("%s: tcp->stream failed", self._label)
            self.abort(f"tcp->stream: {exc!r}")

    def abort(self, why: str = "tunnel closed") -> None:
        """Stop both directions; the TCP side will be reset, the stream closed (FIN)."""
        with self._lock:
            first = not self._failed
            self._failed = True
            sending = self._sending
        if first:
            log.debug("%s: aborted: %s", self._label, why)
        abort_tcp(self._sock, sending)
        with contextlib.suppress(OSError):
            self._stream.close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
        if self._failed:
            reset_and_close(self._sock)
        else:
            self._sock.close()
        log.debug(
            "%s: closed (%d bytes up, %d down%s)",
            self._label,
            self.bytes_up,
            self.bytes_down,
            ", reset" if self._failed else "",
        )
