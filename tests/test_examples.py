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
