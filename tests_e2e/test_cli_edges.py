"""The ``pysmux`` command at its edges: a second signal, flags and config-file values that
cannot work, a metrics address that is taken; and the metrics endpoint refusing what it
does not serve. Commands run in child processes (``Cli`` of ``test_cli.py``); the metrics
server also in-process, on both runtimes."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import re
import resource
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import pysmux
from pysmux.frame import CMD_NOP, encode_header
from pysmux.metrics import MetricsServer
from tests.runtimes import current
from tests_e2e import test_cli
from tests_e2e.test_cli import (
    CHILD,
    REPO,
    Cli,
    TcpTarget,
    addr_arg,
    connect,
    recv_exactly,
    recv_to_eof,
    wait_until,
)
from tests_e2e.test_production import scrape

# The fixtures of test_cli.py, shared.
cli = test_cli.cli
target = test_cli.target
tunnels = test_cli.tunnels

CHILD_RUNTIMES = pytest.mark.parametrize("child", ["thread", "gevent"])


def assert_usage_error(p: Cli, message: str) -> None:
    """Status 2, nothing on stdout (nothing listened), the subcommand's usage, then
    ``pysmux SUBCOMMAND: error: MESSAGE`` (``message`` is a regex)."""
    assert p.wait() == 2, p.describe()
    assert p.out == [], p.describe()
    assert p.err and p.err[0].startswith("usage: pysmux "), p.describe()
    assert re.fullmatch(r"pysmux \w+: error: " + message, p.err[-1]), p.describe()


# ---------------------------------------------------------------------------
# signals


@CHILD
@CHILD_RUNTIMES
def test_cli_second_signal_exits_at_once(
    runtime: str, child: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """An operator presses Ctrl-C while a connection is carried: the client starts draining
    (it would wait up to --drain-timeout for the connection); a second signal ends it at
    once with status 1 and says so, instead of waiting out the drain."""
    echo = target()
    common = ("--runtime", child, "--drain-timeout", "120")
    server = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), *common)
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr_arg(server.address()), *common)
    sock = connect(client.address())
    try:
        sock.sendall(b"still here")
        assert recv_exactly(sock, 10) == b"still here"
        client.send_signal(signal.SIGINT)
        client.wait_lines(r"SIGINT: draining, then exiting", stderr=True)
        client.wait_lines(r"TunnelClient draining: up to 120 s for 1 connection", stderr=True)
        assert client.proc.poll() is None  # the drain waits for the connection
        client.send_signal(signal.SIGTERM)
        assert client.wait(10) == 1, client.describe()
        assert "pysmux: second signal, exiting at once" in client.err, client.describe()
    finally:
        sock.close()
    server.assert_clean_exit(signal.SIGTERM, within=30)


def free_fds(pid: int, count: int) -> list[int]:
    """The ``count`` lowest descriptor numbers process ``pid`` has free: the next ones it
    gets (the limit on descriptors bounds their numbers, not how many are open)."""
    used = {int(name) for name in os.listdir(f"/proc/{pid}/fd")}
    free = (n for n in range(len(used) + count + 1) if n not in used)
    return [next(free) for _ in range(count)]


def leave_fds(pid: int, count: int) -> None:
    """Let process ``pid`` open ``count`` more descriptors, then get EMFILE."""
    _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (free_fds(pid, count + 1)[-1], hard))


def echo_once(session: pysmux.Session, data: bytes) -> bytes:
    st = session.open_stream()
    try:
        st.settimeout(30)
        st.sendall(data)
        return recv_exactly(st, len(data))
    finally:
        st.close()


#: The NOP a tunnel end writes first on a mux connection (smux v1).
HELLO_V1 = encode_header(1, CMD_NOP, 0, 0)


def read_until_the_end(address: tuple[str, int], timeout: float) -> bytes:
    """Connect and read until the server ends the connection (a reset may come at any
    step, the connect included) or ``timeout`` seconds pass in silence; what was read."""
    got = b""
    with contextlib.suppress(ConnectionResetError, TimeoutError):
        sock = current().connect(address, timeout=10)
        try:
            sock.settimeout(timeout)
            while chunk := sock.recv(100):
                got += chunk
        finally:
            sock.close()
    return got


def echo_on_a_new_connection(address: tuple[str, int], runtime: str, data: bytes) -> bytes:
    sock = current().connect(address, timeout=10)
    session = pysmux.client(sock, runtime=runtime)
    try:
        return echo_once(session, data)
    finally:
        session.close()
        sock.close()


@CHILD
@CHILD_RUNTIMES
@pytest.mark.skipif(
    not (hasattr(resource, "prlimit") and os.path.isdir("/proc/self/fd")),
    reason="lowers a child's descriptor limit with prlimit and counts its /proc fds (Linux)",
)
def test_cli_out_of_descriptors_keeps_serving_and_accepts_again(
    runtime: str, child: str, cli: Callable[..., Cli]
) -> None:
    """A server that runs out of file descriptors (EMFILE) logs the failed accept, keeps
    serving the mux connections it has, retries with a growing pause (Linux fails
    ``accept`` at once while no descriptor is free, so a fixed pause would log ten lines a
    second), and accepts new connections as soon as descriptors are free again."""
    server = cli("echo", "-l", "127.0.0.1:0", "--runtime", child)
    address = server.address()
    pid = server.proc.pid
    harness = current()
    first_sock = harness.connect(address, timeout=10)
    first = pysmux.client(first_sock, runtime=runtime)
    try:
        assert echo_once(first, b"one") == b"one"
        server.wait_lines(r"mux connection from", stderr=True)
        server.wait_lines(r"mux connections: plain TCP", stderr=True)  # done starting up
        leave_fds(pid, 0)
        # A connection now is either accepted on the descriptor a blocked accept() took
        # before the limit fell (threads: its session then cannot start and it is reset)
        # or not accepted at all (gevent accepts only once a connection is waiting).
        read_until_the_end(address, timeout=1)
        server.wait_lines(r"ERROR pysmux\.tunnel: accept on .* failed: .*Too many open files",
                          stderr=True)  # fmt: skip
        assert echo_once(first, b"still") == b"still"  # the first one is served meanwhile
        failed = server.wait_lines(r"^\S+ (\S+) ERROR pysmux\.tunnel: accept on .* failed",
                                   count=5, stderr=True)  # fmt: skip
        at = [datetime.strptime(m.group(1), "%H:%M:%S,%f") for m in failed]
        gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(at)]
        # 0.1, 0.2, 0.4, 0.8 s (give or take the clock): the pause doubles.
        assert sum(gaps) >= 1.2, f"accept retried every {gaps} s: no backoff"
    finally:
        first.close()  # frees its descriptors
        first_sock.close()
    assert echo_on_a_new_connection(address, runtime, b"again") == b"again"
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.describe()


@CHILD
@pytest.mark.skipif(
    not (hasattr(resource, "prlimit") and os.path.isdir("/proc/self/fd")),
    reason="lowers a child's descriptor limit with prlimit and counts its /proc fds (Linux)",
)
def test_cli_a_session_that_cannot_start_resets_its_connection(
    runtime: str, cli: Callable[..., Cli]
) -> None:
    """A server that can accept a connection but has no descriptor left for its session
    (on threads a session needs one for its wake-up fd; greenlet sessions need none) resets
    that connection at once and says why: the client is not left hanging until its
    keepalive timeout, and the descriptor is not leaked (the next connection works once
    descriptors are free again)."""
    server = cli("echo", "-l", "127.0.0.1:0", "--runtime", "thread")
    address = server.address()
    pid = server.proc.pid
    server.wait_lines(r"mux connections: plain TCP", stderr=True)  # done starting up
    leave_fds(pid, 1)  # the accepted socket, and nothing for its session
    assert read_until_the_end(address, timeout=10) in (b"", HELLO_V1)  # then the reset
    server.wait_lines(r"WARNING pysmux\.tunnel: mux connection from .*: cannot start its "
                      r"session: .*Too many open files", stderr=True)  # fmt: skip
    leave_fds(pid, 2)
    assert echo_on_a_new_connection(address, runtime, b"works") == b"works"
    server.send_signal(signal.SIGTERM)
    assert server.wait(20) == 0, server.describe()


SIGNAL_ROUNDS = """
import os, random, signal, sys, threading, time
from pysmux.runner import ProcessSignals

