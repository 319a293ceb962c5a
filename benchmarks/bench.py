#!/usr/bin/env python3
"""Throughput and latency of pysmux next to raw TCP and Go smux, in one run.

    python benchmarks/bench.py            # full run (256 MiB bulk, 20,000 ping-pongs, best of 3)
    python benchmarks/bench.py --quick    # a few seconds, for a smoke test

Every row is one client process talking to one server process over loopback
TCP (both started with ``subprocess``, so the two ends never share a GIL):

* ``python tcp``   -- plain Python sockets, the ceiling for anything in Python;
* ``pysmux v1/v2`` -- pysmux on threads, Python client <-> Python server;
* ``go tcp``, ``go smux v1/v2`` -- ``benchmarks/gobench`` built from Debian's
  ``golang-github-xtaci-smux-dev`` (skipped, with a note, when Go is missing);
* with ``--gevent``: pysmux on the gevent runtime (monkey-patched processes);
* with ``--interop``: pysmux client <-> Go smux server and the reverse.

Two measurements per row, on fresh streams of one session (fresh connections
for TCP):

* bulk: the client writes N bytes (1 MiB per ``sendall``) on one stream, the
  server reads them (256 KiB per ``recv_into``) and answers with the count;
  time from opening the stream to the answer.
* ping-pong: the client writes 16 bytes and reads the 16-byte echo, K times;
  microseconds per round trip.

The whole set of rows runs ``--repeat`` times, in rounds (so that a noisy
moment hits every row alike), and each row's best round is reported. The request
protocol (9-byte header: mode byte + u64 little-endian argument) is the same as
in ``gobench/main.go``. ``--profile DIR`` runs the Python ends under cProfile
(every thread) and prints the top functions of each.

Small-message latency depends on where the scheduler puts the two processes:
on a VM a wake-up across CPUs can cost several times one on the same CPU.
``--pin same`` puts both ends on one CPU (stable; shows software cost per round
trip), ``--pin split`` on two.

This is a script, never a timed test: numbers depend on the machine.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GOCODE = Path("/usr/share/gocode")
SMUX_SRC = GOCODE / "src/github.com/xtaci/smux"

WRITE_CHUNK = 1 << 20  # bytes per sendall, as gobench
READ_CHUNK = 256 << 10  # bytes per recv_into, as gobench
PING_SIZE = 16
REQUEST = struct.Struct("<cQ")  # mode (b"B" bulk, b"P" ping-pong), argument
ACK = struct.Struct("<Q")


# --------------------------------------------------------------------------
# The Python ends (run in child processes: ``bench.py --role server|client``)
# --------------------------------------------------------------------------


def recv_exact(conn: Any, view: memoryview) -> None:
    """Fill ``view`` from ``conn`` (a socket or a pysmux Stream)."""
    got = 0
    while got < len(view):
        n = conn.recv_into(view[got:])
        if n == 0:
            raise EOFError(f"peer closed after {got} of {len(view)} bytes")
        got += n


def handle(conn: Any) -> None:
    """Serve one request on a stream or TCP connection."""
    try:
        header = memoryview(bytearray(REQUEST.size))
        recv_exact(conn, header)
        mode, arg = REQUEST.unpack(header)
        if mode == b"B":
            buf = memoryview(bytearray(READ_CHUNK))
            got = 0
            while got < arg:
                n = conn.recv_into(buf)
                if n == 0:
                    raise EOFError(f"bulk: peer closed after {got} of {arg} bytes")
                got += n
            conn.sendall(ACK.pack(got))
        elif mode == b"P":
            msg = memoryview(bytearray(PING_SIZE))
            for _ in range(arg):
                recv_exact(conn, msg)
                conn.sendall(msg)
    finally:
        conn.close()


def start_session(role: str, sock: socket.socket, impl: str, version: int) -> Any:
    import pysmux

    runtime = "gevent" if impl == "pysmux-gevent" else "thread"
    start = pysmux.server if role == "server" else pysmux.client
    return start(sock, config=pysmux.Config(version=version), runtime=runtime)


def nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def serve_connection(conn: socket.socket, impl: str, version: int) -> None:
    if impl == "tcp":
        handle(conn)
        return
    import pysmux

    with start_session("server", conn, impl, version) as session:
        while True:
            try:
                stream = session.accept_stream()
            except pysmux.SessionClosedError:
                return
            threading.Thread(target=handle, args=(stream,), daemon=True).start()


def run_server(impl: str, version: int) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    print(f"PORT {listener.getsockname()[1]}", flush=True)
    while True:
        conn, _ = listener.accept()
        nodelay(conn)
        threading.Thread(target=serve_connection, args=(conn, impl, version), daemon=True).start()


def request(open_conn: Callable[[], Any], mode: bytes, arg: int) -> Any:
    conn = open_conn()
    conn.sendall(REQUEST.pack(mode, arg))
    return conn


def bulk(open_conn: Callable[[], Any], total: int) -> float:
    data = memoryview(bytearray(WRITE_CHUNK))
    start = time.perf_counter()
    conn = request(open_conn, b"B", total)
    try:
        sent = 0
        while sent < total:
            n = min(WRITE_CHUNK, total - sent)
            conn.sendall(data[:n])
            sent += n
        ack = memoryview(bytearray(ACK.size))
        recv_exact(conn, ack)
        elapsed = time.perf_counter() - start
        (got,) = ACK.unpack(ack)
        if got != total:
            raise RuntimeError(f"server got {got} bytes, {total} sent")
        return elapsed
    finally:
        conn.close()


def pingpong(open_conn: Callable[[], Any], count: int) -> float:
    conn = request(open_conn, b"P", count)
    try:
        msg = b"0123456789abcdef"
        reply = memoryview(bytearray(PING_SIZE))
        start = time.perf_counter()
        for _ in range(count):
            conn.sendall(msg)
            recv_exact(conn, reply)
        return time.perf_counter() - start
    finally:
        conn.close()


def run_client(
    impl: str, version: int, addr: str, bulk_bytes: int, pings: int, repeat: int
) -> None:
    host, port = addr.rsplit(":", 1)

    def tcp() -> socket.socket:
        return nodelay(socket.create_connection((host, int(port))))

    session = None
    if impl == "tcp":
        open_conn: Callable[[], Any] = tcp
    else:
        session = start_session("client", tcp(), impl, version)
        open_conn = session.open_stream
    result: dict[str, list[float]] = {"bulk_seconds": [], "pingpong_seconds": []}
    try:
        for _ in range(repeat):
            if bulk_bytes:
                result["bulk_seconds"].append(bulk(open_conn, bulk_bytes))
            if pings:
                result["pingpong_seconds"].append(pingpong(open_conn, pings))
    finally:
        if session is not None:
            session.close()
    print(json.dumps(result), flush=True)


def profiled(path: str | None, fn: Callable[[], None]) -> None:
    """Run ``fn`` under cProfile, with one profiler per thread, and dump the sum to ``path``."""
    if path is None:
        fn()
        return
    profiles: list[cProfile.Profile] = []

    def start_in_thread(*_: object) -> None:
        prof = cProfile.Profile()
        profiles.append(prof)
        prof.enable()  # replaces this hook for the rest of the thread

    threading.setprofile(start_in_thread)
    main = cProfile.Profile()
    profiles.append(main)
    main.enable()

    def dump() -> None:
        main.disable()
        threading.setprofile(None)
        stats = pstats.Stats(main)
        for prof in profiles[1:]:
            try:
                prof.create_stats()
                stats.add(prof)
            except Exception:  # a thread still running: skip what we cannot read
                pass
        stats.dump_stats(path)

    try:
        fn()
    finally:
        dump()


# --------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------


@dataclass
class Row:
    label: str
    server: list[str]
    client: list[str]  # without --addr
    family: str  # "tcp", "v1", "v2": what a ratio compares against
    kind: str  # "python-tcp", "pysmux", "go", "interop"
    bulk_mbps: float | None = None
    rtt_us: float | None = None
    error: str | None = None


def python_cmd(role: str, impl: str, version: int, profile: str | None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--role", role, "--impl", impl]
    cmd += ["--smuxver", str(version)]
    if profile:
        cmd += ["--profile-out", profile]
    return cmd


def go_cmd(binary: str, role: str, mode: str, version: int) -> list[str]:
    return [binary, role, "-mode", mode, "-smuxver", str(version)]


def build_go(workdir: str, package: str = "gobench") -> tuple[str | None, str]:
    """Build ``benchmarks/PACKAGE`` offline from Debian's smux source; (binary or None, note)."""
    go = shutil.which("go")
    if go is None:
        return None, "Go skipped: no `go` on PATH (apt-get install golang-go)"
    if not (SMUX_SRC / "session.go").exists():
        return None, f"Go skipped: no {SMUX_SRC} (apt-get install golang-github-xtaci-smux-dev)"
    binary = os.path.join(workdir, package)
    env = dict(os.environ, GO111MODULE="off", GOPATH=f"{workdir}/gopath:{GOCODE}", GOFLAGS="")
    env.setdefault("GOCACHE", os.path.join(workdir, "gocache"))
    proc = subprocess.run(
        [go, "build", "-o", binary, "."],
        cwd=HERE / package,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return None, f"Go skipped: build failed: {proc.stderr.strip()}"
    version = subprocess.run([go, "version"], capture_output=True, text=True).stdout.strip()
    return binary, f"{version}; xtaci/smux from Debian package {_debian_smux_version()}"


def _debian_smux_version() -> str:
    try:
        out = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "golang-github-xtaci-smux-dev"],
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown version"
    return out or "unknown version"


