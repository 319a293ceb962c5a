"""Helpers of the end-to-end tests: the shared test pattern, peer processes, tasks.

Tasks are threads or greenlets, conditions and pipe reads are threading or
gevent ones, after the runtime of the running test (``tests/runtimes.py``).

Nothing here sleeps to synchronise: every wait is on a condition (a line a peer
printed, a task ending, a blocking call returning) with a deadline. Only
``wait_until`` polls, for a counter that offers no blocking wait.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pysmux
from tests.runtimes import Worker, current

HERE = Path(__file__).resolve().parent
REPO = HERE.parent

MiB = 1 << 20

#: Period of the test pattern, shared with gopeer/main.go: a prime, so that a
#: reordered, lost or duplicated frame never lines up with the pattern.
PATTERN_BLOCK = 65521
_CHUNK = MiB

# ---------------------------------------------------------------------------
# the test pattern (same bytes as gopeer's pattern())


@functools.cache
def _block(seed: int) -> bytes:
    out = bytearray()
    i = 0
    while len(out) < PATTERN_BLOCK:
        out += hashlib.sha256(f"{seed}:{i}".encode()).digest()
        i += 1
    return bytes(out[:PATTERN_BLOCK])


@functools.cache
def _repeated(seed: int) -> memoryview:
    # A buffer from which any chunk of up to _CHUNK bytes at any offset is one slice.
    return memoryview(_block(seed) * (_CHUNK // PATTERN_BLOCK + 2))


def iter_pattern(seed: int, n: int, chunk: int = _CHUNK) -> Iterator[memoryview]:
    """The first ``n`` bytes of the pattern of ``seed``, as zero-copy chunks."""
    big = _repeated(seed)
    chunk = min(chunk, _CHUNK)
    off = 0
    while off < n:
        k = min(chunk, n - off)
        pos = off % PATTERN_BLOCK
        yield big[pos : pos + k]
        off += k


def pattern(seed: int, n: int) -> bytes:
    """The first ``n`` bytes of the pattern of ``seed``."""
    return b"".join(iter_pattern(seed, n))


@functools.cache
def pattern_sha256(seed: int, n: int) -> str:
    h = hashlib.sha256()
    for part in iter_pattern(seed, n):
        h.update(part)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# stream I/O


def send_pattern(st: pysmux.Stream, seed: int, n: int, chunk: int = _CHUNK) -> None:
    for part in iter_pattern(seed, n, chunk):
        st.sendall(part)


def recv_exactly(st: pysmux.Stream, n: int) -> bytes:
    """Read exactly ``n`` bytes; an early EOF is a test failure."""
    buf = bytearray()
    while len(buf) < n:
        data = st.recv(min(n - len(buf), 1 << 20))
        assert data, f"stream {st.id}: EOF after {len(buf)} of {n} bytes"
        buf += data
    return bytes(buf)


def recv_to_eof(st: pysmux.Stream, limit: int = 1 << 31) -> tuple[int, str]:
    """Read until EOF; return the byte count and SHA-256. More than ``limit`` bytes fails."""
    h = hashlib.sha256()
    total = 0
    while True:
        data = st.recv(1 << 20)
        if not data:
            return total, h.hexdigest()
        total += len(data)
        assert total <= limit, f"stream {st.id}: more than {limit} bytes before EOF"
        h.update(data)


def recv_until_error(conn: Any, limit: int = 1 << 34) -> tuple[int, BaseException]:
    """Read a stream or socket until recv raises; a clean EOF (b"") is a test failure.
    Returns (bytes read, the error)."""
    what = f"stream {conn.id}" if isinstance(conn, pysmux.Stream) else "connection"
    total = 0
    while True:
        try:
            data = conn.recv(1 << 20)
        except OSError as exc:
            return total, exc
        assert data, f"{what}: clean EOF after {total} bytes, expected a reset"
        total += len(data)
        assert total <= limit, f"{what}: more than {limit} bytes and no error"


def echo_roundtrip(st: pysmux.Stream, seed: int, n: int, tasks: TaskGroup) -> str:
    """Send ``n`` pattern bytes from a helper task while reading ``n`` bytes back here.

    Reading while writing matters: with v1's shared budget a writer that does
    not read can stall the whole session. Returns the SHA-256 of what came back.
    """
    writer = tasks.spawn(send_pattern, st, seed, n, name=f"send-{st.id}")
    h = hashlib.sha256()
    got = 0
    while got < n:
        data = st.recv(min(n - got, 1 << 20))
        assert data, f"stream {st.id}: EOF after {got} of {n} echoed bytes"
        h.update(data)
        got += len(data)
    writer.result(timeout=60)
    return h.hexdigest()


class Progress:
    """Readers that report how far they got, so a test can wait for data in flight."""

    def __init__(self) -> None:
        self.cond = current().Condition()
        self.counts: dict[int, int] = {}

    def read_until_error(self, st: pysmux.Stream) -> tuple[int, BaseException]:
        """Check the first MiB against the pattern, report it, then read until an error."""
        st.settimeout(20)
        assert recv_exactly(st, MiB) == pattern(st.id, MiB)
        self._report(st.id, MiB)
        total, exc = recv_until_error(st, limit=1 << 40)
        return MiB + total, exc

    def _report(self, sid: int, count: int) -> None:
        with self.cond:
            self.counts[sid] = count
            self.cond.notify_all()

    def wait_all(self, streams: list[pysmux.Stream], at_least: int, timeout: float = 20) -> None:
        """Block until every stream reported ``at_least`` bytes."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: all(self.counts.get(st.id, 0) >= at_least for st in streams), timeout
            )
        assert ok, f"streams stalled: {self.counts}"


