"""Fixtures shared by every pysmux test directory.

* ``_no_leaks`` (autouse): a test fails if it leaves behind a thread that was
  not alive before it started (threads get up to ``THREAD_GRACE`` seconds to
  exit), and ``gc.collect()`` runs at teardown so that an unclosed socket caught
  in a reference cycle emits its ``ResourceWarning`` while the test is still
  the current one. ``filterwarnings = error`` (setup.cfg) turns that warning,
  which surfaces through pytest's unraisable-exception hook because it is
  raised inside ``__del__``, into a test error.
* ``pair``: a factory of connected client/server sessions over
  ``socket.socketpair()``; everything it makes is closed at teardown.
"""

from __future__ import annotations

import gc
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

#: Seconds a test's threads get to finish after its fixtures are torn down.
THREAD_GRACE = 2.0


def _leaked_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t not in before and t.is_alive()]


@pytest.fixture(autouse=True)
def _no_leaks() -> Iterator[None]:
    before = set(threading.enumerate())
    yield
    deadline = time.monotonic() + THREAD_GRACE
    leaked = _leaked_threads(before)
    while leaked and time.monotonic() < deadline:
        # Join with a short bound (not a bare sleep): returns as soon as the
        # thread ends, and re-checks the deadline otherwise.
        leaked[0].join(timeout=min(0.05, max(0.0, deadline - time.monotonic())))
        leaked = _leaked_threads(before)
    gc.collect()
    if leaked:
        names = ", ".join(f"{t.name} (daemon={t.daemon})" for t in leaked)
        pytest.fail(f"test left {len(leaked)} thread(s) running: {names}", pytrace=False)


class SessionPair:
    """A connected client/server session pair. Iterating gives ``client, server``."""

    def __init__(
        self,
        client: Any,
        server: Any,
        client_sock: socket.socket,
        server_sock: socket.socket,
    ) -> None:
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
def pair() -> Iterator[Callable[..., SessionPair]]:
    """Factory: ``pair(config=None, *, client_config=None, server_config=None,
    runtime="thread", **config_fields)`` -> :class:`SessionPair`.

    ``config_fields`` build a ``pysmux.Config`` used by both ends when no
    ``config`` is given: ``client, server = pair(version=2)``.
    """
    import pysmux

    made: list[SessionPair] = []

    def make(
        config: Any = None,
        *,
        client_config: Any = None,
        server_config: Any = None,
        runtime: Any = "thread",
        **config_fields: Any,
    ) -> SessionPair:
        if config is None and config_fields:
            config = pysmux.Config(**config_fields)
        elif config_fields:
            raise TypeError("pass either config or config fields, not both")
        csock, ssock = socket.socketpair()
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
