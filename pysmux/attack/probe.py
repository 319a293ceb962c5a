"""The legitimate client that watches a server while it is attacked.

A :class:`Probe` is an established client: it holds an ordinary session and
stream to the server and keeps making small requests on them (32 bytes echoed,
or a JSON-RPC ``echo`` call on a pooled stream), every ``interval`` seconds
while the attack runs, then a few more once it is over. A request that fails
or takes longer than ``timeout`` counts as a failure; a lost session or stream
is opened again for the next request. (New streams may rightly be refused
while an attack holds every slot a server has; the clients it already serves
must not notice.)
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from ..dialer import Dialer
from ..loadstats import LatencyHistogram
from ..rpc import RpcClient
from ..runtime import Task
from ..session import Session
from ..stream import Stream
from ..tcp import Address

__all__ = ["PROBES", "Probe"]

PROBES = ("echo", "rpc", "none")


class _Phase:
    __slots__ = ("failed", "first_failure", "hist", "ok")

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.first_failure = ""
        self.hist = LatencyHistogram()

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "failed": self.failed,
            "p50_ms": round(self.hist.percentile(50) * 1e3, 2),
            "max_ms": round(self.hist.max * 1e3, 2),
            "first_failure": self.first_failure,
        }


class Probe:
    """Small legitimate requests to ``address``: ``mode`` ``echo`` (any server that
    echoes streams: ``pysmux echo``, a tunnel to an echo service) or ``rpc``
    (``pysmux rpc``); ``none`` makes no request. ``dialer`` makes its sessions."""

    def __init__(
        self,
        dialer: Dialer,
        address: Address,
        mode: str,
        interval: float = 0.05,
        timeout: float = 5.0,
    ) -> None:
        if mode not in PROBES:
            raise ValueError(f"probe={mode!r}: expected one of {', '.join(PROBES)}")
        self._dialer = dialer
        self._rt = rt = dialer.runtime
        self._address = address
        self.mode = mode
        self._interval = interval
        self._timeout = timeout
        self._session: Session | None = None
        self._stream: Stream | None = None  # echo: one stream, as an established client
        self._rpc: RpcClient | None = None
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._running = False
        self._task: Task | None = None
        self._count = 0
        self.before = _Phase()
        self.during = _Phase()
        self.after = _Phase()

    def start(self) -> None:
        """Probe every ``interval`` seconds in a task of its own (the ``during``
        phase), until :meth:`stop`."""
        if self.mode == "none":
            return
        self._running = True
        self._task = self._rt.spawn(self._loop, "pysmux-attack-probe")

    def stop(self) -> None:
        with self._lock:
            self._running = False
            self._cond.notify_all()
        if self._task is not None:
            self._task.join()

    def wait_ready(self, timeout: float) -> float:
        """Request until one succeeds (a server may still be cleaning up after the last
        attack); the seconds that took. Failures meanwhile are not counted; after
        ``timeout`` one is, in ``before``."""
        began = time.monotonic()
        if self.mode == "none":
            return 0.0
        while True:
            trial = _Phase()
            self._once(trial)
            if trial.ok or time.monotonic() - began >= timeout:
                break
            with self._lock:
                self._cond.wait(self._interval)
        if not trial.ok:
            self.before.failed += 1
            self.before.first_failure = trial.first_failure
        return time.monotonic() - began

    def burst(self, phase: _Phase, count: int) -> None:
        """``count`` requests, one after the other, counted in ``phase`` (``before`` or
        ``after`` the attack)."""
        if self.mode != "none":
            for _ in range(count):
                self._once(phase)

    def close(self) -> None:
        self.stop()
        self._drop()

    def _loop(self) -> None:
        while True:
            self._once(self.during)
            with self._lock:
                if self._running:
                    self._cond.wait(self._interval)
                if not self._running:
                    return

    def _once(self, phase: _Phase) -> None:
        self._count += 1
        began = time.perf_counter()
        try:
            self._request(self._count)
        except OSError as exc:
            phase.failed += 1
            why = (
                None
                if self._session is None
                else self._dialer.misconfigured(self._session, self._address)
            )
            phase.first_failure = phase.first_failure or why or f"{type(exc).__name__}: {exc}"
            self._drop()
            return
        took = time.perf_counter() - began
        if took > self._timeout:
            phase.failed += 1
            phase.first_failure = phase.first_failure or f"answered after {took:.1f} s"
            return
        phase.ok += 1
        phase.hist.record(took)

    def _request(self, n: int) -> None:
        if self._session is None or self._session.closed:
            self._drop()
            self._session = self._dialer.session(self._address)
            if self.mode == "rpc":
                self._rpc = RpcClient(self._session, timeout=self._timeout)
        if self._rpc is not None:
            params = [n, "probe"]
            if self._rpc.call("echo", params) != params:
                raise OSError(f"probe {n}: a wrong answer")
            return
        if self._stream is None:
            self._stream = self._session.open_stream()
            self._stream.settimeout(self._timeout)
        data = os.urandom(32)
        self._stream.sendall(data)
        got = b""
        while len(got) < len(data) and (chunk := self._stream.recv(len(data) - len(got))):
            got += chunk
        if len(got) != len(data):
            raise OSError(f"probe {n}: echo returned {len(got)} bytes, not the 32 sent")
        if got != data:
            raise OSError(f"probe {n}: echo returned 32 bytes other than those sent")

    def _drop(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if self._rpc is not None:
            self._rpc.close()
            self._rpc = None
        if self._session is not None:
            with contextlib.suppress(OSError):
                self._session.close()
            self._session = None
