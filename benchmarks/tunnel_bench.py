#!/usr/bin/env python3
"""The ``pysmux`` tunnel next to direct TCP and a Go smux tunnel: speed and scale, one run.

    python benchmarks/tunnel_bench.py            # every row and scenario, best of 3
    python benchmarks/tunnel_bench.py --quick    # a smoke test: small sizes, one round
    python benchmarks/tunnel_bench.py --scenarios parallel --rows go thread --versions 1
    python benchmarks/tunnel_bench.py --scenarios scale --scale 1000 4000 10000

Every row is separate processes on loopback TCP, started afresh for every
scenario of every round::

    driver --> tunnel client ==(one mux connection)==> tunnel server --> target

* target: ``benchmarks/gotunnel`` (``gotunnel target``, built offline from
  Debian's ``golang-github-xtaci-smux-dev`` as ``gobench`` is; a Python target
  with a thread per connection when Go is missing). ``'D'`` + u64 n: it sends
  n bytes and closes; ``'E'``: it echoes until EOF.
* tunnels: ``direct`` (no tunnel); ``go`` (``gotunnel client/server``: Go smux
  1.5.16 in kcptun's design, ``io.Copy`` both ways per stream); ``thread``,
  ``gevent``, ``default`` (``python -m pysmux client/server`` with
  ``--runtime thread``, ``--runtime gevent``, no ``--runtime``); the mixed
  pairs ``py-go`` (pysmux client -> Go server) and ``go-py`` (Go client ->
  pysmux server), pysmux on its default flags. Both ends use the pysmux
  command's defaults (4 MiB session buffer, 2 MiB stream window), the Go
  tunnel included; ``--smuxver`` is each row's version.
* driver: this script (``--role driver``), in a process of its own.

Scenarios:

* ``download``: one download of ``--download-mib`` MiB; MB/s.
* ``parallel``: ``--parallel`` downloads of ``--parallel-mib`` MiB at once (a
  thread each); aggregate MB/s, and the ratio to the row's own single download.
* ``short``: ``--short`` connections from ``--short-threads`` threads, each
  downloading 1 KiB; connections per second.
* ``scale``: for each N of ``--scale``, N connections held open at once (at most
  ``--scale-window`` of them connecting at a time), each echoing 16 bytes once;
  the time until all have echoed, then, while all are still open, each tunnel
  process's RSS and threads from ``/proc/PID/status``, the RSS growth per
  connection, and the CPU each spent. It runs the rows that are not mixed
  pairs, on the first of ``--versions``. The script raises its own open-file
  limit (the processes it starts inherit it) up to the hard limit and says so.

Every figure is the best of ``--rounds`` rounds; a round runs every row once
(scale: the round with the best time gives the memory figures). ``--cost``
adds what the tunnel processes spent (CPU, voluntary and involuntary context
switches, from ``wait4``'s rusage over their whole life, start-up included).
``--profile DIR`` runs the pysmux ends under cProfile (every thread) and prints
their top functions; ``--strace DIR`` runs them under ``strace -c -f``.

This is a script, never a timed test: the numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import pstats
import resource
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

from bench import build_go, profiled  # noqa: E402  (a sibling script, not a package)

MiB = 1 << 20
READ_CHUNK = 256 << 10  # bytes per recv_into of a download
SEND_CHUNK = 1 << 20  # bytes per sendall of the Python target
SHORT_SIZE = 1024  # bytes each short connection downloads
ECHO = b"0123456789abcdef"
SIZE = struct.Struct("<Q")
STARTUP_SECONDS = 30.0
ALL_ROWS = ("direct", "go", "thread", "gevent", "default", "py-go", "go-py")
MIXED = ("py-go", "go-py")
SPEED = ("download", "parallel", "short")


# --------------------------------------------------------------------------
# The driver (``--role driver``, a child process): prints one JSON line
# --------------------------------------------------------------------------


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def fetch(addr: tuple[str, int], size: int, buf: memoryview) -> int:
    """Download ``size`` bytes from the target through ``addr``; the bytes received."""
    with nodelay(socket.create_connection(addr, timeout=60)) as sock:
        sock.sendall(b"D" + SIZE.pack(size))
        got = 0
        while True:
            n = sock.recv_into(buf)
            if not n:
                return got
            got += n


def run_threads(count: int, work: Callable[[int], None]) -> float:
    """Run ``work(i)`` in ``count`` threads started together; seconds until all end."""
    ready = threading.Barrier(count + 1)

    def body(i: int) -> None:
        ready.wait()
        work(i)

    threads = [threading.Thread(target=body, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    ready.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start


def drive_downloads(addr: tuple[str, int], count: int, size: int) -> dict[str, Any]:
    got = [0] * count
    errors: list[str] = []

    def one(i: int) -> None:
        try:
            got[i] = fetch(addr, size, memoryview(bytearray(READ_CHUNK)))
        except OSError as exc:
            errors.append(repr(exc))
        if got[i] != size and not errors:
            errors.append(f"download {i}: {got[i]} of {size} bytes")

    seconds = run_threads(count, one)
    return {"seconds": seconds, "bytes": sum(got), "errors": len(errors), "why": errors[:3]}


def drive_short(addr: tuple[str, int], count: int, threads: int) -> dict[str, Any]:
    errors: list[str] = []
    share = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]

    def many(i: int) -> None:
        buf = memoryview(bytearray(SHORT_SIZE * 2))
        for _ in range(share[i]):
            try:
                got = fetch(addr, SHORT_SIZE, buf)
            except OSError as exc:
                errors.append(repr(exc))
                continue
            if got != SHORT_SIZE:
                errors.append(f"{got} of {SHORT_SIZE} bytes")

    seconds = run_threads(threads, many)
    return {"seconds": seconds, "count": count, "errors": len(errors), "why": errors[:3]}


@dataclass
class _Conn:
    sock: socket.socket
    connected: bool = False
    echoed: int = 0


def drive_scale(addr: tuple[str, int], count: int, window: int, timeout: float) -> dict[str, Any]:
    """Open ``count`` connections, each echoing 16 bytes once, and hold them all open.

    One thread and epoll: the driver must not be what limits. Prints the result,
    then waits for a line (or EOF) on stdin before closing every connection, so
    that the orchestrator can look at the tunnel processes meanwhile.
    """
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    errors: list[str] = []
    started = active = 0
    start = time.perf_counter()
    deadline = start + timeout

    def fail(conn: _Conn, why: str) -> None:
        nonlocal active
        errors.append(why)
        sel.unregister(conn.sock)
        conn.sock.close()
        active -= 1

    while len(held) + len(errors) < count:
        while started < count and active < window:
            sock = socket.socket()
            sock.setblocking(False)
            started += 1
            code = sock.connect_ex(addr)
            if code not in (0, errno.EINPROGRESS):
                errors.append(os.strerror(code))
                sock.close()
                continue
            sel.register(sock, selectors.EVENT_WRITE, _Conn(sock))
            active += 1
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            errors.extend(["timeout"] * (count - len(held) - len(errors)))
            break
        for key, _ in sel.select(min(remaining, 1.0)):
            conn: _Conn = key.data
            sock = conn.sock
            if not conn.connected:
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    fail(conn, os.strerror(code))
                    continue
                conn.connected = True
                try:
                    sock.send(b"E" + ECHO)  # 17 bytes on a fresh socket: all at once
                except OSError as exc:
                    fail(conn, repr(exc))
                    continue
                sel.modify(sock, selectors.EVENT_READ, conn)
                continue
            try:
                data = sock.recv(64)
            except OSError as exc:
                fail(conn, repr(exc))
                continue
            if not data:
                fail(conn, "EOF before the echo")
                continue
            conn.echoed += len(data)
            if conn.echoed >= len(ECHO):
                sel.unregister(sock)
                held.append(sock)
                active -= 1
    seconds = time.perf_counter() - start
    result = {"seconds": seconds, "held": len(held), "errors": len(errors), "why": errors[:3]}
    print(json.dumps(result), flush=True)
    sys.stdin.readline()  # the orchestrator has looked: let go
    for conn_key in list(sel.get_map().values()):
        conn_key.fileobj.close()  # type: ignore[union-attr]
    for sock in held:
        sock.close()
    sel.close()
    return result


# --------------------------------------------------------------------------
# The Python target (when Go is missing) and the profiled pysmux command
# --------------------------------------------------------------------------


def serve_target_conn(conn: socket.socket) -> None:
    with conn:
        try:
            mode = conn.recv(1)
            if mode == b"D":
                header = b""
                while len(header) < SIZE.size:
                    more = conn.recv(SIZE.size - len(header))
                    if not more:
                        return
                    header += more
                (left,) = SIZE.unpack(header)
                data = memoryview(bytes(SEND_CHUNK))
                while left:
                    n = min(left, SEND_CHUNK)
                    conn.sendall(data[:n])
                    left -= n
            elif mode == b"E":
                while data := conn.recv(65536):
                    conn.sendall(data)
        except OSError:
            pass


def run_target() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=socket.SOMAXCONN)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve_target_conn, args=(nodelay(conn),), daemon=True).start()


def run_pysmux(argv: list[str], profile_out: str | None) -> int:
    """``python -m pysmux ARGV`` in this process, under cProfile when ``profile_out``."""
    sys.path.insert(0, str(ROOT))
    from pysmux.cli import main

    status = [0]

    def body() -> None:
        status[0] = main(argv)

    profiled(profile_out, body)
    return status[0]


# --------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------


@dataclass
class Row:
    """One way to get from the driver to the target."""

    name: str  # one of ALL_ROWS
    version: int

    @property
    def label(self) -> str:
        return {
            "direct": "direct TCP",
            "go": f"Go smux tunnel v{self.version}",
            "thread": f"pysmux --runtime thread v{self.version}",
            "gevent": f"pysmux --runtime gevent v{self.version}",
            "default": f"pysmux default flags v{self.version}",
            "py-go": f"pysmux client -> Go server v{self.version}",
            "go-py": f"Go client -> pysmux server v{self.version}",
        }[self.name]

    def ends(self) -> tuple[str, str]:
        """(client end, server end): ``go``, ``pysmux`` or ``none``; runtime in ``runtime``."""
        return {
            "direct": ("none", "none"),
            "go": ("go", "go"),
            "py-go": ("pysmux", "go"),
            "go-py": ("go", "pysmux"),
        }.get(self.name, ("pysmux", "pysmux"))

    @property
    def runtime(self) -> str | None:
        return self.name if self.name in ("thread", "gevent") else None


@dataclass
class Usage:
    """What a tunnel process spent over its life (``wait4``)."""

    cpu: float = 0.0
    voluntary: int = 0
    involuntary: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu + other.cpu,
            self.voluntary + other.voluntary,
            self.involuntary + other.involuntary,
        )

    def __sub__(self, other: Usage) -> Usage:
        return Usage(
            self.cpu - other.cpu,
            self.voluntary - other.voluntary,
            self.involuntary - other.involuntary,
        )


@dataclass
class Result:
    value: float | None = None  # MB/s, conn/s; seconds for scale (lower is better)
    usage: Usage | None = None
    errors: int = 0
    why: str = ""
    memory: dict[str, int] = field(default_factory=dict)  # scale: rss/threads per side


@dataclass
class Settings:
    gobin: str | None
    workdir: str
    profile: str | None
    strace: str | None
    timeout: float
    pysmux_flags: list[str]


class Process:
    """A child that prints ``listening on HOST:PORT``; stderr goes to a file."""

    def __init__(self, cmd: list[str], settings: Settings, name: str) -> None:
        self.name = name
        self.stderr: IO[str] = tempfile.TemporaryFile("w+", dir=settings.workdir)  # noqa: SIM115
        env = dict(os.environ, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env, cwd=ROOT
        )
        self.usage: Usage | None = None
        self.address = self._read_address()

    def _read_address(self) -> tuple[str, int]:
        assert self.proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            ready = sel.select(STARTUP_SECONDS)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {line!r} {self.errors()}")
        host, port = line.split()[-1].rsplit(":", 1)
        return host.strip("[]"), int(port)

    @property
    def pid(self) -> int:
        """The tunnel's own pid (under strace, strace's child)."""
        pid = self.proc.pid
        with contextlib.suppress(OSError, ValueError):
            if Path(f"/proc/{pid}/comm").read_text().strip() == "strace":
                return int(Path(f"/proc/{pid}/task/{pid}/children").read_text().split()[0])
        return pid

    def status(self) -> dict[str, int]:
        """RSS (KiB) and threads now, from /proc/PID/status; CPU so far (ms), from
        /proc/PID/stat."""
        out: dict[str, int] = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "Threads"):
                out[key] = int(value.split()[0])
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[11]) + int(fields[12])  # utime + stime
        out["cpu_ms"] = ticks * 1000 // os.sysconf("SC_CLK_TCK")
        return out

    def errors(self) -> str:
        self.stderr.seek(0)
        text = self.stderr.read().strip()
        return text[-400:]

    def stop(self) -> None:
        """SIGTERM (the tunnel's own, under strace), then reap with its rusage."""
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGTERM)
            self._reap(20)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.stderr.close()

    def _reap(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                self.usage = Usage(usage.ru_utime + usage.ru_stime, usage.ru_nvcsw, usage.ru_nivcsw)
                return
            if time.monotonic() > deadline:
                self.proc.kill()
                deadline = time.monotonic() + 10
            time.sleep(0.02)


def pysmux_cmd(role: str, flag: str, where: str, row: Row, settings: Settings) -> list[str]:
    args = [role, "-l", "127.0.0.1:0", flag, where, "--smuxver", str(row.version), "-q"]
    if row.runtime:
        args += ["--runtime", row.runtime]
    args += ["--drain-timeout", "5", *settings.pysmux_flags]
    if settings.profile:
        os.makedirs(settings.profile, exist_ok=True)
        out = os.path.join(settings.profile, f"{row.name}-v{row.version}-{role}.pstats")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "pysmux"]
        cmd += ["--profile-out", out, "--", *args]
    else:
        cmd = [sys.executable, "-m", "pysmux", *args]
    if settings.strace:
        os.makedirs(settings.strace, exist_ok=True)
        out = os.path.join(settings.strace, f"{row.name}-v{row.version}-{role}.strace")
        cmd = ["strace", "-c", "-f", "-o", out, *cmd]
    return cmd


