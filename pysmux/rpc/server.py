"""The JSON-RPC 2.0 server: plain Python functions served on smux streams.

Each stream carries newline-delimited JSON; its requests are answered one
after the other, in order, by the stream's own task (a thread, or a greenlet on
gevent), so a slow method holds up only the stream that called it. A client
that wants calls to overlap uses several streams.

On gevent, methods run in greenlets: they must not block the process (no
``time.sleep``, no plain sockets) unless it is monkey-patched.
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, overload

from ..config import Config
from ..runtime import Runtime
from ..session import Session
from ..stream import Stream
from ..tunnel import Address, SharedKey
from ..tunnel.security import Network
from ..tunnel.server import MuxServer
from .errors import INVALID_REQUEST, SERVER_BUSY
from .lines import ByteBudget, LineReader, LineTooLong, OverBudget
from .protocol import Dispatcher, error_line

__all__ = ["RpcServer"]

log = logging.getLogger("pysmux.rpc")

_F = TypeVar("_F", bound=Callable[..., Any])
_S = TypeVar("_S", bound="RpcServer")

#: What the listener binds when no ``listen`` address is given (``start()`` refuses then).
_NO_LISTEN = "127.0.0.1:0"


class RpcServer(MuxServer):
    """Serve registered functions as JSON-RPC 2.0 methods over smux streams.

    >>> server = RpcServer("127.0.0.1:0")
    >>> @server.method
    ... def add(a: int, b: int) -> int:
    ...     return a + b
    >>> with server:  # doctest: +SKIP
    ...     print(server.address)

    Serve a listening address (``start()``, ``close()``, :meth:`drain`, a
    context manager that starts it), or sessions you made (``serve_session``),
    or single streams (``serve_stream``). Bounds on what a client can make it hold:

    * ``max_line`` bytes per request line (default 1 MiB): a longer line is
      answered with ``INVALID_REQUEST`` and the stream is closed;
    * ``line_timeout`` seconds to finish a line once it started (default 30),
      ``idle_timeout`` seconds of silence between lines and for writing a
      response (default 300; None: no limit); the stream is closed after them;
    * ``max_buffered`` bytes of unfinished lines on all streams together
      (default 64 MiB): past it, the stream that sent more is answered with
      ``SERVER_BUSY`` (-32000) and closed;
    * ``max_sessions`` mux connections and ``max_streams`` streams at once
      (1024 and 4096), at most ``max_session_streams`` (1024) from one session;
      more are closed at once.

    Who may connect: ``allow``, ``tls``, ``key``, ``handshake_timeout`` and
    ``max_handshakes``, as for the tunnel's servers (README, "Security").
    ``stats()`` gives its figures as theirs does.
    """

    def __init__(
        self,
        listen: str | Address | None = None,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        max_line: int = 1 << 20,
        line_timeout: float | None = 30.0,
        idle_timeout: float | None = 300.0,
        max_buffered: int = 64 << 20,
        max_sessions: int = 1024,
        max_streams: int = 4096,
        max_session_streams: int = 1024,
        backlog: int = 128,
        allow: Iterable[str | Network] | None = None,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        handshake_timeout: float = 10.0,
        max_handshakes: int = 128,
    ) -> None:
        if isinstance(max_line, bool) or not isinstance(max_line, int) or max_line <= 0:
            raise ValueError(f"max_line={max_line!r}: must be an int > 0")
        for what, value in (("line_timeout", line_timeout), ("idle_timeout", idle_timeout)):
            if value is not None and not value > 0:
                raise ValueError(f"{what}={value!r}: must be > 0 or None")
        if not (isinstance(max_session_streams, int) and max_session_streams > 0):
            raise ValueError(f"max_session_streams={max_session_streams!r}: must be an int > 0")
        super().__init__(
            _NO_LISTEN if listen is None else listen,
            config=config,
            runtime=runtime,
            max_conns=max_streams,
            max_sessions=max_sessions,
            backlog=backlog,
            allow=allow,
            tls=tls,
            key=key,
            handshake_timeout=handshake_timeout,
            max_handshakes=max_handshakes,
        )
        self._listens = listen is not None
        self._max_session_streams = max_session_streams
        self.max_line = max_line
        self.line_timeout = line_timeout
        self.idle_timeout = idle_timeout
        self._dispatcher = Dispatcher()
        self._budget = ByteBudget(max_buffered, self._rt)
        # Streams waiting for their next request, which drain() closes at once.
        self._idle: dict[int, Stream] = {}
        self._answering_stopped = False

    # -- methods ---------------------------------------------------------------------

    def register(self, name: str, fn: Callable[..., Any], *, raw: bool = False) -> None:
        """Serve ``fn`` as method ``name`` (see :meth:`Dispatcher.register`)."""
        self._dispatcher.register(name, fn, raw=raw)

    @overload
    def method(self, fn: _F, /) -> _F: ...

    @overload
    def method(
        self, fn: None = None, /, *, name: str | None = None, raw: bool = False
    ) -> Callable[[_F], _F]: ...

    def method(
        self, fn: _F | None = None, /, *, name: str | None = None, raw: bool = False
    ) -> _F | Callable[[_F], _F]:
        """Decorator: ``@server.method`` registers a function under its own name,
        ``@server.method(name="x.y")`` under another."""

        def decorate(func: _F) -> _F:
            self.register(name or func.__name__, func, raw=raw)
            return func

        return decorate if fn is None else decorate(fn)

    @property
    def methods(self) -> list[str]:
        """The names served, sorted."""
        return self._dispatcher.names()

    # -- serving ---------------------------------------------------------------------

    def serve_stream(self, stream: Stream) -> None:
        """Answer the requests of one stream until its EOF, then close it (blocks).

        Once the server drains, the stream is ended after the requests already
        received (see :meth:`drain`). Errors of the stream itself (reset, session
        closed) propagate.
        """
        reader = LineReader(stream, self.max_line, self._budget)
        left: int | None = None  # once draining: the requests received still to answer
        try:
            while True:
                if left is None and self._answering_stopped:
                    left = reader.lines_begun()
                if left is not None:
                    if not left:
                        break  # draining: nothing new is answered
                    left -= 1
                try:
                    if not reader.pending:
                        waiting = self._wait_for_request(stream, reader)
                        if waiting is None:
                            return  # drain() closed it while it was idle
                        if not waiting:
                            break  # EOF, or draining: nothing new is answered
                    line = reader.readline(self.idle_timeout, self.line_timeout)
                except LineTooLong as exc:
                    self._refuse(stream, INVALID_REQUEST, str(exc))
                    return
                except OverBudget as exc:
                    self._refuse(stream, SERVER_BUSY, str(exc))
                    return
                except TimeoutError as exc:
                    log.debug("stream %d closed: %s", stream.id, exc)
                    return
                if line is None:
                    break
                reply = self._dispatcher.handle_line(line)
                if reply is not None:
                    stream.settimeout(self.idle_timeout)
                    stream.sendall(reply + b"\n")
            stream.shutdown(socket.SHUT_WR)
        finally:
            reader.close()
            stream.close()

    def _wait_for_request(self, stream: Stream, reader: LineReader) -> bool | None:
        """Wait, idle, for the first bytes of the next request: True when they came,
        False at EOF or once draining, None if :meth:`drain` closed the stream meanwhile."""
        key = id(stream)
        with self._lock:
            if self._answering_stopped:
                return False
            self._idle[key] = stream
        try:
            came = reader.fill(self.idle_timeout)
        finally:
            with self._lock:
                cut = self._idle.pop(key, None) is None
        return None if cut else came

    def _refuse(self, stream: Stream, code: int, why: str) -> None:
        log.info("stream %d closed: %s", stream.id, why)
        stream.settimeout(self.idle_timeout)
        stream.sendall(error_line(code, data=why) + b"\n")

    def _serve_stream(self, stream: Stream, label: str) -> None:
        try:
            self.serve_stream(stream)
        except OSError as exc:  # the stream was reset, or its session ended
            log.debug("rpc stream %s: %s", label, exc)

    def serve_session(self, session: Session) -> None:
        """Serve every stream ``session``'s peer opens, a task each, until it ends
        (blocks). ``close()`` closes it."""
        token = self._track_session(session)
        if token is None:
            session.close()
            return
        self._serve_session(session, token, f"session {id(session):#x}")

    def drain(self, timeout: float) -> bool:
        """Finish the calls in flight, then close; True if every stream ended in time.

        New mux connections and streams are refused at once. A stream idle between
        requests (a client's pooled stream) is closed at once: its client sees EOF
        and opens no call on it. A stream in the middle of a call gets its answer,
        and those of the requests it has received already, then it is closed: nothing
        new is answered. Streams still busy after ``timeout`` seconds are reset, as by
        ``close()``. A request that crosses the close on its way is not answered (its
        caller sees the stream end). Do not call it from a method the server runs.
        """
        with self._lock:
            self._answering_stopped = True
            idle, self._idle = self._idle, {}
        for stream in idle.values():
            stream.close()
        return super().drain(timeout)

    def start(self: _S) -> _S:
        """Listen on the ``listen`` address and serve in background tasks; ``self``.

        ``OSError`` if it cannot be bound; ``RuntimeError`` without a ``listen`` address."""
        if not self._listens:
            raise RuntimeError("RpcServer: no listen address given")
        return super().start()

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` in a way that suits the runtime, returning early (True)
        once the server closes: what a method that waits should call."""
        return self._pause(seconds)

    @property
    def runtime(self) -> Runtime:
        return self._rt

    @property
    def streams(self) -> int:
        """Streams being served now."""
        return self.connections

    @property
    def buffered(self) -> int:
        """Bytes of unfinished request lines held now, on all streams."""
        return self._budget.held

    def __enter__(self: _S) -> _S:
        if self._listens:
            super().__enter__()
        return self

    def __repr__(self) -> str:
        where = str(self._address) if self._address else "not listening"
        return f"<pysmux.rpc.RpcServer {where} sessions={self.sessions} streams={self.streams}>"
