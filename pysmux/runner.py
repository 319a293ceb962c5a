"""Running a tunnel service as a process: sizing, signals, draining, and its figures.

* :func:`size_process`: the open-file limit raised to the hard limit (as Go
  programs do), smaller thread stacks on the thread runtime, a garbage
  collector tuned for many long-lived objects, and the ``--max-conns`` that
  the open-file limit allows.
* SIGTERM, or a first SIGINT: stop taking work and drain (the service's
  ``drain(timeout)``), then exit 0. A second signal exits at once (status 1).
* SIGUSR1: log one line of the service's figures (:func:`pysmux.metrics.summary`).
* A :class:`StatsLog` logs that line every ``interval`` seconds.

Threads: a Python signal handler runs in the main thread between two of its
bytecodes, where it may hold any lock (``Event.wait`` holds its own for a few
bytecodes: an ``Event.set()`` there deadlocks), and only once the main thread
wakes, which it does not when the kernel hands the signal to another thread.
So the Python handlers do nothing; the C-level handler writes each signal's
number to a pipe (``signal.set_wakeup_fd``), whichever thread the kernel
chose, and a thread of our own reads it and acts, where anything may be done.
gevent (or a monkey-patched process): the handlers run in the hub
(``gevent.signal_handler``) and the waits let greenlets run.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from types import FrameType
from typing import Any

from .metrics import summary
from .runtime import Runtime, get_runtime, gevent_patched

try:
    import resource
except ImportError:  # pragma: no cover - not POSIX
    resource = None  # type: ignore[assignment]

__all__ = [
    "FD_RESERVE",
    "GC_THRESHOLD",
    "MAX_CONNS_CAP",
    "THREAD_STACK",
    "ProcessSignals",
    "StatsLog",
    "max_conns_for",
    "size_process",
]

log = logging.getLogger("pysmux.cli")

_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGUSR1}

#: Stack of each thread the command starts on the thread runtime. The OS default
#: (often 8 MiB) is address space a tunnel's shallow threads never touch; with
#: thousands of threads it can exhaust a strict overcommit limit or ``ulimit -v``.
THREAD_STACK = 512 * 1024
#: Descriptors left for what is not a carried connection (listener, mux
#: connections, logs, metrics) when ``--max-conns`` follows the open-file limit.
FD_RESERVE = 128
#: The largest default ``--max-conns``: a mux connection carries at most 65,536 streams.
MAX_CONNS_CAP = 65536
#: Allocations between two young-generation collections (Python's default: 700).
#: Every few of those, while connections accumulate, the collector walks every
#: object of every connection: at 10,000 connections that was a sixth of the
#: tunnel's CPU. Young garbage then waits a little longer to be collected.
GC_THRESHOLD = (50_000, 10, 10)


def size_process(runtime: str) -> int:
    """Make this process fit many connections; return the open-file limit it has.

    The soft open-file limit is raised to the hard limit (each carried
    connection holds a descriptor on each end), and threads started from now
    on get ``THREAD_STACK`` bytes of stack on the thread runtime.
    """
    if runtime == "thread":
        threading.stack_size(THREAD_STACK)
    gc.freeze()  # what is loaded by now lives for ever: no collection looks at it again
    gc.set_threshold(*GC_THRESHOLD)
    if resource is None:  # pragma: no cover - not POSIX
        return MAX_CONNS_CAP + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:  # an unlimited hard limit (macOS)
            log.debug("open-file limit stays at %d: %s", soft, exc)
        else:
            log.debug("open-file limit raised from %d to %d", soft, hard)
            soft = hard
    return soft


def max_conns_for(open_files: int) -> int:
    """The default ``--max-conns`` of a tunnel whose process may open ``open_files``."""
    return max(1, min(MAX_CONNS_CAP, open_files - FD_RESERVE))


class ProcessSignals:
    """Waits for SIGINT or SIGTERM; a second one ends the process at once (status 1).

    ``on_stats`` runs in a task of its own on every SIGUSR1. Make it in the main thread
    (the only one that may set signal handlers).
    """

    def __init__(self, runtime: str, on_stats: Callable[[], None]) -> None:
        self._rt: Runtime = get_runtime(runtime)
        self._count = 0
        self._on_stats = on_stats
        self._restore: list[Any] = []
        self._event: Any
        self._watcher: threading.Thread | None = None
        if runtime == "gevent" or gevent_patched():
            import gevent
            import gevent.event

            self._event = gevent.event.Event()
            for sig in _SIGNALS:
                self._restore.append(gevent.signal_handler(sig, self._fire, sig))
        else:
            self._event = threading.Event()
            self._pipe = os.pipe()
            os.set_blocking(self._pipe[1], False)
            self._wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
            for sig in _SIGNALS:
                self._restore.append((sig, signal.signal(sig, _ignore)))
            self._watcher = threading.Thread(target=self._watch, name="pysmux-signals", daemon=True)
            self._watcher.start()

    def _watch(self) -> None:
        while True:
            for signum in os.read(self._pipe[0], 64):
                if signum == 0:  # restore(): stop
                    return
                if signum in _SIGNALS:
                    self._fire(signum)

    def _fire(self, signum: int) -> None:
        if signum == signal.SIGUSR1:
            self._rt.spawn(self._on_stats, "pysmux-stats-signal")
            return
        self._count += 1
        if self._count > 1:
            os.write(2, b"pysmux: second signal, exiting at once\n")
            os._exit(1)
        log.info("%s: draining, then exiting", signal.Signals(signum).name)
        self._event.set()

    def wait(self) -> None:
        # A timeout keeps gevent's loop alive (its signal watchers do not).
        while not self._event.wait(3600):
            pass

    def restore(self) -> None:
        for item in self._restore:
            if isinstance(item, tuple):
                signal.signal(*item)
            else:
                item.cancel()
        self._restore.clear()
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            signal.set_wakeup_fd(self._wakeup)
            os.write(self._pipe[1], b"\0")
            watcher.join()
            for fd in self._pipe:
                os.close(fd)


def _ignore(signum: int, frame: FrameType | None) -> None:
    """The Python-level handler: the work is done by the thread that reads the wake-up pipe."""


def log_stats(stats: Callable[[], Mapping[str, int]]) -> None:
    """Log ``stats()`` as one line at INFO."""
    log.info("stats: %s", summary(stats()))


class StatsLog:
    """Logs ``stats()`` every ``interval`` seconds in a task of ``runtime`` until closed."""

    def __init__(
        self, stats: Callable[[], Mapping[str, int]], interval: float, runtime: str
    ) -> None:
        self._rt = rt = get_runtime(runtime)
        self._stats = stats
        self._interval = interval
        self._lock = rt.lock()
        self._cond = rt.condition(self._lock)
        self._closed = False
        self._task = rt.spawn(self._run, "pysmux-stats-log")

    def _run(self) -> None:
        rt = self._rt
        with self._lock:
            due = rt.monotonic() + self._interval
            while not self._closed:
                remaining = due - rt.monotonic()
                if remaining > 0:
                    self._cond.wait(remaining)
                    continue
                due = rt.monotonic() + self._interval
                self._lock.release()
                try:
                    log_stats(self._stats)
                finally:
                    self._lock.acquire()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._cond.notify_all()
        self._task.join(10)
