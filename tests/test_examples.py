"""The examples run as their READMEs say, end by themselves, and print what they promise."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.runtimes("gevent", reason="runs the gevent example (a gevent program) in a child")
def test_gevent_server_example_echoes_and_exits():
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(ROOT / "examples" / "gevent_server.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    assert re.fullmatch(r"gevent smux echo server on 127\.0\.0\.1:\d+", lines[0]), lines
    replies = [
        re.fullmatch(r"stream (\d+): hello (\d) from a greenlet", line) for line in lines[1:-1]
    ]
    assert all(replies), lines
    assert [int(m[2]) for m in replies] == list(range(5)), lines  # type: ignore[index]
    ids = [int(m[1]) for m in replies]  # type: ignore[index]
    assert len(set(ids)) == 5 and all(i % 2 == 1 for i in ids), ids  # client streams: odd ids
    assert lines[-1] == "done", lines
    assert took < 10, f"the example took {took:.1f}s"


RPC_LINES = [
    "add [1, 2] -> 3",
    "add {a: 40, b: 2} -> 42",
    "echo -> {'hello': ['smux', 1]}",
    "batch -> [4, ['x']]",
    "error -32601: Method not found",
    "timeout: 'sleep': no answer within 0.2 s",
    "800 calls from 8 threads: ok",
]


def run_rpc_example(*args: str) -> list[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "dev", "-W", "error", str(ROOT / "examples" / "rpc_client.py"),
         *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stderr == "", proc.stderr
    return proc.stdout.splitlines()


@pytest.mark.runtime_independent(reason="runs the example (a thread program) in a child")
def test_rpc_client_example_with_its_own_server(runtime):
    lines = run_rpc_example()
    assert re.fullmatch(r"server on 127\.0\.0\.1:\d+", lines[0]), lines
    assert lines[1:] == RPC_LINES


@pytest.mark.runtime_independent(reason="runs the example and `pysmux rpc` in children")
def test_rpc_client_example_against_pysmux_rpc(runtime):
    """The example talks to the `pysmux rpc` command as well as to its own server."""
    server = subprocess.Popen(
        [sys.executable, "-m", "pysmux", "rpc", "-l", "127.0.0.1:0", "-q"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        match = re.fullmatch(r"listening on (127\.0\.0\.1:\d+)\n", first)
        assert match, first
        lines = run_rpc_example(match[1])
        assert lines == [f"server on {match[1]}", *RPC_LINES]
    finally:
        server.terminate()
        server.wait(10)
        if server.stdout is not None:
            server.stdout.close()
    assert server.returncode == 0