# Other threads of the process, blocked as a server's are (here: sleeping).
threading.Thread(target=lambda: [time.sleep(0.5) for _ in range(400)], daemon=True).start()
stats = []
pid = os.getpid()
for n in range(200):
    seen = threading.Event()
    signals = ProcessSignals("thread", lambda: (stats.append(1), seen.set()))
    go = threading.Event()
    def send(delay=random.random() * 50e-6, usr1=n % 10 == 0):
        go.wait()
        if usr1:  # stats, and only once they are logged the stop
            os.kill(pid, signal.SIGUSR1)
            seen.wait(10)
        end = time.perf_counter() + delay
        while time.perf_counter() < end:
            pass
        os.kill(pid, signal.SIGTERM)
    sender = threading.Thread(target=send)
    sender.start()
    go.set()
    signals.wait()
    sender.join()
    signals.restore()
print("rounds 200, stats", len(stats), flush=True)
"""


@pytest.mark.runtime_independent(reason="the subject runs in a child process")
def test_a_stop_signal_from_any_thread_ends_the_wait(runtime: str) -> None:
    """The command waits for SIGTERM in its main thread; the kernel may hand the signal to
    any thread (here: the one that sends it), and it may land while the main thread holds
    the lock of what it waits on. 200 rounds of a SIGTERM sent from another thread at
    random moments around the start of the wait each end the wait at once (it used to
    wait for its hour-long timeout: the Python handler runs only in the main thread, and
    only once that thread wakes), and SIGUSR1 sent the same way runs the stats task."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    done = subprocess.run(
        [sys.executable, "-c", SIGNAL_ROUNDS],
        capture_output=True, text=True, timeout=100, env=env, check=False,
    )  # fmt: skip
    assert (done.returncode, done.stderr) == (0, ""), done.stderr
    assert done.stdout.strip() == "rounds 200, stats 20", done.stdout


