"""``pysmux.load`` and ``pysmux.attack`` against servers that misbehave or are not there,
in-process on both runtimes over loopback TCP: wrong answers are counted by kind and
shown, a server that dies ends a run at once, the attack's settings and probe are
checked, and an attack on nothing says so. Plus the text summary of ``pysmux load``."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pysmux
from pysmux import Config
from pysmux.attack import AttackSettings, run_attack
from pysmux.load import LoadGenerator, run_load
from pysmux.rpc import RpcServer
from pysmux.tunnel import EchoServer
from tests.runtimes import Harness, Worker, current
from tests_e2e import test_cli
from tests_e2e.test_cli import Addr, Cli, addr_arg, unused_port

cli = test_cli.cli  # the fixture that starts `python -m pysmux` children
tunnels = test_cli.tunnels

Handler = Callable[[pysmux.Stream, int], None]


class FakeServer:
    """An smux server of the test's runtime whose streams get ``handler(stream, n)``, ``n``
    counting streams from 0 over every connection; ``kill()`` closes every session."""

    def __init__(self, runtime: str, handler: Handler) -> None:
        self.harness: Harness = current()
        self.runtime = runtime
        self.handler = handler
        self.listener = self.harness.listen("127.0.0.1")
        self.address: Addr = self.listener.getsockname()[:2]
        self.lock = self.harness.Condition()
        self.count = 0
        self.socks: list[Any] = []
        self.sessions: list[pysmux.Session] = []
        self.tasks: list[Worker] = [self.harness.spawn(self._accept, name="fake-accept")]

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            session = pysmux.server(sock, runtime=self.runtime)
            with self.lock:
                self.socks.append(sock)
                self.sessions.append(session)
                self.tasks.append(self.harness.spawn(self._serve, session, name="fake-session"))

    def _serve(self, session: pysmux.Session) -> None:
        while True:
            try:
                stream = session.accept_stream()
            except OSError:
                return
            with self.lock:
                n, self.count = self.count, self.count + 1
            self.tasks.append(self.harness.spawn(self._stream, stream, n, name="fake-stream"))

    def _stream(self, stream: pysmux.Stream, n: int) -> None:
        with contextlib.suppress(OSError), stream:
            self.handler(stream, n)

    def kill(self) -> None:
        with self.lock:
            sessions = list(self.sessions)
        for session in sessions:
            session.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.kill()
        for task in list(self.tasks):
            task.result(10)
        for sock in [self.listener, *self.socks]:
            sock.close()


@pytest.fixture
def fake(runtime: str) -> Iterator[Callable[[Handler], FakeServer]]:
    made: list[FakeServer] = []

    def make(handler: Handler) -> FakeServer:
        made.append(FakeServer(runtime, handler))
        return made[-1]

    yield make
    for server in made:
        server.close()


def echo_exactly(stream: pysmux.Stream, size: int, change: Callable[[bytes], bytes]) -> bytes:
    """Read one request of ``size`` bytes and answer ``change(request)``."""
    got = b""
    while len(got) < size:
        chunk = stream.recv(size - len(got))
        if not chunk:
            return got
        got += chunk
    stream.sendall(change(got))
    return got


# ---------------------------------------------------------------------------
# load


def test_load_counts_wrong_echoes_by_kind_and_goes_on(
    runtime: str, fake: Callable[[Handler], FakeServer]
) -> None:
    """A load run against a server whose first stream answers other bytes and whose second
    answers half and ends: two errors of kind ``_WrongAnswer`` with what went wrong in the
    summary's text, and every other request (on fresh streams) verified. Requests of 4
    bytes are all alike (too short to number), which the check must allow."""

    def handler(stream: pysmux.Stream, n: int) -> None:
        if n == 0:
            echo_exactly(stream, 4, lambda req: b"nope")
            stream.recv(1)  # the client gives the stream up
        elif n == 1:
            stream.sendall(stream.recv(4)[:2])
            stream.shutdown(socket.SHUT_WR)
            stream.recv(1)
        else:
            while echo_exactly(stream, 4, lambda req: req):
                pass
            stream.sendall(b"after your FIN")  # read and dropped at the end of the run
            stream.shutdown(socket.SHUT_WR)

    server = fake(handler)
    summary = run_load([server.address], size=4, requests=6, runtime=runtime, timeout=10)
    assert (summary.requests, summary.errors) == (4, 2), summary.text()
    assert summary.error_kinds == {"_WrongAnswer": 2}
    text = summary.text()
    assert "  errors    2" in text
    assert "error     2 x _WrongAnswer: stream 3: the echo differs from what was sent" in text
    assert server.count == 3


def test_load_rpc_mode_checks_the_result(
    runtime: str, fake: Callable[[Handler], FakeServer]
) -> None:
    """In rpc mode an answer with the right id and the wrong result is an error."""

    def handler(stream: pysmux.Stream, n: int) -> None:
        line = b""
        while not line.endswith(b"\n"):
            chunk = stream.recv(4096)
            if not chunk:
                return
            line += chunk
        request_id = line.split(b'"id":')[1].split(b"}")[0]
        stream.sendall(b'{"jsonrpc":"2.0","result":["nope"],"id":' + request_id + b"}\n")
        stream.recv(1)

    server = fake(handler)
    summary = run_load([server.address], mode="rpc", requests=1, runtime=runtime, timeout=10)
    assert (summary.requests, summary.errors) == (0, 1), summary.text()
    assert "echo returned ['nope']" in summary.error_examples["_WrongAnswer"]


def test_load_against_a_server_that_dies_ends_at_once(
    runtime: str, fake: Callable[[Handler], FakeServer]
) -> None:
    """The server's sessions all end mid-run: the run stops then (each task records the
    failure and quits), long before its 60 s duration, instead of counting errors for a
    minute."""
    killed = current().Event()

    def handler(stream: pysmux.Stream, n: int) -> None:
        while echo_exactly(stream, 64, lambda req: req):
            if n == 1:
                killed.set()
                return

    server = fake(handler)
    gen = LoadGenerator([server.address], streams=2, duration=60, runtime=runtime, timeout=10)
    task = current().spawn(gen.run, name="load")
    assert killed.wait(20)
    server.kill()
    summary = task.result(30)
    assert summary.duration_s < 30, summary.text()
    # Each task records what it met (its stream reset or cut short, then the session
    # gone) and stops: a handful of errors, not one per turn of a loop.
    assert 1 <= summary.errors <= 6, summary.text()


@pytest.mark.runtime_independent(reason="checks arguments only; nothing starts")
def test_load_arguments_are_checked(runtime: str) -> None:
    for kwargs, message in [
        ({"targets": []}, "targets: at least one address is needed"),
        ({"duration": 0}, r"duration=0: must be > 0"),
        ({"requests": 0}, r"requests=0: must be an int > 0"),
        ({"requests": 2.5}, r"requests=2.5: must be an int > 0"),
    ]:
        targets = kwargs.pop("targets", ["127.0.0.1:1"])
        with pytest.raises(ValueError, match=message):
            LoadGenerator(targets, **kwargs)  # type: ignore[arg-type]


@pytest.mark.runtime_independent(reason="every process is a child; one runtime proves it")
def test_load_command_prints_a_text_summary(runtime: str, cli: Callable[..., Cli]) -> None:
    """Without ``--json`` the command prints the summary as text lines."""
    server = cli("echo", "-l", "127.0.0.1:0", "-q")
    p = cli("load", "-r", addr_arg(server.address()), "--requests", "25", "--size", "10")
    assert p.wait(60) == 0, p.describe()
    assert p.out[0].startswith("pysmux load: echo, 1 mux connection(s) x 1 stream(s) to "), p.out
    assert "  requests  25  (" in p.out[1] and p.out[2] == "  errors    0", p.describe()


# ---------------------------------------------------------------------------
# attack


@pytest.mark.runtime_independent(reason="checks arguments only; nothing starts")
def test_attack_settings_and_probe_are_checked(runtime: str) -> None:
    for kwargs, message in [
        ({"streams": 0}, r"streams=0: must be > 0"),
        ({"max_bytes": -1}, r"max_bytes=-1: must be > 0"),
        ({"conns": 0}, r"conns=0: must be > 0"),
        ({"version": 3}, r"version=3: smux has versions 1 and 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            AttackSettings(**kwargs)
    with pytest.raises(ValueError, match=r"probe='ping': expected one of echo, rpc, none"):
        run_attack(("127.0.0.1", 1), "nop-flood", probe="ping")


def test_attack_on_nothing_says_no_connection_could_be_opened(runtime: str) -> None:
    """With no probe, an attack on a port nobody listens on runs, opens nothing, and says
    so in its notes; the report has no probe lines."""
    report = run_attack(
        ("127.0.0.1", unused_port()),
        "nop-flood",
        settings=AttackSettings(duration=0.2, connect_timeout=2),
        probe="none",
        runtime=runtime,
    )
    assert report.observed["connections"] == 0
    assert "only 0 of 1 connections could be opened" in report.observed["notes"]
    assert "probe" not in report.text()


def test_attack_takes_the_version_of_its_config_and_its_byte_budget(
    runtime: str, tunnels: list[Any]
) -> None:
    """The probe's config decides the attack's smux version (settings say v1, the config
    v2: window abuse runs, it is not skipped); the SYN flood stops at ``max_bytes``."""
    cfg = Config(version=2, max_receive_buffer=1 << 20, max_stream_buffer=256 * 1024)
    srv = EchoServer("127.0.0.1:0", config=cfg, runtime=runtime)
    tunnels.append(srv)
    srv.start()
    v1 = AttackSettings(duration=0.3, version=1, max_bytes=1 << 20)
    report = run_attack(srv.address, "window-abuse", settings=v1, config=cfg, runtime=runtime)
    assert report.version == 2, report.text()
    assert not any("skipped" in n for n in report.observed["notes"]), report.text()
    assert report.responsive, report.text()
    # A server that holds 100 streams refuses the rest at once, so the flood ends soon.
    few = EchoServer("127.0.0.1:0", config=Config(max_streams=100), runtime=runtime)
    tunnels.append(few)
    few.start()
    # SYNs go out in batches of 4096 (32 KiB): the budget lets three through, not five.
    small = AttackSettings(duration=0.3, streams=20_000, max_bytes=100_000)
    report = run_attack(few.address, "syn-flood", settings=small, probe="none", runtime=runtime)
    assert report.version == 1
    assert report.observed["bytes_sent"] <= 100_000, report.text()
    assert report.observed["frames_sent"] == 3 * 4096, report.text()
    assert report.observed["refused_streams"] >= report.observed["frames_sent"] - 100


def test_rpc_probe_that_gets_wrong_answers_stops_the_attack(
    runtime: str, tunnels: list[Any]
) -> None:
    """A server whose ``echo`` method answers something else fails the probe before the
    attack, which is then not made; the report says why and that it is not responsive."""
    srv = RpcServer("127.0.0.1:0", runtime=runtime)
    srv.register("echo", lambda *params: ["something else"])
    tunnels.append(srv)
    srv.start()
    report = run_attack(
        srv.address, "nop-flood", settings=AttackSettings(duration=0.2), probe="rpc",
        runtime=runtime, probe_timeout=0.5,
    )  # fmt: skip
    assert not report.responsive
    assert "a wrong answer" in report.probe_before["first_failure"], report.text()
    assert report.observed["connections"] == 0, report.text()


def test_echo_probe_that_gets_other_bytes_says_so(
    runtime: str, fake: Callable[[Handler], FakeServer]
) -> None:
    """An echo probe answered with 32 other bytes fails, and says the bytes differ."""
    server = fake(lambda stream, n: echo_exactly(stream, 32, lambda req: bytes(32)) and None)
    report = run_attack(
        server.address, "nop-flood", settings=AttackSettings(duration=0.2), probe="echo",
        runtime=runtime, probe_timeout=0.5,
    )  # fmt: skip
    assert not report.responsive
    assert "echo returned 32 bytes other than those sent" in report.probe_before["first_failure"]
