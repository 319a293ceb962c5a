"""A kcptun-style tunnel as a library: TCP connections carried as smux streams.

::

    TCP clients --> TunnelClient ==(N mux connections)==> TunnelServer --> target
                    (listen)        one stream per TCP                    (one TCP per
                                    connection, round-robin               stream)

* :class:`TunnelClient` accepts TCP connections on its listen address and
  carries each as one stream over ``conn`` mux connections to the remote
  address, picked round-robin. A mux connection that dies is dialled again with
  exponential backoff; a TCP connection that arrives while none is up waits for
  one (up to ``connect_timeout``).
* :class:`TunnelServer` accepts mux connections and forwards every stream as a
  new TCP connection to its target. A target that cannot be reached closes that
  stream only.
* :class:`EchoServer` accepts mux connections and echoes every stream (for
  tests and benchmarks).

The mux connections are plain TCP (kcptun runs smux over KCP/UDP instead), so
both ends speak the smux wire protocol of Go's ``xtaci/smux`` over TCP; either
end can be a Go program that does the same. Both ends must use the same
``Config.version``.

What each carried connection gets (one :class:`_Pipe`):

* two copy tasks (threads, or greenlets with ``runtime="gevent"``): TCP to
  stream and stream to TCP, ended and joined when the connection ends;
* half-close in both directions: EOF from the TCP side becomes
  ``stream.shutdown(SHUT_WR)`` (a FIN), EOF of the stream becomes
  ``sock.shutdown(SHUT_WR)``, and the other direction carries on;
* a failure (the TCP peer resets, the mux connection dies, the tunnel closes)
  aborts both directions and resets the TCP side (on Linux with
  ``connect(AF_UNSPEC)``, which also wakes a ``send`` blocked on a peer that
  does not read; elsewhere ``SO_LINGER`` 0 and ``shutdown``): a connection cut
  short is not shown to a TCP peer as a clean EOF. smux has no stream reset,
  so across the mux a failure travels as a FIN.

Everything is bounded: ``max_conns`` carried connections at once (more are
refused at once: a TCP connection is reset, a stream closed), two tasks per
connection, ``max_sessions`` mux connections on a server. ``close()`` closes
the listener, then every mux session (so the peer sees its streams reset, not
end), then aborts every connection, and joins every task it started.

Version 1 caveat (DESIGN.md 4): one session-wide receive budget. A TCP peer
that stops reading stops its stream being read, and once the budget is full
every stream of that mux connection waits. ``Config(version=2)`` (on both ends)
gives each stream its own window.

Logging goes to the ``pysmux.tunnel`` logger: mux connections coming and going
at INFO, problems at WARNING, each carried connection at DEBUG.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import socket
import struct
import sys
from collections.abc import Callable
from typing import Any, TypeVar

from .config import Config
from .runtime import Runtime, Task, get_runtime
from .session import Session
from .session import client as mux_client
from .session import server as mux_server
from .stream import Stream

__all__ = [
    "Address",
    "EchoServer",
    "TunnelClient",
    "TunnelServer",
    "format_address",
    "parse_address",
]

log = logging.getLogger("pysmux.tunnel")

#: ``(host, port)``.
Address = tuple[str, int]

#: Bytes read from a TCP socket at once (two frames at the default max_frame_size).
_BUFSIZE = 65536
#: How long ``close()`` waits for the tasks of a tunnel to end.
_CLOSE_SECONDS = 10.0
#: Pause after a failed ``accept`` (out of file descriptors, say) before the next one.
_ACCEPT_ERROR_PAUSE = 0.1
#: ``SO_LINGER`` on, timeout 0: ``close()`` sends a reset and drops unsent data.
_LINGER_RESET = struct.pack("ii", 1, 0)
#: accept() errors that concern one connection only.
_TRANSIENT_ACCEPT_ERRORS = {errno.ECONNABORTED, errno.EPROTO, errno.EINTR, errno.EAGAIN}

_S = TypeVar("_S", bound="_Service")


# -- addresses --------------------------------------------------------------------------


def parse_address(text: str, default_host: str = "") -> Address:
    """Parse ``HOST:PORT``, ``[IPV6]:PORT`` or ``:PORT`` (host ``default_host``).

    ``ValueError`` names what is wrong.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep:
        raise ValueError(f"{text!r}: expected HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 address needs brackets, as in [::1]:4000")
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{text!r}: port {port_text!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is not in 0..65535")
    return (host or default_host, port)


def format_address(addr: Any) -> str:
    """``(host, port, ...)`` as ``host:port`` (``[host]:port`` for IPv6)."""
    host, port = str(addr[0]), int(addr[1])
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _as_address(addr: str | Address, what: str, default_host: str = "") -> Address:
    if isinstance(addr, str):
        return parse_address(addr, default_host)
    host, port = addr
    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{what}={addr!r}: port must be an int in 0..65535")
    return (str(host), port)


class _Net:
    """Sockets of the tunnel's runtime: the stdlib's, or gevent's for ``runtime="gevent"``."""

    def __init__(self, rt: Runtime) -> None:
        self._module = rt.socket_module()

    def socket(self, family: int) -> Any:
        return self._module.socket(family, socket.SOCK_STREAM)

    def resolve(self, addr: Address, passive: bool) -> list[tuple[int, Any]]:
        """``(family, sockaddr)`` candidates; a numeric host needs no resolver."""
        host, port = addr
        if not host and passive:
            return [(socket.AF_INET, ("0.0.0.0", port))]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            if ip.version == 6:
                return [(socket.AF_INET6, (host, port, 0, 0))]
            return [(socket.AF_INET, (host, port))]
        flags = socket.AI_PASSIVE if passive else 0
        infos = self._module.getaddrinfo(host, port, 0, socket.SOCK_STREAM, 0, flags)
        return [(info[0], info[4]) for info in infos]


def _nodelay(sock: Any) -> None:
    # Carried connections are often interactive: no Nagle delay on our writes.
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _load_disconnect() -> Callable[[int], bool] | None:
    """``connect(fd, AF_UNSPEC)``: Linux's abort of a TCP connection, or None elsewhere.

    It sends a reset, drops unsent data and wakes every thread or greenlet
    blocked in ``send`` or ``recv`` on the socket, while the descriptor stays
    open. Nothing in the socket module does that: ``shutdown(SHUT_WR)`` would
    send a FIN first, which the peer reads as a clean EOF.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        connect = libc.connect
    except (OSError, AttributeError):  # pragma: no cover - no usable libc
        return None
    connect.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint32]
    connect.restype = ctypes.c_int
    unspec = ctypes.create_string_buffer(16)  # a sockaddr whose family is AF_UNSPEC (0)

    def disconnect(fd: int) -> bool:
        return bool(connect(fd, unspec, len(unspec)) == 0)

    return disconnect


_disconnect = _load_disconnect()


def _abort_tcp(sock: Any, sending: bool) -> None:
    """Reset a TCP connection now and wake whoever blocks on it; the socket stays open.

    Without ``connect(AF_UNSPEC)``: ``SO_LINGER`` 0, then ``SHUT_RD`` (wakes a
    ``recv``, sends nothing) and, if a ``sendall`` may block (``sending``),
    ``SHUT_WR`` too: its FIN then waits behind the unsent data, and the reset
    at ``close()`` drops both (a peer reading fast may still see that FIN).
    """
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    if _disconnect is not None:
        with contextlib.suppress(OSError, ValueError):
            if _disconnect(sock.fileno()):
                return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR if sending else socket.SHUT_RD)


def _reset_and_close(sock: Any) -> None:
    """Close a TCP socket with a reset, not a FIN: the peer must not see a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    sock.close()


# -- one carried connection ------------------------------------------------------------


class _Pipe:
    """One TCP connection carried by one stream: a copy task per direction.

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
            while True:
                data = stream.recv(_BUFSIZE)
                if not data:
                    break
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
            while True:
                data = sock.recv(_BUFSIZE)
                if not data:
                    break
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
        _abort_tcp(self._sock, sending)
        with contextlib.suppress(OSError):
            self._stream.close()

    def _close(self) -> None:
        with contextlib.suppress(OSError):
            self._stream.close()
        if self._failed:
            _reset_and_close(self._sock)
        else:
            self._sock.close()
        log.debug(
            "%s: closed (%d bytes up, %d down%s)",
            self._label,
            self.bytes_up,
            self.bytes_down,
            ", reset" if self._failed else "",
        )


# -- what both ends share -----------------------------------------------------------------


class _Service:
    """A listener, the tasks it starts, and what ``close()`` must end."""

    def __init__(
        self,
        listen: str | Address,
        *,
        config: Config | None,
        runtime: str | Runtime | None,
        connect_timeout: float,
        max_conns: int,
        backlog: int,
        default_host: str,
    ) -> None:
        self._listen_addr = _as_address(listen, "listen", default_host)
        if config is None:
            config = Config()
        if not isinstance(config, Config):
            raise TypeError(f"config must be a pysmux.Config, not {type(config).__name__}")
        self._config = config
        if not connect_timeout > 0:
            raise ValueError(f"connect_timeout={connect_timeout!r}: must be > 0")
        if not (isinstance(max_conns, int) and max_conns > 0):
            raise ValueError(f"max_conns={max_conns!r}: must be an int > 0")
        if not (isinstance(backlog, int) and backlog > 0):
            raise ValueError(f"backlog={backlog!r}: must be an int > 0")
        self._connect_timeout = float(connect_timeout)
        self._max_conns = max_conns
        self._backlog = backlog
        self._rt = rt = get_runtime(runtime)
        self._net = _Net(rt)
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._started = False
        self._closed = False
        self._listener: Any = None
        self._address: Address | None = None
        self._ids = itertools.count(1)
        # Running tasks by id (None until spawn returned), and ended ones not yet joined.
        self._tasks: dict[int, Task | None] = {}
        self._ended: list[Task] = []
        # What close() ends: sessions first, then connections and dials.
        self._sessions: dict[int, Session] = {}
        self._aborts: dict[int, Callable[[], None]] = {}
        self._active = 0  # carried connections (including those being set up)

    # -- public --------------------------------------------------------------------

    @property
    def address(self) -> Address:
        """The address the listener is bound to (the real port when 0 was asked for)."""
        if self._address is None:
            raise RuntimeError("not listening: call start() first")
        return self._address

    @property
    def config(self) -> Config:
        return self._config

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def connections(self) -> int:
        """Connections being carried now (TCP connection <-> stream)."""
        return self._active

    def start(self: _S) -> _S:
        """Bind and listen, then serve in background tasks. Returns ``self``.

        ``OSError`` if the address cannot be bound (nothing is left running).
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("the tunnel is closed")
            if self._started:
                raise RuntimeError("the tunnel is already started")
            self._started = True
        listener = self._bind()
        with self._lock:
            self._listener = listener
            host, port = listener.getsockname()[:2]
            self._address = (str(host), int(port))
        log.info("%s listening on %s", type(self).__name__, format_address(self._address))
        self._start_tasks()
        if not self._spawn(self._accept_loop, "pysmux-tunnel-accept"):
            self.close()
            raise RuntimeError("the tunnel was closed while starting, or no task could start")
        return self

    def close(self) -> None:
        """Stop listening, end every mux session and connection, join every task.

        Idempotent and thread-safe; do not call it from a task of the tunnel.
        """
        rt = self._rt
        with self._lock:
            self._closed = True
            self._cond.notify_all()
            listener = self._listener
            sessions = list(self._sessions.values())
        deadline = rt.monotonic() + _CLOSE_SECONDS
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        # Sessions first: the peer then sees its streams reset, not cleanly ended.
        for session in sessions:
            session.close()
        with self._lock:
            aborts = list(self._aborts.values())
        for abort in aborts:
            abort()
        with self._lock:
            while self._tasks:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            stuck = len(self._tasks)
            ended, self._ended = self._ended, []
        for task in ended:
            task.join(max(0.0, deadline - rt.monotonic()))
        if stuck:  # pragma: no cover - a task ignoring every wake-up
            log.warning("%s: %d task(s) still running after close()", type(self).__name__, stuck)
        if listener is not None:
            listener.close()

    def __enter__(self: _S) -> _S:
        if not self._started:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = format_address(self._address) if self._address else "not started"
        state = "closed" if self._closed else "open"
        return f"<pysmux.tunnel.{type(self).__name__} {where} {state} conns={self._active}>"

    # -- for subclasses ----------------------------------------------------------------

    def _start_tasks(self) -> None:
        """Start tasks other than the accept loop (before it starts)."""

    def _accepted(self, sock: Any, peer: Any) -> None:
        raise NotImplementedError

    # -- tasks ---------------------------------------------------------------------------

    def _spawn(self, fn: Callable[[], None], name: str) -> bool:
        """Run ``fn`` in a tracked task; False (nothing started) once closed."""
        with self._lock:
            if self._closed:
                return False
            tid = next(self._ids)
            self._tasks[tid] = None
            if self._ended:  # keep the list short: drop the ones already over
                self._ended = [t for t in self._ended if t.is_alive()]

        def run() -> None:
            try:
                fn()
            except Exception:
                log.exception("%s: task %s failed", type(self).__name__, name)
            finally:
                with self._lock:
                    task = self._tasks.pop(tid, None)
                    if task is not None:
                        self._ended.append(task)
                    self._cond.notify_all()

        try:
            task = self._rt.spawn(run, name)
        except RuntimeError as exc:  # "can't start new thread": refuse this piece of work
            log.error("%s: cannot start a task for %s: %s", type(self).__name__, name, exc)
            with self._lock:
                self._tasks.pop(tid, None)
                self._cond.notify_all()
            return False
        with self._lock:
            if tid in self._tasks:
                self._tasks[tid] = task
            else:
                self._ended.append(task)
        return True

    def _pause(self, seconds: float) -> bool:
        """Wait ``seconds`` or until closed; True if closed."""
        rt = self._rt
        deadline = rt.monotonic() + seconds
        with self._lock:
            while not self._closed:
                remaining = deadline - rt.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def _track(self, abort: Callable[[], None]) -> int | None:
        """Have ``close()`` call ``abort``; None (not tracked) if already closed."""
        with self._lock:
            if self._closed:
                return None
            token = next(self._ids)
            self._aborts[token] = abort
            return token

    def _untrack(self, token: int) -> None:
        with self._lock:
            self._aborts.pop(token, None)

    def _track_session(self, session: Session) -> int | None:
        with self._lock:
            if self._closed:
                return None
            token = next(self._ids)
            self._sessions[token] = session
            return token

    def _untrack_session(self, token: int) -> None:
        with self._lock:
            self._sessions.pop(token, None)
            self._cond.notify_all()

    def _reserve_conn(self) -> bool:
        """Count one more carried connection, unless ``max_conns`` are carried."""
        with self._lock:
            if self._active >= self._max_conns:
                return False
            self._active += 1
            return True

    def _release_conn(self) -> None:
        with self._lock:
            self._active -= 1
            self._cond.notify_all()

    # -- sockets -------------------------------------------------------------------------

    def _bind(self) -> Any:
        last: OSError | None = None
        for family, sockaddr in self._net.resolve(self._listen_addr, passive=True):
            sock = self._net.socket(family)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(sockaddr)
                sock.listen(self._backlog)
            except OSError as exc:
                sock.close()
                last = exc
                continue
            return sock
        if last is None:  # pragma: no cover - getaddrinfo returns at least one or raises
            last = OSError(errno.EADDRNOTAVAIL, "no address to listen on")
        raise last

    def _accept_loop(self) -> None:
        listener = self._listener
        while True:
            try:
                sock, peer = listener.accept()
            except OSError as exc:
                if self._closed:
                    return
                if exc.errno not in _TRANSIENT_ACCEPT_ERRORS:
                    # EMFILE and friends: the process is short of something; the
                    # connections already carried go on, new ones wait a moment.
                    log.error("accept on %s failed: %s", format_address(self.address), exc)
                    if self._pause(_ACCEPT_ERROR_PAUSE):
                        return
                continue
            sock.settimeout(None)
            try:
                self._accepted(sock, peer)
            except Exception:  # a bug; one connection must not end the accept loop
                log.exception("serving the connection from %s failed", format_address(peer))
                _reset_and_close(sock)

    def _dial(self, addr: Address) -> Any:
        """A TCP connection to ``addr`` within ``connect_timeout``; ``close()`` interrupts it."""
        last: OSError | None = None
        for family, sockaddr in self._net.resolve(addr, passive=False):
            sock = self._net.socket(family)
            token = self._track(functools.partial(_shutdown_quietly, sock))
            if token is None:
                sock.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "the tunnel is closed")
            try:
                sock.settimeout(self._connect_timeout)
                sock.connect(sockaddr)
                sock.settimeout(None)
            except OSError as exc:
                self._untrack(token)
                sock.close()
                last = exc
                continue
            self._untrack(token)
            if self._closed:  # a shutdown() can let connect() return without an error
                sock.close()
                raise ConnectionAbortedError(errno.ECONNABORTED, "the tunnel is closed")
            _nodelay(sock)
            return sock
        if last is None:  # pragma: no cover
            last = OSError(errno.EADDRNOTAVAIL, f"no address for {format_address(addr)}")
        raise last

    def _carry(self, sock: Any, stream: Stream, label: str) -> None:
        """Copy between ``sock`` and ``stream`` until both are done (or aborted)."""
        pipe = _Pipe(self._rt, sock, stream, label)
        token = self._track(pipe.abort)
        if token is None:
            pipe.abort()
        try:
            pipe.run()
        finally:
            if token is not None:
                self._untrack(token)


