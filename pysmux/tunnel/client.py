"""The client side of the tunnel: TCP connections in, each carried as a stream.

:class:`TunnelClient` keeps ``conn`` mux connections (links) to the server,
each re-dialled with exponential backoff whenever it dies (and renewed after
``autoexpire`` seconds, if set), and carries every TCP connection it accepts
as one stream on the live link that carries the fewest.
"""

from __future__ import annotations

import functools
import logging
import ssl
from collections.abc import Iterable
from typing import Any

from ..config import Config
from ..runtime import Runtime
from ..session import Session
from ..stream import Stream
from .guard import Guard
from .handshake import describe_loss, start_session
from .net import Address, abort_tcp, as_address, format_address, nodelay, reset_and_close
from .security import Network, SharedKey, is_loopback
from .service import Service, check_seconds

__all__ = ["Link", "Mux", "TunnelClient"]

log = logging.getLogger("pysmux.tunnel")


class Mux:
    """One live mux connection of a link, and the connections it carries now."""

    __slots__ = ("born", "carried", "session", "token")

    def __init__(self, session: Session, token: int, born: float) -> None:
        self.session = session
        self.token = token
        self.born = born
        self.carried = 0


class Link:
    """One of the client's ``conn`` mux connections, re-dialled whenever it dies."""

    __slots__ = ("index", "mux")

    def __init__(self, index: int) -> None:
        self.index = index
        self.mux: Mux | None = None

    @property
    def session(self) -> Session | None:
        return None if self.mux is None else self.mux.session


