"""Fixtures of the unit/integration tests (the shared ones are in ../conftest.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.rawpeer import RawPeer
from tests.runtimes import current


@pytest.fixture
def raw_session(runtime: str) -> Iterator[Callable[..., tuple[Any, RawPeer]]]:
    """Factory: ``raw_session(role="server", config=None, **config_fields)`` ->
    ``(session, peer)``: a pysmux session on one socketpair end and a
    :class:`RawPeer` on the other, both of the test's runtime. Config fields
    default to ``keepalive=False`` so that the peer reads only the frames a
    test causes."""
    import pysmux

    made: list[list[Any]] = []

    def make(role: str = "server", config: Any = None, **fields: Any) -> tuple[Any, RawPeer]:
        if config is None:
            fields.setdefault("keepalive", False)
            config = pysmux.Config(**fields)
        mine, theirs = current().socketpair()
        entry: list[Any] = [None, mine, theirs]
        made.append(entry)
        factory = pysmux.server if role == "server" else pysmux.client
        entry[0] = factory(mine, config=config, runtime=runtime)
        return entry[0], RawPeer(theirs, config.version)

    yield make
    for session, mine, theirs in reversed(made):
        try:
            if session is not None:
                session.close()
        finally:
            mine.close()
            theirs.close()
