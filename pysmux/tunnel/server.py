"""The server side of the tunnel: mux connections in, every stream served.

:class:`MuxServer` accepts mux connections (one server session each, at most
``max_sessions``) and serves every stream in a task of its own, at most
``max_conns`` at once. What a stream gets is up to the subclass:
:class:`TunnelServer` forwards it as a new TCP connection to its target,
:class:`EchoServer` echoes it.
"""

from __future__ import annotations

import functools
import logging
import socket
from typing import Any

from ..config import Config
from ..runtime import Runtime
from ..session import Session
from ..session import server as mux_server
from ..stream import Stream
from .net import Address, as_address, format_address, reset_and_close
from .pipe import chunks
from .service import Service, check_seconds

__all__ = ["EchoServer", "MuxServer", "TunnelServer"]

log = logging.getLogger("pysmux.tunnel")


class MuxServer(Service):
    """Accepts mux connections on ``listen`` (one server session each) and serves every stream.

    ``listen`` is a ``"host:port"`` string (``":port"`` listens on every IPv4
    interface) or a ``(host, port)`` tuple. ``runtime`` is ``"thread"``
    (default), ``"gevent"`` or ``"auto"``, as for sessions; ``config`` must
    match the clients' (same version). At most ``max_sessions`` mux
    connections and ``max_conns`` streams are served at once; more are refused.
    """

    _default_host = "0.0.0.0"

    def __init__(
        self,
        listen: str | Address,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        max_conns: int = 4096,
        max_sessions: int = 1024,
        backlog: int = 128,
    ) -> None:
        super().__init__(
            listen, config=config, runtime=runtime, max_conns=max_conns, backlog=backlog
        )
        if not (isinstance(max_sessions, int) and max_sessions > 0):
            raise ValueError(f"max_sessions={max_sessions!r}: must be an int > 0")
        self._max_sessions = max_sessions

    @property
    def sessions(self) -> int:
        """Mux connections open now."""
        return len(self._sessions)

    def _accepted(self, sock: Any, peer: Any) -> None:
        where = format_address(peer)
        if len(self._sessions) >= self._max_sessions:
            log.warning(
                "refused mux connection from %s: max_sessions=%d reached", where, self._max_sessions
            )
            reset_and_close(sock)
            return
        session = mux_server(sock, config=self._config, runtime=self._rt)
        token = self._track_session(session)
        if token is None:
            session.close()
            return
        if not self._spawn(
            functools.partial(self._serve_session, session, token, where),
            f"pysmux-tunnel-session-{where}",
        ):
            self._untrack_session(token)
            session.close()

    def _serve_session(self, session: Session, token: int, where: str) -> None:
        log.info("mux connection from %s", where)
        try:
            while True:
                try:
                    stream = session.accept_stream()
                except OSError:
                    break
                label = f"{where}/{stream.id}"
                if not self._reserve_conn():
                    log.warning("stream %s refused: max_conns=%d reached", label, self._max_conns)
                    stream.close()
                    continue
                if not self._spawn(
                    functools.partial(self._serve_stream_task, stream, label),
                    f"pysmux-tunnel-stream-{label}",
                ):
                    self._release_conn()
                    stream.close()
        finally:
            self._untrack_session(token)
            session.close()
            if not self._closed:
                log.info("mux connection from %s ended: %s", where, session.error)

    def _serve_stream_task(self, stream: Stream, label: str) -> None:
        try:
            self._serve_stream(stream, label)
        finally:
            stream.close()
            self._release_conn()

    def _serve_stream(self, stream: Stream, label: str) -> None:
        raise NotImplementedError


class TunnelServer(MuxServer):
    """Accept mux connections on ``listen``; forward each stream as a TCP connection to ``target``.

    ``listen`` and ``target`` are ``"host:port"`` strings (``":port"`` listens
    on every IPv4 interface) or ``(host, port)`` tuples. A target that refuses
    or does not answer within ``connect_timeout`` seconds closes that stream
    only. ``runtime`` is ``"thread"`` (default), ``"gevent"`` or ``"auto"``,
    as for sessions; ``config`` must match the clients' (same version).

    >>> with TunnelServer("127.0.0.1:0", "127.0.0.1:8080") as srv:  # doctest: +SKIP
    ...     print(srv.address)
    """

    def __init__(
        self,
        listen: str | Address,
        target: str | Address,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        connect_timeout: float = 10.0,
        max_conns: int = 4096,
        max_sessions: int = 1024,
        backlog: int = 128,
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            max_conns=max_conns,
            max_sessions=max_sessions,
            backlog=backlog,
        )
        self._connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self._target = as_address(target, "target")
        if not self._target[0] or not self._target[1]:
            raise ValueError(f"target={target!r}: needs a host and a port")

    @property
    def target(self) -> Address:
        return self._target

    def _serve_stream(self, stream: Stream, label: str) -> None:
        target = format_address(self._target)
        try:
            sock = self._dial(self._target, self._connect_timeout)
        except OSError as exc:
            if not self._closed:
                log.warning("stream %s: cannot connect to target %s: %s", label, target, exc)
            return
        log.debug("stream %s: connected to %s", label, target)
        self._carry(sock, stream, f"stream {label}")


class EchoServer(MuxServer):
    """Accept mux connections on ``listen`` and echo every stream until its EOF.

    For trying a client out, tests and benchmarks; it takes the arguments of
    :class:`MuxServer`.
    """

    def _serve_stream(self, stream: Stream, label: str) -> None:
        token = self._track(stream.close)
        if token is None:
            return
        total = 0
        try:
            for data in chunks(stream):
                stream.sendall(data)
                total += len(data)
            stream.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.debug("echo %s: %s", label, exc)
        finally:
            self._untrack(token)
        log.debug("echo %s: %d bytes", label, total)
