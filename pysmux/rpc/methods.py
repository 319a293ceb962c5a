"""The methods ``pysmux rpc`` serves, for trying clients out and for tests.

* ``echo``: returns its params as they came (null when absent);
* ``add``: ``{"a": int, "b": int}`` or ``[a, b]``, returns the sum;
* ``get_time``: the server's clock, Unix seconds (a float);
* ``sleep``: ``{"seconds": s}`` or ``[s]``, ``0 <= s <= 10``, returns null after
  that long (sooner if the server closes): for client timeout tests.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from typing import Any

from .errors import INVALID_PARAMS, RpcError
from .protocol import Params
from .server import RpcServer

__all__ = ["MAX_SLEEP", "register_builtins"]

#: The longest ``sleep`` the server agrees to, in seconds.
MAX_SLEEP = 10.0


def echo(params: Params) -> Params:
    return params


def add(a: int, b: int) -> int:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (a, b)):
        raise RpcError(INVALID_PARAMS, data="a and b must be integers")
    return a + b


def get_time() -> float:
    return time.time()


def sleep(pause: Callable[[float], Any], seconds: float) -> None:
    if (
        not isinstance(seconds, (int, float))
        or isinstance(seconds, bool)
        or not 0 <= seconds <= MAX_SLEEP
    ):
        raise RpcError(INVALID_PARAMS, data=f"seconds must be a number in 0..{MAX_SLEEP:g}")
    pause(float(seconds))


def register_builtins(server: RpcServer) -> RpcServer:
    """Register ``echo``, ``add``, ``get_time`` and ``sleep`` on ``server``; returns it."""
    server.register("echo", echo, raw=True)
    server.register("add", add)
    server.register("get_time", get_time)
    server.register("sleep", functools.partial(sleep, server.pause))
    return server
