"""The tunnel library when things go wrong: bad arguments, limits reached, no task to be
had, a close in the middle of a dial or a handshake, peers that are not what they should
be, addresses given by name or as IPv6. In-process on both runtimes, over loopback TCP,
with the helpers and fixtures of ``test_cli.py``; each test checks what a user sees (the
exception and its message, the log line, how the TCP connection ends, the counters)."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from errno import ENOTCONN
from typing import Any

import pytest

import pysmux
from pysmux.frame import CMD_NOP, encode_header
from pysmux.runtime import Runtime, Task, get_runtime
from pysmux.tunnel import EchoServer, TunnelClient, TunnelServer, format_address
from tests.runtimes import current
from tests_e2e import test_cli
from tests_e2e.test_cli import (
    Addr,
    TcpTarget,
    connect,
    echo_through,
    payload,
    recv_to_eof,
    sha,
    start_pair,
    unused_port,
    wait_until,
)

# The fixtures of test_cli.py, shared.
target = test_cli.target
tunnels = test_cli.tunnels

ARGS = pytest.mark.runtime_independent(reason="checks arguments only; nothing starts")
#: The NOP a tunnel end writes first on a mux connection (smux v1).
HELLO_V1 = encode_header(1, CMD_NOP, 0, 0)
KEY = "a key for the tunnel error tests"


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.DEBUG) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= level]


def wait_logged(caplog: pytest.LogCaptureFixture, text: str, timeout: float = 10) -> str:
    """The first log message containing ``text``, waiting for it to be logged."""
    wait_until(lambda: any(text in m for m in messages(caplog)), timeout, f"log: {text}")
    return next(m for m in messages(caplog) if text in m)


def logged_error(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    """An ERROR (or worse) was logged with ``text`` in its message or its exception."""
    for record in caplog.records:
        if record.levelno >= logging.ERROR:
            cause = "" if record.exc_info is None else repr(record.exc_info[1])
            if text in record.getMessage() + cause:
                return True
    return False


def ends_with_reset(sock: Any, timeout: float = 10) -> bool:
    """Read ``sock`` to its end: True for a reset, False for a clean EOF (no data either way)."""
    sock.settimeout(timeout)
    try:
        data = recv_to_eof(sock)
    except ConnectionResetError:
        return True
    assert data == b"", f"{len(data)} unexpected bytes"
    return False


def echo_or_reset(addr: Addr, data: bytes) -> bytes | None:
    """Send ``data`` on a new connection, half-close, read to EOF: what came back, or None
    if the connection was reset (at any step: connect, send or receive)."""
    try:
        sock = connect(addr)
    except ConnectionResetError:
        return None
    try:
        sock.settimeout(10)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        return recv_to_eof(sock)
    except OSError as exc:  # a reset shows as any of these, depending on when it came
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)) or exc.errno == ENOTCONN:
            return None
        raise
    finally:
        sock.close()


def tunnel(
    runtime: Any, tunnels: list[Any], target: Addr, **server_kw: Any
) -> tuple[TunnelServer, TunnelClient]:
    """A started TunnelServer (``server_kw``) to ``target`` and a TunnelClient connected to it."""
    srv = TunnelServer("127.0.0.1:0", target, runtime=runtime, **server_kw)
    tunnels.append(srv)
    srv.start()
    cli = TunnelClient("127.0.0.1:0", srv.address, runtime=runtime)
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10)
    return srv, cli


class FlakyRuntime:
    """The test's runtime, except that ``spawn`` can be told to fail, as in a process that
    is out of threads (CPython raises ``RuntimeError("can't start new thread")``).

    ``fail_spawn(k, exc)``: the k-th ``spawn`` from now raises ``exc``; the others work.
    A runtime object is public API: ``runtime=`` takes one.
    """

    def __init__(self, name: str) -> None:
        self._base: Runtime = get_runtime(name)
        self._guard = threading.Lock()
        self._countdown = 0
        self._exc: BaseException | None = None
        self.failed = current().Event()

    def fail_spawn(self, k: int, exc: BaseException) -> None:
        with self._guard:
            self._countdown, self._exc = k, exc
        self.failed.clear()

    def spawn(self, target: Callable[[], None], name: str) -> Task:
        with self._guard:
            exc = None
            if self._countdown:
                self._countdown -= 1
                if not self._countdown:
                    exc, self._exc = self._exc, None
        if exc is not None:
            self.failed.set()
            raise exc
        return self._base.spawn(target, name)

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._base, attr)


# ---------------------------------------------------------------------------
# arguments and lifecycle


@ARGS
def test_bad_arguments_are_refused_with_a_message_naming_them(runtime: str) -> None:
    """Every constructor argument that cannot work is refused at once, naming itself."""
    tcp = "127.0.0.1:1"
    cases: list[tuple[Callable[[], object], type[Exception], str]] = [
        (lambda: TunnelServer(tcp, tcp, config="v2"), TypeError,  # type: ignore[arg-type]
         "config must be a pysmux.Config, not str"),
        (lambda: TunnelServer(tcp, tcp, max_conns=0), ValueError, "max_conns=0: must be"),
        (lambda: EchoServer(tcp, backlog=0), ValueError, "backlog=0: must be"),
        (lambda: EchoServer(tcp, max_sessions=0), ValueError, "max_sessions=0: must be"),
        (lambda: EchoServer(tcp, max_handshakes=-1), ValueError, "max_handshakes=-1: must be"),
        (lambda: EchoServer(("127.0.0.1", 70000)), ValueError,
         r"listen=('127.0.0.1', 70000): port must be an int in 0..65535"),
        (lambda: TunnelClient(tcp, ":80"), ValueError, "remote=':80': needs a host and a port"),
        (lambda: TunnelClient(tcp, tcp, backoff_initial=2.0, backoff_max=1.0), ValueError,
         "need 0 < backoff_initial <= backoff_max"),
        (lambda: TunnelClient(tcp, tcp, backoff_initial=0), ValueError,
         "need 0 < backoff_initial <= backoff_max"),
        (lambda: EchoServer(tcp, allow=[]), ValueError, "allow: no network given"),
        (lambda: EchoServer(tcp, allow=[42]), TypeError,  # type: ignore[list-item]
         "allow: 42 is not a network"),
        (lambda: EchoServer(tcp, key=42), TypeError,  # type: ignore[arg-type]
         "a key must be bytes or str, not int"),
        (lambda: TunnelClient(tcp, tcp, tls="yes"), TypeError,  # type: ignore[arg-type]
         "tls must be an ssl.SSLContext, not str"),
    ]  # fmt: skip
    for make, exc_type, message in cases:
        with pytest.raises(exc_type) as info:
            make()
        assert message in str(info.value), (message, str(info.value))


def test_lifecycle_misuse_is_refused_clearly(runtime: str) -> None:
    """``address`` before ``start()``, a second ``start()``, a ``start()`` after ``close()``
    are RuntimeErrors that say what is wrong; ``with`` on a started tunnel does not start
    it again; the properties give back what was passed."""
    cfg = pysmux.Config(version=2)
    srv = TunnelServer("127.0.0.1:0", "127.0.0.1:9", config=cfg, runtime=runtime)
    assert repr(srv) == "<pysmux.tunnel.TunnelServer not started open conns=0>"
    with pytest.raises(RuntimeError, match=r"not listening: call start\(\) first"):
        _ = srv.address
    assert srv.config is cfg
    assert srv.target == ("127.0.0.1", 9)
    srv.start()
    try:
        with pytest.raises(RuntimeError, match="already started"):
            srv.start()
        with srv as same:  # already started: used as it is
            assert same is srv
            assert srv.address[1] > 0
    finally:
        srv.close()
    assert srv.closed
    with pytest.raises(RuntimeError, match="the tunnel is closed"):
        srv.start()


def test_drain_of_a_tunnel_never_started_closes_it(
    runtime: str, caplog: pytest.LogCaptureFixture
) -> None:
    """``drain()`` before ``start()`` has nothing to wait for: True, and the tunnel is
    closed. A second ``drain()`` is harmless and logs no second "draining" line."""
    caplog.set_level(logging.INFO, logger="pysmux.tunnel")
    echo = EchoServer("127.0.0.1:0", runtime=runtime)
    assert echo.drain(5) is True
    assert echo.closed and echo.draining
    assert echo.drain(5) is True
    assert len([m for m in messages(caplog) if "draining" in m]) == 1


# ---------------------------------------------------------------------------
# limits


def test_max_sessions_resets_one_mux_connection_too_many(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server at ``max_sessions`` resets the next mux connection at once (and says so);
    the sessions it holds carry on."""
    echo = target()
    srv, cli = tunnel(runtime, tunnels, echo.address, max_sessions=1)
    wait_until(lambda: srv.sessions == 1, 10, "the server holds the session")
    assert echo_or_reset(srv.address, b"hello") is None
    wait_logged(caplog, "max_sessions=1 reached")
    data = payload(100_000, 3)
    assert sha(echo_through(cli.address, data)) == sha(data)
    assert srv.sessions == 1


