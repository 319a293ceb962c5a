"""``pysmux demo``: everything pysmux does, in one process, checked byte for byte.

On loopback it starts a TCP echo service, a tunnel server in front of it, a
tunnel client in front of that (two mux connections) and a JSON-RPC server,
every mux connection authenticated by a shared key made up for the run;
then it pushes a few hundred TCP connections through the tunnel (each sends
random bytes, half-closes and must get exactly those bytes back) and a few
thousand JSON-RPC calls from several tasks at once (each ``add`` must come out
right). It prints a short table and ``all N connections verified``; exit
status 0, or 1 on any mismatch or error.

::

    TCP clients -> TunnelClient ==2 mux connections==> TunnelServer -> TCP echo
    RpcClient ==1 mux connection, a stream per call in flight==> RpcServer
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import logging
import random
import secrets
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from .cli_options import Flag, add_flags, positive_int
from .config import Config
from .loadstats import LatencyHistogram, ProgressLine, format_bytes
from .rpc import RpcClient, RpcServer, register_builtins
from .runtime import Runtime, Task, get_runtime
from .tcp import Address, dial, listen
from .tunnel import SharedKey, TunnelClient, TunnelServer

__all__ = ["DESCRIPTION", "HELP", "DemoResult", "add_arguments", "run", "run_demo"]

HELP = "a self-checking tour: tunnel and JSON-RPC on loopback, with a summary table"
DESCRIPTION = (
    "Start a TCP echo service, a tunnel server and client, and a JSON-RPC server on "
    "loopback; push --connections TCP connections through the tunnel and --calls RPC calls, "
    "verify every byte and every result, and print what it measured. Exit status 1 on any "
    "mismatch."
)

#: Seconds any one connection or call may take before it counts as failed.
_TIMEOUT = 30.0


class _TcpEcho:
    """A TCP echo service: a task per connection, EOF answered with EOF."""

    def __init__(self, rt: Runtime) -> None:
        self._rt = rt
        self._listener = listen(rt, ("127.0.0.1", 0))
        host, port = self._listener.getsockname()[:2]
        self.address: Address = (host, port)
        self._lock = rt.lock()
        self._conns: list[Any] = []
        self._tasks: list[Task] = [rt.spawn(self._accept, "pysmux-demo-echo")]

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self._conns.append(conn)
                self._tasks.append(self._rt.spawn(functools.partial(self._echo, conn), "echo"))

    @staticmethod
    def _echo(conn: Any) -> None:
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)
        with self._lock:
            conns, tasks = list(self._conns), list(self._tasks)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        for task in tasks:
            task.join(10)
        for conn in conns:
            conn.close()
        self._listener.close()


class DemoResult:
    """What the demo measured; ``ok`` when every byte and result checked out."""

    def __init__(self, connections: int, calls: int) -> None:
        self.connections = connections
        self.calls = calls
        self.verified_connections = 0
        self.verified_calls = 0
        self.bytes = 0  # through the tunnel, each way
        self.conn_seconds = 0.0
        self.call_seconds = 0.0
        self.conn_latency = LatencyHistogram()
        self.call_latency = LatencyHistogram()
        self.failures: list[str] = []

    @property
    def ok(self) -> bool:
        return (
            not self.failures
            and self.verified_connections == self.connections
            and self.verified_calls == self.calls
        )

    def table(self) -> str:
        def ms(hist: LatencyHistogram, p: float) -> str:
            return f"{hist.percentile(p) * 1e3:.1f} ms"

        conn_rate = self.bytes / self.conn_seconds if self.conn_seconds else 0.0
        call_rate = self.verified_calls / self.call_seconds if self.call_seconds else 0.0
        rows = [
            ("", "count", "bytes", "time", "throughput", "p50", "p99"),
            ("tunnel connections", str(self.verified_connections), format_bytes(self.bytes),
             f"{self.conn_seconds:.2f} s", f"{format_bytes(conn_rate)}/s",
             ms(self.conn_latency, 50), ms(self.conn_latency, 99)),
            ("RPC calls", str(self.verified_calls), "-", f"{self.call_seconds:.2f} s",
             f"{call_rate:.0f} calls/s", ms(self.call_latency, 50), ms(self.call_latency, 99)),
        ]  # fmt: skip
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        return "\n".join(
            "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in
                      enumerate(zip(row, widths, strict=True))).rstrip()
            for row in rows
        )  # fmt: skip


def _fan_out(rt: Runtime, count: int, tasks: int, job: Callable[[int], None]) -> None:
    """Run ``job(0) .. job(count - 1)`` on ``tasks`` tasks at once."""
    jobs = iter(range(count))

    def worker() -> None:
        for i in jobs:  # a shared iterator: each index is taken once
            job(i)

    running = [rt.spawn(worker, f"pysmux-demo-{k}") for k in range(min(tasks, count))]
    for task in running:
        task.join()


class _Demo:
    def __init__(self, result: DemoResult, rt: Runtime, size: int, seed: int) -> None:
        self.result = result
        self.rt = rt
        self.size = size
        self.seed = seed
        self.lock = rt.lock()

    def fail(self, what: str) -> None:
        with self.lock:
            self.result.failures.append(what)

    def connection(self, address: Address, i: int) -> None:
        rng = random.Random(self.seed * 1_000_003 + i)
        data = rng.randbytes(rng.randint(self.size // 2, self.size))
        began = time.perf_counter()
        try:
            sock = dial(self.rt, address, _TIMEOUT)
        except OSError as exc:
            self.fail(f"connection {i}: {exc}")
            return
        try:
            sock.settimeout(_TIMEOUT)
            writer = self.rt.spawn(functools.partial(_send_and_close, sock, data), "send")
            got = hashlib.sha256()
            received = 0
            while chunk := sock.recv(65536):
                got.update(chunk)
                received += len(chunk)
            writer.join(_TIMEOUT)
        except OSError as exc:
            self.fail(f"connection {i}: {exc}")
            return
        finally:
            sock.close()
        if received != len(data) or got.digest() != hashlib.sha256(data).digest():
            self.fail(f"connection {i}: {received} of {len(data)} bytes, or different ones")
            return
        with self.lock:
            self.result.verified_connections += 1
            self.result.bytes += len(data)
            self.result.conn_latency.record(time.perf_counter() - began)

    def call(self, rpc: RpcClient, i: int) -> None:
        rng = random.Random(self.seed * 7919 + i)
        a, b = rng.randint(-(10**12), 10**12), rng.randint(-(10**12), 10**12)
        began = time.perf_counter()
        try:
            total = rpc.call("add", {"a": a, "b": b} if i % 2 else [a, b], timeout=_TIMEOUT)
        except OSError as exc:
            self.fail(f"call {i}: {exc}")
            return
        if total != a + b:
            self.fail(f"call {i}: add({a}, {b}) returned {total!r}")
            return
        with self.lock:
            self.result.verified_calls += 1
            self.result.call_latency.record(time.perf_counter() - began)


def _send_and_close(sock: Any, data: bytes) -> None:
    with contextlib.suppress(OSError):  # a failure shows on the reading side
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)


def run_demo(
    *,
    connections: int = 300,
    calls: int = 3000,
    size: int = 32768,
    concurrency: int = 32,
    config: Config | None = None,
    runtime: str | Runtime | None = None,
    seed: int = 1,
    on_progress: Callable[[DemoResult], None] | None = None,
) -> DemoResult:
    """Run the demo; see the module's docstring. ``on_progress`` is called from the
    demo's tasks as work completes (keep it quick)."""
    rt = get_runtime(runtime)
    config = config or Config()
    # Both ends prove they hold it before smux starts, as a deployment would.
    key = SharedKey(secrets.token_bytes(32))
    result = DemoResult(connections, calls)
    demo = _Demo(result, rt, size, seed)
    echo = _TcpEcho(rt)
    opened: list[Any] = [echo]

    def step(job: Callable[[int], None]) -> Callable[[int], None]:
        def run_and_report(i: int) -> None:
            try:
                job(i)
            except Exception as exc:  # a bug: count it as a failure, keep the others going
                demo.fail(f"job {i}: {exc!r}")
            if on_progress is not None:
                on_progress(result)

        return run_and_report

    try:
        tserver = TunnelServer("127.0.0.1:0", echo.address, config=config, runtime=rt, key=key)
        opened.append(tserver)
        tserver.start()
        tclient = TunnelClient(
            "127.0.0.1:0", tserver.address, conn=2, config=config, runtime=rt, key=key
        )
        opened.append(tclient)
        tclient.start()
        rpc_server = register_builtins(RpcServer("127.0.0.1:0", config=config, runtime=rt, key=key))
        opened.append(rpc_server)
        rpc_server.start()
        if not tclient.wait_connected(timeout=_TIMEOUT):
            result.failures.append("the tunnel client did not connect")
            return result

        began = time.perf_counter()
        job = functools.partial(demo.connection, tclient.address)
        _fan_out(rt, connections, concurrency, step(job))
        result.conn_seconds = time.perf_counter() - began

        with RpcClient.connect(rpc_server.address, config=config, runtime=rt, key=key) as rpc:
            began = time.perf_counter()
            _fan_out(rt, calls, 16, step(functools.partial(demo.call, rpc)))
            result.call_seconds = time.perf_counter() - began
    finally:
        for service in reversed(opened):
            service.close()
    return result


