"""The tunnel end to end over real loopback TCP: ``pysmux.tunnel`` in-process (on both
runtimes) and the ``pysmux`` command in child processes.

Every TCP connection the tests make through a tunnel ends at a small TCP server
of the test (``TcpTarget``, tasks of the test's runtime). Nothing sleeps to
synchronise: tests wait for lines a child prints, tasks ending, or blocking
calls returning, each with a deadline; ``wait_until`` polls only counters that
offer no blocking wait.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import hashlib
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pysmux
from pysmux.cli import add_smux_options, build_parser, config_from_args
from pysmux.cli_options import resolve_runtime
from pysmux.launch import WaitingLauncher
from pysmux.runner import GC_THRESHOLD, THREAD_STACK, max_conns_for, size_process
from pysmux.runtime import ThreadRuntime, get_runtime
from pysmux.tunnel import EchoServer, TunnelClient, TunnelServer, format_address, parse_address
from tests import runtimes
from tests.runtimes import Harness, Worker, current
from tests.util import unread_bytes
from tests_e2e.peers import recv_until_error

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20

VERSIONS = pytest.mark.parametrize("version", [1, 2], ids=["v1", "v2"])
CHILD = pytest.mark.runtime_independent(reason="the tunnel under test runs in child processes")

Addr = tuple[str, int]


# ---------------------------------------------------------------------------
# helpers


def wait_until(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a counter that has no blocking wait; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    harness = current()
    while not pred():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        harness.sleep(0.01)


def payload(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def recv_to_eof(sock: Any, limit: int = 64 * MiB) -> bytes:
    """Read until a clean EOF; an error propagates."""
    out = bytearray()
    while True:
        data = sock.recv(1 << 16)
        if not data:
            return bytes(out)
        out += data
        assert len(out) <= limit, "more data than sent"


def recv_exactly(sock: Any, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        data = sock.recv(min(1 << 16, n - len(out)))
        assert data, f"EOF after {len(out)} of {n} bytes"
        out += data
    return bytes(out)


def connect(addr: Addr) -> Any:
    return current().connect(addr, timeout=30)


def echo_through(addr: Addr, data: bytes) -> bytes:
    """One TCP connection: send ``data`` and half-close (from a helper task) while reading
    everything back here until EOF."""
    harness = current()
    sock = connect(addr)
    try:

        def send() -> None:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)

        writer = harness.spawn(send, name="tcp-send")
        try:
            got = recv_to_eof(sock)
        finally:
            writer.join(30)
        writer.result(0)
        return got
    finally:
        sock.close()


def echo_many(addr: Addr, count: int, size: int) -> None:
    """``count`` concurrent TCP connections each echo ``size`` checksummed bytes."""
    harness = current()
    datas = [payload(size, seed) for seed in range(count)]
    workers = [harness.spawn(echo_through, addr, d, name=f"echo-{i}") for i, d in enumerate(datas)]
    results = [w.result(60) for w in workers]
    for i, (sent, got) in enumerate(zip(datas, results, strict=True)):
        assert len(got) == len(sent), f"connection {i}: {len(got)} of {len(sent)} bytes"
        assert sha(got) == sha(sent), f"connection {i}: corrupted echo"


class TcpTarget:
    """A plain TCP server of the test's runtime: one task per connection runs ``handler(conn)``.

    ``close()`` stops accepting, wakes every handler, joins every task and closes
    every socket, then re-raises what a task raised other than an OSError (a failed
    assertion in a handler). ``errors`` holds the OSErrors handlers raised: each test
    says which it expects.
    """

    def __init__(self, handler: Callable[[Any], None]) -> None:
        self.harness: Harness = current()
        self.listener = self.harness.listen("127.0.0.1")
        host, port = self.listener.getsockname()[:2]
        self.address: Addr = (host, port)
        self.handler = handler
        self.cond = self.harness.Condition()
        self.conns: list[Any] = []
        self.tasks: list[Worker] = []
        self.errors: list[OSError] = []
        self.finished = 0
        self._closed = False
        self._acceptor = self.harness.spawn(self._accept_loop, name="target-accept")

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(30)
            with self.cond:
                if self._closed:
                    conn.close()
                    return
                self.conns.append(conn)
                self.tasks.append(self.harness.spawn(self._serve, conn, name="target-conn"))

    def _serve(self, conn: Any) -> None:
        try:
            self.handler(conn)
        except OSError as exc:
            with self.cond:
                self.errors.append(exc)
        finally:
            with self.cond:
                self.finished += 1
                self.cond.notify_all()

    def wait_finished(self, count: int, timeout: float = 20) -> None:
        with self.cond:
            ok = self.cond.wait_for(lambda: self.finished >= count, timeout)
        assert ok, f"{self.finished} of {count} target connections finished"

    def close(self) -> None:
        with self.cond:
            self._closed = True
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self._acceptor.join(10)
        assert not self._acceptor.is_alive(), "target accept loop did not end"
        self.listener.close()
        with self.cond:
            conns, tasks = list(self.conns), list(self.tasks)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for task in tasks:
            task.join(10)
            assert not task.is_alive(), "a target connection task did not end"
        for conn in conns:
            conn.close()
        for task in [self._acceptor, *tasks]:
            if task.exc is not None:
                raise task.exc


def echo_handler(conn: Any) -> None:
    """Echo until EOF, then half-close: EOF travels back only after all the data."""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            break
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


@pytest.fixture
def target() -> Iterator[Callable[..., TcpTarget]]:
    """Factory of TCP targets (default: echo); all closed at teardown."""
    made: list[TcpTarget] = []

    def make(handler: Callable[[Any], None] = echo_handler) -> TcpTarget:
        t = TcpTarget(handler)
        made.append(t)
        return t

    yield make
    errors: list[BaseException] = []
    for t in made:
        try:
            t.close()
        except BaseException as exc:  # close every target, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@pytest.fixture
def tunnels() -> Iterator[list[Any]]:
    """Tunnels a test starts; all closed at teardown (closing twice is harmless)."""
    made: list[Any] = []
    yield made
    for t in reversed(made):
        t.close()


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    sock = current().listen("127.0.0.1")
    port: int = sock.getsockname()[1]
    sock.close()
    return port


# ---------------------------------------------------------------------------
# the library, in-process, on both runtimes


def start_pair(
    runtime: str,
    tunnels: list[Any],
    target: Addr,
    version: int = 1,
    conn: int = 2,
    **client_kw: Any,
) -> tuple[TunnelServer, TunnelClient]:
    cfg = pysmux.Config(version=version)
    srv = TunnelServer("127.0.0.1:0", target, config=cfg, runtime=runtime)
    tunnels.append(srv)
    srv.start()
    cli = TunnelClient(
        "127.0.0.1:0", srv.address, conn=conn, config=cfg, runtime=runtime, **client_kw
    )
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10), "mux connections did not come up"
    return srv, cli


@VERSIONS
def test_tunnel_carries_many_connections_round_robin(
    runtime: str,
    version: int,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user runs a TunnelClient with two mux connections to a TunnelServer and sends 8 TCP
    connections x 1 MiB through it at once: every byte comes back intact, each connection
    ends with a clean EOF after its half-close, and the connections were spread evenly over
    both mux connections."""
    caplog.set_level(logging.DEBUG, logger="pysmux.tunnel")
    echo = target()
    srv, cli = start_pair(runtime, tunnels, echo.address, version=version, conn=2)
    echo_many(cli.address, count=8, size=MiB)
    echo.wait_finished(8)
    assert not echo.errors
    assert srv.sessions == 2 and cli.connected == 2 and cli.dials == 2
    per_session: dict[str, int] = {}
    for rec in caplog.records:
        if rec.name == "pysmux.tunnel" and rec.msg == "stream %s: connected to %s":
            session = str(rec.args[0]).rsplit("/", 1)[0]  # type: ignore[index]
            per_session[session] = per_session.get(session, 0) + 1
    assert sorted(per_session.values()) == [4, 4], per_session
    wait_until(lambda: srv.connections == 0 and cli.connections == 0, 10, "connections ended")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@VERSIONS