def test_max_handshakes_and_close_during_a_handshake(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With a key, a server at ``max_handshakes`` resets the next connection at once; once
    the stalled handshake goes away a client with the key gets in. ``close()`` during a
    handshake resets that connection without calling it a refused client."""
    echo = target()
    srv = TunnelServer(
        "127.0.0.1:0",
        echo.address,
        runtime=runtime,
        key=KEY,
        max_handshakes=1,
        handshake_timeout=60,
    )
    tunnels.append(srv)
    srv.start()
    staller = connect(srv.address)
    try:
        wait_until(lambda: srv.handshakes == 1, 10, "the staller is in its handshake")
        assert echo_or_reset(srv.address, b"hello") is None
        wait_logged(caplog, "max_handshakes=1 in progress")
    finally:
        staller.close()
    wait_until(lambda: srv.handshakes == 0, 10, "the staller's handshake ended")
    cli = TunnelClient("127.0.0.1:0", srv.address, runtime=runtime, key=KEY)
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10)
    data = payload(50_000, 4)
    assert sha(echo_through(cli.address, data)) == sha(data)
    cli.close()

    caplog.clear()
    staller = connect(srv.address)
    try:
        wait_until(lambda: srv.handshakes == 1, 10, "a new staller is in its handshake")
        srv.close()
        assert ends_with_reset(staller)
    finally:
        staller.close()
    assert srv.handshakes == 0
    assert not [m for m in messages(caplog, logging.WARNING) if "refused" in m]


def test_server_refuses_a_stream_past_max_conns(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server carrying ``max_conns`` connections resets the next stream at once (the
    TCP client's connection is reset, as a refused connection), counts and logs it;
    once a connection ends the next one is carried."""
    echo = target()
    srv, cli = tunnel(runtime, tunnels, echo.address, max_conns=1)
    first = connect(cli.address)
    try:
        first.sendall(b"held")
        first.settimeout(10)
        assert first.recv(4) == b"held"
        assert echo_or_reset(cli.address, b"refused") is None
        wait_logged(caplog, "refused: max_conns=1 reached")
        assert srv.stats()["connections_refused"] == 1
    finally:
        first.close()
    wait_until(lambda: srv.connections == 0, 10, "the first connection ended")
    data = payload(10_000, 5)
    assert sha(echo_through(cli.address, data)) == sha(data)


# ---------------------------------------------------------------------------
# no task to be had


@pytest.mark.parametrize("side", ["client", "server"])
@pytest.mark.parametrize("nth", [1, 2])
def test_a_connection_whose_task_cannot_start_ends_and_the_tunnel_goes_on(
    runtime: str,
    side: str,
    nth: int,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of threads while taking a new connection: whichever of the tasks it needs on
    that side cannot start, that connection alone ends (its TCP connection is reset: on
    the server side through a stream reset), the failure is logged as an error, no
    connection stays counted, and the next connection is carried as before."""
    echo = target()
    flaky = FlakyRuntime(runtime)
    rts = {"client": runtime, "server": runtime, side: flaky}
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=rts["server"])
    tunnels.append(srv)
    srv.start()
    cli = TunnelClient("127.0.0.1:0", srv.address, runtime=rts["client"])
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10)
    data = payload(20_000, 6)
    # One connection first: the server has started every task of the mux connection
    # (arming the failure earlier could hit those instead of the connection's).
    assert echo_or_reset(cli.address, data) == data

    flaky.fail_spawn(nth, RuntimeError("can't start new thread"))
    victim = None
    for _ in range(3):  # the failure lands on a connection that needs an nth task
        got = echo_or_reset(cli.address, data)
        if flaky.failed.is_set():
            victim = got
            break
        assert got is not None and sha(got) == sha(data)
    assert flaky.failed.is_set(), "no task was asked for"
    assert victim is None, f"the TCP connection was not reset ({side} side failed)"
    # The error, with its cause (in the message, or in the traceback logged with it).
    wait_until(lambda: logged_error(caplog, "can't start new thread"), 10, "the failure logged")
    wait_until(lambda: cli.connections == 0 and srv.connections == 0, 10, "nothing held")
    assert sha(echo_through(cli.address, data)) == sha(data)


@pytest.mark.parametrize(
    ("keyed", "nth"),
    # With a key the first task is the handshake's; the raw peer here never gets further.
    [(False, 1), (False, 2), (True, 1)],
    ids=["session-task-1", "session-task-2", "handshake-task"],
)
def test_a_mux_connection_whose_task_cannot_start_is_dropped(
    runtime: str,
    nth: int,
    keyed: bool,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Out of threads while a server takes a new mux connection (its handshake task, or
    a task of its session): that connection ends at once (reset, or closed), the error
    is logged, no task of it is left behind (a leaked reader would fail this test), and
    the next mux connection is served."""
    echo = target()
    flaky = FlakyRuntime(runtime)
    key = KEY if keyed else None
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=flaky, key=key, handshake_timeout=30)
    tunnels.append(srv)
    srv.start()
    flaky.fail_spawn(nth, RuntimeError("can't start new thread"))
    # The peer sends nothing and waits: the server's hello may come, then the end.
    try:
        raw = connect(srv.address)
    except ConnectionResetError:
        raw = None
    if raw is not None:
        try:
            raw.settimeout(10)
            got = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := raw.recv(4096):
                    got += chunk
            assert got in (b"", HELLO_V1)
        finally:
            raw.close()
    assert flaky.failed.is_set()
    wait_until(lambda: logged_error(caplog, "can't start new thread"), 10, "the failure logged")
    wait_until(lambda: srv.sessions == 0 and srv.handshakes == 0, 10, "nothing held")
    cli = TunnelClient("127.0.0.1:0", srv.address, runtime=runtime, key=key)
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10)
    data = payload(5000, 9)
    assert sha(echo_through(cli.address, data)) == sha(data)


