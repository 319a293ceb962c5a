"""Fixtures of the unit/integration tests (the shared ones are in ../conftest.py)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.rawpeer import RawPeer


@pytest.fixture
def raw_session() -> Iterator[Callable[..., tuple[Any, RawPeer]]]:
    """Factory: ``raw_session(role="server", config=None, **config_fields)`` ->
    ``(session, peer)``: a pysmux session on one socketpair end and a
    :class:`RawPeer` on the other. Config fields default to ``keepalive=False``
    so that the peer reads only the frames a test causes."""
    import pysmux

    made: list[tuple[Any, socket.socket, socket.socket]] = []

    def make(role: str = "server", config: Any = None, **fields: Any) -> tuple[Any, RawPeer]:
        if config is None:
            fields.setdefault("keepalive", False)
            config = pysmux.Config(**fields)
        mine, theirs = socket.socketpair()
        entry: list[Any] = [None, mine, theirs]
        made.append(entry)  # type: ignore[arg-type]
        factory = pysmux.server if role == "server" else pysmux.client
        entry[0] = factory(mine, config=config)
        return entry[0], RawPeer(theirs, config.version)

    yield make
    for session, mine, theirs in reversed(made):
        try:
            if session is not None:
                session.close()
        finally:
            mine.close()
            theirs.close()
