"""``pysmux rpc``: a JSON-RPC 2.0 server of the built-in methods, on every stream.

::

    pysmux rpc -l 127.0.0.1:4000 [--smuxver 2] [--max-line BYTES] [--line-timeout S]

It serves ``echo``, ``add``, ``get_time`` and ``sleep`` (see
:mod:`pysmux.rpc.methods`). The ``pysmux`` command gives it what ``pysmux
echo`` has: ``-l``, the smux, security and production flags, the ``listening
on HOST:PORT`` line, the drain on SIGTERM/SIGINT and the rule that a listener
beyond loopback needs a key or client certificates (or ``--no-auth``); this
module adds the flags of its own.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..cli_options import Flag, add_flags, positive_int, positive_seconds
from ..config import Config
from .methods import register_builtins
from .server import RpcServer

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "make_server"]

HELP = "serve JSON-RPC 2.0 (echo, add, get_time, sleep) on every stream"
DESCRIPTION = (
    "Accept mux connections on -l; every stream carries newline-delimited JSON-RPC 2.0 "
    "requests, answered in order. Methods: echo (returns its params), add ({a, b} or "
    "[a, b]), get_time (Unix seconds), sleep ({seconds}, at most 10)."
)


_FLAGS = (
    Flag("--max-line", positive_int, 1 << 20, "BYTES",
         "longest request line; a longer one is answered -32600 and its stream closed"),
    Flag("--max-buffered", positive_int, 64 << 20, "BYTES",
         "unfinished request bytes held on all streams together"),
    Flag("--max-session-streams", positive_int, 1024, "N",
         "streams served at once for one mux connection; --max-conns bounds them all"),
    Flag("--line-timeout", positive_seconds, 30.0, "SECONDS",
         "a stream that started a line and does not finish it within this is closed"),
    Flag("--idle-timeout", positive_seconds, 300.0, "SECONDS",
         "a stream silent this long between requests, or not reading a response, is closed"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_flags(parser, _FLAGS)


def make_server(args: argparse.Namespace, config: Config, security: dict[str, Any]) -> RpcServer:
    """The server the flags describe, not started (``--max-conns``: streams at once);
    ``security`` are the keyword arguments of the security flags."""
    server = RpcServer(
        args.listen,
        config=config,
        runtime=args.runtime,
        max_line=args.max_line,
        line_timeout=args.line_timeout,
        idle_timeout=args.idle_timeout,
        max_buffered=args.max_buffered,
        max_streams=args.max_conns,
        max_session_streams=min(args.max_session_streams, args.max_conns),
        **security,
    )
    return register_builtins(server)