_FLAGS = (
    Flag("--connections", positive_int, 300, "N", "TCP connections through the tunnel"),
    Flag("--calls", positive_int, 3000, "K", "JSON-RPC calls"),
    Flag("--size", positive_int, 32768, "BYTES",
         "largest payload of a connection; each sends between half that and that"),
    Flag("--concurrency", positive_int, 32, "C", "connections in flight at once"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, _FLAGS)


def run(args: argparse.Namespace, config: Config, security: dict[str, Any]) -> int:
    """``pysmux demo``: 0 when everything was verified, else 1."""
    line = ProgressLine()
    total = args.connections + args.calls
    # Called from many tasks: one draws, the others skip (a plain lock never blocks here).
    drawing = threading.Lock()
    drawn = [0.0]

    def show(result: DemoResult) -> None:
        now = time.monotonic()
        if now - drawn[0] < 0.05 or not drawing.acquire(blocking=False):
            return
        try:
            drawn[0] = now
            done = result.verified_connections + result.verified_calls + len(result.failures)
            line.show(
                f"{ProgressLine.bar(done / total)} connections {result.verified_connections}/"
                f"{result.connections}  RPC calls {result.verified_calls}/{result.calls}"
            )
        finally:
            drawing.release()

    runtime = "greenlets" if args.runtime == "gevent" else "threads"
    print(
        f"pysmux demo: smux v{config.version} on {runtime}, loopback, a shared key on every "
        "mux connection",
        flush=True,
    )
    began = time.perf_counter()
    logger = logging.getLogger("pysmux")
    level = logger.level
    if not args.verbose:  # the table tells the story; the services' INFO logs would bury it
        logger.setLevel(max(level, logging.WARNING))
    try:
        result = run_demo(
            connections=args.connections,
            calls=args.calls,
            size=args.size,
            concurrency=args.concurrency,
            config=config,
            runtime=args.runtime,
            on_progress=show if line.enabled else None,
        )
    finally:
        line.clear()
        logger.setLevel(level)
    print(result.table())
    took = time.perf_counter() - began
    if result.ok:
        print(
            f"all {result.connections} connections verified, all {result.calls} RPC calls "
            f"verified ({took:.1f} s)"
        )
        return 0
    for failure in result.failures[:10]:
        print(f"FAILED {failure}")
    print(
        f"{result.verified_connections} of {result.connections} connections and "
        f"{result.verified_calls} of {result.calls} RPC calls verified: MISMATCH"
    )
    return 1