def go_cmd(role: str, flag: str, where: str, row: Row, settings: Settings) -> list[str]:
    assert settings.gobin is not None
    return [settings.gobin, role, "-l", "127.0.0.1:0", flag, where, "-smuxver", str(row.version)]


@contextlib.contextmanager
def path_through(row: Row, settings: Settings) -> Iterator[tuple[tuple[str, int], list[Process]]]:
    """Start the target and the row's tunnel; yield (address for the driver, tunnel processes)."""
    started: list[Process] = []
    try:
        if settings.gobin:
            target_cmd = [settings.gobin, "target", "-l", "127.0.0.1:0"]
        else:
            target_cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "target"]
        target = Process(target_cmd, settings, "target")
        started.append(target)
        client_end, server_end = row.ends()
        if client_end == "none":
            yield target.address, []
            return
        make = {"go": go_cmd, "pysmux": pysmux_cmd}
        where = "{}:{}".format(*target.address)
        server = Process(make[server_end]("server", "-t", where, row, settings), settings, "server")
        started.append(server)
        where = "{}:{}".format(*server.address)
        client = Process(make[client_end]("client", "-r", where, row, settings), settings, "client")
        started.append(client)
        yield client.address, [client, server]
    finally:
        for proc in reversed(started):
            proc.stop()


