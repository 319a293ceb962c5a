"""Running the tunnel in production: metrics, draining, the client's links, errors that say
what to do. The library in-process on both runtimes, and the ``pysmux`` command in child
processes (the helpers and fixtures of ``test_cli.py``)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

import pysmux
from pysmux.metrics import MetricsServer
from pysmux.tunnel import TunnelClient, TunnelServer
from tests.runtimes import current
from tests_e2e import test_cli
from tests_e2e.test_cli import (
    Addr,
    Cli,
    MiB,
    TcpTarget,
    addr_arg,
    connect,
    echo_many,
    payload,
    recv_exactly,
    recv_to_eof,
    sha,
    start_pair,
    wait_until,
)

# The fixtures of test_cli.py, shared.
cli = test_cli.cli
target = test_cli.target
tunnels = test_cli.tunnels

CHILD_RUNTIMES = pytest.mark.parametrize("child", ["thread", "gevent"])
CHILD = pytest.mark.runtime_independent(reason="the tunnel under test runs in child processes")


def scrape(addr: Addr, path: str = "/metrics") -> tuple[int, str]:
    """One HTTP GET; the status and the body."""
    sock = connect(addr)
    try:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
        answer = recv_to_eof(sock).decode()
    finally:
        sock.close()
    head, _, body = answer.partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(body: str) -> dict[str, int]:
    """``name{labels}`` -> value of every sample line."""
    out = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = int(value)
    return out


def sink_handler(received: dict[str, Any], cond: Any) -> Callable[[Any], None]:
    """A target that reads to EOF (counting bytes as they come), then answers the sha256."""

    def handle(conn: Any) -> None:
        import hashlib

        digest = hashlib.sha256()
        while True:
            data = conn.recv(1 << 16)
            if not data:
                break
            digest.update(data)
            with cond:
                received["bytes"] = received.get("bytes", 0) + len(data)
                cond.notify_all()
        conn.sendall(digest.hexdigest().encode())
        conn.shutdown(socket.SHUT_WR)

    return handle


# ---------------------------------------------------------------------------
# metrics


def test_metrics_scraped_over_http(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """An operator points Prometheus at a tunnel's metrics endpoint: after 4 connections of
    256 KiB through it, ``GET /metrics`` answers in the text format with HELP and TYPE lines,
    a role label, the connections carried, the bytes (at least the payload both ways), the
    sessions open; other paths are 404. Figures of sessions that ended are kept."""
    echo = target()
    srv, cli_ = start_pair(runtime, tunnels, echo.address, conn=2)
    metrics = MetricsServer("127.0.0.1:0", cli_.stats, "client", runtime=runtime)
    tunnels.append(metrics)
    metrics.start()
    echo_many(cli_.address, count=4, size=256 * 1024)
    wait_until(lambda: cli_.connections == 0, 10, "connections ended")
    status, body = scrape(metrics.address)
    assert status == 200
    assert "# HELP pysmux_bytes_sent_total " in body
    assert "# TYPE pysmux_bytes_sent_total counter" in body
    assert "# TYPE pysmux_sessions gauge" in body
    got = samples(body)
    role = '{role="client"}'
    assert got[f"pysmux_connections_carried_total{role}"] == 4
    assert got[f"pysmux_streams_opened_total{role}"] == 4
    assert got[f"pysmux_sessions{role}"] == 2
    assert got[f"pysmux_connections{role}"] == 0
    assert got[f"pysmux_bytes_sent_total{role}"] > 4 * 256 * 1024
    assert got[f"pysmux_bytes_received_total{role}"] > 4 * 256 * 1024
    assert got[f"pysmux_protocol_errors_total{role}"] == 0
    assert got[f"pysmux_reconnects_total{role}"] == 0
    assert scrape(metrics.address, "/")[0] == 404

    before = srv.stats()
    assert before["streams_accepted"] == 4 and before["connections_carried"] == 4
    srv.close()  # the client's sessions end; their figures stay in its totals
    wait_until(lambda: cli_.stats()["sessions"] == 0, 10, "sessions ended")
    after = samples(scrape(metrics.address)[1])
    assert after[f"pysmux_streams_opened_total{role}"] == 4
    assert after[f"pysmux_bytes_sent_total{role}"] >= got[f"pysmux_bytes_sent_total{role}"]


@CHILD
@CHILD_RUNTIMES
def test_cli_metrics_stats_line_and_sigusr1(
    runtime: str, child: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """``pysmux server --metrics 127.0.0.1:0 -v --stats-interval 0.2`` prints ``metrics on
    HOST:PORT`` (the real port), serves the figures over HTTP while carrying connections,
    logs a stats line every interval (and no line per connection at -v), and SIGUSR1 logs
    one at once; on threads and on gevent."""
    echo = target()
    server = cli(
        "server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), "--metrics",
        "127.0.0.1:0", "-v", "--stats-interval", "0.2", "--runtime", child,
    )  # fmt: skip
    saddr = server.address()
    maddr = server.wait_lines(r"^metrics on 127\.0\.0\.1:(\d+)$")[0]
    port = int(maddr.group(1))
    assert port != 0
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(saddr), "--runtime", child)
    echo_many(client.address(), count=3, size=128 * 1024)
    echo.wait_finished(3)
    got = samples(scrape(("127.0.0.1", port))[1])
    assert got['pysmux_connections_carried_total{role="server"}'] == 3
    assert got['pysmux_streams_accepted_total{role="server"}'] == 3
    assert got['pysmux_sessions{role="server"}'] == 1
    server.wait_lines(r"INFO pysmux\.cli: stats: sessions=1 .*connections_carried=3", stderr=True)
    stats_lines = len(server.wait_lines(r"pysmux\.cli: stats: ", stderr=True))
    server.send_signal(signal.SIGUSR1)
    server.wait_lines(r"pysmux\.cli: stats: ", count=stats_lines + 1, stderr=True)
    assert not any("connected to" in line for line in server.err), server.describe()
    client.assert_clean_exit(signal.SIGTERM)
    server.assert_clean_exit(signal.SIGTERM)


# ---------------------------------------------------------------------------
# draining


@CHILD
@CHILD_RUNTIMES
def test_cli_sigterm_drains_a_transfer_in_flight(
    runtime: str, child: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """A slow 20 MiB upload runs through ``pysmux client`` -> ``pysmux server`` -> a target
    when the server gets SIGTERM: the server stops listening at once (a new mux connection
    is refused, and a new connection through the client never reaches the target), the
    upload completes intact (the target's checksum comes back), and the server exits 0."""
    received: dict[str, Any] = {}
    harness = current()
    cond = harness.Condition()
    sink = target(sink_handler(received, cond))
    common = ("--runtime", child, "--smuxver", "2")
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(sink.address), *common)
    saddr = server.address()
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(saddr), *common)
    caddr = client.address()
    data = payload(20 * MiB, 11)
    sock = connect(caddr)

    def upload() -> None:
        view = memoryview(data)
        for offset in range(0, len(data), 256 * 1024):  # about 2 s: slow enough to drain
            sock.sendall(view[offset : offset + 256 * 1024])
            harness.sleep(0.025)
        sock.shutdown(socket.SHUT_WR)

    try:
        writer = harness.spawn(upload, name="upload")
        with cond:
            assert cond.wait_for(lambda: received.get("bytes", 0) >= MiB, 20)
        server.send_signal(signal.SIGTERM)
        server.wait_lines(r"TunnelServer draining", stderr=True)
        with pytest.raises(ConnectionRefusedError):
            harness.connect(saddr, timeout=5).close()
        late = connect(caddr)
        try:
            late.sendall(b"hello?")
            late.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # the server refused its stream
                assert recv_to_eof(late) == b""
        finally:
            late.close()
        assert recv_to_eof(sock).decode() == sha(data)
        writer.result(30)
    finally:
        sock.close()
    assert received["bytes"] == len(data)
    sink.wait_finished(1)
    assert len(sink.conns) == 1  # the late connection never reached the target
    rc = server.wait(30)
    assert rc == 0, server.describe()
    client.assert_clean_exit(signal.SIGTERM)


