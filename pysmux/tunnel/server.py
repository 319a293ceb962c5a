"""The server side of the tunnel: mux connections in, every stream served.

:class:`MuxServer` accepts mux connections (one server session each, at most
``max_sessions``) and serves every stream in a task of its own, at most
``max_conns`` at once. What a stream gets is up to the subclass:
:class:`TunnelServer` forwards it as a new TCP connection to its target,
:class:`EchoServer` echoes it.
"""

from __future__ import annotations

import errno
import functools
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any

from ..config import Config
from ..runtime import Runtime
from ..session import Session
from ..stream import Stream
from .guard import Guard
from .handshake import describe_end, start_session
from .net import Address, abort_tcp, as_address, format_address, reset_and_close
from .pipe import chunks
from .security import Network, SharedKey, is_loopback
from .service import Service, check_seconds


def _abort_holder(holder: list[Any]) -> None:
    """Reset the connection in its handshake, whichever socket object now carries it."""
    abort_tcp(holder[-1], sending=True)


__all__ = ["EchoServer", "MuxServer", "TunnelServer"]

log = logging.getLogger("pysmux.tunnel")

#: Errors of a peer that left before its session started (not this end's trouble).
_PEER_GONE = frozenset({errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.EBADF})


class MuxServer(Service):
    """Accepts mux connections on ``listen`` (one server session each) and serves every stream.

    ``listen`` is a ``"host:port"`` string (``":port"`` listens on every IPv4
    interface) or a ``(host, port)`` tuple. ``runtime`` is ``"thread"``
    (default), ``"gevent"`` or ``"auto"``, as for sessions; ``config`` must
    match the clients' (same version). At most ``max_sessions`` mux
    connections and ``max_conns`` streams are served at once; more are refused.

    Who may connect (README, "Security"):

    * ``allow``: networks (``"10.0.0.0/8"``, ``"192.0.2.7"``, or
      ``ipaddress`` networks); a connection from elsewhere is closed at accept,
      before any handshake. ``None`` (default): any address.
    * ``tls``: an ``ssl.SSLContext`` for the server side (see
      :func:`server_tls_context`); TLS 1.2 at least. A context that requires
      client certificates (``verify_mode = CERT_REQUIRED``) is mutual TLS.
    * ``key``: a shared secret (bytes, str or :class:`SharedKey`); every client
      must prove it knows it before smux starts. It authenticates; only TLS
      encrypts.

    The TLS and key handshakes of a connection run in a task of their own and
    must be done within ``handshake_timeout`` seconds; at most
    ``max_handshakes`` run at once (more connections are refused). A client
    that fails is logged with its address and the reason, and dropped: its
    connection never becomes a session. A server listening beyond loopback with
    neither a key nor client certificates logs a warning at ``start()``: anyone
    who reaches it can use it.
    """

    _default_host = "0.0.0.0"
    _COUNTERS = (*Service._COUNTERS, "handshake_failures")
    #: Streams served at once for one mux connection (None: only ``max_conns`` bounds
    #: them), so that one peer cannot take every slot.
    _max_session_streams: int | None = None

    def __init__(
        self,
        listen: str | Address,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        max_conns: int = 4096,
        max_sessions: int = 1024,
        backlog: int = 128,
        allow: Iterable[str | Network] | None = None,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        handshake_timeout: float = 10.0,
        max_handshakes: int = 128,
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            max_conns=max_conns,
            backlog=backlog,
            allow=allow,
        )
        if not (isinstance(max_sessions, int) and max_sessions > 0):
            raise ValueError(f"max_sessions={max_sessions!r}: must be an int > 0")
        if not (isinstance(max_handshakes, int) and max_handshakes > 0):
            raise ValueError(f"max_handshakes={max_handshakes!r}: must be an int > 0")
        self._max_sessions = max_sessions
        self._max_handshakes = max_handshakes
        self._guard = Guard.build(self._rt, tls, key, handshake_timeout, server_side=True)
        # Connections in their handshakes: abort callable and deadline, by token.
        self._handshakes: dict[int, tuple[float, Callable[[], None]]] = {}

    @property
    def sessions(self) -> int:
        """Mux connections open now."""
        return len(self._sessions)

    @property
    def handshakes(self) -> int:
        """Connections in their TLS or key handshake now."""
        return len(self._handshakes)

    @property
    def refused(self) -> int:
        """Connections that failed their TLS or key handshake so far."""
        return self._counts["handshake_failures"]

    @property
    def authenticated(self) -> bool:
        """True if a client must prove who it is: a key, or TLS client certificates."""
        tls = self._guard.tls
        return self._guard.key is not None or (
            tls is not None and tls.verify_mode == ssl.CERT_REQUIRED
        )

    def _start_tasks(self) -> None:
        host = self.address[0]
        if not self.authenticated and not is_loopback(host):
            log.warning(
                "%s on %s lets anyone who can reach it in: no key and no TLS client certificates",
                type(self).__name__,
                format_address(self.address),
            )
        if not self._guard.trivial:
            self._spawn(self._expire_handshakes, "pysmux-tunnel-handshake-timer")

    def _accepted(self, sock: Any, peer: Any) -> None:
        where = format_address(peer)
        if len(self._sessions) + len(self._handshakes) >= self._max_sessions:
            log.warning(
                "refused mux connection from %s: max_sessions=%d reached", where, self._max_sessions
            )
            reset_and_close(sock)
            return
        if self._guard.trivial:
            self._start_session(sock, where)
            return
        if len(self._handshakes) >= self._max_handshakes:
            log.warning(
                "refused mux connection from %s: max_handshakes=%d in progress",
                where,
                self._max_handshakes,
            )
            reset_and_close(sock)
            return
        holder = [sock]
        deadline = self._rt.monotonic() + self._guard.timeout
        entry: tuple[float, Callable[[], None]] = (
            deadline,
            functools.partial(_abort_holder, holder),
        )
        token = self._register(self._handshakes, entry)
        if token is None:
            reset_and_close(sock)
            return
        with self._lock:
            self._cond.notify_all()  # the timer may need to wake sooner
        secure = functools.partial(self._secure, holder, token, where, deadline)
        if not self._spawn(secure, f"pysmux-tunnel-handshake-{where}"):
            self._end_handshake(token)
            reset_and_close(sock)

    def _secure(self, holder: list[Any], token: int, where: str, deadline: float) -> None:
        """The handshakes of one connection (in its own task), then its session."""
        abort_token = self._track(functools.partial(_abort_holder, holder))
        if abort_token is None:  # closed meanwhile
            self._end_handshake(token)
            reset_and_close(holder[0])
            return
        try:
            transport = self._guard.server_side(holder[0], holder.append)
        except OSError as exc:
            reason = str(exc)
            if self._rt.monotonic() >= deadline:  # the timer cut it short
                reason = f"handshake not done within {self._guard.timeout:g} s"
            if not self._closed:
                log.warning("mux connection from %s refused: %s", where, reason)
            self._count("handshake_failures")  # after the log: whoever waits for it sees why
            reset_and_close(holder[-1])
            return
        finally:
            self._end_handshake(token)
            self._untrack(abort_token)
        if self._closed or self._draining:
            reset_and_close(transport)
            return
        self._start_session(transport, where, spawn=False)

    def _end_handshake(self, token: int) -> None:
        with self._lock:
            self._handshakes.pop(token, None)

    def _expire_handshakes(self) -> None:
        """Abort every handshake past its deadline: a peer that trickles bytes cannot
        stretch one (the socket timeouts bound each wait, not the whole)."""
        rt = self._rt
        with self._lock:
            while not self._closed:
                now = rt.monotonic()
                due = [t for t, (d, _) in self._handshakes.items() if d <= now]
                for t in due:
                    _, abort = self._handshakes.pop(t)
                    abort()
                soonest = min((d for d, _ in self._handshakes.values()), default=None)
                self._cond.wait(None if soonest is None else max(0.0, soonest - now) + 0.01)

    def _start_session(self, transport: Any, where: str, spawn: bool = True) -> None:
        try:
            session = start_session(transport, self._config, self._rt, is_client=False)
        except OSError as exc:
            if exc.errno in _PEER_GONE:
                log.info("mux connection from %s: gone before it started: %s", where, exc)
            else:  # this end's trouble (out of descriptors, say): the operator's business
                log.warning("mux connection from %s: cannot start its session: %s", where, exc)
            return
        token = self._track_session(session)
        if token is None:
            session.close()
            return
        serve = functools.partial(self._serve_session, session, token, where)
        if not spawn:
            serve()
        elif not self._spawn(serve, f"pysmux-tunnel-session-{where}"):
            self._end_session(token)

    def _serve_session(self, session: Session, token: int, where: str) -> None:
        log.info("mux connection from %s", where)
        served = [0]  # this session's streams being served
        try:
            while True:
                try:
                    stream = session.accept_stream()
                except OSError:
                    break
                label = f"{where}/{stream.id}"
                limit = self._max_session_streams
                if limit is not None and served[0] >= limit:
                    self._count("connections_refused")
                    log.warning("stream %s refused: max_session_streams=%d reached", label, limit)
                    stream.reset()
                    continue
                if not self._reserve_conn():
                    if self._draining:
                        log.info("stream %s refused: draining", label)
                    else:
                        log.warning(
                            "stream %s refused: max_conns=%d reached", label, self._max_conns
                        )
                    stream.reset()
                    continue
                with self._lock:
                    served[0] += 1
                if not self._spawn(
                    functools.partial(self._serve_stream_task, stream, label, served),
                    f"pysmux-tunnel-stream-{label}",
                ):
                    self._stream_done(served)
                    stream.reset()
        finally:
            self._end_session(token)
            if not self._closed:
                why, misconfigured = describe_end(session, where, "sent")
                level = logging.WARNING if misconfigured else logging.INFO
                log.log(level, "mux connection from %s ended: %s", where, why)

    def _serve_stream_task(self, stream: Stream, label: str, served: list[int]) -> None:
        try:
            self._serve_stream(stream, label)
        finally:
            stream.close()
            self._stream_done(served)

    def _stream_done(self, served: list[int]) -> None:
        with self._lock:
            served[0] -= 1
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
    ``allow``, ``tls``, ``key``, ``handshake_timeout`` and ``max_handshakes``
    decide who may connect, as for :class:`MuxServer`; without a key or client
    certificates anyone who reaches ``listen`` can reach ``target``.

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
        allow: Iterable[str | Network] | None = None,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        handshake_timeout: float = 10.0,
        max_handshakes: int = 128,
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            max_conns=max_conns,
            max_sessions=max_sessions,
            backlog=backlog,
            allow=allow,
            tls=tls,
            key=key,
            handshake_timeout=handshake_timeout,
            max_handshakes=max_handshakes,
        )
        self._connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self._target = as_address(target, "target")
        if not self._target[0] or not self._target[1]:
            raise ValueError(f"target={target!r}: needs a host and a port")

    @property
    def target(self) -> Address:
        return self._target

    _COUNTERS = (*MuxServer._COUNTERS, "target_connect_failures")

    def _serve_stream(self, stream: Stream, label: str) -> None:
        target = format_address(self._target)
        try:
            sock = self._dial(self._target, self._connect_timeout)
        except OSError as exc:
            self._count("target_connect_failures")
            if not self._closed:
                log.warning("stream %s: cannot connect to target %s: %s", label, target, exc)
            stream.reset()  # the client resets its TCP connection: it did not complete
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
