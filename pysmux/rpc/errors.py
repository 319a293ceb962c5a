"""JSON-RPC 2.0 error codes and the exceptions of :mod:`pysmux.rpc`.

Both exceptions are ``pysmux.SmuxError`` (so ``OSError``), like every error
pysmux raises: ``except OSError`` around a call catches a lost connection and a
remote error alike.
"""

from __future__ import annotations

from typing import Any, Final

from ..errors import SmuxError

__all__ = [
    "INTERNAL_ERROR",
    "INVALID_PARAMS",
    "INVALID_REQUEST",
    "METHOD_NOT_FOUND",
    "PARSE_ERROR",
    "SERVER_BUSY",
    "RpcError",
    "RpcProtocolError",
]

#: The codes of the JSON-RPC 2.0 specification.
PARSE_ERROR: Final = -32700
INVALID_REQUEST: Final = -32600
METHOD_NOT_FOUND: Final = -32601
INVALID_PARAMS: Final = -32602
INTERNAL_ERROR: Final = -32603
#: In the spec's "server error" range (-32000 to -32099): the server is at its
#: bound for request bytes held at once; the stream is closed.
SERVER_BUSY: Final = -32000

_MESSAGES: Final = {
    PARSE_ERROR: "Parse error",
    INVALID_REQUEST: "Invalid Request",
    METHOD_NOT_FOUND: "Method not found",
    INVALID_PARAMS: "Invalid params",
    INTERNAL_ERROR: "Internal error",
    SERVER_BUSY: "Server busy",
}


class RpcError(SmuxError):
    """A JSON-RPC error: raised by a call the server answered with an error.

    A method handler raises it too, to answer with a code of its own choosing
    (``RpcError(INVALID_PARAMS, "b must be an int")``); any other exception in
    a handler is answered with ``INTERNAL_ERROR`` and its traceback is logged
    on the server, never sent.
    """

    def __init__(self, code: int, message: str | None = None, data: Any = None) -> None:
        if message is None:
            message = _MESSAGES.get(code, "Server error")
        super().__init__(f"{message} (JSON-RPC error {code})")
        #: The error's ``code`` (an int).
        self.code = code
        #: The error's ``message``.
        self.message = message
        #: The error's ``data`` member, None when absent.
        self.data = data

    def to_json(self) -> dict[str, Any]:
        """The ``error`` member of a response."""
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.code, self.message, self.data))


class RpcProtocolError(SmuxError):
    """The peer's line is not JSON-RPC 2.0 where it must be (a client got a bad
    response, or none at all before the stream ended); that stream is dropped."""