def read_port(proc: subprocess.Popen[str], timeout: float) -> int:
    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            raise RuntimeError("server did not report its port")
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        raise RuntimeError(f"server said {line!r} (exit code {proc.poll()})")
    return int(line.split()[1])


def best(old: float | None, new: float, better: Callable[[float, float], float]) -> float:
    return new if old is None else better(old, new)


def cpu_pinning(pin: str) -> tuple[Callable[[], None] | None, Callable[[], None] | None]:
    """``preexec_fn`` for the server and the client process: ``none``, ``same`` or ``split``."""
    if pin == "none":
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = cpus[0], cpus[-1] if pin == "split" else cpus[0]
    return (
        lambda: os.sched_setaffinity(0, {server_cpu}),
        lambda: os.sched_setaffinity(0, {client_cpu}),
    )


def run_row(row: Row, bulk_bytes: int, pings: int, timeout: float, pin: str) -> None:
    """One round of ``row``: fresh server and client processes, each test once."""
    pin_server, pin_client = cpu_pinning(pin)
    server = subprocess.Popen(
        row.server,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=pin_server,
    )
    try:
        port = read_port(server, 30)
        client = [*row.client, "--addr", f"127.0.0.1:{port}", "--bulk", str(bulk_bytes)]
        client += ["--pings", str(pings), "--repeat", "1"]
        proc = subprocess.run(
            client, capture_output=True, text=True, timeout=timeout, preexec_fn=pin_client
        )
        if proc.returncode != 0:
            raise RuntimeError(f"client failed: {proc.stderr.strip()[-500:]}")
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        for seconds in result["bulk_seconds"]:
            row.bulk_mbps = best(row.bulk_mbps, bulk_bytes / seconds / 1e6, max)
        for seconds in result["pingpong_seconds"]:
            row.rtt_us = best(row.rtt_us, seconds / pings * 1e6, min)
    except subprocess.TimeoutExpired:
        row.error = f"client did not finish within {timeout:.0f} s"
    except Exception as exc:
        row.error = str(exc)
    finally:
        server.terminate()
        try:
            _, err = server.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            _, err = server.communicate()
        if row.error and err.strip():
            row.error += f" | server stderr: {err.strip()[-500:]}"


