"""``pysmux rpc`` in a child process, spoken to over real loopback TCP: the raw wire
format line by line, and ``pysmux.rpc.RpcClient`` from many tasks.

Each test runs on both runtimes: the child gets ``--runtime`` of the test's runtime and
the in-process side uses it too. Smux versions alternate with the runtime (one
combination proves a point; the next test takes the other).
"""

from __future__ import annotations

import json
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pysmux.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RpcChannel,
    RpcClient,
)
from pysmux.tunnel import TunnelClient
from tests.runtimes import current
from tests_e2e import test_cli
from tests_e2e.conftest import Net
from tests_e2e.test_cli import Cli, wait_until
from tests_e2e.test_production import samples, scrape

cli = test_cli.cli  # the fixture that starts `python -m pysmux` children

MiB = 1 << 20


def version_for(runtime: str, flip: bool = False) -> int:
    """v1 on threads and v2 on gevent, or the other way round."""
    return 1 + ((runtime == "gevent") ^ flip)


def rss_kib(pid: int) -> int:
    """The resident set size of a process, from /proc/PID/status (Linux)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def start_rpc(cli: Callable[..., Cli], runtime: str, version: int, *extra: str) -> Cli:
    return cli("rpc", "-l", "127.0.0.1:0", "--runtime", runtime, f"--smuxver={version}", *extra)


class Wire:
    """One raw stream to the server: whole lines out, response lines in."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        stream.settimeout(20)
        self.file = stream.makefile("rb")

    def send(self, text: str | bytes) -> None:
        self.stream.sendall(text.encode() if isinstance(text, str) else text)

    def line(self) -> Any:
        raw = self.file.readline()
        assert raw.endswith(b"\n"), f"no whole response line: {raw[:100]!r}"
        return json.loads(raw)

    def ask(self, text: str) -> Any:
        self.send(text + "\n")
        return self.line()

    def end(self, half_close: bool = True) -> bytes:
        """Half-close (or not); everything the server still sends, up to its EOF."""
        if half_close:
            self.stream.shutdown(socket.SHUT_WR)
        rest = self.file.read()
        self.file.close()
        self.stream.close()
        return bytes(rest)


def code(reply: Any) -> tuple[int, Any]:
    return reply["error"]["code"], reply["id"]


