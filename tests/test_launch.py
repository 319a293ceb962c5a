"""The runtimes' launchers: a task started once a socket is readable, and never after
``cancel()`` (what a tunnel uses to give an idle connection no upload task)."""

from __future__ import annotations

import select
from collections.abc import Callable
from typing import Any

import pytest

from pysmux.launch import EpollLauncher, GeventLauncher, WaitingLauncher
from pysmux.runtime import Launcher, Task, ThreadRuntime, get_runtime
from tests import util
from tests.runtimes import gevent_patched

#: How long a test waits to see that something did NOT happen.
QUIET = 0.2


def _launch_cycle(launcher: Launcher) -> None:
    """A task starts only once the socket is readable, again when armed again, never
    after cancel; ``join`` waits for a started one; nothing starts after close."""
    a, b = util.socketpair()
    try:
        started = util.Event()
        first = launcher.when_readable(a, started.set, "t-first", pytest.fail)
        assert not started.wait(QUIET), "started before the socket was readable"
        assert first.is_alive()
        b.sendall(b"x")
        assert started.wait(10), "not started once readable"
        first.join(10)
        assert not first.is_alive()

        again = util.Event()  # level-triggered: unread bytes start the next one at once
        second = launcher.when_readable(a, again.set, "t-again", pytest.fail)
        assert again.wait(10)
        second.join(10)
        assert a.recv(16) == b"x"

        never = util.Event()
        third = launcher.when_readable(a, never.set, "t-never", pytest.fail)
        third.cancel()
        b.sendall(b"y")
        assert not never.wait(QUIET), "started after cancel"
        third.join(10)
        assert not third.is_alive()
    finally:
        launcher.close()
        a.close()
        b.close()
    with pytest.raises(RuntimeError):
        launcher.when_readable(a, pytest.fail, "t-closed", pytest.fail)


def test_launcher_of_the_runtime(runtime: str) -> None:
    """The launcher a tunnel gets from its runtime (epoll thread, or hub watchers)."""
    launcher = get_runtime(runtime).launcher()
    if runtime == "gevent" or gevent_patched():
        assert isinstance(launcher, GeventLauncher)
    elif hasattr(select, "epoll"):
        assert isinstance(launcher, EpollLauncher)
    _launch_cycle(launcher)


@pytest.mark.runtimes("thread", reason="the fallback for threads where epoll is missing")
def test_waiting_launcher(runtime: str) -> None:
    """Where epoll is missing (or threads are greenlets), a task per socket waits for it:
    the same promises."""
    waiting = WaitingLauncher(ThreadRuntime())
    assert waiting.linger > 0
    _launch_cycle(waiting)


class _NoThreads(ThreadRuntime):
    """A thread runtime out of threads for tasks named ``fail-*``."""

    def spawn(self, target: Callable[[], None], name: str) -> Task:
        if name.startswith("fail-"):
            raise RuntimeError("can't start new thread")
        return super().spawn(target, name)


@pytest.mark.runtimes("thread", reason="only OS threads run out")
@pytest.mark.skipif(
    not hasattr(select, "epoll"), reason="needs select.epoll: Linux, not monkey-patched"
)
def test_epoll_launcher_reports_a_task_it_cannot_start(runtime: str) -> None:
    """Out of threads: the owner hears of it (``on_error``) instead of a task that never
    comes, and the launcher goes on serving the other sockets."""
    launcher = EpollLauncher(_NoThreads())
    a, b = util.socketpair()
    try:
        failed: list[BaseException] = []
        told = util.Event()

        def on_error(exc: BaseException) -> None:
            failed.append(exc)
            told.set()

        launch = launcher.when_readable(a, pytest.fail, "fail-1", on_error)
        b.sendall(b"x")
        assert told.wait(10)
        assert isinstance(failed[0], RuntimeError)
        assert not launch.is_alive()
        ran = util.Event()
        other: Any = launcher.when_readable(a, ran.set, "fine-1", on_error)
        assert ran.wait(10), "the launcher stopped after a failed start"
        other.join(10)
    finally:
        launcher.close()
        a.close()
        b.close()