class TunnelClient(Service):
    """Accept TCP connections on ``listen``; carry each as one stream to ``remote``.

    ``conn`` mux connections are kept open to ``remote`` (kcptun's ``--conn``);
    each new TCP connection goes to the live one carrying the fewest
    connections. A mux connection that fails to connect or dies is dialled
    again after a backoff that doubles from ``backoff_initial`` up to
    ``backoff_max`` seconds (at once after the loss of a healthy one that had
    lived that long). A TCP connection that arrives while no mux connection is
    up waits up to ``connect_timeout`` seconds for one, then is reset.

    ``autoexpire`` (seconds, kcptun's ``--autoexpire``): a mux connection that
    old is retired: new connections go to a fresh one dialled at once, those
    it carries finish on it, for up to ``scavenge_ttl`` seconds (kcptun's
    ``--scavengettl``), then it is closed.

    ``listen`` and ``remote`` are ``"host:port"`` strings (``":port"`` listens
    on 127.0.0.1) or ``(host, port)`` tuples. ``config`` must match the
    server's (same version).

    Security (README, "Security"), each as the server has it:

    * ``tls``: an ``ssl.SSLContext`` for the client side (see
      :func:`client_tls_context`); the server's certificate is checked for
      ``server_hostname`` (default: the host of ``remote``). A context that
      verifies nothing logs a warning at every ``start()``.
    * ``key``: the server's shared secret; the client proves it knows it, and
      checks that the server does too, before any stream is carried.
    * ``handshake_timeout``: seconds for the TLS and key handshakes together;
      a failed handshake counts as a failed dial (logged, retried with backoff).
    * ``allow``: networks TCP connections may come from (others are closed at
      accept). Listening beyond loopback without it logs a warning: anyone who
      reaches ``listen`` reaches the server's target.
    """

    _default_host = "127.0.0.1"
    _COUNTERS = (*Service._COUNTERS, "reconnects", "dial_failures", "expired")

    def __init__(
        self,
        listen: str | Address,
        remote: str | Address,
        *,
        conn: int = 1,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        connect_timeout: float = 10.0,
        backoff_initial: float = 0.05,
        backoff_max: float = 5.0,
        max_conns: int = 4096,
        backlog: int = 128,
        allow: Iterable[str | Network] | None = None,
        tls: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        key: SharedKey | bytes | str | None = None,
        handshake_timeout: float = 10.0,
        autoexpire: float | None = None,
        scavenge_ttl: float = 600.0,
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            max_conns=max_conns,
            backlog=backlog,
            allow=allow,
        )
        self._guard = Guard.build(self._rt, tls, key, handshake_timeout, server_side=False)
        self._connect_timeout = check_seconds("connect_timeout", connect_timeout)
        self._remote = as_address(remote, "remote")
        if not self._remote[0] or not self._remote[1]:
            raise ValueError(f"remote={remote!r}: needs a host and a port")
        if not (isinstance(conn, int) and conn > 0):
            raise ValueError(f"conn={conn!r}: must be an int > 0")
        self._backoff_max = check_seconds("backoff_max", backoff_max)
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                f"backoff_initial={backoff_initial!r}, backoff_max={backoff_max!r}: "
                "need 0 < backoff_initial <= backoff_max"
            )
        self._backoff_initial = float(backoff_initial)
        self._server_hostname = server_hostname or self._remote[0]
        self._autoexpire = None if autoexpire is None else check_seconds("autoexpire", autoexpire)
        self._scavenge_ttl = check_seconds("scavenge_ttl", scavenge_ttl)
        self._links = [Link(i + 1) for i in range(conn)]
        self._next_link = 0
        self._dials = 0

    @property
    def remote(self) -> Address:
        return self._remote

    @property
    def connected(self) -> int:
        """Mux connections up now (0 to ``conn``; retired ones not counted)."""
        with self._lock:
            return self._live()

    @property
    def dials(self) -> int:
        """Mux connections established so far (the first ones and every reconnect)."""
        return self._dials

    def carried_per_link(self) -> list[int]:
        """Connections carried now by each link's current mux connection (0 when down)."""
        with self._lock:
            return [0 if ln.mux is None else ln.mux.carried for ln in self._links]

    def wait_connected(self, count: int | None = None, timeout: float | None = None) -> bool:
        """Wait until ``count`` (default: all ``conn``) mux connections are up.

        True when they are; False on timeout or once closed.
        """
        want = len(self._links) if count is None else count
        rt = self._rt
        deadline = None if timeout is None else rt.monotonic() + timeout
        with self._lock:
            while not self._closed:
                if self._live() >= want:
                    return True
                if deadline is None:
                    self._cond.wait()
                    continue
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return False

    def _live(self) -> int:
        return sum(1 for ln in self._links if ln.mux is not None and not ln.mux.session.closed)

    def _start_tasks(self) -> None:
        tls = self._guard.tls
        if tls is not None and tls.verify_mode == ssl.CERT_NONE:
            log.warning(
                "TLS without verifying the server's certificate: anyone in the path to %s "
                "can pose as the server and read the traffic",
                format_address(self._remote),
            )
        if self._allow is None and not is_loopback(self.address[0]):
            log.warning(
                "listening on %s without allow: anyone who can reach it can reach %s's target",
                format_address(self.address),
                format_address(self._remote),
            )
        for link in self._links:
            self._spawn(functools.partial(self._maintain, link), f"pysmux-tunnel-link-{link.index}")

    # -- mux connections -----------------------------------------------------------------

    def _maintain(self, link: Link) -> None:
        """Keep ``link`` connected until the tunnel closes."""
        rt = self._rt
        remote = format_address(self._remote)
        backoff = self._backoff_initial
        lost_one = False
        while not self._closed:
            try:
                transport = self._secure(self._dial(self._remote, self._connect_timeout))
                session = start_session(transport, self._config, rt, is_client=True)
            except OSError as exc:
                if self._closed:
                    return
                self._count("dial_failures")
                log.warning(
                    "mux connection %d: cannot connect to %s: %s (retrying in %.2f s)",
                    link.index,
                    remote,
                    exc,
                    backoff,
                )
                if self._pause(backoff):
                    return
                backoff = min(backoff * 2, self._backoff_max)
                continue
            token = self._track_session(session)
            if token is None:
                session.close()
                return
            began = rt.monotonic()
            mux = Mux(session, token, began)
            with self._lock:
                link.mux = mux
                self._dials += 1
                if lost_one:
                    self._counts["reconnects"] += 1
                self._cond.notify_all()
            log.info("mux connection %d to %s established", link.index, remote)
            expired = self._until_dead(session, began)
            with self._lock:
                link.mux = None
            if expired:
                self._retire(link, mux)
                backoff = self._backoff_initial
                continue
            self._end_session(token)
            if self._closed:
                return
            lost_one = True
            healthy = describe_loss(session, remote, link.index)
            if healthy and rt.monotonic() - began >= self._backoff_max:
                backoff = self._backoff_initial  # it was healthy: dial again at once
                continue
            if self._pause(backoff):
                return
            backoff = min(backoff * 2, self._backoff_max)

    def _secure(self, sock: Any) -> Any:
        """TLS and the key handshake on a new connection; ``close()`` interrupts them."""
        if self._guard.trivial:
            return sock
        holder = [sock]
        token = self._track(lambda: abort_tcp(holder[-1], sending=True))
        try:
            if token is None:
                raise ConnectionAbortedError("the tunnel is closed")
            return self._guard.client_side(sock, self._server_hostname, holder.append)
        except BaseException:
            reset_and_close(holder[-1])
            raise
        finally:
            if token is not None:
                self._untrack(token)

    def _until_dead(self, session: Session, began: float) -> bool:
        """Block until ``session`` ends (False) or reaches ``autoexpire`` (True).

        A tunnel server never opens streams: refuse them.
        """
        expire_at = None if self._autoexpire is None else began + self._autoexpire
        while True:
            timeout = None
            if expire_at is not None:
                timeout = max(0.0, expire_at - self._rt.monotonic())
            try:
                stream = session.accept_stream(timeout)
            except TimeoutError:
                return not session.closed
            except OSError:
                return False
            log.warning("the server opened stream %d; a tunnel does not carry those", stream.id)
            stream.close()

    def _retire(self, link: Link, mux: Mux) -> None:
        """Let an expired mux connection's connections finish (up to ``scavenge_ttl``)."""
        self._count("expired")
        log.info(
            "mux connection %d retired after %g s (autoexpire); %d connection(s) finish on it",
            link.index,
            self._autoexpire,
            mux.carried,
        )
        scavenge = functools.partial(self._scavenge, mux)
        if not self._spawn(scavenge, f"pysmux-tunnel-scavenge-{link.index}"):
            self._end_session(mux.token)

    def _scavenge(self, mux: Mux) -> None:
        rt = self._rt
        deadline = rt.monotonic() + self._scavenge_ttl
        with self._lock:
            while mux.carried and not self._closed:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    log.info(
                        "retired mux connection closed after scavenge_ttl=%g s with %d "
                        "connection(s) still on it",
                        self._scavenge_ttl,
                        mux.carried,
                    )
                    break
                self._cond.wait(remaining)
        self._end_session(mux.token)

    def _open_stream(self) -> tuple[Stream, Mux] | None:
        """A new stream on the live mux connection carrying the fewest connections.

        None if none comes up within ``connect_timeout``.
        """
        rt = self._rt
        links = self._links
        deadline = rt.monotonic() + self._connect_timeout
        with self._lock:
            while not self._closed:
                candidates = [
                    links[(self._next_link + k) % len(links)].mux for k in range(len(links))
                ]
                live = [m for m in candidates if m is not None and not m.session.closed]
                for mux in sorted(live, key=lambda m: m.carried):  # stable: ties rotate
                    try:
                        stream = mux.session.open_stream()  # takes the session lock briefly
                    except OSError:
                        continue  # it has just died (or has no ids left)
                    mux.carried += 1
                    self._next_link = (self._next_link + 1) % len(links)
                    return stream, mux
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None

    # -- TCP connections -----------------------------------------------------------------

    def _accepted(self, sock: Any, peer: Any) -> None:
        where = format_address(peer)
        if not self._reserve_conn():
            log.warning("connection from %s refused: max_conns=%d reached", where, self._max_conns)
            reset_and_close(sock)
            return
        nodelay(sock)
        serve = functools.partial(self._serve_conn, sock, where)
        if not self._spawn(serve, f"pysmux-tunnel-conn-{where}"):
            self._release_conn()
            reset_and_close(sock)

    def _serve_conn(self, sock: Any, where: str) -> None:
        try:
            opened = self._open_stream()  # close() wakes it
            if opened is None:
                if not self._closed:
                    log.warning(
                        "connection from %s reset: no mux connection to %s within %s s",
                        where,
                        format_address(self._remote),
                        self._connect_timeout,
                    )
                reset_and_close(sock)
                return
            stream, mux = opened
            log.debug("connection from %s: stream %d", where, stream.id)
            try:
                pipe = self._carry(sock, stream, f"conn {where}/{stream.id}")
                if pipe is not None and pipe.reset_by_peer and not pipe.bytes_down:
                    log.warning(
                        "connection from %s reset: stream %d was reset before any reply "
                        "(the server could not reach its target or refused the connection, "
                        "or the mux connection ended; see the server's log)",
                        where,
                        stream.id,
                    )
            finally:
                with self._lock:
                    mux.carried -= 1
                    self._cond.notify_all()
        finally:
            self._release_conn()
