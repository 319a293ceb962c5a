"""``pysmux demo``, the newcomer's first command: it runs, checks every byte, prints its
table and says "verified"; and it does fail when a byte is wrong."""

from __future__ import annotations

import argparse
import contextlib
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from pysmux import Config, demo
from tests_e2e import test_cli
from tests_e2e.test_cli import Cli

cli = test_cli.cli  # the fixture that starts `python -m pysmux` children


def test_demo_command(runtime: str, cli: Callable[..., Cli]) -> None:
    """A newcomer runs ``pysmux demo`` (here on the test's runtime, smux v2 on gevent):
    it exits 0 within its time budget, prints the table (connections, bytes, throughput,
    latency, RPC calls per second) and "all 300 connections verified"."""
    began = time.monotonic()
    p = cli("demo", "--runtime", runtime, f"--smuxver={1 + (runtime == 'gevent')}")
    status = p.wait(60)
    took = time.monotonic() - began
    assert status == 0, p.describe()
    assert took < 30, f"the demo took {took:.1f} s"
    out = "\n".join(p.out)
    header, conns, calls = p.out[1:4]
    assert header.split() == ["count", "bytes", "time", "throughput", "p50", "p99"], out
    assert conns.startswith("tunnel connections") and conns.split()[2] == "300", out
    assert calls.startswith("RPC calls") and "calls/s" in calls and calls.split()[2] == "3000"
    assert "all 300 connections verified, all 3000 RPC calls verified" in p.out[-1], out
    assert p.err == [], p.describe()  # quiet unless -v


def test_demo_reports_a_mismatch(
    runtime: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A corrupted byte anywhere makes the demo fail: a TCP echo service that flips one
    bit of one connection is caught, and the command's exit status is 1."""
    flipped = []

    def bad_echo(conn: Any) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                if not flipped:
                    flipped.append(1)
                    data = bytes([data[0] ^ 1]) + data[1:]
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    monkeypatch.setattr(demo._TcpEcho, "_echo", staticmethod(bad_echo))
    progress: list[int] = []
    result = demo.run_demo(
        connections=20, calls=50, size=4096, concurrency=4, config=Config(version=2),
        runtime=runtime, on_progress=lambda r: progress.append(r.verified_connections),
    )  # fmt: skip
    assert not result.ok and flipped
    assert result.verified_connections == 19 and result.verified_calls == 50
    assert len(result.failures) == 1 and "bytes, or different ones" in result.failures[0]
    assert len(progress) == 70
    assert "tunnel connections" in result.table()

    flipped.clear()
    args = argparse.Namespace(connections=10, calls=10, size=1000, concurrency=2,
                              runtime=runtime, verbose=0)  # fmt: skip
    assert demo.run(args, Config(), {}) == 1
    out = capsys.readouterr().out
    assert "FAILED connection" in out and "9 of 10 connections" in out and "MISMATCH" in out
    assert "all 10 connections verified" not in out
