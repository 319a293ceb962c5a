"""JSON-RPC 2.0 over smux streams.

Wire format: every stream carries newline-delimited JSON (UTF-8). A client
writes one request, notification or batch per line; the server writes one
response line per request or batch, in order on that stream, and none for a
notification or a batch of only notifications. A client may pipeline several
requests on one stream or use a stream per call. Errors are the
specification's: -32700 parse error, -32600 invalid request (also a line
longer than the server's bound, after which the stream is closed), -32601
method not found, -32602 invalid params, -32603 internal error (a handler's
exception: logged on the server, never sent).

::

    from pysmux.rpc import RpcClient, RpcServer

    server = RpcServer("127.0.0.1:0")
    server.register("add", lambda a, b: a + b)
    with server, RpcClient.connect(server.address) as rpc:
        assert rpc.call("add", {"a": 1, "b": 2}) == 3

``pysmux rpc -l ADDR`` serves :func:`register_builtins`' methods.
"""

from __future__ import annotations

from .client import RpcChannel, RpcClient
from .errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    SERVER_BUSY,
    RpcError,
    RpcProtocolError,
)
from .methods import register_builtins
from .protocol import Dispatcher
from .server import RpcServer

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SERVER_BUSY",
    "Dispatcher",
    "RpcChannel",
    "RpcClient",
    "RpcError",
    "RpcProtocolError",
    "RpcServer",
    "register_builtins",
]