def _shutdown_quietly(sock: Any) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


# -- servers: accept mux connections, serve each stream ------------------------------------


class _MuxServer(_Service):
    """Accepts mux connections (one server session each) and serves every stream."""

    def __init__(
        self,
        listen: str | Address,
        *,
        config: Config | None,
        runtime: str | Runtime | None,
        connect_timeout: float,
        max_conns: int,
        max_sessions: int,
        backlog: int,
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            connect_timeout=connect_timeout,
            max_conns=max_conns,
            backlog=backlog,
            default_host="0.0.0.0",
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
            _reset_and_close(sock)
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


class TunnelServer(_MuxServer):
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
            connect_timeout=connect_timeout,
            max_conns=max_conns,
            max_sessions=max_sessions,
            backlog=backlog,
        )
        self._target = _as_address(target, "target")
        if not self._target[0] or not self._target[1]:
            raise ValueError(f"target={target!r}: needs a host and a port")

    @property
    def target(self) -> Address:
        return self._target

    def _serve_stream(self, stream: Stream, label: str) -> None:
        target = format_address(self._target)
        try:
            sock = self._dial(self._target)
        except OSError as exc:
            if not self._closed:
                log.warning("stream %s: cannot connect to target %s: %s", label, target, exc)
            return
        log.debug("stream %s: connected to %s", label, target)
        self._carry(sock, stream, f"stream {label}")


