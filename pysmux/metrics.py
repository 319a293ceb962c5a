"""The tunnel's figures for people and for Prometheus.

:func:`render` turns a ``stats()`` dict (``Session.stats()``, or a tunnel's
``stats()``) into the Prometheus text exposition format (version 0.0.4):
every name prefixed ``pysmux_``, counters suffixed ``_total``, a ``role``
label, ``# HELP`` and ``# TYPE`` lines. :func:`summary` is the same figures
as one log line. :class:`MetricsServer` serves :func:`render` over HTTP at
``GET /metrics`` with the stdlib's request handler, on sockets and tasks of
the tunnel's runtime (threads, or greenlets), so it never blocks a gevent
hub.
"""

from __future__ import annotations

import functools
import http.server
import logging
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

from .runtime import Runtime
from .tunnel.net import Address, format_address, reset_and_close, shutdown_quietly
from .tunnel.service import Service

__all__ = ["METRICS", "Metric", "MetricsServer", "render", "summary"]

log = logging.getLogger("pysmux.metrics")

#: How long a scrape may take to send its request and read the answer.
_SCRAPE_TIMEOUT = 10.0


class Metric(NamedTuple):
    """One exported figure: the ``stats()`` key, and how Prometheus sees it."""

    key: str
    kind: str  # "counter" or "gauge"
    help: str

    @property
    def name(self) -> str:
        return f"pysmux_{self.key}_total" if self.kind == "counter" else f"pysmux_{self.key}"


#: Every figure a tunnel exports, in the order they are shown.
METRICS = (
    Metric("sessions", "gauge", "Mux connections (smux sessions) open now."),
    Metric("sessions_opened", "counter", "Mux connections opened or accepted."),
    Metric("connections", "gauge", "TCP connections carried now."),
    Metric("connections_carried", "counter", "TCP connections carried, each as one stream."),
    Metric(
        "connections_refused",
        "counter",
        "Connections or streams refused (max_conns reached, or draining).",
    ),
    Metric(
        "connections_not_allowed",
        "counter",
        "Connections closed at accept: their address is not in --allow.",
    ),
    Metric(
        "handshake_failures",
        "counter",
        "Mux connections refused: they failed TLS or the key handshake.",
    ),
    Metric("target_connect_failures", "counter", "Streams whose target could not be reached."),
    Metric("reconnects", "counter", "Mux connections dialled again after one was lost."),
    Metric("dial_failures", "counter", "Failed attempts to dial the server."),
    Metric("expired", "counter", "Mux connections retired by autoexpire."),
    Metric("streams", "gauge", "Streams open now."),
    Metric("streams_opened", "counter", "Streams opened by this end."),
    Metric("streams_accepted", "counter", "Streams opened by the peer and accepted."),
    Metric("streams_refused", "counter", "Streams the peer opened past a session limit."),
    Metric("frames_sent", "counter", "smux frames written."),
    Metric("frames_received", "counter", "smux frames read."),
    Metric("bytes_sent", "counter", "Bytes written to mux connections, frame headers included."),
    Metric("bytes_received", "counter", "Bytes read from mux connections, frame headers included."),
    Metric("dropped_frames", "counter", "Data frames dropped: for closed or unknown streams."),
    Metric("protocol_errors", "counter", "Mux connections ended by a protocol violation."),
    Metric("buffered_bytes", "gauge", "Bytes received and not yet read by a stream."),
    Metric("draining", "gauge", "1 while draining before exit, else 0."),
)


def render(stats: Mapping[str, int], role: str) -> str:
    """``stats`` in the Prometheus text format; keys it does not have are left out."""
    label = role.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    lines: list[str] = []
    for metric in METRICS:
        if metric.key not in stats:
            continue
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        lines.append(f'{metric.name}{{role="{label}"}} {int(stats[metric.key])}')
    return "\n".join(lines) + "\n"


def summary(stats: Mapping[str, int]) -> str:
    """``stats`` as one log line: ``key=value`` pairs in the order of ``METRICS``."""
    return " ".join(f"{m.key}={stats[m.key]}" for m in METRICS if m.key in stats)


class _Handler(http.server.BaseHTTPRequestHandler):
    """``GET /metrics``; anything else 404 (or 405)."""

    server_version = "pysmux-metrics"
    metrics: Callable[[], str]

    def do_GET(self) -> None:
        if self.path.split("?", 1)[0] != "/metrics":
            self.send_error(404, "only /metrics is here")
            return
        body = self.metrics().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:
        self.send_error(405, "use GET")

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s: %s", self.address_string(), format % args)


class MetricsServer(Service):
    """Serves ``render(source(), role)`` at ``http://LISTEN/metrics`` until closed.

    ``listen`` is ``"host:port"`` (``":port"`` is 127.0.0.1) or a tuple;
    ``source`` is typically a tunnel's ``stats``. At most ``max_conns``
    scrapes are served at once; each gets ``_SCRAPE_TIMEOUT`` seconds.
    """

    _default_host = "127.0.0.1"

    def __init__(
        self,
        listen: str | Address,
        source: Callable[[], Mapping[str, int]],
        role: str,
        *,
        runtime: str | Runtime | None = None,
        max_conns: int = 16,
    ) -> None:
        super().__init__(listen, config=None, runtime=runtime, max_conns=max_conns, backlog=16)

        def metrics() -> str:
            return render(source(), role)

        self._handler = type("Handler", (_Handler,), {"metrics": staticmethod(metrics)})

    def _accepted(self, sock: Any, peer: Any) -> None:
        if not self._reserve_conn():
            reset_and_close(sock)
            return
        if not self._spawn(functools.partial(self._scrape, sock, peer), "pysmux-metrics"):
            self._release_conn()
            reset_and_close(sock)

    def _scrape(self, sock: Any, peer: Any) -> None:
        token = self._track(functools.partial(shutdown_quietly, sock))
        try:
            if token is None:
                return
            sock.settimeout(_SCRAPE_TIMEOUT)
            try:
                self._handler(sock, peer, self)
            except OSError as exc:
                log.debug("scrape from %s: %s", format_address(peer), exc)
        finally:
            if token is not None:
                self._untrack(token)
            sock.close()
            self._release_conn()
