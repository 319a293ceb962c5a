"""Measuring helpers of the load, demo and attack commands: latency percentiles in
bounded memory, byte counts, and the progress line that only a terminal gets (checked
through the commands that draw it)."""

from __future__ import annotations

import argparse
import io
import random
import re

import pytest

from pysmux import Config, demo, load
from pysmux.loadstats import LatencyHistogram, ProgressLine, format_bytes
from pysmux.tunnel import EchoServer

PURE = pytest.mark.runtime_independent(reason="pure functions, no I/O")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@PURE
def test_histogram_percentiles_within_one_percent(runtime: str) -> None:
    rng = random.Random(5)
    samples = [rng.lognormvariate(-7, 1.5) for _ in range(20_000)]
    halves = LatencyHistogram(), LatencyHistogram()
    for k, s in enumerate(samples):
        halves[k % 2].record(s)
    hist = halves[0]
    hist.merge(halves[1])
    assert hist.count == len(samples) and hist.max == max(samples)
    assert len(hist._buckets) < 2000  # bounded, whatever the number of samples
    ordered = sorted(samples)
    for p in (50, 90, 99, 99.9):
        exact = ordered[max(0, int(len(ordered) * p / 100) - 1)]
        assert exact * 0.98 <= hist.percentile(p) <= exact * 1.02, p
    assert hist.percentile(100) == hist.max
    assert abs(hist.mean - sum(samples) / len(samples)) < 1e-9
    assert LatencyHistogram().percentile(99) == 0.0


@PURE
def test_format_bytes_and_progress_line(runtime: str) -> None:
    assert [format_bytes(n) for n in (0, 999, 1500, 2_500_000, 7e12)] == [
        "0 B", "999 B", "1.5 kB", "2.5 MB", "7000.0 GB"]  # fmt: skip
    tty, pipe = FakeTty(), io.StringIO()
    for stream in (tty, pipe):
        line = ProgressLine(stream)
        line.show("working")
        line.clear()
    assert tty.getvalue() == "\r\x1b[Kworking\r\x1b[K"
    assert pipe.getvalue() == ""  # a pipe or a log file gets no progress noise
    assert ProgressLine.bar(0.5, 10) == "[#####.....]"


def test_load_and_demo_draw_progress_on_a_terminal(
    runtime: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """``pysmux load`` shows its live rate and errors, ``pysmux demo`` its progress bar,
    on stderr when it is a terminal; stdout gets the summary only."""
    tty = FakeTty()
    monkeypatch.setattr("sys.stderr", tty)
    with EchoServer("127.0.0.1:0", runtime=runtime) as srv:
        args = argparse.Namespace(
            remote=[f"127.0.0.1:{srv.address[1]}"], mode="echo", conns=1, streams=2,
            duration=0.6, requests=None, size=32, runtime=runtime, timeout=5.0,
            connect_timeout=5.0, json=True,
        )  # fmt: skip
        assert load.run(args, Config(), {}) == 0
    assert "requests" in tty.getvalue() and "errors" in tty.getvalue(), tty.getvalue()
    assert tty.getvalue().endswith("\r\x1b[K")  # cleared before the summary
    assert capsys.readouterr().out.count("\n") == 1  # --json: one line
    tty.seek(0)
    tty.truncate()
    args = argparse.Namespace(connections=20, calls=40, size=2000, concurrency=4,
                              runtime=runtime, verbose=0)  # fmt: skip
    assert demo.run(args, Config(), {}) == 0
    bar = r"\[[#.]{30}\] connections \d+/20  RPC calls \d+/40"
    assert re.search(bar, tty.getvalue()), tty.getvalue()
    assert "all 20 connections verified" in capsys.readouterr().out
