"""Fixtures shared by every pysmux test directory.

* ``runtime``: every test runs once per runtime, ``thread`` and ``gevent``
  (ids ``[thread]``, ``[gevent]``). The fixture's value is the name to pass as
  ``pysmux.client(..., runtime=runtime)``; it also activates the matching
  harness of ``tests/runtimes.py``, from which tests get their tasks, waits and
  sockets (``tests.util.spawn``, ``socketpair``, ...). gevent runs unpatched in
  the default run. ``PYSMUX_TEST_RUNTIME=thread|gevent|thread,gevent`` picks
  the runtimes; in a monkey-patched process (``python -m gevent.monkey
  --module pytest -o timeout_method=signal``) the default is gevent alone, and
  ``thread`` there means the thread runtime on patched (greenlet) threads.
  ``@pytest.mark.runtimes("gevent", reason=...)`` limits a test to the named
  runtimes; ``@pytest.mark.runtime_independent(reason=...)`` runs a test once,
  on the first runtime of the run (its subject is a child process).
  Without gevent installed its tests are skipped, except under ``CI=true``,
  where that is a usage error: the run fails before any test.
* ``_no_leaks`` (autouse): a test fails if it leaves behind a thread or a
  gevent greenlet that was not alive before it started (they get up to
  ``THREAD_GRACE`` seconds, env ``PYSMUX_TEST_LEAK_GRACE``, to end), and
  ``gc.collect()`` runs at teardown so that an unclosed socket caught in a
  reference cycle emits its ``ResourceWarning`` while the test is still the
  current one. ``filterwarnings = error`` (setup.cfg) turns that warning,
  which surfaces through pytest's unraisable-exception hook because it is
  raised inside ``__del__``, into a test error. Both walk the collector's
  objects, so each test first collects and then freezes (``gc.freeze``)
  what outlived the tests before it: modules, pytest's records and, under
  coverage, a tracer object for every thread the run ever started. The
  checks then walk only what the test made; walking it all cost more than
  the tests themselves. (A long-lived object that becomes cyclic garbage
  after it was frozen is never collected: memory only, as long as no fixture
  that outlives a test holds an unclosed socket; none does.)
* ``pair``: a factory of connected client/server sessions over a socketpair
  of the test's runtime; everything it makes is closed at teardown.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests import runtimes

#: Seconds a test's threads and greenlets get to finish after its fixtures are torn down.
THREAD_GRACE = float(os.environ.get("PYSMUX_TEST_LEAK_GRACE", "2.0"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "runtimes(*names, reason): run the test only on these runtimes (thread, gevent)",
    )
    config.addinivalue_line(
        "markers",
        "runtime_independent(reason): run the test once, on the first runtime of the run",
    )
    runtimes.configured_runtimes()  # a bad PYSMUX_TEST_RUNTIME is a usage error at once
    if runtimes.in_ci() and not runtimes.gevent_available():
        # Elsewhere the gevent half of the suite is skipped; CI must not pass that way.
        raise pytest.UsageError(
            "CI=true and gevent is not installed, so every gevent test would be skipped: "
            "install it (pip install -e '.[gevent,test]')"
        )


def pytest_unconfigure(config: pytest.Config) -> None:
    gc.unfreeze()


def pytest_report_header(config: pytest.Config) -> str:
    patched = "monkey-patched" if runtimes.gevent_patched() else "not monkey-patched"
    return (
        f"pysmux runtimes: {', '.join(runtimes.configured_runtimes())} "
        f"(gevent {'installed' if runtimes.gevent_available() else 'missing'}, {patched})"
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "runtime" not in metafunc.fixturenames:
        return
    configured = runtimes.configured_runtimes()
    marker = metafunc.definition.get_closest_marker("runtimes")
    allowed = tuple(marker.args) if marker else runtimes.ALL_RUNTIMES
    if metafunc.definition.get_closest_marker("runtime_independent"):
        allowed = configured[:1]
    unknown = set(allowed) - set(runtimes.ALL_RUNTIMES)
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown runtimes {unknown}")
    params = []
    for name in allowed:
        marks = []
        if name == "gevent" and not runtimes.gevent_available():
            marks.append(pytest.mark.skip(reason="gevent is not installed"))
        if name in configured:
            params.append(pytest.param(name, marks=marks, id=name))
    if not params:
        reason = marker.kwargs.get("reason", "") if marker else ""
        skip = pytest.mark.skip(
            reason=f"runs on {', '.join(allowed)} only ({reason}); this run: {configured}"
        )
        params.append(pytest.param(allowed[0], marks=skip, id=allowed[0]))
    metafunc.parametrize("runtime", params, indirect=True)


@pytest.fixture
def runtime(request: pytest.FixtureRequest) -> Iterator[str]:
    """The runtime of this test run: ``"thread"`` or ``"gevent"`` (see the module docstring)."""
    name = request.param
    runtimes.activate(name)
    try:
        yield name
    finally:
        runtimes.deactivate()


def _leaked_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    # Dummy threads are not threads anyone started: threading makes one for a thread
    # (or, monkey-patched, a greenlet) it did not start, when that one logs, say.
    # They cannot be joined; a greenlet behind one is checked as a greenlet.
    dummy = threading._DummyThread  # type: ignore[attr-defined]
    return [
        t
        for t in threading.enumerate()
        if t not in before and t.is_alive() and not isinstance(t, dummy)
    ]


def _leaked_greenlets(before: set[int]) -> list[Any]:
    return [g for g in runtimes.live_greenlets() if id(g) not in before]


@pytest.fixture(autouse=True)
def _no_leaks(runtime: str) -> Iterator[None]:
    gc.collect()  # what earlier tests left: their garbage goes now, the rest is frozen
    gc.freeze()
    threads_before = set(threading.enumerate())
    greenlets_before = {id(g) for g in runtimes.live_greenlets()}
    yield
    deadline = time.monotonic() + THREAD_GRACE
    leaked = _leaked_threads(threads_before)
    while leaked and time.monotonic() < deadline:
        # Join with a short bound (not a bare sleep): returns as soon as the
        # thread ends, and re-checks the deadline otherwise.
        leaked[0].join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        leaked = _leaked_threads(threads_before)
    green = _leaked_greenlets(greenlets_before)
    while green and time.monotonic() < deadline:
        green[0].join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        green = _leaked_greenlets(greenlets_before)
    gc.collect()
    problems = []
    if leaked:
        names = ", ".join(f"{t.name} (daemon={t.daemon})" for t in leaked)
        problems.append(f"test left {len(leaked)} thread(s) running: {names}")
    if green:
        names = ", ".join(getattr(g, "name", repr(g)) for g in green)
        problems.append(f"test left {len(green)} greenlet(s) running: {names}")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)


class SessionPair:
    """A connected client/server session pair. Iterating gives ``client, server``."""

    def __init__(self, client: Any, server: Any, client_sock: Any, server_sock: Any) -> None:
        self.client = client
        self.server = server
        self.client_sock = client_sock
        self.server_sock = server_sock

    def __iter__(self) -> Iterator[Any]:
        return iter((self.client, self.server))

    def close(self) -> None:
        """Close both sessions and both socket ends (idempotent)."""
        try:
            for session in (self.client, self.server):
                if session is not None:
                    session.close()
        finally:
            self.client_sock.close()
            self.server_sock.close()


@pytest.fixture
def pair(runtime: str) -> Iterator[Callable[..., SessionPair]]:
    """Factory: ``pair(config=None, *, client_config=None, server_config=None,
    **config_fields)`` -> :class:`SessionPair` on the test's runtime.

    ``config_fields`` build a ``pysmux.Config`` used by both ends when no
    ``config`` is given: ``client, server = pair(version=2)``.
    """
    import pysmux

    harness = runtimes.current()
    made: list[SessionPair] = []

    def make(
        config: Any = None,
        *,
        client_config: Any = None,
        server_config: Any = None,
        **config_fields: Any,
    ) -> SessionPair:
        if config is None and config_fields:
            config = pysmux.Config(**config_fields)
        elif config_fields:
            raise TypeError("pass either config or config fields, not both")
        csock, ssock = harness.socketpair()
        p = SessionPair(None, None, csock, ssock)
        made.append(p)
        p.client = pysmux.client(csock, config=client_config or config, runtime=runtime)
        p.server = pysmux.server(ssock, config=server_config or config, runtime=runtime)
        return p

    yield make
    errors: list[BaseException] = []
    for p in reversed(made):
        try:
            p.close()
        except BaseException as exc:  # close everything, then report
            errors.append(exc)
    if errors:
        raise errors[0]