def test_drain_lets_connections_finish_then_resets_the_rest(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """``TunnelServer.drain(timeout)`` from the library: a connection that finishes within
    the timeout completes intact and ``drain`` returns True; one that does not is reset when
    the timeout passes and ``drain`` returns False; nothing is accepted meanwhile."""
    echo = target()
    srv, cli_ = start_pair(runtime, tunnels, echo.address, conn=1)
    harness = current()
    sock = connect(cli_.address)
    try:
        sock.sendall(b"ping")
        assert recv_exactly(sock, 4) == b"ping"
        finisher = harness.spawn(lambda: srv.drain(20), name="drain")
        wait_until(lambda: srv.draining, 5, "draining")
        data = payload(MiB, 5)
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        assert sha(recv_to_eof(sock)) == sha(data)
        assert finisher.result(20) is True
    finally:
        sock.close()
    assert srv.closed and srv.stats()["draining"] == 1

    srv_b, cli2 = start_pair(runtime, tunnels, echo.address, conn=1)
    idle = connect(cli2.address)
    try:
        idle.sendall(b"ping")
        assert recv_exactly(idle, 4) == b"ping"
        began = time.monotonic()
        assert srv_b.drain(0.3) is False
        assert time.monotonic() - began < 5
        with pytest.raises(ConnectionResetError):
            idle.settimeout(10)
            recv_to_eof(idle)
    finally:
        idle.close()


# ---------------------------------------------------------------------------
# the client's links


def test_client_places_streams_on_the_least_loaded_link(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """With ``conn=2``, new connections go to the mux connection carrying the fewest: after
    two long-lived connections (one each), ending the one on link 1 sends the next two to
    link 1 first. When link 2's mux connection dies, new connections go to link 1 only, and
    link 2 is dialled again in the background."""
    echo = target()
    _, cli_ = start_pair(runtime, tunnels, echo.address, conn=2, backoff_max=0.2)
    socks: list[Any] = []

    def open_one() -> Any:
        sock = connect(cli_.address)
        socks.append(sock)
        sock.sendall(b"hi")
        assert recv_exactly(sock, 2) == b"hi"
        return sock

    try:
        first, _ = open_one(), open_one()
        assert sorted(cli_.carried_per_link()) == [1, 1]
        busy = cli_.carried_per_link()
        first_link = 0 if len(socks) and busy[0] == 1 else 1
        first.close()
        socks.remove(first)
        wait_until(lambda: sum(cli_.carried_per_link()) == 1, 10, "first ended")
        emptied = cli_.carried_per_link().index(0)
        del first_link
        open_one()
        assert cli_.carried_per_link()[emptied] == 1
        open_one()
        assert sorted(cli_.carried_per_link()) == [1, 2]

        # Kill link 2's session from the server side: the client's link 1 takes everything.
        victim = cli_._links[1].session
        assert victim is not None
        victim.close()
        wait_until(lambda: cli_._links[1].session is not victim, 10, "link 2 noticed")
        for _ in range(3):
            open_one()
        assert cli_.wait_connected(2, timeout=10), "link 2 was not replaced"
        assert cli_.stats()["reconnects"] == 1
    finally:
        for sock in socks:
            sock.close()


def test_autoexpire_renews_links_and_old_streams_finish(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """``autoexpire``: a mux connection older than that is retired: a connection it carries
    keeps working past the expiry, a new connection goes to a fresh mux connection, and the
    retired one is closed once its last connection ends; ``scavenge_ttl`` closes a retired
    one (resetting what it still carries) when its time is up."""
    echo = target()
    srv, cli_ = start_pair(runtime, tunnels, echo.address, conn=1, autoexpire=0.5, scavenge_ttl=30)
    old = connect(cli_.address)
    try:
        old.sendall(b"before")
        assert recv_exactly(old, 6) == b"before"
        wait_until(lambda: cli_.stats()["expired"] >= 1 and cli_.connected == 1, 10, "renewed")
        assert srv.sessions == 2  # the retired one still carries `old`
        old.sendall(b"after expiry")
        assert recv_exactly(old, 12) == b"after expiry"
        echo_many(cli_.address, count=2, size=64 * 1024)  # on the fresh one
    finally:
        old.close()
    wait_until(lambda: cli_.stats()["sessions"] <= 2, 10, "retired one closed")

    _, cli2 = start_pair(runtime, tunnels, echo.address, conn=1, autoexpire=0.3, scavenge_ttl=0.3)
    held = connect(cli2.address)
    try:
        held.sendall(b"x")
        assert recv_exactly(held, 1) == b"x"
        held.settimeout(10)
        with pytest.raises(ConnectionResetError):
            recv_to_eof(held)  # the scavenger closed its mux connection
    finally:
        held.close()


# ---------------------------------------------------------------------------
# errors that say what to do


def http_handler(conn: Any) -> None:
    """What a web server says to bytes that are not HTTP, once it has a line."""
    buf = b""
    while b"\n" not in buf:
        data = conn.recv(4096)
        if not data:
            return
        buf += data
    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")


def ssh_handler(conn: Any) -> None:
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
    conn.recv(100)


def test_client_pointed_at_http_or_ssh_says_so_and_backs_off(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client whose ``remote`` is a web server says "does not speak smux (it answered with
    bytes that look like HTTP)" once a request goes through; pointed at an SSH server it
    names the banner, and re-dials with a growing backoff, not every 50 ms."""
    web = target(http_handler)
    cli_ = TunnelClient("127.0.0.1:0", web.address, runtime=runtime, backoff_max=0.4)
    tunnels.append(cli_)
    cli_.start()
    assert cli_.wait_connected(timeout=10)
    sock = connect(cli_.address)
    try:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        with pytest.raises(ConnectionResetError):
            recv_to_eof(sock)
    finally:
        sock.close()
    host, port = web.address
    wanted = f"{host}:{port} does not speak smux (it answered with bytes that look like HTTP)"
    wait_until(lambda: any(wanted in r.getMessage() for r in caplog.records), 10, wanted)
    cli_.close()

    caplog.clear()
    ssh = target(ssh_handler)
    cli2 = TunnelClient(
        "127.0.0.1:0", ssh.address, runtime=runtime, backoff_initial=0.1, backoff_max=0.4
    )
    tunnels.append(cli2)
    cli2.start()
    wait_until(lambda: cli2.dials >= 4, 10, "four dials")
    began = time.monotonic()
    dials = cli2.dials
    current().sleep(1.0)  # a window to count dials in, not synchronisation
    assert cli2.dials - dials <= 5, "re-dialled without backing off"
    assert time.monotonic() - began >= 1.0
    assert any("it answered with an SSH banner" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(("client_v", "server_v"), [(1, 2), (2, 1)])
def test_version_mismatch_is_explained_on_both_ends(
    runtime: str,
    client_v: int,
    server_v: int,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Client and server configured with different smux versions both say so, naming
    ``Config.version``, as soon as the mux connection is up (no stream needed), once each
    and not prefixed twice."""
    caplog.set_level(logging.DEBUG)
    echo = target()
    srv = TunnelServer(
        "127.0.0.1:0", echo.address, config=pysmux.Config(version=server_v), runtime=runtime
    )
    tunnels.append(srv)
    srv.start()
    cli_ = TunnelClient(
        "127.0.0.1:0",
        srv.address,
        config=pysmux.Config(version=client_v),
        runtime=runtime,
        backoff_initial=1.0,
        backoff_max=5.0,
    )
    tunnels.append(cli_)
    cli_.start()
    client_says = f"speaks smux version {server_v}, this end version {client_v}: both ends"
    server_says = f"speaks smux version {client_v}, this end version {server_v}: both ends"

    def said(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    wait_until(lambda: said(client_says) and said(server_says), 10, "both ends explained")
    cli_.close()
    srv.close()
    assert len(said(client_says)) == 1 and len(said(server_says)) == 1
    assert all("Config.version" in m for m in said(client_says) + said(server_says))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert {r.name for r in warnings} == {"pysmux.tunnel"}
    assert not any(m.getMessage().startswith("pysmux:") for m in caplog.records)


@CHILD
def test_cli_version_mismatch_names_the_flag(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """From the command line the same mismatch names ``--smuxver`` on both ends, in one line
    each with one prefix."""
    echo = target()
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), "--smuxver", "2")
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()))
    client.wait_lines(r"speaks smux version 2, this end version 1: .*--smuxver", stderr=True)
    server.wait_lines(r"speaks smux version 1, this end version 2: .*--smuxver", stderr=True)
    for end in (client, server):
        end.send_signal(signal.SIGTERM)
        assert end.wait(10) == 0, end.describe()
    text = "\n".join(server.err + client.err)
    assert "pysmux: pysmux:" not in text
    assert not re.search(r"Config\.version", text), text


# ---------------------------------------------------------------------------
# config files


@CHILD
def test_cli_kcptun_config_file(
    runtime: str,
    cli: Callable[..., Cli],
    target: Callable[..., TcpTarget],
    tmp_path: Any,
) -> None:
    """A kcptun user runs ``pysmux server -c server.json`` and ``pysmux client -c
    client.json`` with their existing configs: addresses, conn, smuxver and the smux buffers
    come from the files, a flag on the command line wins over the file (``--conn 1``),
    kcptun's pre-shared ``key`` becomes the shared key of both ends (and shows in no log),
    every KCP or cipher key is ignored with one warning saying why, an unknown key is warned
    about, and connections go through."""
    echo = target()
    server_json = tmp_path / "server.json"
    server_json.write_text(json.dumps({
        "listen": "127.0.0.1:0", "target": addr_arg(echo.address), "smuxver": 2,
        "crypt": "aes", "key": "it's a secret", "mode": "fast3", "mtu": 1350,
    }))  # fmt: skip
    server = cli("server", "-c", str(server_json))
    saddr = server.address()
    for key in ("crypt", "mode", "mtu"):
        lines = [line for line in server.err if f"'{key}' ignored: pysmux carries smux" in line]
        assert len(lines) == 1, server.describe()
    server.wait_lines(r"mux connections: plain TCP, shared key", stderr=True)
    client_json = tmp_path / "client.json"
    client_json.write_text(json.dumps({
        "localaddr": "127.0.0.1:0", "remoteaddr": addr_arg(saddr), "conn": 3, "smuxver": 2,
        "smuxbuf": 4194304, "streambuf": 1048576, "keepalive": 5, "autoexpire": 0,
        "scavengettl": 60, "sndwnd": 1024, "datashard": 10, "parityshard": 3,
        "nocomp": True, "dscp": 0, "frobnicate": 1, "key": "it's a secret",
    }))  # fmt: skip
    client = cli("client", "-c", str(client_json), "--conn", "1")
    caddr = client.address()
    client.wait_lines(r"over 1 mux connection\(s\), smux v2", stderr=True)
    client.wait_lines(r"unknown key 'frobnicate' ignored", stderr=True)
    assert len([line for line in client.err if "ignored: pysmux carries" in line]) == 5
    echo_many(caddr, count=2, size=256 * 1024)
    for end in (client, server):
        end.send_signal(signal.SIGTERM)
        assert end.wait(10) == 0, end.describe()
        assert not [line for line in end.err if "secret" in line], end.describe()


@CHILD
def test_cli_config_file_errors_name_the_key(
    runtime: str, cli: Callable[..., Cli], tmp_path: Any
) -> None:
    """A config file with a bad value, broken JSON or a missing file stops the command with
    status 2 and a message naming the file and the key; nothing listens."""
    cases = [
        ({"remoteaddr": "127.0.0.1:1", "conn": 0}, r"conn=0: 0 must be > 0"),
        ({"remoteaddr": "127.0.0.1:1", "smuxver": 3}, r"smuxver=3: must be one of 1, 2"),
        ({"remoteaddr": "nowhere"}, r"remoteaddr=\"nowhere\": 'nowhere': expected HOST:PORT"),
        ({"remoteaddr": "127.0.0.1:1", "keepalive": "often"}, r"keepalive=\"often\": "),
        ([1, 2], r"expected a JSON object"),
    ]
    for i, (content, message) in enumerate(cases):
        path = tmp_path / f"bad{i}.json"
        path.write_text(json.dumps(content))
        p = cli("client", "-l", "127.0.0.1:0", "-c", str(path))
        assert p.wait() == 2, p.describe()
        assert p.out == [], p.describe()
        assert re.search(re.escape(str(path)) + ": " + message, p.err[-1]), p.describe()
    broken = tmp_path / "broken.json"
    broken.write_text('{"conn": 2,')
    p = cli("client", "-c", str(broken))
    assert p.wait() == 2 and "not valid JSON" in p.err[-1], p.describe()
    p = cli("client", "-c", str(tmp_path / "missing.json"))
    assert p.wait() == 2 and "No such file" in p.err[-1], p.describe()
