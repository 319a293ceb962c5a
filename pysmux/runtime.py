"""The only module that knows whether pysmux runs on threads or on gevent.

A session asks its runtime object for every lock, condition, task and clock it
uses, so the rest of the library is the same code on both.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Protocol

__all__ = ["Runtime", "Task", "ThreadRuntime", "get_runtime"]


class Task(Protocol):
    """A running background task (a thread or a greenlet)."""

    def join(self, timeout: float | None = None) -> None: ...

    def is_alive(self) -> bool: ...


class Lock(Protocol):
    def acquire(self, blocking: bool = ..., timeout: float = ...) -> bool: ...

    def release(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class Condition(Protocol):
    def wait(self, timeout: float | None = None) -> bool: ...

    def notify(self, n: int = 1) -> None: ...

    def notify_all(self) -> None: ...

    def __enter__(self) -> bool: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
        /,
    ) -> None: ...


class Runtime(Protocol):
    """What a session needs from its concurrency model."""

    name: str

    def lock(self) -> Lock: ...

    def condition(self, lock: Lock) -> Condition: ...

    def spawn(self, target: Callable[[], None], name: str) -> Task: ...

    def current_task_is(self, task: Task) -> bool: ...

    def monotonic(self) -> float: ...

    def check_transport(self, sock: object) -> None: ...


class ThreadRuntime:
    """Plain OS threads (the default)."""

    name = "thread"

    def lock(self) -> Lock:
        return threading.Lock()

    def condition(self, lock: Lock) -> Condition:
        return threading.Condition(lock)  # type: ignore[arg-type]

    def spawn(self, target: Callable[[], None], name: str) -> Task:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        return thread

    def current_task_is(self, task: Task) -> bool:
        return threading.current_thread() is task

    monotonic = staticmethod(time.monotonic)

    def check_transport(self, sock: object) -> None:
        """Any blocking socket works on threads."""


_THREAD = ThreadRuntime()


def get_runtime(runtime: str | Runtime | None) -> Runtime:
    """Resolve the ``runtime=`` argument of ``pysmux.client``/``pysmux.server``."""
    if runtime is None or runtime == "thread":
        return _THREAD
    if isinstance(runtime, str):
        raise ValueError(f"runtime={runtime!r}: expected 'thread' or 'gevent'")
    return runtime