def test_an_unexpected_error_taking_a_connection_resets_only_that_one(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug (any exception) while the client takes a TCP connection is logged with its
    traceback, that connection is reset, and the accept loop goes on."""
    echo = target()
    flaky = FlakyRuntime(runtime)
    srv, _cli = start_pair(runtime, tunnels, echo.address, conn=1)
    plain = TunnelClient("127.0.0.1:0", srv.address, runtime=flaky)
    tunnels.append(plain)
    plain.start()
    assert plain.wait_connected(timeout=10)
    flaky.fail_spawn(1, MemoryError("no memory for this one"))
    assert echo_or_reset(plain.address, b"x") is None
    wait_until(lambda: logged_error(caplog, "no memory for this one"), 10, "the bug is logged")
    data = payload(1000, 7)
    assert sha(echo_through(plain.address, data)) == sha(data)
    began = time.monotonic()
    plain.close()  # nothing of the failed connection is left for close() to wait for
    assert time.monotonic() - began < 5


def test_start_without_a_task_for_the_accept_loop_fails_and_frees_the_port(
    runtime: str,
) -> None:
    """If the accept loop's task cannot start, ``start()`` raises RuntimeError, the tunnel
    is closed and its port is free again."""
    flaky = FlakyRuntime(runtime)
    flaky.fail_spawn(1, RuntimeError("can't start new thread"))
    port = unused_port()
    echo = EchoServer(("127.0.0.1", port), runtime=flaky)
    with pytest.raises(RuntimeError, match="no task could start"):
        echo.start()
    assert echo.closed
    again = EchoServer(("127.0.0.1", port), runtime=runtime)
    try:
        again.start()
        assert again.address == ("127.0.0.1", port)
    finally:
        again.close()


# ---------------------------------------------------------------------------
# close in the middle of things


def full_listener() -> tuple[Any, list[Any]]:
    """A listener that takes no more connections: its accept queue is full and it never
    accepts, so the next connect waits (its SYNs are dropped) until it times out."""
    harness = current()
    listener = harness.listen("127.0.0.1", backlog=0)
    queued: list[Any] = []
    addr = listener.getsockname()
    for _ in range(8):
        sock = harness.socket()
        sock.settimeout(0.3)
        try:
            sock.connect(addr)
        except TimeoutError:
            sock.close()
            return listener, queued
        queued.append(sock)
    for sock in [listener, *queued]:
        sock.close()
    pytest.fail("the listener's queue never filled")


def test_close_interrupts_a_connect_to_the_target(
    runtime: str, tunnels: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A server dialling a target that does not answer (the connect waits for its
    ``connect_timeout``) is closed: ``close()`` returns at once, the TCP client's
    connection ends, and no "cannot connect" warning is logged for a dial the close cut
    short."""
    listener, queued = full_listener()
    try:
        srv, cli = start_pair(runtime, tunnels, listener.getsockname(), conn=1)
        srv_dials = srv.stats()["target_connect_failures"]
        sock = connect(cli.address)
        try:
            wait_until(lambda: srv.connections == 1, 10, "the server dials the target")
            began = time.monotonic()
            srv.close()
            assert time.monotonic() - began < 5
            sock.settimeout(10)
            with contextlib.suppress(ConnectionResetError):
                assert recv_to_eof(sock) == b""
        finally:
            sock.close()
        assert srv.stats()["target_connect_failures"] == srv_dials + 1
        assert not [m for m in messages(caplog) if "cannot connect to target" in m]
    finally:
        for s in [listener, *queued]:
            s.close()


def test_close_resets_a_connection_waiting_for_a_mux_connection(
    runtime: str, tunnels: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A TCP connection waiting for a mux connection (the server is down) is reset as soon
    as the client is closed, long before ``connect_timeout``, and is not reported as a
    timeout."""
    cli = TunnelClient(
        "127.0.0.1:0",
        ("127.0.0.1", unused_port()),
        runtime=runtime,
        connect_timeout=60,
        backoff_max=0.2,
    )
    tunnels.append(cli)
    cli.start()
    assert not cli.wait_connected(timeout=0.2)
    sock = connect(cli.address)
    try:
        wait_until(lambda: cli.connections == 1, 10, "the connection waits")
        began = time.monotonic()
        cli.close()
        assert ends_with_reset(sock)
        assert time.monotonic() - began < 10
    finally:
        sock.close()
    assert not cli.wait_connected()  # closed: False at once, even without a timeout
    assert not [m for m in messages(caplog) if "no mux connection" in m]


# ---------------------------------------------------------------------------
# peers that are not what they should be


class SmuxPeer:
    """A mux server of the test's own: a listener whose first connection gets a plain
    ``pysmux.server`` session (no tunnel around it), to act as a tunnel server would not."""

    def __init__(self, runtime: str) -> None:
        self.harness = current()
        self.runtime = runtime
        self.listener = self.harness.listen("127.0.0.1")
        self.address: Addr = self.listener.getsockname()[:2]
        self.socks: list[Any] = []
        self.sessions: list[pysmux.Session] = []

    def accept(self) -> pysmux.Session:
        self.listener.settimeout(10)
        sock, _ = self.listener.accept()
        self.socks.append(sock)
        session = pysmux.server(sock, runtime=self.runtime)
        self.sessions.append(session)
        return session

    def close(self) -> None:
        for session in self.sessions:
            session.close()
        for sock in [self.listener, *self.socks]:
            sock.close()


@pytest.fixture
def smux_peer(runtime: str) -> Any:
    peers: list[SmuxPeer] = []

    def make() -> SmuxPeer:
        peers.append(SmuxPeer(runtime))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


def test_a_stream_the_server_opens_is_refused_by_the_client(
    runtime: str,
    smux_peer: Callable[[], SmuxPeer],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tunnel carries connections from client to server only: a stream the server opens
    is closed at once (the server reads EOF) with a warning, and the mux connection stays
    up for the client's own connections."""
    peer = smux_peer()
    cli = TunnelClient("127.0.0.1:0", peer.address, runtime=runtime)
    tunnels.append(cli)
    cli.start()
    session = peer.accept()
    assert cli.wait_connected(timeout=10)
    pushed = session.open_stream()
    pushed.sendall(b"unasked")
    pushed.settimeout(10)
    assert pushed.recv(10) == b""
    wait_logged(caplog, f"the server opened stream {pushed.id}; a tunnel does not carry those")
    assert cli.connected == 1

    sock = connect(cli.address)
    try:
        st = session.accept_stream(timeout=10)
        sock.sendall(b"mine")
        assert st.recv(4) == b"mine"
    finally:
        sock.close()


def test_a_healthy_mux_connection_lost_after_a_while_is_redialled_at_once(
    runtime: str,
    smux_peer: Callable[[], SmuxPeer],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A mux connection that worked (frames went both ways) for at least ``backoff_max``
    and then ended is dialled again at once, not after a backoff: a server restart after
    days of service does not cost the users seconds."""
    backoff = 3.0
    peer = smux_peer()
    cli = TunnelClient(
        "127.0.0.1:0",
        peer.address,
        runtime=runtime,
        backoff_initial=backoff,
        backoff_max=backoff,
    )
    tunnels.append(cli)
    cli.start()
    session = peer.accept()
    assert cli.wait_connected(timeout=10)
    sock = connect(cli.address)
    try:
        st = session.accept_stream(timeout=10)
        st.sendall(b"frames the client receives")
        sock.settimeout(10)
        assert sock.recv(100)
    finally:
        sock.close()
    born = time.monotonic()
    wait_until(lambda: time.monotonic() - born >= backoff, backoff + 5, "older than backoff_max")
    session.close()
    lost = time.monotonic()
    peer.accept()
    assert time.monotonic() - lost < backoff * 0.8, "waited a backoff before re-dialling"
    wait_logged(caplog, "lost")
    assert cli.wait_connected(timeout=10)


@pytest.mark.parametrize(
    ("answer", "described"),
    [
        (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", "a TLS record (is it a TLS port?)"),
        (b"220 mail.example ESMTP ready\r\n", "text: b'220 mail.example ESMTP ready\\r\\n'"),
    ],
    ids=["tls", "text"],
)
def test_a_remote_that_is_not_smux_is_described(
    runtime: str,
    answer: bytes,
    described: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client pointed at a TLS port or at a text protocol says what answered it."""

    def speak(conn: Any) -> None:
        conn.sendall(answer)
        with contextlib.suppress(OSError):
            conn.recv(100)

    wrong = target(speak)
    cli = TunnelClient("127.0.0.1:0", wrong.address, runtime=runtime, backoff_initial=1.0)
    tunnels.append(cli)
    cli.start()
    message = wait_logged(caplog, "does not speak smux")
    assert f"(it answered with {described})" in message, message


# ---------------------------------------------------------------------------
# addresses


def test_names_and_ipv6_addresses_carry_connections(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """``localhost`` is resolved for listening and for dialling, and IPv6 literals
    (``[::1]:port``) work for both: a connection crosses two tunnels in a row, the first
    reached over IPv6, the second listening on IPv6 and listened to by name."""
    echo = target()
    inner_srv = TunnelServer("localhost:0", f"localhost:{echo.address[1]}", runtime=runtime)
    tunnels.append(inner_srv)
    inner_srv.start()
    inner_cli = TunnelClient("[::1]:0", f"localhost:{inner_srv.address[1]}", runtime=runtime)
    tunnels.append(inner_cli)
    inner_cli.start()
    assert inner_cli.address[0] == "::1"
    outer_srv = TunnelServer("[::1]:0", format_address(inner_cli.address), runtime=runtime)
    tunnels.append(outer_srv)
    outer_srv.start()
    outer_cli = TunnelClient("127.0.0.1:0", format_address(outer_srv.address), runtime=runtime)
    tunnels.append(outer_cli)
    outer_cli.start()
    assert inner_cli.wait_connected(timeout=10) and outer_cli.wait_connected(timeout=10)
    data = payload(30_000, 8)
    assert sha(echo_through(outer_cli.address, data)) == sha(data)
    assert inner_srv.stats()["connections_carried"] == 1