def test_every_method_and_error_on_the_wire(
    runtime: str, net: Net, cli: Callable[..., Cli]
) -> None:
    """A client speaking raw newline-delimited JSON gets exactly what JSON-RPC 2.0
    promises: each method's result, every error code, a mixed batch answered element by
    element, an empty batch as one error, no line for notifications, and pipelined
    requests answered in order on their stream."""
    version = version_for(runtime)
    server = start_rpc(cli, runtime, version)
    session = net.client(net.connect(server.address()), version=version)
    w = Wire(session.open_stream())

    assert w.ask('{"jsonrpc":"2.0","method":"echo","params":{"x":[1,"a"]},"id":1}') == {
        "jsonrpc": "2.0", "result": {"x": [1, "a"]}, "id": 1}  # fmt: skip
    assert w.ask('{"jsonrpc":"2.0","method":"add","params":{"a":2,"b":40},"id":"s"}')[
        "result"] == 42  # fmt: skip
    assert w.ask('{"jsonrpc":"2.0","method":"add","params":[-2,3],"id":2}')["result"] == 1
    now = w.ask('{"jsonrpc":"2.0","method":"get_time","id":3}')["result"]
    assert isinstance(now, float) and abs(now - time.time()) < 10
    assert w.ask('{"jsonrpc":"2.0","method":"sleep","params":{"seconds":0.05},"id":4}') == {
        "jsonrpc": "2.0", "result": None, "id": 4}  # fmt: skip

    assert code(w.ask('{"jsonrpc":"2.0","method":"echo",')) == (PARSE_ERROR, None)
    assert code(w.ask('{"jsonrpc":"2.0","method":1,"id":5}')) == (INVALID_REQUEST, 5)
    assert code(w.ask("[]")) == (INVALID_REQUEST, None)
    assert code(w.ask('{"jsonrpc":"2.0","method":"nope","id":6}')) == (METHOD_NOT_FOUND, 6)
    assert code(w.ask('{"jsonrpc":"2.0","method":"add","params":[1],"id":7}')) == (
        INVALID_PARAMS, 7)  # fmt: skip
    assert code(w.ask('{"jsonrpc":"2.0","method":"add","params":["1",2],"id":8}')) == (
        INVALID_PARAMS, 8)  # fmt: skip
    assert code(w.ask('{"jsonrpc":"2.0","method":"sleep","params":[11],"id":9}')) == (
        INVALID_PARAMS, 9)  # fmt: skip
    assert code(w.ask('{"jsonrpc":"2.0","method":"add","params":[1e400,1],"id":10}')) == (
        INVALID_PARAMS, 10)  # fmt: skip

    batch = w.ask(
        '[{"jsonrpc":"2.0","method":"add","params":[1,2],"id":"a"},'
        '{"jsonrpc":"2.0","method":"echo","params":["note"]},'
        '{"bad":1},'
        '{"jsonrpc":"2.0","method":"nope","id":"b"},'
        '{"jsonrpc":"2.0","method":"echo","params":[true],"id":"c"}]'
    )
    assert [r.get("result") if "result" in r else code(r) for r in batch] == [
        3, (INVALID_REQUEST, None), (METHOD_NOT_FOUND, "b"), [True]]  # fmt: skip

    # Notifications and an all-notification batch: no line. Then pipelining: all the
    # requests in one write, the answers in order.
    w.send('{"jsonrpc":"2.0","method":"add","params":[1,1]}\n'
           '[{"jsonrpc":"2.0","method":"echo"},{"jsonrpc":"2.0","method":"nope"}]\n'
           '{"jsonrpc":"2.0","method":"nope"}\n')  # fmt: skip
    w.send("".join(
        f'{{"jsonrpc":"2.0","method":"add","params":[{i},1],"id":{i}}}\n' for i in range(50)
    ))  # fmt: skip
    answers = [w.line() for _ in range(50)]
    assert [(a["id"], a["result"]) for a in answers] == [(i, i + 1) for i in range(50)]
    assert w.end() == b""  # and nothing else was sent: no line for the notifications

    # An internal error: echo's result cannot be sent (1e400 parses as infinity, which
    # JSON cannot carry). The answer says no more; the traceback goes to the log.
    w = Wire(session.open_stream())
    assert w.ask('{"jsonrpc":"2.0","method":"echo","params":[1e400],"id":11}') == {
        "jsonrpc": "2.0", "error": {"code": INTERNAL_ERROR, "message": "Internal error"},
        "id": 11}  # fmt: skip
    server.wait_lines(r"ValueError: Out of range float", stderr=True)
    # A last request without its newline, then EOF: still answered.
    w.send('{"jsonrpc":"2.0","method":"add","params":[1,2],"id":12}')
    assert json.loads(w.end()) == {"jsonrpc": "2.0", "result": 3, "id": 12}
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()


def test_thousand_calls_over_fifty_streams_from_eight_tasks(
    runtime: str, net: Net, cli: Callable[..., Cli]
) -> None:
    """1,000 calls over 50 streams of one session from 8 tasks at once (each task
    pipelines 20 requests per stream), then 1,000 more through one shared RpcClient:
    every answer is the right one."""
    version = version_for(runtime, flip=True)
    server = start_rpc(cli, runtime, version)
    session = net.client(net.connect(server.address()), version=version)
    harness = current()
    channels = [RpcChannel(session.open_stream()) for _ in range(50)]

    def pipelined(task: int) -> int:
        done = 0
        for c in range(task, 50, 8):
            deadline = time.monotonic() + 30
            for i in range(20):
                params = {"a": c, "b": i}
                channels[c].send({"jsonrpc": "2.0", "method": "add", "params": params, "id": i})
            for i in range(20):
                assert channels[c].answer(i, deadline) == c + i
                done += 1
        return done

    workers = [harness.spawn(pipelined, t, name=f"pipelined-{t}") for t in range(8)]
    assert sum(w.result(60) for w in workers) == 1000
    for ch in channels:
        ch.close()

    rpc = RpcClient(session, timeout=30, max_idle_streams=8)

    def calls(task: int) -> None:
        for i in range(125):
            assert rpc.call("echo", [task, i, "x" * (i % 7)]) == [task, i, "x" * (i % 7)]

    workers = [harness.spawn(calls, t, name=f"caller-{t}") for t in range(8)]
    for w in workers:
        w.result(60)
    rpc.close()
    server.assert_clean_exit()