# ---------------------------------------------------------------------------
# flags that cannot work


@CHILD
def test_cli_security_flags_that_cannot_work_name_the_problem(
    runtime: str, cli: Callable[..., Cli], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Security flags that contradict each other, files that cannot be used, an empty key,
    a network that is not one: each stops the command at once with status 2, the usage and
    a message naming the flag (never the key), and nothing listens."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    empty = tmp_path / "empty.key"
    empty.write_text("\n")
    missing = tmp_path / "missing.key"
    srv = ("server", "-l", "127.0.0.1:0", "-t", "127.0.0.1:1")
    cln = ("client", "-l", "127.0.0.1:0", "-r", "127.0.0.1:1")
    cases = [
        ((*srv, "--tls-key", str(garbage)), r"--tls-key needs --tls-cert"),
        ((*srv, "--tls-cert", str(garbage), "--tls-key", str(garbage)), r"TLS files: .+"),
        ((*srv, "--tls-client-ca", str(garbage)),
         r"--tls-client-ca needs --tls-cert and --tls-key \(TLS on\)"),
        ((*srv, "--key-file", str(missing)),
         r"--key-file: \[Errno 2\] No such file or directory: .*missing\.key'"),
        ((*srv, "--key-file", str(empty)), r"--key-file: .*empty\.key: the key file is empty"),
        ((*srv, "--key", ""), r"--key: the key is empty"),
        ((*cln, "--tls-insecure", "--tls-ca", str(garbage)),
         r"--tls-insecure and --tls-ca: give one"),
        ((*cln, "--no-auth", "--allow", "10.0.0.0/8"),
         r"--no-auth with --allow: give one or the other"),
        ((*cln, "--allow", "10.0.0.300"),
         r"argument --allow: '10\.0\.0\.300' is not a network \(as in 10\.0\.0\.0/8, "
         r"192\.0\.2\.7 or ::1/128\)"),
        ((*cln, "--conn", "two"), r"argument --conn: 'two' is not an integer"),
    ]  # fmt: skip
    for args, message in cases:
        assert_usage_error(cli(*args), message)
    monkeypatch.setenv("PYSMUX_KEY", "")  # the children get the environment of the test
    assert_usage_error(cli(*srv), r"PYSMUX_KEY: the key is empty")


@CHILD
def test_cli_config_file_values_are_read_as_their_flags(
    runtime: str, cli: Callable[..., Cli], tmp_path: Path
) -> None:
    """A config file's value goes through its flag's own rules: true/false for a switch,
    true/false or a count for ``quiet``, a number or a string elsewhere, a list of networks
    for ``allow``; a wrong kind stops the command (status 2) naming the file and the key.
    ``--config=FILE`` works like ``-c FILE``, and a key the subcommand has no flag for is
    ignored with a warning."""

    def write(name: str, settings: dict[str, Any]) -> str:
        path = tmp_path / name
        path.write_text(json.dumps(settings))
        return str(path)

    listen = {"listen": "127.0.0.1:0"}
    for settings, message in [
        ({**listen, "smuxbuf": [2]}, r"smuxbuf=\[2\]: expected a number or a string"),
        ({**listen, "smuxver": True}, r"smuxver=true: expected a number or a string, not "
                                      r"true/false"),
        ({**listen, "quiet": -1}, r"quiet=-1: expected true, false or a count"),
        ({**listen, "noauth": "yes"}, r'noauth="yes": expected true or false'),
        ({**listen, "allow": [10, 8]}, r"allow: expected a list of networks, as in "
                                       r'\["10\.0\.0\.0/8", "192\.0\.2\.7"\]'),
        # A switch read as true: --no-auth, which contradicts the key.
        ({**listen, "noauth": True, "key": "k"},
         r"--no-auth with a key or --tls-client-ca: give one or the other"),
    ]:  # fmt: skip
        path = write("bad.json", settings)
        p = cli("echo", f"--config={path}")
        assert p.wait() == 2, p.describe()
        assert re.search(message, p.err[-1]), p.describe()
        if "--no-auth" not in message:
            assert re.search(re.escape(path) + ": ", p.err[-1]), p.describe()

    # quiet as a count: -q twice logs only errors, even the file warning is gone; the
    # unused key is warned about at the default level.
    path = write("quiet.json", {**listen, "quiet": 2, "target": "127.0.0.1:1"})
    quiet = cli("echo", "-c", path)
    quiet.address()
    quiet.assert_clean_exit(signal.SIGTERM)
    assert quiet.err == [], quiet.describe()
    path = write("loud.json", {**listen, "quiet": False, "target": "127.0.0.1:1"})
    loud = cli("echo", "-c", path)
    loud.address()
    loud.wait_lines(r"'target' ignored: `pysmux echo` has no use for it", stderr=True)
    loud.assert_clean_exit(signal.SIGTERM)


@CHILD
def test_cli_metrics_address_taken_exits_1(runtime: str, cli: Callable[..., Cli]) -> None:
    """``--metrics`` on an address already taken: the command says it cannot listen there
    and exits with status 1 (after closing the service it had started)."""
    taken = current().listen("127.0.0.1")
    try:
        where = addr_arg(taken.getsockname())
        p = cli("echo", "-l", "127.0.0.1:0", "--metrics", where)
        assert p.wait() == 1, p.describe()
        assert p.out and p.out[0].startswith("listening on "), p.describe()
        assert not [line for line in p.out if line.startswith("metrics on")], p.describe()
        assert any(f"cannot listen on {where}" in line for line in p.err), p.describe()
    finally:
        taken.close()


# ---------------------------------------------------------------------------
# the metrics endpoint


def test_metrics_refuses_what_it_does_not_serve(runtime: str, tunnels: list[Any]) -> None:
    """HEAD is answered 405 and other methods 501; past ``max_conns`` scrapes at once a
    connection is reset; a scraper that resets mid-request costs nothing; after all that
    a plain GET is answered."""
    metrics = MetricsServer(
        "127.0.0.1:0", lambda: {"connections": 7}, "client", runtime=runtime, max_conns=1
    )
    tunnels.append(metrics)
    metrics.start()

    def ask(request: bytes, settle: bool = True) -> str:
        sock = connect(metrics.address)
        try:
            sock.sendall(request)
            sock.settimeout(10)
            return recv_to_eof(sock).decode()
        finally:
            sock.close()
            if settle:
                wait_until(lambda: metrics.connections == 0, 10, "the scrape's slot is free")

    assert ask(b"HEAD /metrics HTTP/1.0\r\n\r\n").startswith("HTTP/1.0 405 ")
    assert ask(b"POST /metrics HTTP/1.0\r\n\r\n").startswith("HTTP/1.0 501 ")

    idle = connect(metrics.address)  # holds the only slot
    try:
        wait_until(lambda: metrics.connections == 1, 10, "the idle scrape is held")
        with pytest.raises((ConnectionResetError, BrokenPipeError)):  # at any step
            ask(b"GET /metrics HTTP/1.0\r\n\r\n", settle=False)
        idle.sendall(b"GET /met")
        idle.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        idle.close()  # a reset in the middle of the request
    wait_until(lambda: metrics.connections == 0, 10, "the reset scrape is let go")
    status, body = scrape(metrics.address)
    assert status == 200
    assert 'pysmux_connections{role="client"} 7' in body
