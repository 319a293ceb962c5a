"""``pysmux load``: a load generator for smux servers (echo and JSON-RPC).

::

    pysmux load -r 127.0.0.1:4000 --mode echo --conns 50 --streams 20 --duration 5 --json

``conns`` mux connections to each target, ``streams`` concurrent streams on
each, every stream doing request/response until the end (``duration`` seconds,
or ``requests`` requests in all): in ``echo`` mode it sends ``size`` bytes and
reads them back (a ``pysmux echo`` server, or a tunnel to a TCP echo service);
in ``rpc`` mode it calls ``echo`` with a ``size``-character string (a ``pysmux
rpc`` server). Every answer is checked; a wrong one, a timeout or a lost
stream counts as an error. The summary: requests, errors, requests per second,
latency p50/p99/max, bytes each way.

Servers that require a shared key or TLS are reached as the tunnel's client
reaches them (``key=``, ``tls=``, ``server_hostname=``, ``handshake_timeout=``;
the ``--key``/``--key-file``/``--tls*`` flags of ``pysmux client``): the
handshakes are done once per mux connection, before the run's clock starts.

As a library: ``LoadGenerator(targets, ...).run()`` or :func:`run_load`, which
return a :class:`LoadSummary`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import itertools
import json
import random
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from typing import Any

from .cli_options import Flag, add_flags, add_remote, positive_int, positive_seconds
from .config import Config
from .dialer import Dialer
from .errors import SessionClosedError
from .loadstats import LatencyHistogram, ProgressLine, format_bytes
from .rpc.client import RpcChannel
from .runtime import Runtime
from .session import Session
from .stream import Stream
from .tcp import Address, as_address
from .tunnel import SharedKey, format_address

__all__ = ["MODES", "LoadGenerator", "LoadSummary", "add_arguments", "run", "run_load"]

MODES = ("echo", "rpc")
#: How long a stream may take to end cleanly once the run is over.
_END_SECONDS = 2.0


class _WrongAnswer(Exception):
    """The server answered something else than what was sent."""


@dataclasses.dataclass
class LoadSummary:
    """What a load run measured. ``as_dict()`` is what ``--json`` prints."""

    mode: str
    targets: list[str]
    conns: int  # mux connections in all
    streams: int  # per mux connection
    duration_s: float
    requests: int  # answered correctly
    errors: int
    bytes_sent: int
    bytes_received: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    error_kinds: dict[str, int]
    error_examples: dict[str, str]

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["rps"] = round(self.rps, 1)
        for key in ("duration_s", "p50_ms", "p99_ms", "max_ms"):
            out[key] = round(out[key], 3)
        return out

    def text(self) -> str:
        lines = [
            f"pysmux load: {self.mode}, {self.conns} mux connection(s) x {self.streams} "
            f"stream(s) to {', '.join(self.targets)}, {self.duration_s:.1f} s",
            f"  requests  {self.requests}  ({self.rps:.0f}/s)",
            f"  errors    {self.errors}",
            f"  latency   p50 {self.p50_ms:.2f} ms  p99 {self.p99_ms:.2f} ms  "
            f"max {self.max_ms:.2f} ms",
            f"  bytes     sent {format_bytes(self.bytes_sent)}  "
            f"received {format_bytes(self.bytes_received)}",
        ]
        for kind, count in sorted(self.error_kinds.items()):
            lines.append(f"  error     {count} x {kind}: {self.error_examples[kind]}")
        return "\n".join(lines)


class _Tally:
    """One task's counts (merged at the end: no lock per request)."""

    __slots__ = ("errors", "examples", "hist", "kinds", "received", "requests", "sent")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.sent = 0
        self.received = 0
        self.hist = LatencyHistogram()
        self.kinds: dict[str, int] = {}
        self.examples: dict[str, str] = {}

    def fail(self, exc: BaseException, message: str | None = None) -> None:
        """Count ``exc`` by its type; the first of a type is kept as an example (its
        ``message``, if given, else what it says)."""
        self.errors += 1
        kind = type(exc).__name__
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.examples.setdefault(kind, (message or str(exc))[:200])