def test_oversized_and_half_lines(runtime: str, net: Net, cli: Callable[..., Cli]) -> None:
    """A line past --max-line gets one -32600 line and its stream is closed, and the
    server does not hold on to what follows (64 MiB without a newline leave its memory
    flat); a stream that sends half a line and goes silent is closed after
    --line-timeout; other streams of the same session carry on throughout."""
    version = version_for(runtime)
    server = start_rpc(cli, runtime, version, "--max-line", str(MiB), "--line-timeout", "0.5")
    session = net.client(net.connect(server.address()), version=version)
    rpc = RpcClient(session, timeout=20)
    assert rpc.call("add", [1, 2]) == 3
    before = rss_kib(server.proc.pid)

    big = session.open_stream()
    # v1: the server drops what comes after its close, so all 64 MiB go out. v2: the
    # writer waits for window updates that a closed stream no longer sends, and times out.
    big.settimeout(1.0)
    chunk = b"7" * (256 * 1024)
    sent = 0
    try:
        for _ in range(256):
            big.sendall(chunk)
            sent += len(chunk)
    except TimeoutError:
        assert version == 2 and sent < 8 * MiB, sent
    reply = Wire(big).line()
    assert code(reply) == (INVALID_REQUEST, None), reply
    assert "longer than 1048576 bytes" in reply["error"]["data"]
    assert rpc.call("add", [2, 2]) == 4
    grown = rss_kib(server.proc.pid) - before
    # The line buffer is bounded by --max-line (1 MiB) and the session by its 4 MiB
    # receive budget; 16 MiB leaves room for the allocator and nothing for 64 MiB.
    assert grown < 16 * 1024, f"server RSS grew {grown} KiB after {sent >> 20} MiB"
    big.close()

    half = Wire(session.open_stream())
    half.send('{"jsonrpc":"2.0","method":"add","par')
    began = time.monotonic()
    assert half.end(half_close=False) == b""  # the server ended it, without an answer
    assert 0.4 < time.monotonic() - began < 5
    assert rpc.call("echo", ["still fine"]) == ["still fine"]
    rpc.close()
    server.assert_clean_exit()


def test_client_timeout_while_the_server_sleeps(
    runtime: str, net: Net, cli: Callable[..., Cli]
) -> None:
    """A call that outlives its timeout raises TimeoutError on time; the client drops that
    stream (the late answer can never be taken for another call's), and the next call
    answers at once although the server still sleeps on the first one."""
    version = version_for(runtime, flip=True)
    server = start_rpc(cli, runtime, version)
    rpc = RpcClient(net.client(net.connect(server.address()), version=version))
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3 s"):
        rpc.call("sleep", {"seconds": 3}, timeout=0.3)
    took = time.monotonic() - began
    assert 0.25 < took < 2, took
    began = time.monotonic()
    assert rpc.call("add", [20, 22], timeout=5) == 42
    assert time.monotonic() - began < 1
    rpc.close()
    server.assert_clean_exit()