def test_half_close_travels_both_ways(
    runtime: str, version: int, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """Half-close works through the tunnel in both directions: a client that sends its
    request and shuts down writing still reads the whole answer and then EOF; and a server
    that sends a greeting and shuts down writing is read to EOF by the client, which can
    still send to it afterwards."""
    received: dict[str, str] = {}

    def greet_then_listen(conn: Any) -> None:
        conn.sendall(b"hello, I will not talk any more")
        conn.shutdown(socket.SHUT_WR)
        received["sha"] = sha(recv_to_eof(conn))

    echo = target()
    greeter = target(greet_then_listen)
    _, cli_echo = start_pair(runtime, tunnels, echo.address, version=version, conn=1)
    _, cli_greet = start_pair(runtime, tunnels, greeter.address, version=version, conn=1)

    # Client-side half-close, reading only after the whole request is sent.
    request = payload(256 * 1024, 7)
    sock = connect(cli_echo.address)
    try:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        assert sha(recv_to_eof(sock)) == sha(request)
        assert sock.recv(1) == b""
    finally:
        sock.close()

    # Server-side half-close: the greeting, EOF, then the client still talks.
    upload = payload(MiB, 8)
    sock = connect(cli_greet.address)
    try:
        assert recv_to_eof(sock) == b"hello, I will not talk any more"
        sock.sendall(upload)
        sock.shutdown(socket.SHUT_WR)
        greeter.wait_finished(1)
        assert sock.recv(1) == b""
    finally:
        sock.close()
    assert received["sha"] == sha(upload)
    echo.wait_finished(1)
    assert not echo.errors and not greeter.errors


def test_unreachable_target_resets_only_that_connection(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """When the server cannot reach its target, the TCP client's connection is reset at
    once (no hang, and not a clean EOF: the connection never completed), both ends log
    why at the default level, and the mux connection stays up for the next connections.
    Across the mux the failure travels as a stream reset (an empty PSH before the FIN)."""
    srv, cli = start_pair(runtime, tunnels, ("127.0.0.1", unused_port()), conn=1)
    for _ in range(3):
        sock = connect(cli.address)
        try:
            with pytest.raises(ConnectionResetError):
                recv_to_eof(sock)
        finally:
            sock.close()
    assert cli.connected == 1 and cli.dials == 1 and srv.sessions == 1

    def logged(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    assert len(logged("cannot connect to target")) == 3, [r.getMessage() for r in caplog.records]
    wait_until(lambda: len(logged("was reset before any reply")) == 3, 5, "client logs")
    assert all(r.levelno == logging.WARNING for r in logged("was reset before any reply"))


def test_client_redials_after_server_restart(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """The tunnel server goes away and comes back on the same port: the client notices,
    re-dials with backoff, and serves new connections again, including one that arrived
    while no mux connection was up (it waits for one instead of failing)."""
    echo = target()
    srv, cli = start_pair(runtime, tunnels, echo.address, conn=2, backoff_max=0.5)
    echo_many(cli.address, count=2, size=64 * 1024)
    port = srv.address[1]
    srv.close()
    wait_until(lambda: cli.connected == 0, 10, "the client noticed the server is gone")

    harness = current()
    data = payload(256 * 1024, 3)
    early = harness.spawn(echo_through, cli.address, data, name="early-conn")
    srv2 = TunnelServer(("127.0.0.1", port), echo.address, runtime=runtime)
    tunnels.append(srv2)
    srv2.start()
    assert cli.wait_connected(timeout=15), "the client did not re-dial"
    assert sha(early.result(30)) == sha(data)
    echo_many(cli.address, count=4, size=256 * 1024)
    assert cli.dials == 4 and srv2.sessions == 2
    echo.wait_finished(2 + 1 + 4)
    assert not echo.errors  # every connection ended after its echo: none was cut short


def test_connection_without_any_server_is_reset_after_connect_timeout(
    runtime: str, tunnels: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """With the tunnel server down, the client keeps re-dialling (and says so in its log);
    a TCP connection that arrives meanwhile waits ``connect_timeout`` for a mux connection
    and is then reset, rather than hanging or looking like an empty answer."""
    cli = TunnelClient(
        "127.0.0.1:0",
        ("127.0.0.1", unused_port()),
        runtime=runtime,
        connect_timeout=0.3,
        backoff_max=0.1,
    )
    tunnels.append(cli)
    cli.start()
    sock = connect(cli.address)
    try:
        began = time.monotonic()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)
        assert 0.2 < time.monotonic() - began < 10
    finally:
        sock.close()
    assert cli.connected == 0 and cli.dials == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("cannot connect to 127.0.0.1" in m for m in messages), messages
    assert any("no mux connection" in m for m in messages), messages


def test_mux_death_resets_carried_connections(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """A download cut short because the tunnel server went away is seen by the TCP client as
    a connection reset, never as a clean end of file; likewise the target sees a reset when
    the client side of the tunnel goes away."""
    written: dict[str, OSError] = {}

    def stream_forever(conn: Any) -> None:
        block = payload(64 * 1024, 1)
        try:
            while True:
                conn.sendall(block)
        except OSError as exc:
            written["error"] = exc

    source = target(stream_forever)
    srv, cli = start_pair(runtime, tunnels, source.address, conn=1)
    sock = connect(cli.address)
    try:
        recv_exactly(sock, 512 * 1024)  # the download is under way
        srv.close()
        _, exc = recv_until_error(sock)
        assert isinstance(exc, ConnectionResetError), repr(exc)
    finally:
        sock.close()
    source.wait_finished(1)
    # A reset seen by sendall, or EPIPE when it arrived between two writes: either way cut.
    assert isinstance(written["error"], (ConnectionResetError, BrokenPipeError))

    # The other way round: the client side of the tunnel goes away.
    _, cli2 = start_pair(runtime, tunnels, source.address, conn=1)
    sock = connect(cli2.address)
    try:
        recv_exactly(sock, 512 * 1024)
        cli2.close()
        source.wait_finished(2)
        _, exc = recv_until_error(sock)
        assert isinstance(exc, ConnectionResetError), repr(exc)
    finally:
        sock.close()


def test_one_failing_connection_leaves_the_others_alone(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """One TCP client aborts (sends a reset) in the middle of its transfer; the reset
    travels through the tunnel (a stream reset) to that connection's target, the
    transfers of the others on the same mux connection complete, and the tunnel keeps
    working."""
    echo = target()
    srv, cli = start_pair(runtime, tunnels, echo.address, conn=1)
    harness = current()
    good = [harness.spawn(echo_through, cli.address, payload(MiB, i)) for i in range(3)]
    bad = connect(cli.address)
    try:
        bad.sendall(payload(128 * 1024, 99))
        recv_exactly(bad, 64 * 1024)
        bad.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        bad.close()  # with linger 0: a reset
    for i, w in enumerate(good):
        assert sha(w.result(60)) == sha(payload(MiB, i))
    echo_many(cli.address, count=2, size=64 * 1024)
    assert cli.connected == 1 and cli.dials == 1 and srv.sessions == 1
    echo.wait_finished(3 + 1 + 2)
    # Only the aborted connection's target side failed, and with a reset: in recv, or
    # in sendall (EPIPE when the reset arrived between two writes).
    assert len(echo.errors) == 1, echo.errors
    assert isinstance(echo.errors[0], (ConnectionResetError, BrokenPipeError)), echo.errors


def test_close_is_prompt_with_idle_connections(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """Closing a tunnel that carries idle connections returns promptly, resets those
    connections, and leaves no task behind (the leak check of conftest.py)."""
    echo = target()
    srv, cli = start_pair(runtime, tunnels, echo.address, conn=2)
    socks = [connect(cli.address) for _ in range(4)]
    try:
        for i, s in enumerate(socks):  # each one is carried end to end
            s.sendall(b"ping %d" % i)
            assert recv_exactly(s, 6) == b"ping %d" % i
        began = time.monotonic()
        cli.close()
        srv.close()
        assert time.monotonic() - began < 3.0
        assert cli.connections == 0 and srv.connections == 0
        for s in socks:
            _, exc = recv_until_error(s)
            assert isinstance(exc, ConnectionResetError)
    finally:
        for s in socks:
            s.close()
    # The target's side of each connection is reset too, not ended as if complete.
    echo.wait_finished(4)
    assert [type(e) for e in echo.errors] == [ConnectionResetError] * 4, echo.errors


def test_close_is_prompt_without_linux_disconnect(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where connect(AF_UNSPEC) cannot abort a TCP connection (not Linux), closing the tunnel
    still wakes connections blocked in either direction, including one whose TCP client
    stopped reading, and returns promptly."""
    import pysmux.tunnel.net

    monkeypatch.setattr(pysmux.tunnel.net, "_disconnect", None)

    def flood(conn: Any) -> None:
        block = payload(64 * 1024, 5)
        while True:
            conn.sendall(block)  # until the tunnel resets the connection: see below

    source = target(flood)
    srv, cli = start_pair(runtime, tunnels, source.address, conn=1)
    stalled = connect(cli.address)  # never read after the first bytes: sendall blocks
    idle = connect(srv.address)  # a mux connection that never speaks
    try:
        recv_exactly(stalled, 1024)
        wait_until(lambda: srv.connections == 1, 10, "the flood is carried")
        queued: list[int] = []

        def flood_stalled() -> bool:
            # What the TCP client has not read stopped growing for 10 looks in a row:
            # every buffer on the way is full, the tunnel's sendall to it is blocked.
            queued.append(unread_bytes(stalled))
            return len(queued) >= 10 and queued[-1] > 0 and len(set(queued[-10:])) == 1

        wait_until(flood_stalled, 20, "the flood stalls on the client that does not read")
        began = time.monotonic()
        cli.close()
        srv.close()
        assert time.monotonic() - began < 3.0
        # Unsent data was still queued when the tunnel closed, so its FIN never left:
        # the reset at close() is all the TCP client can see.
        _, exc = recv_until_error(stalled)
        assert isinstance(exc, ConnectionResetError), repr(exc)
    finally:
        stalled.close()
        idle.close()
    source.wait_finished(1)
    # The flood's sendall fails with a reset or, when the reset arrived between two
    # writes, EPIPE: both say the tunnel cut the connection.
    assert len(source.errors) == 1, source.errors
    assert isinstance(source.errors[0], (ConnectionResetError, BrokenPipeError)), source.errors


def test_echo_server_and_connection_limit(runtime: str, tunnels: list[Any]) -> None:
    """EchoServer (what ``pysmux echo`` runs) echoes every stream a TunnelClient carries;
    a client at its ``max_conns`` refuses (resets) more connections at once instead of
    queueing them, and takes new ones again when one ends."""
    echo = EchoServer("127.0.0.1:0", runtime=runtime)
    tunnels.append(echo)
    echo.start()
    cli = TunnelClient("127.0.0.1:0", echo.address, runtime=runtime, max_conns=1)
    tunnels.append(cli)
    cli.start()
    assert cli.wait_connected(timeout=10)
    held = connect(cli.address)
    try:
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        # Refused with a reset: connect() itself reports it when the reset arrived before
        # it looked at the socket's error (a connect with a timeout looks), else recv does.
        with pytest.raises(ConnectionResetError):
            extra = connect(cli.address)
            try:
                extra.recv(1)
            finally:
                extra.close()
    finally:
        held.close()
    wait_until(lambda: cli.connections == 0, 10, "the held connection ended")
    echo_many(cli.address, count=1, size=MiB)


@pytest.mark.runtime_independent(reason="pure functions")
def test_parse_and_format_addresses(runtime: str) -> None:
    """Addresses are written as kcptun users write them: HOST:PORT, :PORT, [IPV6]:PORT;
    mistakes are reported clearly."""
    assert parse_address("127.0.0.1:4000") == ("127.0.0.1", 4000)
    assert parse_address(":4000", "0.0.0.0") == ("0.0.0.0", 4000)
    assert parse_address("[::1]:0") == ("::1", 0)
    assert parse_address("example.com:80") == ("example.com", 80)
    for bad, why in [("4000", "HOST:PORT"), ("::1:80", "brackets"), ("h:x", "not a number"),
                     ("h:70000", "0..65535")]:  # fmt: skip
        with pytest.raises(ValueError, match=re.escape(why)):
            parse_address(bad)
    assert format_address(("::1", 80)) == "[::1]:80"
    assert format_address(("127.0.0.1", 80, "ignored")) == "127.0.0.1:80"
    with pytest.raises(ValueError, match="conn"):
        TunnelClient("127.0.0.1:0", "127.0.0.1:1", conn=0)
    with pytest.raises(ValueError, match="target"):
        TunnelServer("127.0.0.1:0", ":80")


# ---------------------------------------------------------------------------
# the command, in child processes


class Cli:
    """``python -m pysmux ARGS`` in a child process, read line by line.

    stdout and stderr are read by tasks of the test's runtime. ``stop()`` makes
    sure the child is gone and reaped and every pipe and reader task closed.
    """

    def __init__(self, *args: str, path: str | None = None) -> None:
        env = dict(os.environ)
        paths = (path, str(REPO), env.get("PYTHONPATH"))  # ``path`` first: it can hide modules
        if path is not None:
            # Coverage (CI's measured run) starts in every child with the parent's
            # settings, and its gevent support cannot start where gevent is hidden:
            # such a child runs unmeasured rather than with coverage's error on stderr.
            env.pop("COVERAGE_PROCESS_CONFIG", None)
            env.pop("COVERAGE_PROCESS_START", None)
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        self.argv = [sys.executable, "-W", "error::ResourceWarning", "-m", "pysmux", *args]
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.harness = current()
        self.cond = self.harness.Condition()
        self.out: list[str] = []
        self.err: list[str] = []
        self._open = 2
        self._readers = [
            self.harness.spawn(self._read, self.proc.stdout, self.out, name="cli-stdout"),
            self.harness.spawn(self._read, self.proc.stderr, self.err, name="cli-stderr"),
        ]

    def _read(self, pipe: Any, lines: list[str]) -> None:
        fd = pipe.fileno()
        buf = b""
        try:
            while True:
                chunk = self.harness.read_fd(fd, 65536)
                if not chunk:
                    break
                buf += chunk
                *done, buf = buf.split(b"\n")
                with self.cond:
                    lines.extend(d.decode(errors="replace") for d in done)
                    self.cond.notify_all()
        finally:
            with self.cond:
                if buf:
                    lines.append(buf.decode(errors="replace"))
                self._open -= 1
                self.cond.notify_all()

    def describe(self) -> str:
        with self.cond:
            out = "\n  ".join(self.out[-20:])
            err = "\n  ".join(self.err[-30:])
        cmd = " ".join(self.argv[3:])
        return f"{cmd} (rc={self.proc.poll()})\n stdout:\n  {out}\n stderr:\n  {err}"

    def wait_lines(
        self, pattern: str, count: int = 1, timeout: float = 20, stderr: bool = False
    ) -> list[re.Match[str]]:
        """Block until ``count`` lines match ``pattern`` (on stdout, or stderr)."""
        regex = re.compile(pattern)
        lines = self.err if stderr else self.out
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in map(regex.search, lines) if m]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if left <= 0 or self._open == 0:
                    raise AssertionError(
                        f"{len(found)} of {count} lines matching {pattern!r}\n{self.describe()}"
                    )
                self.cond.wait(left)

    def address(self) -> Addr:
        """The address of its ``listening on HOST:PORT`` line."""
        return parse_address(self.wait_lines(r"^listening on (\S+)$")[0].group(1))

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float = 10) -> int:
        """Wait for the child to exit (its pipes closing first: cooperative); its status."""
        with self.cond:
            self.cond.wait_for(lambda: self._open == 0, timeout)
            closed = self._open == 0
        try:
            return self.proc.wait(2 if closed else 0.01)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"did not exit within {timeout}s\n{self.describe()}") from None

    def assert_clean_exit(self, sig: int = signal.SIGTERM, within: float = 5.0) -> None:
        """``sig`` makes it exit with status 0 within ``within`` seconds, without a warning
        or traceback on stderr."""
        began = time.monotonic()
        self.send_signal(sig)
        rc = self.wait(within + 5)
        took = time.monotonic() - began
        assert rc == 0, self.describe()
        assert took < within, f"exit took {took:.1f}s\n{self.describe()}"
        text = "\n".join(self.err)
        for bad in ("Traceback", "Warning", "ERROR", "Exception"):
            assert bad not in text, self.describe()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with self.cond:
            self.cond.wait_for(lambda: self._open == 0, 10)
        self.proc.wait(10)
        for r in self._readers:
            r.result(10)
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def cli() -> Iterator[Callable[..., Cli]]:
    """Start ``python -m pysmux`` children; all killed (if need be) and reaped after."""
    procs: list[Cli] = []

    def start(*args: str, path: str | None = None) -> Cli:
        p = Cli(*args, path=path)
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.stop()


def addr_arg(addr: Addr) -> str:
    return format_address(addr)


@CHILD
@VERSIONS
def test_cli_tunnel_echo(
    runtime: str, version: int, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """The kcptun-style command line: ``pysmux server -l ... -t TARGET`` and ``pysmux client
    -l ... -r SERVER --conn 2`` carry 8 TCP connections x 1 MiB to an echo service and back
    intact (each client half-closes and reads the full echo, then EOF), over two mux
    connections; SIGTERM then stops both with status 0."""
    echo = target()
    ver = f"--smuxver={version}"
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), ver)
    client = cli(
        "client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), "--conn", "2", ver
    )
    caddr = client.address()
    client.wait_lines(r"mux connection \d to .* established", count=2, stderr=True)
    echo_many(caddr, count=8, size=MiB)
    echo.wait_finished(8)
    assert not echo.errors
    assert len(server.wait_lines(r"mux connection from", count=2, stderr=True)) == 2
    client.assert_clean_exit(signal.SIGTERM)
    server.assert_clean_exit(signal.SIGTERM)


@CHILD
def test_cli_client_reconnects_after_server_killed(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """The tunnel server process is killed (SIGKILL) and started again on the same port: the
    client process keeps running, logs the loss, re-dials both mux connections, and new
    connections through it work again."""
    echo = target()
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address))
    saddr = server.address()
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(saddr), "--conn", "2")
    caddr = client.address()
    client.wait_lines(r"mux connection \d to .* established", count=2, stderr=True)
    echo_many(caddr, count=2, size=256 * 1024)

    server.send_signal(signal.SIGKILL)
    assert server.wait() == -signal.SIGKILL
    client.wait_lines(r"mux connection \d to .* lost", count=2, stderr=True)
    server2 = cli("server", "-l", addr_arg(saddr), "-t", addr_arg(echo.address))
    assert server2.address() == saddr
    client.wait_lines(r"mux connection \d to .* established", count=4, stderr=True)
    echo_many(caddr, count=4, size=256 * 1024)
    assert client.proc.poll() is None
    client.assert_clean_exit(signal.SIGTERM)
    server2.assert_clean_exit(signal.SIGTERM)
    echo.wait_finished(2 + 4)
    assert not echo.errors  # the kill came between transfers: none was cut short


@CHILD
def test_cli_signals_stop_promptly_with_live_connections(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """With ``--drain-timeout 0``, SIGINT (Ctrl-C) and SIGTERM stop the client and the
    server promptly with status 0 even while connections are being carried; those
    connections are reset, not left hanging or ended as if complete."""
    echo = target()
    now = ("--drain-timeout", "0")
    server = cli(
        "server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), "--smuxver", "2", *now
    )
    client = cli(
        "client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), "--smuxver=2", "-v", *now
    )
    caddr = client.address()
    socks = [connect(caddr) for _ in range(3)]
    try:
        for s in socks:
            s.sendall(b"are you there")
            assert recv_exactly(s, 13) == b"are you there"
        client.assert_clean_exit(signal.SIGINT)
        for s in socks:
            try:
                _, exc = recv_until_error(s)
            except AssertionError as err:
                raise AssertionError(f"{err}\n{client.describe()}") from None
            assert isinstance(exc, ConnectionResetError), repr(exc)
        server.assert_clean_exit(signal.SIGTERM)
    finally:
        for s in socks:
            s.close()
    echo.wait_finished(3)
    # The target's side of each live connection is reset too, not ended as if complete.
    assert [type(e) for e in echo.errors] == [ConnectionResetError] * 3, echo.errors


@CHILD
def test_cli_gevent_runtime(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """``--runtime gevent`` runs the same tunnel on greenlets: 4 connections x 1 MiB come
    back intact over smux v2, and SIGTERM stops both ends with status 0."""
    pytest.importorskip("gevent")
    echo = target()
    common = ("--runtime", "gevent", "--smuxver", "2")
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), *common)
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), *common)
    caddr = client.address()
    echo_many(caddr, count=4, size=MiB)
    echo.wait_finished(4)
    assert not echo.errors
    client.assert_clean_exit(signal.SIGTERM)
    server.assert_clean_exit(signal.SIGTERM)


@CHILD
def test_cli_echo_command_and_quiet(runtime: str, cli: Callable[..., Cli]) -> None:
    """``pysmux echo`` is a ready-made smux echo service for trying a client out; with ``-q``
    it logs nothing while all is well."""
    server = cli("echo", "-l", "127.0.0.1:0", "-q")
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), "-q")
    echo_many(client.address(), count=2, size=MiB)
    client.assert_clean_exit(signal.SIGTERM)
    server.assert_clean_exit(signal.SIGINT)
    assert client.err == [] and server.err == []


@CHILD
def test_cli_usage_errors(runtime: str, cli: Callable[..., Cli]) -> None:
    """Mistakes on the command line are reported at once with status 2, an address that is
    taken with status 1 and a message; ``--version`` and ``--help`` work."""
    for args in [
        ("client", "-l", "127.0.0.1:0"),  # no -r
        ("server", "-t", "127.0.0.1:1", "--smuxver", "3"),
        ("client", "-r", "nowhere", "-l", "127.0.0.1:0"),
        ("server", "-t", "127.0.0.1:1", "--conn", "2"),  # a client flag
        ("client", "-r", "127.0.0.1:1", "--conn", "0"),
        ("client", "-r", "127.0.0.1:1", "--smuxbuf", "100", "--streambuf", "100", "--framesize",
         "70000"),
    ]:  # fmt: skip
        p = cli(*args)
        assert p.wait() == 2, p.describe()
        assert any("error" in line for line in p.err), p.describe()

    taken = current().listen("127.0.0.1")
    try:
        p = cli("server", "-l", addr_arg(taken.getsockname()), "-t", "127.0.0.1:1")
        assert p.wait() == 1, p.describe()
        assert any("cannot listen" in line for line in p.err), p.describe()
    finally:
        taken.close()

    p = cli("--version")
    assert p.wait() == 0
    assert p.out == [f"pysmux {pysmux.__version__}"]
    p = cli("client", "--help")
    assert p.wait() == 0
    assert any("--conn" in line for line in p.out)


@CHILD
def test_cli_config_errors_name_the_flag(runtime: str, cli: Callable[..., Cli]) -> None:
    """A flag value the session config refuses (a frame larger than smux can carry, a
    keepalive timeout shorter than the interval, a stream window past 2**31-1) is reported
    like any other bad flag, on every subcommand: the subcommand's usage, then the flag as
    typed and what is wrong with it, status 2, and nothing listens."""
    for args, message in [
        (("server", "-t", "127.0.0.1:1", "--framesize", "70000"),
         r"--framesize 70000: must be in 1\.\.65535"),
        (("client", "-r", "127.0.0.1:1", "--keepalive", "60", "--keepalive-timeout", "30"),
         r"--keepalive-timeout 30: must be >= --keepalive\b"),
        (("echo", "-l", "127.0.0.1:0", "--smuxbuf", "4000000000", "--streambuf", "3000000000"),
         r"--streambuf 3000000000: must be in 1\.\."),
    ]:  # fmt: skip
        p = cli(*args)
        assert p.wait() == 2, p.describe()
        assert p.out == [], p.describe()
        assert p.err[0].startswith(f"usage: pysmux {args[0]} "), p.describe()
        assert re.fullmatch(rf"pysmux {args[0]}: error: {message}.*", p.err[-1]), p.describe()


@pytest.mark.runtime_independent(reason="parses flags in-process; no runtime involved")
def test_smux_options_serve_any_subcommand(runtime: str) -> None:
    """A subcommand defined anywhere gets the shared smux flags from ``add_smux_options`` and
    its session config from ``config_from_args``: every flag lands in its ``Config`` field,
    the defaults are Go's but for kcptun's 2 MiB stream window (capped by --smuxbuf), and
    ``--keepalive 0`` turns keepalive off whatever --keepalive-timeout says."""
    parser = argparse.ArgumentParser(prog="pysmux other", allow_abbrev=False)
    add_smux_options(parser)
    args = parser.parse_args(
        ["--smuxver", "2", "--smuxbuf", "1048576", "--streambuf", "4194304", "--framesize",
         "1024", "--keepalive", "2.5", "--runtime", "gevent", "-vv", "-q"]
    )  # fmt: skip
    assert config_from_args(args) == pysmux.Config(
        version=2,
        max_receive_buffer=1048576,
        max_stream_buffer=1048576,
        max_frame_size=1024,
        keepalive_interval=2.5,
        keepalive_timeout=30.0,
    )
    assert (args.runtime, args.verbose - args.quiet) == ("gevent", 1)
    defaults = parser.parse_args([])
    assert config_from_args(defaults) == pysmux.Config(max_stream_buffer=2 * MiB)
    assert defaults.runtime == "thread"
    assert config_from_args(parser.parse_args(["--keepalive", "40"])).keepalive_timeout == 120
    off = config_from_args(parser.parse_args(["--keepalive", "0", "--keepalive-timeout", "5"]))
    assert not off.keepalive
    with pytest.raises(ValueError, match=r"^--framesize 65536: "):
        config_from_args(parser.parse_args(["--framesize", "65536"]))


@pytest.mark.runtime_independent(reason="checks arguments only; nothing starts")
def test_waits_too_long_for_the_os_are_refused(runtime: str) -> None:
    """A timeout or backoff too long for the OS's timers (past about 292 years a thread's
    wait overflows, and the task waiting dies) is refused up front, by the library and by
    the command's flags, instead of killing a task later."""
    for kwargs in [{"connect_timeout": float("inf")}, {"connect_timeout": 1e10},
                   {"backoff_max": 1e10}, {"connect_timeout": float("nan")}]:  # fmt: skip
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            TunnelClient("127.0.0.1:0", "127.0.0.1:1", **kwargs)
    with pytest.raises(ValueError, match="connect_timeout"):
        TunnelServer("127.0.0.1:0", "127.0.0.1:1", connect_timeout=1e7)
    parser = argparse.ArgumentParser(prog="pysmux other", allow_abbrev=False, exit_on_error=False)
    add_smux_options(parser)
    for flag in ("--keepalive", "--keepalive-timeout"):
        with pytest.raises(argparse.ArgumentError, match="at most"):
            parser.parse_args([flag, "1e10"])
    assert config_from_args(parser.parse_args(["--keepalive", "1e6"])).keepalive_timeout == 3e6


# ---------------------------------------------------------------------------
# scale: hundreds of connections, and the command's defaults for thousands

#: Connections held open at once by the scale tests: with the target and the two
#: tunnel ends in this process, about four descriptors each, past 1,023 (where
#: ``select()`` stops working).
HELD = 300


@pytest.fixture
def open_files() -> Iterator[int]:
    """Raise this process's soft open-file limit for ``HELD`` connections (restored after)."""
    resource = pytest.importorskip("resource", reason="open-file limits are POSIX")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = HELD * 4 + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"the hard open-file limit ({hard}) is below the {want} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    try:
        yield want
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def upload_tasks() -> int:
    """Upload tasks of carried connections alive now, in this process."""
    prefix = "pysmux-tunnel-up-"
    threads = sum(1 for t in threading.enumerate() if t.name.startswith(prefix))
    greenlets = [g for g in runtimes.live_greenlets() if getattr(g, "name", "")]
    return threads + sum(1 for g in greenlets if g.name.startswith(prefix))


@VERSIONS
def test_hundreds_of_connections_held_open_cost_one_task_each(
    runtime: str,
    version: int,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    open_files: int,
) -> None:
    """A crawler or an office keeps hundreds of TCP connections open through one tunnel: 300
    connections each echo a message and stay open. Once they are idle neither end holds an
    upload task for any of them (an idle connection costs one task, not two), each echoes
    again (its next bytes start a task), and closing them all ends every carried
    connection cleanly."""
    echo = target()
    srv, cli = start_pair(runtime, tunnels, echo.address, version=version, conn=1)
    socks: list[Any] = []
    try:
        for i in range(HELD):
            sock = connect(cli.address)
            socks.append(sock)
            sock.sendall(b"hello %05d" % i)
            assert recv_exactly(sock, 11) == b"hello %05d" % i
        assert cli.connections == HELD and srv.connections == HELD
        wait_until(lambda: upload_tasks() == 0, 20, "idle connections hold no upload task")
        for i, sock in enumerate(socks):  # all sent before any is read: all busy at once
            sock.sendall(b"again %05d" % i)
        for i, sock in enumerate(socks):
            assert recv_exactly(sock, 11) == b"again %05d" % i
    finally:
        for sock in socks:
            sock.close()
    wait_until(lambda: cli.connections == 0 and srv.connections == 0, 30, "connections ended")
    echo.wait_finished(HELD)
    assert not echo.errors
    assert srv.stats()["connections_carried"] == HELD


@pytest.mark.runtimes("thread", reason="the fallback launcher serves threads only")
def test_tunnel_without_epoll(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where epoll is missing (not Linux), the thread runtime's tunnel watches each
    connection with a waiting task instead: connections still carry data both ways and
    half-close, and close() joins every task."""
    monkeypatch.setattr(ThreadRuntime, "launcher", lambda rt: WaitingLauncher(rt))
    echo = target()
    _, cli = start_pair(runtime, tunnels, echo.address, conn=1)
    echo_many(cli.address, count=4, size=256 * 1024)
    echo.wait_finished(4)
    assert not echo.errors


def test_a_connection_the_tunnel_cannot_watch_is_reset(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client out of descriptors for the watcher of its connections (the epoll) resets
    the connection it cannot take, so the TCP client sees a reset instead of a hang, logs
    why, and carries the next connection once it can."""
    base: Any = type(get_runtime(runtime))

    class Starved(base):  # type: ignore[misc]
        fails = 1

        def launcher(self) -> Any:
            if Starved.fails:
                Starved.fails -= 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().launcher()

    echo = target()
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=runtime)
    tunnels.append(srv)
    cli = TunnelClient("127.0.0.1:0", srv.start().address, runtime=Starved())
    tunnels.append(cli)
    assert cli.start().wait_connected(timeout=10)
    try:  # the reset may beat the end of connect()
        sock = connect(cli.address)
    except ConnectionResetError:
        pass
    else:
        try:
            _, exc = recv_until_error(sock)
            assert isinstance(exc, ConnectionResetError), repr(exc)
        finally:
            sock.close()
    assert any("cannot watch connections" in r.getMessage() for r in caplog.records)
    echo_many(cli.address, count=2, size=64 * 1024)
    with pytest.raises(TypeError, match="launcher"):
        TunnelServer("127.0.0.1:0", echo.address, runtime=object())  # type: ignore[arg-type]


@pytest.mark.runtime_independent(reason="resolves flags in-process; nothing starts")
def test_runtime_auto_is_the_services_default(
    runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--runtime auto`` is the default of the commands that serve (server, client, echo):
    gevent when it can be imported, else threads, with the reason; an explicit choice is
    kept. The tools keep threads unless told."""
    parser = build_parser()
    for command in (["server", "-t", "h:1"], ["client", "-r", "h:1"], ["echo"]):
        assert parser.parse_args(command).runtime == "auto"
    for command in (["rpc"], ["demo"]):
        assert parser.parse_args(command).runtime == "thread"
    assert resolve_runtime("thread") == ("thread", "--runtime thread")
    assert resolve_runtime("gevent") == ("gevent", "--runtime gevent")
    if runtimes.gevent_available():
        assert resolve_runtime("auto") == ("gevent", "auto: gevent is installed")
    monkeypatch.setitem(sys.modules, "gevent", None)  # what a missing gevent looks like
    name, why = resolve_runtime("auto")
    assert name == "thread" and why.startswith("auto: gevent cannot be imported"), why


@pytest.mark.runtime_independent(reason="sizes this process; nothing starts")
def test_the_command_sizes_its_process_for_many_connections(runtime: str) -> None:
    """The tunnel commands raise the soft open-file limit to the hard one (as Go programs
    do) and take --max-conns from it (less a reserve, at most 65,536), give the thread
    runtime's threads small stacks, and spare the garbage collector the objects of
    thousands of connections."""
    resource = pytest.importorskip("resource", reason="open-file limits are POSIX")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard) - 1
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    threshold = gc.get_threshold()
    try:
        assert size_process("thread") == hard
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (hard, hard)
        assert threading.stack_size() == THREAD_STACK
        assert gc.get_threshold() == GC_THRESHOLD
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
        threading.stack_size(0)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert max_conns_for(1024) == 896
    assert max_conns_for(20_000) == 19_872
    assert max_conns_for(1 << 20) == 65_536
    assert max_conns_for(100) == 1


@CHILD
def test_cli_says_which_runtime_runs(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget], tmp_path: Path
) -> None:
    """A user who starts the tunnel without ``--runtime`` reads in its log which runtime
    runs and why (gevent when installed; threads when gevent cannot be imported) and how
    many connections it takes at once; either way the tunnel carries data."""
    echo = target()
    hidden = tmp_path / "no-gevent"
    (hidden / "gevent").mkdir(parents=True)
    (hidden / "gevent" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    expected = "gevent" if runtimes.gevent_available() else "thread"
    for path, name, why in [
        (None, expected, "auto: gevent is installed" if expected == "gevent" else "auto: "),
        (str(hidden), "thread", "auto: gevent cannot be imported (hidden by the test)"),
    ]:
        server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), path=path)
        client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), path=path)
        caddr = client.address()
        for end in (server, client):
            line = end.wait_lines(r"runtime: (\S+) \((.*)\)$", stderr=True)[0]
            assert line.group(1) == name and line.group(2).startswith(why), end.describe()
            limit = end.wait_lines(r"at most (\d+) connections at once \(open-file limit (\d+)\)",
                                   stderr=True)[0]  # fmt: skip
            assert int(limit.group(1)) == max_conns_for(int(limit.group(2))), end.describe()
        echo_many(caddr, count=2, size=64 * 1024)
        client.assert_clean_exit(signal.SIGTERM)
        server.assert_clean_exit(signal.SIGTERM)
    explicit = cli("echo", "-l", "127.0.0.1:0", "--runtime", "thread")
    explicit.address()  # listening: a signal from now on is graceful
    explicit.wait_lines(r"runtime: thread \(--runtime thread\)$", stderr=True)
    explicit.assert_clean_exit(signal.SIGTERM)
    echo.wait_finished(4)
    assert not echo.errors