class EchoServer(_MuxServer):
    """Accept mux connections on ``listen`` and echo every stream until its EOF."""

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
            listen,
            config=config,
            runtime=runtime,
            connect_timeout=10.0,
            max_conns=max_conns,
            max_sessions=max_sessions,
            backlog=backlog,
        )

    def _serve_stream(self, stream: Stream, label: str) -> None:
        token = self._track(stream.close)
        if token is None:
            return
        total = 0
        try:
            while True:
                data = stream.recv(_BUFSIZE)
                if not data:
                    break
                stream.sendall(data)
                total += len(data)
            stream.shutdown(socket.SHUT_WR)
        except OSError as exc:
            log.debug("echo %s: %s", label, exc)
        finally:
            self._untrack(token)
        log.debug("echo %s: %d bytes", label, total)


# -- client: accept TCP, carry each connection over the mux ------------------------------


class _Link:
    """One of the client's mux connections, re-dialled whenever it dies."""

    __slots__ = ("index", "session")

    def __init__(self, index: int) -> None:
        self.index = index
        self.session: Session | None = None


class TunnelClient(_Service):
    """Accept TCP connections on ``listen``; carry each as one stream to ``remote``.

    ``conn`` mux connections are kept open to ``remote`` (kcptun's ``--conn``);
    each new TCP connection goes to the next live one, round-robin. A mux
    connection that fails to connect or dies is dialled again after a backoff
    that doubles from ``backoff_initial`` up to ``backoff_max`` seconds (at
    once after a loss, if it had lived that long). A TCP connection that
    arrives while no mux connection is up waits up to ``connect_timeout``
    seconds for one, then is reset.

    ``listen`` and ``remote`` are ``"host:port"`` strings (``":port"`` listens
    on 127.0.0.1) or ``(host, port)`` tuples. ``config`` must match the
    server's (same version).
    """

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
    ) -> None:
        super().__init__(
            listen,
            config=config,
            runtime=runtime,
            connect_timeout=connect_timeout,
            max_conns=max_conns,
            backlog=backlog,
            default_host="127.0.0.1",
        )
        self._remote = _as_address(remote, "remote")
        if not self._remote[0] or not self._remote[1]:
            raise ValueError(f"remote={remote!r}: needs a host and a port")
        if not (isinstance(conn, int) and conn > 0):
            raise ValueError(f"conn={conn!r}: must be an int > 0")
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError(
                f"backoff_initial={backoff_initial!r}, backoff_max={backoff_max!r}: "
                "need 0 < backoff_initial <= backoff_max"
            )
        self._backoff_initial = float(backoff_initial)
        self._backoff_max = float(backoff_max)
        self._links = [_Link(i + 1) for i in range(conn)]
        self._next_link = 0
        self._dials = 0

    @property
    def remote(self) -> Address:
        return self._remote

    @property
    def connected(self) -> int:
        """Mux connections up now (0 to ``conn``)."""
        with self._lock:
            return self._live()

    @property
    def dials(self) -> int:
        """Mux connections established so far (the first ones and every reconnect)."""
        return self._dials

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
        return sum(1 for ln in self._links if ln.session is not None and not ln.session.closed)

    def _start_tasks(self) -> None:
        for link in self._links:
            self._spawn(functools.partial(self._maintain, link), f"pysmux-tunnel-link-{link.index}")

    # -- mux connections -----------------------------------------------------------------

    def _maintain(self, link: _Link) -> None:
        """Keep ``link`` connected until the tunnel closes."""
        rt = self._rt
        remote = format_address(self._remote)
        backoff = self._backoff_initial
        while not self._closed:
            try:
                sock = self._dial(self._remote)
            except OSError as exc:
                if self._closed:
                    return
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
            session = mux_client(sock, config=self._config, runtime=rt)
            token = self._track_session(session)
            if token is None:
                session.close()
                return
            with self._lock:
                link.session = session
                self._dials += 1
                self._cond.notify_all()
            log.info("mux connection %d to %s established", link.index, remote)
            began = rt.monotonic()
            self._until_dead(session)
            with self._lock:
                link.session = None
            self._untrack_session(token)
            session.close()
            if self._closed:
                return
            log.warning("mux connection %d to %s lost: %s", link.index, remote, session.error)
            if rt.monotonic() - began >= self._backoff_max:
                backoff = self._backoff_initial  # it was healthy: dial again at once
                continue
            if self._pause(backoff):
                return
            backoff = min(backoff * 2, self._backoff_max)

    @staticmethod
    def _until_dead(session: Session) -> None:
        """Block until ``session`` ends. A tunnel server never opens streams: refuse them."""
        while True:
            try:
                stream = session.accept_stream()
            except OSError:
                return
            log.warning("the server opened stream %d; a tunnel does not carry those", stream.id)
            stream.close()

    def _open_stream(self) -> Stream | None:
        """A new stream on the next live mux connection; None if none comes up in time."""
        rt = self._rt
        links = self._links
        deadline = rt.monotonic() + self._connect_timeout
        with self._lock:
            while not self._closed:
                for k in range(len(links)):
                    i = (self._next_link + k) % len(links)
                    session = links[i].session
                    if session is None or session.closed:
                        continue
                    try:
                        stream = session.open_stream()  # takes the session lock briefly only
                    except OSError:
                        continue  # it has just died (or has no ids left)
                    self._next_link = (i + 1) % len(links)
                    return stream
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
            _reset_and_close(sock)
            return
        _nodelay(sock)
        serve = functools.partial(self._serve_conn, sock, where)
        if not self._spawn(serve, f"pysmux-tunnel-conn-{where}"):
            self._release_conn()
            _reset_and_close(sock)

    def _serve_conn(self, sock: Any, where: str) -> None:
        try:
            stream = self._open_stream()  # close() wakes it
            if stream is None:
                if not self._closed:
                    log.warning(
                        "connection from %s reset: no mux connection to %s within %s s",
                        where,
                        format_address(self._remote),
                        self._connect_timeout,
                    )
                _reset_and_close(sock)
                return
            log.debug("connection from %s: stream %d", where, stream.id)
            self._carry(sock, stream, f"conn {where}/{stream.id}")
        finally:
            self._release_conn()
