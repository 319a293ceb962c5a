"""Measuring for the load, demo and attack commands: latency percentiles in bounded
memory, and a progress line on a terminal."""

from __future__ import annotations

import math
import sys
from typing import TextIO

__all__ = ["LatencyHistogram", "ProgressLine", "format_bytes"]

#: Bucket width, relative: a percentile is reported within 1 %.
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)


class LatencyHistogram:
    """Latencies in buckets 1 % wide from one microsecond up: any number of samples in a
    few kilobytes. Not thread-safe: one per task, then :meth:`merge`."""

    __slots__ = ("_buckets", "count", "max", "total")

    def __init__(self) -> None:
        self._buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def record(self, seconds: float) -> None:
        micros = seconds * 1e6
        index = 0 if micros <= 1.0 else int(math.log(micros) / _LOG_GROWTH) + 1
        self._buckets[index] = self._buckets.get(index, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds

    def merge(self, other: LatencyHistogram) -> None:
        for index, n in other._buckets.items():
            self._buckets[index] = self._buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)

    def percentile(self, percent: float) -> float:
        """Seconds within which ``percent`` % of the samples fell (0.0 when empty)."""
        if not self.count:
            return 0.0
        rank = max(1, math.ceil(self.count * percent / 100.0))
        seen = 0
        for index in sorted(self._buckets):
            seen += self._buckets[index]
            if seen >= rank:
                upper = 1e-6 * _GROWTH**index  # the bucket's upper edge
                return min(upper, self.max)
        return self.max  # pragma: no cover - the counts add up to count

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0


def format_bytes(count: float) -> str:
    """``1.5 MB``: decimal units, as network rates are usually written."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(count) < 1000 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1000
    return f"{count:.1f} GB"  # pragma: no cover - the loop returns


class ProgressLine:
    """One line on a terminal, rewritten in place; silent when ``stream`` is not a TTY
    (so pipes and logs get only the final output)."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = sys.stderr if stream is None else stream
        isatty = getattr(self._stream, "isatty", None)
        self.enabled = bool(isatty and isatty())
        self._shown = False

    def show(self, text: str) -> None:
        if self.enabled:
            self._stream.write(f"\r\x1b[K{text}")
            self._stream.flush()
            self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._stream.write("\r\x1b[K")
            self._stream.flush()
            self._shown = False

    @staticmethod
    def bar(fraction: float, width: int = 30) -> str:
        """``[#####.....]`` for a fraction in 0..1."""
        filled = round(max(0.0, min(1.0, fraction)) * width)
        return "[" + "#" * filled + "." * (width - filled) + "]"
