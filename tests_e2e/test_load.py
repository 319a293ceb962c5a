"""``pysmux load`` against ``pysmux echo`` and ``pysmux rpc`` (child processes over
loopback TCP), and ``pysmux.load`` as a library in-process.

Each command test runs once per runtime: the servers and the load generator get
``--runtime`` of the test's runtime, with smux v1 on threads and v2 on gevent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from pysmux import Config
from pysmux.load import LoadGenerator, run_load
from pysmux.rpc import RpcServer, register_builtins
from pysmux.tunnel import EchoServer
from tests_e2e import test_cli
from tests_e2e.test_cli import Cli, addr_arg, unused_port

cli = test_cli.cli  # the fixture that starts `python -m pysmux` children


def flags(runtime: str) -> tuple[str, ...]:
    return ("--runtime", runtime, f"--smuxver={1 + (runtime == 'gevent')}")


def server(cli: Callable[..., Cli], command: str, runtime: str) -> str:
    return addr_arg(cli(command, "-l", "127.0.0.1:0", *flags(runtime)).address())


def load(
    cli: Callable[..., Cli], runtime: str, *args: str, timeout: float = 60
) -> tuple[int, dict[str, Any]]:
    """Run ``pysmux load ... --json`` to its end: exit status and the summary it printed."""
    p = cli("load", *flags(runtime), "--json", *args)
    status = p.wait(timeout)
    assert p.out, p.describe()
    summary = json.loads(p.out[-1])
    for key in ("requests", "errors", "rps", "p50_ms", "p99_ms", "max_ms"):
        assert key in summary, p.describe()
    return status, summary


def assert_clean(status: int, summary: dict[str, Any]) -> None:
    assert status == 0 and summary["errors"] == 0, summary
    assert summary["requests"] > 0 and summary["rps"] > 0, summary
    assert 0 < summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"], summary


@pytest.mark.parametrize("command", ["echo", "rpc"])
def test_fifty_connections_by_twenty_streams(
    runtime: str, command: str, cli: Callable[..., Cli]
) -> None:
    """An operator load-tests a server with 50 mux connections x 20 streams for two
    seconds: 1,000 concurrent request/response loops, every answer checked, no error,
    and a summary with rate, latency percentiles and bytes each way."""
    address = server(cli, command, runtime)
    status, summary = load(
        cli, runtime, "-r", address, "--mode", command, "--conns", "50", "--streams", "20",
        "--duration", "2", "--size", "100",
    )  # fmt: skip
    assert_clean(status, summary)
    assert (summary["conns"], summary["streams"], summary["mode"]) == (50, 20, command)
    assert summary["bytes_sent"] >= 100 * summary["requests"]
    assert summary["bytes_received"] >= 100 * summary["requests"]


@pytest.mark.runtime_independent(reason="every process is a child; one runtime proves it")
def test_one_client_three_servers(runtime: str, cli: Callable[..., Cli]) -> None:
    """One load client holds sessions to three servers at once (two connections each)
    and spreads its requests over all of them."""
    servers = [cli("echo", "-l", "127.0.0.1:0", *flags(runtime)) for _ in range(3)]
    args = [a for s in servers for a in ("-r", addr_arg(s.address()))]
    status, summary = load(cli, runtime, *args, "--conns", "2", "--streams", "5",
                           "--requests", "3000")  # fmt: skip
    assert_clean(status, summary)
    assert summary["requests"] == 3000 and summary["conns"] == 6
    assert len(summary["targets"]) == 3
    for s in servers:  # each saw its two mux connections
        s.wait_lines(r"mux connection from", count=2, stderr=True)


@pytest.mark.runtime_independent(reason="every process is a child; one runtime proves it")
def test_two_hundred_sessions_against_one_server(runtime: str, cli: Callable[..., Cli]) -> None:
    """Many clients' worth of sessions at one server: 200 mux connections to one
    ``pysmux rpc`` (on greenlets; the load on threads), all answered without an error."""
    rpc = cli("rpc", "-l", "127.0.0.1:0", "--runtime", "gevent", "--smuxver", "1")
    status, summary = load(cli, "thread", "-r", addr_arg(rpc.address()), "--mode", "rpc",
                           "--conns", "200", "--streams", "1", "--duration", "2")  # fmt: skip
    assert_clean(status, summary)
    assert summary["conns"] == 200


@pytest.mark.runtime_independent(reason="every process is a child; one runtime proves it")
def test_errors_are_counted_and_fail_the_run(runtime: str, cli: Callable[..., Cli]) -> None:
    """Wrong answers and unreachable servers are errors: the run exits 1 and says what
    went wrong (an RPC load aimed at an echo server gets its own requests back)."""
    echo = server(cli, "echo", runtime)
    status, summary = load(cli, runtime, "-r", echo, "--mode", "rpc", "--requests", "20")
    assert status == 1 and summary["errors"] >= 1, summary
    assert "RpcProtocolError" in summary["error_kinds"], summary
    nowhere = f"127.0.0.1:{unused_port()}"
    status, summary = load(cli, runtime, "-r", nowhere, "--conns", "3", "--duration", "1")
    assert status == 1 and summary["errors"] == 3 and summary["requests"] == 0, summary
    p = cli("load", "-r", echo, "--duration", "1", "--requests", "5")
    assert p.wait() == 2  # mutually exclusive


@pytest.mark.parametrize("mode", ["echo", "rpc"])
def test_library_in_process(runtime: str, mode: str) -> None:
    """``LoadGenerator`` as a library on the test's runtime: a fixed number of requests
    against in-process servers, with a progress callback; ``stop()`` ends a run early."""
    cfg = Config(version=2)
    srv: Any = EchoServer("127.0.0.1:0", config=cfg, runtime=runtime)
    if mode == "rpc":
        srv = register_builtins(RpcServer("127.0.0.1:0", config=cfg, runtime=runtime))
    with srv:
        summary = run_load([srv.address], mode=mode, conns=2, streams=4, requests=400,
                           size=300, config=cfg, runtime=runtime)  # fmt: skip
        assert (summary.requests, summary.errors) == (400, 0), summary.text()
        assert summary.as_dict()["requests"] == 400 and "rps" in summary.as_dict()
        assert "400" in summary.text()

        seen: list[int] = []
        gen = LoadGenerator([srv.address], mode=mode, streams=2, config=cfg, runtime=runtime)

        def progress(elapsed: float, requests: int, errors: int) -> None:
            seen.append(requests)
            if requests >= 50:
                gen.stop()

        summary = gen.run(progress, every=0.05)
        assert summary.errors == 0 and summary.requests >= 50 and seen
    with pytest.raises(ValueError, match="mode"):
        LoadGenerator(["127.0.0.1:1"], mode="nope")
    with pytest.raises(ValueError, match="streams"):
        LoadGenerator(["127.0.0.1:1"], streams=0)