def pysmux_available() -> str | None:
    """None if ``pysmux.client`` can be imported in a child process, else why not."""
    proc = subprocess.run(
        [sys.executable, "-c", "import pysmux; pysmux.client; pysmux.server"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if proc.returncode == 0:
        return None
    return proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "import failed"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def print_table(rows: list[Row]) -> None:
    py_tcp = next((r for r in rows if r.kind == "python-tcp"), None)
    go = {r.family: r for r in rows if r.kind in ("go", "go-tcp")}
    head = [
        "implementation",
        "bulk MB/s",
        "vs py tcp",
        "vs go",
        "ping-pong µs/rt",
        "vs py tcp",
        "vs go",
    ]
    lines = [head]
    for r in rows:
        if r.error:
            lines.append([r.label, "error", "", "", "", "", ""])
            continue
        ref = go.get(r.family) if r.kind not in ("go", "go-tcp") else None
        lines.append(
            [
                r.label,
                fmt(r.bulk_mbps, ".0f"),
                ratio(r.bulk_mbps, py_tcp.bulk_mbps if py_tcp else None),
                ratio(r.bulk_mbps, ref.bulk_mbps if ref else None),
                fmt(r.rtt_us, ".1f"),
                ratio(r.rtt_us, py_tcp.rtt_us if py_tcp else None),
                ratio(r.rtt_us, ref.rtt_us if ref else None),
            ]
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]

    def out(cells: list[str]) -> None:
        rest = zip(cells[1:], widths[1:], strict=True)
        padded = [cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        print("| " + " | ".join(padded) + " |")

    out(lines[0])
    rules = ["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]
    print("|" + "|".join(rules) + "|")
    for line in lines[1:]:
        out(line)
    print()
    print("Bulk: higher is better, ratio > 1 means faster. Ping-pong: lower is better,")
    print("ratio > 1 means slower. 'vs go' compares with Go smux of the same version")
    print("(python tcp with go tcp).")
    for r in rows:
        if r.error:
            print(f"error in {r.label}: {r.error}")


def orchestrate(args: argparse.Namespace) -> int:
    bulk_bytes = int(args.bulk_mib * (1 << 20))
    print(
        f"pysmux benchmark: bulk {args.bulk_mib:g} MiB, {args.pings} ping-pongs of 16 B, "
        f"best of {args.repeat}, CPU pinning: {args.pin}"
    )
    print(
        f"python {platform.python_version()} ({platform.python_implementation()}), "
        f"{platform.system()} {platform.release()} {platform.machine()}, {os.cpu_count()} CPUs"
    )
    print("client and server are separate processes (subprocess), talking over loopback TCP")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="pysmux-bench-") as workdir:

        def prof(name: str, role: str) -> str | None:
            if not args.profile:
                return None
            os.makedirs(args.profile, exist_ok=True)
            return os.path.join(args.profile, f"{name}-{role}.pstats")

        def py(role: str, impl: str, v: int, name: str | None = None) -> list[str]:
            return python_cmd(role, impl, v, prof(name, role) if name else None)

        def gocmd(role: str, mode: str, v: int) -> list[str]:
            assert gobin is not None
            return go_cmd(gobin, role, mode, v)

        rows.append(
            Row("python tcp", py("server", "tcp", 1), py("client", "tcp", 1), "tcp", "python-tcp")
        )
        why_not = pysmux_available()
        if why_not:
            print(f"pysmux skipped: {why_not}")
        else:
            for v in (1, 2):
                server, client = (
                    py("server", "pysmux", v, f"pysmux-v{v}"),
                    py("client", "pysmux", v, f"pysmux-v{v}"),
                )
                rows.append(Row(f"pysmux v{v}", server, client, f"v{v}", "pysmux"))
            for v in (1, 2) if args.gevent else ():
                name = f"pysmux-gevent-v{v}"
                server, client = (
                    py("server", "pysmux-gevent", v, name),
                    py("client", "pysmux-gevent", v, name),
                )
                rows.append(Row(f"pysmux v{v} gevent", server, client, f"v{v}", "pysmux"))
        gobin = None
        if args.no_go:
            print("Go skipped: --no-go")
        else:
            gobin, note = build_go(workdir)
            print(note)
        if gobin:
            rows.append(
                Row("go tcp", gocmd("server", "tcp", 1), gocmd("client", "tcp", 1), "tcp", "go-tcp")
            )
            for v in (1, 2):
                rows.append(
                    Row(
                        f"go smux v{v}",
                        gocmd("server", "smux", v),
                        gocmd("client", "smux", v),
                        f"v{v}",
                        "go",
                    )
                )
            for v in (1, 2) if args.interop and not why_not else ():
                pyc, gos = py("client", "pysmux", v), gocmd("server", "smux", v)
                rows.append(Row(f"pysmux client -> go server v{v}", gos, pyc, f"v{v}", "interop"))
                goc, pys = gocmd("client", "smux", v), py("server", "pysmux", v)
                rows.append(Row(f"go client -> pysmux server v{v}", pys, goc, f"v{v}", "interop"))
        if args.only:
            rows = [r for r in rows if any(s in r.label for s in args.only)]
        print()
        for round_ in range(1, args.repeat + 1):  # rounds, so that noise hits every row alike
            for r in rows:
                if not r.error:
                    print(f"round {round_}: {r.label} ...", file=sys.stderr, flush=True)
                    run_row(r, bulk_bytes, args.pings, args.timeout, args.pin)
    print()
    print_table(rows)
    if args.profile:
        print_profiles(args.profile, args.profile_top)
    return 1 if any(r.error for r in rows) else 0


def print_profiles(directory: str, top: int) -> None:
    for path in sorted(Path(directory).glob("*.pstats")):
        print(f"\n=== {path.name}: top {top} by own time ===")
        pstats.Stats(str(path)).strip_dirs().sort_stats("tottime").print_stats(top)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--bulk-mib", type=float, default=256, help="bulk size in MiB (default 256)")
    p.add_argument("--pings", type=int, default=20_000, help="round trips (default 20000)")
    p.add_argument("--repeat", type=int, default=3, help="runs per test, best is kept (default 3)")
    p.add_argument("--quick", action="store_true", help="16 MiB, 2000 pings, 1 run: a smoke test")
    p.add_argument("--no-go", action="store_true", help="skip the Go rows")
    p.add_argument("--interop", action="store_true", help="add pysmux <-> Go smux rows")
    p.add_argument("--gevent", action="store_true", help="add pysmux rows on the gevent runtime")
    p.add_argument("--only", nargs="+", metavar="TEXT", help="run rows whose label contains TEXT")
    p.add_argument("--timeout", type=float, default=600, help="seconds per row before giving up")
    p.add_argument(
        "--pin",
        choices=["none", "same", "split"],
        default="none",
        help="CPU affinity: both ends on one CPU (same), on two (split), or free (default)",
    )
    p.add_argument("--profile", metavar="DIR", help="cProfile pysmux ends into DIR")
    p.add_argument("--profile-top", type=int, default=25, help="functions to print per profile")
    # internal: the child processes
    p.add_argument("--role", choices=["server", "client"], help=argparse.SUPPRESS)
    impls = ["tcp", "pysmux", "pysmux-gevent"]
    p.add_argument("--impl", choices=impls, default="tcp", help=argparse.SUPPRESS)
    p.add_argument("--smuxver", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--addr", help=argparse.SUPPRESS)
    p.add_argument("--bulk", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--profile-out", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.impl == "pysmux-gevent":  # before any socket or thread exists
        from gevent import monkey

        monkey.patch_all()
    if args.role == "server":
        # serve until the orchestrator's SIGTERM; exit through `finally` to save a profile
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        profiled(args.profile_out, lambda: run_server(args.impl, args.smuxver))
        return 0
    if args.role == "client":
        profiled(
            args.profile_out,
            lambda: run_client(
                args.impl, args.smuxver, args.addr, args.bulk, args.pings, args.repeat
            ),
        )
        return 0
    if args.quick:
        args.bulk_mib, args.pings, args.repeat = 16, 2000, 1
    return orchestrate(args)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # bench this checkout's pysmux
    sys.exit(main())
