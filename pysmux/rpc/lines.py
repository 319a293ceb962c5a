"""Newline-delimited lines from a stream, with bounds on size and time.

A :class:`LineReader` never holds more than ``max_line + 1`` bytes of a
stream: it asks the stream for no more than what could still complete a line
within the bound. A line longer than ``max_line`` raises :class:`LineTooLong`
(a peer that never sends a newline cannot grow it), a line not finished within
``line_timeout`` of its first byte raises ``TimeoutError`` (a peer that sends
half a line and goes silent, or drips), as does a stream silent for
``idle_timeout`` between lines. An optional :class:`ByteBudget` bounds what all
the readers sharing it hold at once.
"""

from __future__ import annotations

import time
from typing import Any

from ..runtime import Runtime
from .errors import SERVER_BUSY, RpcProtocolError

__all__ = ["ByteBudget", "LineReader", "LineTooLong", "OverBudget"]

#: Largest single read from the stream.
_CHUNK = 16384


class LineTooLong(RpcProtocolError):
    """A line passed the reader's ``max_line`` bytes without a newline."""


class OverBudget(RpcProtocolError):
    """Readers sharing a :class:`ByteBudget` hold all it allows."""

    code = SERVER_BUSY


class ByteBudget:
    """Bytes that several line readers may hold at once, altogether."""

    def __init__(self, limit: int, runtime: Runtime) -> None:
        if not (isinstance(limit, int) and limit > 0):
            raise ValueError(f"limit={limit!r}: must be an int > 0")
        self.limit = limit
        self.held = 0
        self._lock = runtime.lock()

    def take(self, count: int) -> bool:
        with self._lock:
            if self.held + count > self.limit:
                return False
            self.held += count
            return True

    def give(self, count: int) -> None:
        with self._lock:
            self.held -= count


class LineReader:
    """Reads lines (without their newline) from one stream; blank lines are skipped."""

    __slots__ = ("_budget", "_buf", "_held", "_scanned", "_stream", "max_line")

    def __init__(self, stream: Any, max_line: int, budget: ByteBudget | None = None) -> None:
        if not (isinstance(max_line, int) and max_line > 0):
            raise ValueError(f"max_line={max_line!r}: must be an int > 0")
        self._stream = stream
        self.max_line = max_line
        self._budget = budget
        self._buf = bytearray()
        self._scanned = 0  # no newline in _buf[:_scanned]
        self._held = 0  # bytes taken from the budget

    @property
    def pending(self) -> int:
        """Bytes read from the stream and not yet returned as lines."""
        return len(self._buf)

    def readline(
        self,
        idle_timeout: float | None = None,
        line_timeout: float | None = None,
        deadline: float | None = None,
    ) -> bytes | None:
        """The next line; None at the stream's EOF (after a last line without newline).

        ``TimeoutError`` after ``idle_timeout`` seconds without a byte between
        lines, ``line_timeout`` seconds after a line's first byte, or at
        ``deadline`` (a ``time.monotonic()`` value), whichever comes first.
        """
        buf = self._buf
        line_deadline = None
        while True:
            newline = buf.find(b"\n", self._scanned)
            if newline >= 0:
                line = bytes(buf[:newline])
                del buf[: newline + 1]
                self._scanned = 0
                self._release()
                if line.strip():
                    return line
                line_deadline = None
                continue
            self._scanned = len(buf)
            if len(buf) > self.max_line:
                raise LineTooLong(f"a line is longer than {self.max_line} bytes")
            if buf and line_timeout is not None and line_deadline is None:
                line_deadline = time.monotonic() + line_timeout
            timeout = _remaining(line_deadline, deadline, idle_timeout)
            if timeout is not None and timeout <= 0:
                raise TimeoutError(
                    "no complete line in time"
                    if line_deadline is None
                    else f"a line was not finished within {line_timeout} s"
                )
            if not self._read(timeout):
                if not buf.strip():
                    return None
                line = bytes(buf)
                buf.clear()
                self._release()
                return line

    def lines_begun(self) -> int:
        """Lines read, in whole or in part, and not yet returned (blank ones not counted)."""
        return sum(1 for part in self._buf.split(b"\n") if part.strip())

    def fill(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for data (``TimeoutError`` then) unless some is
        buffered already; False at the stream's EOF with nothing buffered."""
        return bool(self._buf) or self._read(timeout)

    def _read(self, timeout: float | None) -> bool:
        """One read from the stream into the buffer; False at EOF."""
        self._stream.settimeout(timeout)
        # recv_into, not recv: a stream's recv returns one received frame's payload
        # at a time, so a peer sending 1-byte frames would cost a call per byte.
        scratch = bytearray(min(_CHUNK, self.max_line + 1 - len(self._buf)))
        count = self._stream.recv_into(scratch)
        if not count:
            return False
        if self._budget is not None:
            if not self._budget.take(count):
                raise OverBudget(
                    f"the server holds {self._budget.limit} bytes of unfinished requests already"
                )
            self._held += count
        self._buf += memoryview(scratch)[:count]
        return True

    def _release(self) -> None:
        if self._budget is not None and self._held > len(self._buf):
            self._budget.give(self._held - len(self._buf))
            self._held = len(self._buf)

    def close(self) -> None:
        """Give back what the budget lent; the reader reads no more."""
        self._buf.clear()
        self._release()


def _remaining(
    line_deadline: float | None, deadline: float | None, idle: float | None
) -> float | None:
    """Seconds the next read may wait: the nearest of the bounds (None: no bound)."""
    now = time.monotonic()
    bounds = [d - now for d in (line_deadline, deadline) if d is not None]
    if line_deadline is None and idle is not None:
        bounds.append(idle)
    return min(bounds) if bounds else None