def read_while_killing(
    sess: pysmux.Session,
    peer: PeerProcess,
    get_stream: Callable[[], pysmux.Stream],
    nstreams: int,
) -> list[tuple[pysmux.Stream, BaseException]]:
    """Read ``nstreams`` streams (from ``get_stream``) until they fail, killing ``peer``
    once every one of them has delivered its first MiB; return how each read ended.

    Each stream is read from the moment it exists: in v1 one unread stream fills
    the shared session budget and stalls the others (docs/design.md 7.1), and an unread
    stream could even hold back the SYN of the next one.
    """
    progress = Progress()
    streams: list[pysmux.Stream] = []
    readers: list[Task] = []
    with TaskGroup(sess.close, peer.kill) as tasks:
        for _ in range(nstreams):
            st = get_stream()
            streams.append(st)
            readers.append(tasks.spawn(progress.read_until_error, st))
        progress.wait_all(streams, MiB)  # the transfer is under way on every stream
        peer.kill()
    return [(st, r.result(0)[1]) for st, r in zip(streams, readers, strict=True)]


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.01) -> None:
    """Poll ``pred`` until it holds, for state that has no blocking wait (a counter)."""
    deadline = time.monotonic() + timeout
    harness = current()
    while not pred():
        assert time.monotonic() < deadline, f"condition not met in {timeout}s"
        harness.sleep(interval)


# ---------------------------------------------------------------------------
# tasks (threads or greenlets)


class Task:
    """A task whose result or exception is handed to whoever joins it."""

    worker: Worker

    def __init__(
        self, fn: Callable[..., Any], args: tuple[Any, ...], name: str, group: TaskGroup
    ) -> None:
        self._fn, self._args, self._group = fn, args, group
        self.name = name
        self._value: Any = None
        self.error: BaseException | None = None
        self.done = False

    def _run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as exc:
            self.error = exc
        finally:
            with self._group.cond:
                self.done = True
                self._group.cond.notify_all()

    def result(self, timeout: float) -> Any:
        self.worker.join(timeout)
        assert not self.worker.is_alive(), f"task {self.name} still running after {timeout}s"
        if self.error is not None:
            raise self.error
        return self._value