class LoadGenerator:
    """Drive request/response load at smux servers; see the module's docstring.

    ``targets`` are ``"host:port"`` strings or tuples; ``conns`` mux connections go
    to each. ``duration`` (seconds) or ``requests`` (in all) ends the run; with
    neither it runs until :meth:`stop`. ``timeout`` bounds each request.
    ``tls``, ``key``, ``server_hostname`` and ``handshake_timeout`` reach servers
    that require them, as for :class:`~pysmux.tunnel.TunnelClient`.
    """

    def __init__(
        self,
        targets: Sequence[str | Address],
        *,
        mode: str = "echo",
        conns: int = 1,
        streams: int = 1,
        duration: float | None = None,
        requests: int | None = None,
        size: int = 64,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        timeout: float = 10.0,
        connect_timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        server_hostname: str | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {', '.join(MODES)}")
        if not targets:
            raise ValueError("targets: at least one address is needed")
        for what, value in (("conns", conns), ("streams", streams), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{what}={value!r}: must be an int > 0")
        if duration is not None and not duration > 0:
            raise ValueError(f"duration={duration!r}: must be > 0")
        if requests is not None and not (isinstance(requests, int) and requests > 0):
            raise ValueError(f"requests={requests!r}: must be an int > 0")
        self.targets = [as_address(t) for t in targets]
        self.mode = mode
        self.conns = conns
        self.streams = streams
        self.duration = duration
        self.requests = requests
        self.size = size
        self.timeout = timeout
        self._dialer = Dialer(
            config=config,
            runtime=runtime,
            tls=tls,
            key=key,
            server_hostname=server_hostname,
            handshake_timeout=handshake_timeout,
            connect_timeout=connect_timeout,
        )
        self.config = self._dialer.config
        self._rt = rt = self._dialer.runtime
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._issued = itertools.count()
        self._stopped = False
        self._deadline: float | None = None
        self._running = 0
        self._tallies: list[_Tally] = []

    def stop(self) -> None:
        """End the run early: tasks finish the request they are in and stop."""
        with self._lock:
            self._stopped = True
            self._cond.notify_all()

    def progress(self) -> tuple[int, int]:
        """``(requests, errors)`` so far (read without locks: may lag a little)."""
        tallies = list(self._tallies)
        return sum(t.requests for t in tallies), sum(t.errors for t in tallies)

    def run(
        self, on_progress: Callable[[float, int, int], None] | None = None, every: float = 0.5
    ) -> LoadSummary:
        """Connect, run the load, close everything; the summary. ``on_progress(elapsed,
        requests, errors)`` is called every ``every`` seconds meanwhile."""
        rt = self._rt
        setup = _Tally()
        self._tallies.append(setup)
        sessions: list[tuple[Session, Address]] = []
        try:
            for target in self.targets:
                for _ in range(self.conns):
                    try:
                        sessions.append((self._dialer.session(target), target))
                    except OSError as exc:  # refused, or the TLS or key handshake failed
                        setup.fail(exc, f"connect {format_address(target)}: {exc}")
            began = rt.monotonic()
            if self.duration is not None:
                self._deadline = began + self.duration
            tasks = []
            for k, (session, target) in enumerate(sessions):
                for j in range(self.streams):
                    tally = _Tally()
                    self._tallies.append(tally)
                    with self._lock:
                        self._running += 1
                    seed = k * self.streams + j
                    work = functools.partial(self._work, session, target, tally, seed)
                    tasks.append(rt.spawn(work, f"pysmux-load-{k}-{j}"))
            try:
                self._wait_running(on_progress, began, every)
            except KeyboardInterrupt:  # Ctrl-C: end the requests in flight, then report
                self.stop()
                self._wait_running(None, began, every)
            elapsed = rt.monotonic() - began
            for task in tasks:
                task.join()
        finally:
            for session, _ in sessions:
                session.close()
        return self._summary(elapsed, len(sessions))

    def _wait_running(
        self, on_progress: Callable[[float, int, int], None] | None, began: float, every: float
    ) -> None:
        while True:
            with self._lock:
                if not self._running:
                    return
                self._cond.wait(every)
            if on_progress is not None:
                on_progress(self._rt.monotonic() - began, *self.progress())

    def _summary(self, elapsed: float, conns: int) -> LoadSummary:
        total = _Tally()
        for t in self._tallies:
            total.requests += t.requests
            total.errors += t.errors
            total.sent += t.sent
            total.received += t.received
            total.hist.merge(t.hist)
            for kind, n in t.kinds.items():
                total.kinds[kind] = total.kinds.get(kind, 0) + n
                total.examples.setdefault(kind, t.examples[kind])
        hist = total.hist
        return LoadSummary(
            mode=self.mode,
            targets=[format_address(t) for t in self.targets],
            conns=conns,
            streams=self.streams,
            duration_s=elapsed,
            requests=total.requests,
            errors=total.errors,
            bytes_sent=total.sent,
            bytes_received=total.received,
            p50_ms=hist.percentile(50) * 1e3,
            p99_ms=hist.percentile(99) * 1e3,
            max_ms=hist.max * 1e3,
            error_kinds=total.kinds,
            error_examples=total.examples,
        )

    # -- one task: one stream at a time, request after request ------------------------

    def _claim(self) -> bool:
        if self._stopped:
            return False
        if self._deadline is not None and self._rt.monotonic() >= self._deadline:
            return False
        return self.requests is None or next(self._issued) < self.requests

    def _work(self, session: Session, target: Address, tally: _Tally, seed: int) -> None:
        echo = self.mode == "echo"
        payload = bytearray(random.Random(seed).randbytes(self.size))
        text = payload.hex()[: self.size]
        clock = time.perf_counter
        channel: RpcChannel | None = None
        try:
            n = 0
            while self._claim():
                n += 1
                try:
                    if channel is None:
                        channel = RpcChannel(session.open_stream())
                        channel.stream.settimeout(self.timeout)
                    began = clock()
                    if echo:
                        self._echo_once(channel.stream, payload, n)
                    else:
                        self._call_once(channel, text, n)
                    tally.hist.record(clock() - began)
                    tally.requests += 1
                    if echo:
                        tally.sent += self.size
                        tally.received += self.size
                except (OSError, _WrongAnswer) as exc:
                    tally.fail(exc, Dialer.misconfigured(session, target))
                    if channel is not None:
                        self._end(channel, tally, clean=False)
                        channel = None
                    # A session that can no longer write (closed, or its transport
                    # failed while it still reads to the end) never recovers: stop, and
                    # do not spin on it (on gevent that would starve its reader).
                    if session.closed or isinstance(exc, SessionClosedError):
                        return
        finally:
            if channel is not None:
                self._end(channel, tally, clean=True)
            with self._lock:
                self._running -= 1
                self._cond.notify_all()

    def _echo_once(self, stream: Stream, payload: bytearray, n: int) -> None:
        size = len(payload)
        if size >= 8:  # every request differs: a reply to another one cannot pass
            payload[:8] = n.to_bytes(8, "little")
        stream.sendall(payload)
        got = bytearray(size)
        view = memoryview(got)
        pos = 0
        while pos < size:
            count = stream.recv_into(view[pos:], size - pos)
            if not count:
                raise _WrongAnswer(f"stream {stream.id}: EOF after {pos} of {size} bytes")
            pos += count
        if got != payload:
            raise _WrongAnswer(f"stream {stream.id}: the echo differs from what was sent")

    def _call_once(self, channel: RpcChannel, text: str, n: int) -> None:
        deadline = time.monotonic() + self.timeout
        params = [f"{n}:{text}"]
        channel.send({"jsonrpc": "2.0", "method": "echo", "params": params, "id": n}, deadline)
        result = channel.answer(n, deadline)
        if result != params:
            raise _WrongAnswer(f"stream {channel.stream.id}: echo returned {result!r:.80}")

    def _end(self, channel: RpcChannel, tally: _Tally, clean: bool) -> None:
        """Close a stream; cleanly (FIN, then the server's EOF) when the run is over."""
        tally.sent += channel.sent_bytes
        tally.received += channel.received_bytes
        stream = channel.stream
        if clean:
            with contextlib.suppress(OSError):
                stream.settimeout(_END_SECONDS)
                stream.shutdown(socket.SHUT_WR)
                while stream.recv(65536):
                    pass
        channel.close()


def run_load(targets: Sequence[str | Address], **options: Any) -> LoadSummary:
    """``LoadGenerator(targets, **options).run()``."""
    return LoadGenerator(targets, **options).run()


# -- the command ---------------------------------------------------------------------------

HELP = "drive request/response load at smux servers (pysmux echo or pysmux rpc)"
DESCRIPTION = (
    "Open --conns mux connections to each -r server and --streams concurrent streams on "
    "each; every stream does request/response (echo of --size bytes, or an `echo` JSON-RPC "
    "call) until --duration or --requests is reached. Prints requests, errors, requests "
    "per second, latency p50/p99/max and bytes each way; exit status 1 if any request failed."
)


#: The load's shape and its timeouts.
_FLAGS = (
    Flag("--conns", positive_int, 1, "N", "mux connections to each server"),
    Flag("--streams", positive_int, 1, "M", "concurrent streams on each connection"),
    Flag("--size", positive_int, 64, "BYTES",
         "request size: echo bytes, or characters of the echo call's string"),
    Flag("--timeout", positive_seconds, 10.0, "SECONDS",
         "a request not answered within this counts as an error"),
    Flag("--connect-timeout", positive_seconds, 10.0, "SECONDS", "for each mux connection"),
)  # fmt: skip
#: What ends the run: one or the other.
_END_FLAGS = (
    Flag("--duration", positive_seconds, None, "SECONDS",
         "run this long (the default, 5 s, when --requests is not given)"),
    Flag("--requests", positive_int, None, "K", "stop after K requests in all"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote(
        parser, "a server, HOST:PORT; repeat for several (each gets --conns connections)", True
    )
    parser.add_argument("--mode", choices=MODES, default="echo", help="(default: echo)")
    add_flags(parser.add_mutually_exclusive_group(), _END_FLAGS)
    add_flags(parser, _FLAGS)
    parser.add_argument(
        "--json", action="store_true", help="print the summary as one JSON object instead"
    )


def run(args: argparse.Namespace, config: Config, security: dict[str, Any]) -> int:
    """``pysmux load``: the exit status (1 when any request failed). ``security``: the
    keyword arguments of the TLS and key flags."""
    duration = args.duration if args.duration is not None or args.requests else 5.0
    generator = LoadGenerator(
        args.remote,
        mode=args.mode,
        conns=args.conns,
        streams=args.streams,
        duration=duration,
        requests=args.requests,
        size=args.size,
        config=config,
        runtime=args.runtime,
        timeout=args.timeout,
        connect_timeout=args.connect_timeout,
        **security,
    )
    line = ProgressLine()
    last = [0.0, 0]

    def show(elapsed: float, requests: int, errors: int) -> None:
        rate = (requests - last[1]) / max(elapsed - last[0], 1e-9)
        last[:] = [elapsed, requests]
        line.show(f"{elapsed:6.1f} s  {requests} requests  {rate:.0f}/s  {errors} errors")

    try:
        summary = generator.run(show if line.enabled else None)
    finally:
        line.clear()
    if args.json:
        print(json.dumps(summary.as_dict()), flush=True)
    else:
        print(summary.text(), flush=True)
    return 1 if summary.errors else 0
