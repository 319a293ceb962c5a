"""Starting a task once a socket is readable: the runtimes' :class:`~pysmux.runtime.Launcher`.

Part of the runtime layer (:mod:`pysmux.runtime` hands these out from
``launcher()``); nothing else in the library knows which one runs:

* :class:`EpollLauncher` (threads): one epoll thread watches every socket and
  starts a thread for each that turns readable;
* :class:`WaitingLauncher` (threads without epoll, or monkey-patched): a task
  per socket that waits for it;
* :class:`GeventLauncher`: an I/O watcher of the hub per socket, no greenlet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
from typing import TYPE_CHECKING, Any

from .runtime import Launch, LaunchError, LaunchTarget, Task

if TYPE_CHECKING:
    from .runtime import GeventRuntime, ThreadRuntime

__all__ = ["EpollLauncher", "GeventLauncher", "WaitingLauncher"]

log = logging.getLogger("pysmux")


class _ThreadLaunch:
    """A thread to start once a socket is readable (see :class:`EpollLauncher`)."""

    __slots__ = ("_launcher", "cancelled", "fd", "name", "on_error", "target", "task")

    def __init__(
        self,
        launcher: EpollLauncher | WaitingLauncher,
        fd: int,
        target: LaunchTarget,
        name: str,
        on_error: LaunchError,
    ) -> None:
        self._launcher = launcher
        self.fd = fd
        self.target = target
        self.name = name
        self.on_error = on_error
        self.cancelled = False
        self.task: Task | None = None

    def cancel(self) -> None:
        self._launcher.cancel(self)

    def join(self, timeout: float | None = None) -> None:
        with self._launcher.lock:  # a task being started is assigned under it
            task = self.task
        if task is not None:
            task.join(timeout)

    def is_alive(self) -> bool:
        with self._launcher.lock:
            task, cancelled = self.task, self.cancelled
        return not cancelled if task is None else task.is_alive()


class EpollLauncher:
    """Watches sockets with one epoll and starts a thread for each that turns readable.

    The thread is started under the lock that ``cancel`` takes: once ``cancel``
    returns, the task either runs (and can be joined) or never will.
    """

    linger = 0.5

    def __init__(self, rt: ThreadRuntime) -> None:
        self._rt = rt
        self.lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._pending: dict[int, _ThreadLaunch] = {}
        self._closed = False
        self._task = rt.spawn(self._run, "pysmux-tunnel-launcher")

    def when_readable(
        self, sock: Any, target: LaunchTarget, name: str, on_error: LaunchError
    ) -> Launch:
        fd = sock.fileno()
        launch = _ThreadLaunch(self, fd, target, name, on_error)
        with self.lock:
            if self._closed:
                raise RuntimeError("the launcher is closed")
            mask = select.EPOLLIN | select.EPOLLONESHOT
            try:
                self._epoll.register(fd, mask)
            except FileExistsError:  # fired before (one-shot): registered, disarmed
                self._epoll.modify(fd, mask)
            self._pending[fd] = launch
        return launch

    def cancel(self, launch: _ThreadLaunch) -> None:
        with self.lock:
            launch.cancelled = True
            if self._pending.get(launch.fd) is launch:
                del self._pending[launch.fd]
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(launch.fd)

    def _run(self) -> None:
        while True:
            failed: list[tuple[_ThreadLaunch, BaseException]] = []
            events = self._epoll.poll()
            with self.lock:
                if self._closed:
                    return
                for fd, _ in events:
                    launch = self._pending.pop(fd, None)
                    if launch is None or launch.cancelled:
                        continue  # the wake-up fd, or cancelled meanwhile
                    try:
                        launch.task = self._rt.spawn(launch.target, launch.name)
                    except RuntimeError as exc:  # "can't start new thread"
                        launch.cancelled = True
                        failed.append((launch, exc))
            for launch, error in failed:  # outside the lock: it may cancel others
                try:
                    launch.on_error(error)
                except Exception:  # pragma: no cover - a bug in on_error
                    log.exception("pysmux: launch error handler failed")

    def close(self) -> None:
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._pending.clear()
        os.eventfd_write(self._wake_fd, 1)
        self._task.join()
        self._epoll.close()
        os.close(self._wake_fd)


class WaitingLauncher:
    """A task per socket that waits for it, for where epoll is missing (or threads are
    greenlets): it costs what a task blocked in ``recv`` costs, nothing more."""

    #: How often a waiting task looks whether it was cancelled.
    _STEP = 0.5

    linger = 0.5

    def __init__(self, rt: ThreadRuntime) -> None:
        self._rt = rt
        self.lock = threading.Lock()
        self._closed = False

    def when_readable(
        self, sock: Any, target: LaunchTarget, name: str, on_error: LaunchError
    ) -> Launch:
        if self._closed:
            raise RuntimeError("the launcher is closed")
        launch = _ThreadLaunch(self, sock.fileno(), target, name, on_error)

        def wait_then_run() -> None:
            while not (launch.cancelled or self._closed):
                try:
                    ready = self._rt.wait_readable(sock, self._STEP)
                except (OSError, ValueError):  # closed under us: cancelled
                    return
                if ready:
                    with self.lock:
                        if launch.cancelled or self._closed:
                            return
                        launch.cancelled = True  # started: cannot be cancelled now
                    target()
                    return

        launch.task = self._rt.spawn(wait_then_run, name)
        return launch

    def cancel(self, launch: _ThreadLaunch) -> None:
        with self.lock:
            launch.cancelled = True

    def close(self) -> None:
        """Start nothing more; the tasks still waiting end within ``_STEP``."""
        self._closed = True


class _GeventLaunch:
    """An I/O watcher that starts a greenlet once its socket is readable."""

    __slots__ = ("_rt", "_watcher", "name", "on_error", "target", "task")

    def __init__(
        self,
        rt: GeventRuntime,
        watcher: Any,
        target: LaunchTarget,
        name: str,
        on_error: LaunchError,
    ) -> None:
        self._rt = rt
        self._watcher: Any = watcher
        self.target = target
        self.name = name
        self.on_error = on_error
        self.task: Task | None = None

    def fire(self) -> None:
        """In the hub: stop watching, start the greenlet."""
        self.cancel()
        try:
            self.task = self._rt.spawn(self.target, self.name)
        except Exception as exc:  # pragma: no cover - out of memory
            self.on_error(exc)

    def cancel(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()

    def join(self, timeout: float | None = None) -> None:
        if self.task is not None:
            self.task.join(timeout)

    def is_alive(self) -> bool:
        return self._watcher is not None or (self.task is not None and self.task.is_alive())


class GeventLauncher:
    """Hub I/O watchers: a watched socket costs a watcher, not a greenlet. Everything
    runs in the hub's thread, so there is nothing to lock."""

    linger = 0.0

    def __init__(self, rt: GeventRuntime, loop: Any) -> None:
        self._rt = rt
        self._loop = loop
        self._closed = False

    def when_readable(
        self, sock: Any, target: LaunchTarget, name: str, on_error: LaunchError
    ) -> Launch:
        if self._closed:
            raise RuntimeError("the launcher is closed")
        watcher = self._loop.io(sock.fileno(), 1)  # 1: READ
        launch = _GeventLaunch(self._rt, watcher, target, name, on_error)
        watcher.start(launch.fire)
        return launch

    def close(self) -> None:
        self._closed = True