class TaskGroup:
    """Tasks (threads or greenlets) that are all joined when the ``with`` block ends.

    Leaving the block joins every task and raises the first error one of
    them raised. If the block fails, a task fails, or a task outlives
    ``join_timeout``, the ``on_error`` callables run first (closing sessions,
    killing peers) so that tasks blocked in I/O wake up and can be joined.
    """

    def __init__(self, *on_error: Callable[[], object], join_timeout: float = 60.0) -> None:
        self.harness = current()
        self.tasks: list[Task] = []
        self.on_error = list(on_error)
        self.join_timeout = join_timeout
        self.cond = self.harness.Condition()

    def spawn(self, fn: Callable[..., Any], *args: Any, name: str = "e2e-task") -> Task:
        task = Task(fn, args, name, self)
        with self.cond:
            self.tasks.append(task)
        task.worker = self.harness.spawn(task._run, name=name)
        return task

    def results(self, timeout: float | None = None) -> list[Any]:
        """Wait until every task ended, or one failed; return the results or raise that error."""
        deadline = time.monotonic() + (self.join_timeout if timeout is None else timeout)
        with self.cond:
            while True:
                failed = [t for t in self.tasks if t.error is not None]
                running = [t for t in self.tasks if not t.done]
                left = deadline - time.monotonic()
                if failed or not running or left <= 0:
                    break
                self.cond.wait(left)
        if failed:
            raise failed[0].error  # type: ignore[misc]
        return [t.result(max(0.0, deadline - time.monotonic())) for t in self.tasks]

    def __enter__(self) -> TaskGroup:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            try:
                self.results()
            except BaseException:
                self._abort()
                raise
        else:
            self._abort()

    def _abort(self) -> None:
        if any(t.worker.is_alive() for t in self.tasks):
            for fn in self.on_error:
                with contextlib.suppress(Exception):
                    fn()
        deadline = time.monotonic() + 10
        for t in self.tasks:
            t.worker.join(max(0.0, deadline - time.monotonic()))


# ---------------------------------------------------------------------------
# peer processes (gopeer and pypeer.py print one JSON object per stdout line)