def test_server_killed_mid_call(runtime: str, net: Net, cli: Callable[..., Cli]) -> None:
    """The server process dies (SIGKILL) while calls wait on it: every waiting call fails
    at once with a connection error (the stream was reset), none hangs or returns a
    made-up answer."""
    version = version_for(runtime)
    server = start_rpc(cli, runtime, version)
    session = net.client(net.connect(server.address()), version=version)
    rpc = RpcClient(session, timeout=20)
    assert rpc.call("echo", ["up"]) == ["up"]
    harness = current()
    waiting = [harness.spawn(rpc.call, "sleep", [10], name=f"sleeper-{i}") for i in range(4)]
    wait_until(lambda: session.num_streams == 4, 10, "four calls on their streams")
    began = time.monotonic()
    server.send_signal(signal.SIGKILL)
    for w in waiting:
        exc = w.exception(10)
        assert isinstance(exc, ConnectionError), repr(exc)
    assert time.monotonic() - began < 5
    with pytest.raises(ConnectionError):
        rpc.call("echo", ["down"])
    rpc.close()


def test_sigterm_with_idle_pooled_clients_exits_at_once(
    runtime: str, net: Net, cli: Callable[..., Cli]
) -> None:
    """An operator stops ``pysmux rpc`` (SIGTERM) while clients keep idle streams in their
    pools: the server closes them and exits 0 at once instead of waiting out
    ``--drain-timeout`` (30 s here); each client's next call fails at once, none hangs."""
    version = version_for(runtime, flip=True)
    server = start_rpc(cli, runtime, version, "--drain-timeout", "30")
    address = server.address()
    clients = [RpcClient(net.client(net.connect(address), version=version), timeout=20)
               for _ in range(3)]  # fmt: skip
    for i, rpc in enumerate(clients):
        assert rpc.call("add", [i, 1]) == i + 1
    server.assert_clean_exit(within=5)
    for rpc in clients:
        began = time.monotonic()
        with pytest.raises(OSError):
            rpc.call("add", [1, 1])
        assert time.monotonic() - began < 2
        rpc.close()


def test_rpc_command_has_the_security_and_production_flags_of_echo(
    runtime: str, net: Net, cli: Callable[..., Cli], tmp_path: Path
) -> None:
    """An operator runs ``pysmux rpc`` like ``pysmux echo``: beyond loopback it refuses to
    start open (status 2, naming the flags), with ``--key-file`` only clients with the key
    get answers (a keyless one is dropped), ``--metrics`` serves its figures under
    ``role="rpc"``, and SIGTERM drains, then exits 0."""
    p = cli("rpc", "-l", "0.0.0.0:0", "--runtime", runtime)
    assert p.wait() == 2 and p.out == [], p.describe()
    assert "--key-file" in p.err[-1] and "--no-auth" in p.err[-1], p.describe()

    key = tmp_path / "key"
    key.write_text("rpc secret\n")
    server = cli("rpc", "-l", "127.0.0.1:0", "--runtime", runtime, "--key-file", str(key),
                 "--metrics", "127.0.0.1:0")  # fmt: skip
    address = server.address()
    metrics = int(server.wait_lines(r"^metrics on 127\.0\.0\.1:(\d+)$")[0].group(1))
    # A tunnel client with the key carries a TCP connection as one stream to the server.
    with TunnelClient("127.0.0.1:0", address, key=key.read_text().strip(), runtime=runtime) as tc:
        tc.wait_connected(timeout=10)
        with net.connect(tc.address) as sock:
            sock.sendall(b'{"jsonrpc":"2.0","method":"add","params":[2,3],"id":1}\n')
            sock.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := sock.recv(4096):
                answer += chunk
    assert json.loads(answer) == {"jsonrpc": "2.0", "result": 5, "id": 1}
    keyless = net.client(net.connect(address), version=1)
    with pytest.raises(OSError):  # refused before smux starts: the session ends
        RpcClient(keyless, timeout=10).call("add", [1, 2])
    keyless.close()
    server.wait_lines(r"WARNING .*refused", stderr=True)
    got = samples(scrape(("127.0.0.1", metrics))[1])
    assert got['pysmux_streams_accepted_total{role="rpc"}'] == 1, got
    assert got['pysmux_handshake_failures_total{role="rpc"}'] == 1, got
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()
    assert any("draining" in line for line in server.err), server.describe()