def driver_cmd(addr: tuple[str, int], *args: object) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", "driver"]
    return [*cmd, "--addr", f"{addr[0]}:{addr[1]}", *map(str, args)]


def run_driver(cmd: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"driver failed: {proc.stderr.strip()[-400:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def idle_usage(row: Row, settings: Settings) -> Usage | None:
    """What the row's tunnel processes spend to start and stop, carrying nothing."""
    with path_through(row, settings) as (_, tunnel):
        pass
    if not tunnel or not all(p.usage for p in tunnel):
        return None
    return sum((p.usage for p in tunnel if p.usage), Usage())


def speed_once(row: Row, scenario: str, args: argparse.Namespace, settings: Settings) -> Result:
    with path_through(row, settings) as (addr, tunnel):
        if scenario == "download":
            size = int(args.download_mib * MiB)
            out = run_driver(driver_cmd(addr, "--mode", "download", "--size", size), args.timeout)
            value = out["bytes"] / out["seconds"] / 1e6
        elif scenario == "parallel":
            size = int(args.parallel_mib * MiB)
            cmd = driver_cmd(addr, "--mode", "download", "--size", size, "--count", args.parallel)
            out = run_driver(cmd, args.timeout)
            value = out["bytes"] / out["seconds"] / 1e6
        else:
            cmd = driver_cmd(
                addr, "--mode", "short", "--count", args.short, "--threads", args.short_threads
            )
            out = run_driver(cmd, args.timeout)
            value = out["count"] / out["seconds"]
    result = Result(value, errors=out["errors"], why="; ".join(out["why"]))
    if tunnel and all(p.usage for p in tunnel):
        result.usage = sum((p.usage for p in tunnel if p.usage), Usage())
    return result


def scale_once(row: Row, count: int, args: argparse.Namespace, settings: Settings) -> Result:
    with path_through(row, settings) as (addr, tunnel):
        idle = {p.name: p.status() for p in tunnel}
        cmd = driver_cmd(
            addr,
            "--mode",
            "scale",
            "--count",
            count,
            "--window",
            args.scale_window,
            "--timeout",
            args.timeout,
        )
        driver = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            assert driver.stdout is not None and driver.stdin is not None
            line = driver.stdout.readline()
            memory: dict[str, int] = {}
            for p in tunnel:  # every connection is still open now
                now = p.status()
                memory[f"{p.name}_rss"] = now.get("VmRSS", 0)
                memory[f"{p.name}_idle_rss"] = idle[p.name].get("VmRSS", 0)
                memory[f"{p.name}_threads"] = now.get("Threads", 0)
                memory[f"{p.name}_cpu_ms"] = now["cpu_ms"] - idle[p.name]["cpu_ms"]
            _, err = driver.communicate("\n", timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.communicate()
        if not line:
            raise RuntimeError(f"driver failed: {err.strip()[-400:]}")
        out = json.loads(line)
        for p in tunnel:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.name} ended: {p.errors()}")
    return Result(out["seconds"], errors=out["errors"], why="; ".join(out["why"]), memory=memory)


def keep_best(old: Result | None, new: Result, higher_is_better: bool) -> Result:
    if old is None or old.value is None or new.errors < old.errors:
        return new
    if new.errors > old.errors or new.value is None:
        return old
    better = new.value > old.value if higher_is_better else new.value < old.value
    return new if better else old


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def measure(
    row: Row, scenario: str, count: int, args: argparse.Namespace, settings: Settings
) -> Result:
    """One round of one scenario on one row; an error is a result, not an exception."""
    started = time.perf_counter()
    try:
        if scenario == "scale":
            return scale_once(row, count, args, settings)
        return speed_once(row, scenario, args, settings)
    except (RuntimeError, OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        return Result(None, errors=1, why=str(exc)[-400:])
    finally:
        say(f"  {time.perf_counter() - started:.1f} s")


def raise_fd_limit(needed: int) -> str:
    """Raise this process's soft open-file limit toward ``needed`` (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return f"open-file limit {soft} (enough for {needed})"
    new = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    if new > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        note = f"open-file limit raised from {soft} to {new} (hard limit {hard})"
    else:
        note = f"open-file limit {soft} (the hard limit)"
    if new < needed:
        note += f"; {needed} wanted for every process at the largest N: raise ulimit -Hn"
    return note


# -- tables -------------------------------------------------------------------


def ratio(a: float | None, b: float | None, lower_is_better: bool = False) -> str:
    if a is None or b is None or not a or not b:
        return "-"
    return f"{(b / a if lower_is_better else a / b):.2f}x"


def table(head: list[str], lines: list[list[str]]) -> None:
    widths = [max(len(line[i]) for line in [head, *lines]) for i in range(len(head))]

    def out(cells: list[str]) -> None:
        rest = zip(cells[1:], widths[1:], strict=True)
        print("| " + " | ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]) + " |")

    out(head)
    print("|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|")
    for line in lines:
        out(line)
    print()


def cell(result: Result | None, spec: str) -> str:
    if result is None:
        return "-"
    if result.value is None:
        return "error"
    text = format(result.value, spec)
    return f"{text} ({result.errors} err)" if result.errors else text


def go_of(row: Row, rows: list[Row]) -> Row | None:
    return next((r for r in rows if r.name == "go" and r.version == row.version), None)


Results = dict[tuple[str, str], Result]


def print_speed(rows: list[Row], results: Results, scenarios: list[str]) -> None:
    head = ["path"]
    titles = {"download": "1 download MB/s", "parallel": "parallel MB/s", "short": "short conn/s"}
    for s in scenarios:
        head += [titles[s], "vs Go"]
        if s == "parallel" and "download" in scenarios:
            head.append("vs own 1")
    lines = []
    for row in rows:
        go = go_of(row, rows)
        line = [row.label]
        for s in scenarios:
            mine = results.get((row.label, s))
            ref = results.get((go.label, s)) if go and row.name not in ("go", "direct") else None
            line += [cell(mine, ".0f"), ratio(mine and mine.value, ref and ref.value)]
            if s == "parallel" and "download" in scenarios:
                single = results.get((row.label, "download"))
                line.append(ratio(mine and mine.value, single and single.value))
        lines.append(line)
    table(head, lines)


def print_cost(
    rows: list[Row], results: Results, idle: dict[str, Usage], args: argparse.Namespace
) -> None:
    """CPU and context switches of both tunnel processes per MB (per connection for short),
    less what they spend to start and stop."""
    head = ["path", "scenario", "CPU ms/unit", "voluntary cs/unit", "involuntary cs/unit"]
    lines = []
    for row in rows:
        for s, result in ((s, results.get((row.label, s))) for s in SPEED):
            if result is None or result.usage is None or result.value is None:
                continue
            if row.label not in idle:
                continue
            if s == "short":
                units, name = args.short, "conn"
            elif s == "download":
                units, name = args.download_mib * MiB / 1e6, "MB"
            else:
                units, name = args.parallel * args.parallel_mib * MiB / 1e6, "MB"
            u = result.usage - idle[row.label]
            lines.append(
                [
                    row.label,
                    f"{s} (per {name})",
                    f"{u.cpu * 1000 / units:.2f}",
                    f"{u.voluntary / units:.1f}",
                    f"{u.involuntary / units:.1f}",
                ]
            )
    if lines:
        print("What both tunnel processes spent (wait4 rusage, less an idle start and stop):")
        table(head, lines)


def print_scale(rows: list[Row], results: Results, counts: list[int]) -> None:
    head = ["tunnel", "connections", "time s", "vs Go", "RSS MB client+server", "vs Go"]
    head += ["KiB/conn client+server", "threads client+server", "CPU s client+server", "errors"]
    lines = []
    for count in counts:
        for row in rows:
            mine = results.get((row.label, f"scale{count}"))
            go = go_of(row, rows)
            ref = None
            if go and row.name not in ("go", "direct"):
                ref = results.get((go.label, f"scale{count}"))
            if mine is None:
                continue
            m = mine.memory
            rss = (m.get("client_rss", 0) + m.get("server_rss", 0)) / 1024
            sides = ("client", "server")
            grow = [(m.get(f"{s}_rss", 0) - m.get(f"{s}_idle_rss", 0)) / count for s in sides]
            ref_rss = None
            if ref is not None and ref.memory:
                ref_rss = (ref.memory.get("client_rss", 0) + ref.memory.get("server_rss", 0)) / 1024
            lines.append(
                [
                    row.label,
                    f"{count:,}",
                    "error" if mine.value is None else f"{mine.value:.2f}",
                    ratio(mine.value, ref and ref.value),
                    "+".join(f"{m.get(f'{s}_rss', 0) / 1024:.0f}" for s in sides) if m else "-",
                    ratio(rss, ref_rss) if m else "-",
                    f"{grow[0]:.1f}+{grow[1]:.1f}" if m else "-",
                    f"{m.get('client_threads', 0)}+{m.get('server_threads', 0)}" if m else "-",
                    "+".join(f"{m.get(f'{s}_cpu_ms', 0) / 1000:.1f}" for s in sides) if m else "-",
                    str(mine.errors),
                ]
            )
    table(head, lines)
    print("time: until every connection has echoed once; RSS and threads while all are open;")
    print("KiB/conn: RSS growth from the idle tunnel, divided by the connections. CPU: what")
    print("each tunnel process spent from idle until all had echoed. 'vs Go' is the ratio")
    print("to the Go tunnel of the same version (above 1: slower, or more memory).")
    print()


def print_profiles(directory: str, top: int) -> None:
    for path in sorted(Path(directory).glob("*.pstats")):
        print(f"\n=== {path.name}: top {top} by own time ===")
        pstats.Stats(str(path)).strip_dirs().sort_stats("tottime").print_stats(top)


def print_straces(directory: str) -> None:
    for path in sorted(Path(directory).glob("*.strace")):
        print(f"\n=== {path.name} ===")
        print("\n".join(path.read_text().splitlines()[:16]))


def orchestrate(args: argparse.Namespace) -> int:
    versions = args.versions
    rows = [Row(name, v) for v in versions for name in args.rows]
    rows = [r for i, r in enumerate(rows) if r.name != "direct" or i == rows.index(r)]
    rows = list({r.label: r for r in rows}.values())  # one direct row, not one per version
    scenarios = [s for s in (*SPEED, "scale") if s in args.scenarios]
    counts = sorted(args.scale) if "scale" in scenarios else []
    print(f"pysmux tunnel benchmark: best of {args.rounds} round(s), rounds run back to back")
    print(
        f"python {platform.python_version()}, {platform.system()} {platform.release()} "
        f"{platform.machine()}, {os.cpu_count()} CPUs"
    )
    if counts:
        print(raise_fd_limit(max(counts) * 2 + 256))
    results: dict[tuple[str, str], Result] = {}
    failed = False
    with tempfile.TemporaryDirectory(prefix="pysmux-tunnel-bench-") as workdir:
        gobin, note = (None, "Go skipped: --no-go") if args.no_go else build_go(workdir, "gotunnel")
        print(note)
        if gobin is None:
            print("target: Python (a thread per connection); Go rows skipped")
            rows = [r for r in rows if "go" not in r.ends()]
        flags = args.pysmux_flags.split()
        settings = Settings(gobin, workdir, args.profile, args.strace, args.timeout, flags)
        scale_rows = [r for r in rows if r.version == versions[0] and r.name not in MIXED]
        print()
        idle: dict[str, Usage] = {}
        for row in rows if args.cost else []:
            usage = idle_usage(row, settings)
            if usage is not None:
                idle[row.label] = usage
        for round_ in range(1, args.rounds + 1):
            for s in scenarios:
                for count in counts if s == "scale" else [0]:
                    key = f"scale{count}" if s == "scale" else s
                    for row in rows if s != "scale" else scale_rows:
                        say(f"round {round_}: {key}: {row.label} ...")
                        new = measure(row, s, count, args, settings)
                        if new.errors:
                            say(f"  {new.errors} error(s): {new.why}")
                        results[(row.label, key)] = keep_best(
                            results.get((row.label, key)), new, s != "scale"
                        )
    print()
    speed = [s for s in scenarios if s != "scale"]
    if speed:
        print(
            f"Speed: one download of {args.download_mib:g} MiB; {args.parallel} parallel downloads "
            f"of {args.parallel_mib:g} MiB (aggregate); {args.short:,} short connections "
            f"(1 KiB each) from {args.short_threads} threads."
        )
        print()
        print_speed(rows, results, speed)
        print("'vs Go': ratio to the Go smux tunnel of the same version (above 1: faster);")
        print("'vs own 1': the row's parallel aggregate over its own single download.")
        print()
        if args.cost:
            print_cost(rows, results, idle, args)
    if counts:
        print(f"Scale: N connections held open at once, at most {args.scale_window} connecting.")
        print()
        print_scale(scale_rows, results, counts)
    for (label, key), result in results.items():
        if result.errors:
            failed = True
            print(f"errors in {label}, {key}: {result.errors}: {result.why}")
    if args.profile:
        print_profiles(args.profile, args.profile_top)
    if args.strace:
        print_straces(args.strace)
    return 1 if failed else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="small sizes, one round: a smoke test")
    p.add_argument("--rows", nargs="+", choices=ALL_ROWS, help="paths (default: all)")
    p.add_argument("--versions", nargs="+", type=int, choices=(1, 2), help="(default: 1 2)")
    p.add_argument(
        "--scenarios",
        nargs="+",
        choices=(*SPEED, "scale"),
        default=[*SPEED, "scale"],
        help="what to measure (default: all)",
    )
    p.add_argument("--rounds", type=int, default=3, help="best of this many (default 3)")
    p.add_argument("--download-mib", type=float, default=256, help="one download (default 256)")
    p.add_argument("--parallel", type=int, default=8, help="parallel downloads (default 8)")
    p.add_argument("--parallel-mib", type=float, default=32, help="each of them (default 32)")
    p.add_argument("--short", type=int, default=2000, help="short connections (default 2000)")
    p.add_argument("--short-threads", type=int, default=8, help="their threads (default 8)")
    p.add_argument("--scale", nargs="+", type=int, default=[1000, 4000, 10000], metavar="N")
    p.add_argument("--scale-window", type=int, default=256, help="connecting at once (256)")
    p.add_argument("--timeout", type=float, default=300, help="seconds per measurement")
    p.add_argument("--no-go", action="store_true", help="no Go rows; a Python target")
    p.add_argument("--cost", action="store_true", help="CPU and context switches per MB")
    p.add_argument("--profile", metavar="DIR", help="cProfile the pysmux ends into DIR")
    p.add_argument("--profile-top", type=int, default=25, help="functions to print per profile")
    p.add_argument("--strace", metavar="DIR", help="strace -c -f the pysmux ends into DIR")
    p.add_argument(
        "--pysmux-flags", default="", metavar="FLAGS", help="more flags for every pysmux end"
    )
    # internal: the child processes
    p.add_argument("--role", choices=["driver", "target", "pysmux"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["download", "short", "scale"], help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--size", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=8, help=argparse.SUPPRESS)
    p.add_argument("--window", type=int, default=256, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    args, rest = p.parse_known_args()
    if args.role == "pysmux":
        return run_pysmux([a for a in rest if a != "--"], args.profile_out)
    if rest:
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.role == "target":
        run_target()
        return 0
    if args.role == "driver":
        host, port = args.addr.rsplit(":", 1)
        addr = (host, int(port))
        if args.mode == "download":
            out = drive_downloads(addr, args.count, args.size)
        elif args.mode == "short":
            out = drive_short(addr, args.count, args.threads)
        else:
            drive_scale(addr, args.count, args.window, args.timeout)
            return 0
        print(json.dumps(out), flush=True)
        return 0
    if args.quick:
        args.download_mib, args.parallel_mib, args.short, args.rounds = 8, 2, 100, 1
        args.scale = [100]
        args.rows = args.rows or ["direct", "go", "default"]
        args.versions = args.versions or [1]
    args.rows = args.rows or list(ALL_ROWS)
    args.versions = args.versions or [1, 2]
    return orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