class PeerProcess:
    """A peer in a child process, read through the JSON lines it prints.

    The child exits when its stdin reaches EOF, so ``stop()`` closes stdin
    first and kills only if that does not work. Every pipe is closed, every
    reader task joined and the child reaped in ``stop()``.

    The pipes are read by tasks of the test's runtime, so on gevent waiting
    for a peer's line lets the sessions run. The child's exit is awaited as
    the end of its stdout first (cooperative), and only then reaped, so
    ``Popen.wait`` never holds the gevent hub for long.
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        self.argv = argv
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        self._harness = harness = current()
        self._cond = harness.Condition()
        self._events: list[dict[str, Any]] = []
        self._stderr: list[str] = []
        self._eof = False
        self._stopped = False
        self._readers = [
            harness.spawn(self._read_stdout, name="peer-stdout"),
            harness.spawn(self._read_stderr, name="peer-stderr"),
        ]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _lines(self, pipe: Any) -> Iterator[bytes]:
        fd = pipe.fileno()
        buf = b""
        while True:
            chunk = self._harness.read_fd(fd, 65536)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            yield from lines
        if buf:
            yield buf

    def _read_stdout(self) -> None:
        try:
            for raw in self._lines(self.proc.stdout):
                line = raw.decode(errors="replace").strip()
                try:
                    event = json.loads(line)
                except ValueError:
                    event = {"event": "garbage", "line": line}
                with self._cond:
                    self._events.append(event)
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._eof = True
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        for raw in self._lines(self.proc.stderr):
            with self._cond:
                self._stderr.append(raw.decode(errors="replace").rstrip())

    def describe(self) -> str:
        with self._cond:
            events = "\n  ".join(json.dumps(e) for e in self._events[-20:])
            err = "\n  ".join(self._stderr[-20:])
        return (
            f"peer {' '.join(self.argv)} (rc={self.proc.poll()})\n"
            f" last stdout events:\n  {events}\n stderr:\n  {err}"
        )

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        with self._cond:
            return [e for e in self._events if name is None or e["event"] == name]

    def wait_for(
        self,
        name: str,
        count: int = 1,
        timeout: float = 20.0,
        where: Callable[[dict[str, Any]], bool] = lambda e: True,
    ) -> list[dict[str, Any]]:
        """Block until ``count`` events called ``name`` (and matching ``where``) were printed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [e for e in self._events if e["event"] == name and where(e)]
                if len(found) >= count:
                    return found
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "exited" if self._eof else f"no {count} {name!r} events in {timeout}s"
                    raise AssertionError(f"{why}: got {len(found)}\n{self.describe()}")
                self._cond.wait(left)

    def _reap(self, timeout: float) -> int | None:
        """Wait (cooperatively) for the child's stdout to end, then reap it; None on timeout."""
        with self._cond:
            self._cond.wait_for(lambda: self._eof, timeout)
        try:
            return self.proc.wait(1 if self._eof else 0.01)
        except subprocess.TimeoutExpired:
            return None

    def _join_readers(self) -> None:
        for t in self._readers:
            t.result(10)

    def wait(self, timeout: float = 20.0) -> int:
        """Wait for the child to exit by itself; return its exit status."""
        rc = self._reap(timeout)
        if rc is None:
            raise AssertionError(f"peer did not exit in {timeout}s\n{self.describe()}")
        self._join_readers()
        return rc

    def command(self, line: str) -> None:
        """Write one line to the child's stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, sig)
            self._stopped = sig == signal.SIGSTOP

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.proc.poll() is None:
            self.proc.kill()
        if self._reap(10) is None:
            raise AssertionError(f"peer survived SIGKILL\n{self.describe()}")

    def stop(self) -> None:
        """Make sure the child is gone, reaped, and every pipe and task closed."""
        if self._stopped:
            self.send_signal(signal.SIGCONT)
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        if self._reap(5) is None:
            self.kill()
        self._join_readers()
        for f in (self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


def pypeer_argv(*args: str) -> list[str]:
    return [sys.executable, str(HERE / "pypeer.py"), *args]


def pypeer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def parse_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


# ---------------------------------------------------------------------------
# pysmux-side servers


class EchoHandler:
    """Accepts every stream of a pysmux session and echoes it until EOF, then closes it.

    One task accepts, one task per stream echoes (threads or greenlets). ``stop()``
    closes the session and joins them all; errors seen by the stream tasks are in
    ``errors``.
    """

    def __init__(self, sess: pysmux.Session) -> None:
        self.sess = sess
        self.tasks = TaskGroup()
        self.errors: list[BaseException] = []
        self.echoed: dict[int, int] = {}
        self._done = current().Condition()
        self._acceptor = current().spawn(self._accept_loop, name="echo-accept")

    def _accept_loop(self) -> None:
        while True:
            try:
                st = self.sess.accept_stream()
            except pysmux.SmuxError:
                return
            self.tasks.spawn(self._echo, st, name=f"echo-{st.id}")

    def _echo(self, st: pysmux.Stream) -> None:
        total = 0
        try:
            with st:
                while True:
                    data = st.recv(1 << 16)
                    if not data:
                        break
                    st.sendall(data)
                    total += len(data)
        except OSError as exc:
            with self._done:
                self.errors.append(exc)
        with self._done:
            self.echoed[st.id] = total
            self._done.notify_all()

    def wait_finished(self, count: int, timeout: float) -> None:
        """Wait until ``count`` streams have reached EOF (or failed)."""
        with self._done:
            assert self._done.wait_for(lambda: len(self.echoed) >= count, timeout), (
                f"only {len(self.echoed)} of {count} streams finished"
            )

    def stop(self) -> None:
        self.sess.close()
        self._acceptor.result(10)  # fails if the accept loop did not end after session.close()
        self.tasks.results(timeout=10)
