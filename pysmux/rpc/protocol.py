"""JSON-RPC 2.0 messages, without I/O: a line in, a line out.

:class:`Dispatcher` holds the registered methods and turns one request line
(a request, a notification or a batch) into its response line, or None when
nothing is to be sent (notifications; a batch of only notifications). The
client side's helpers build request lines and check response objects.

Lines are UTF-8 JSON without their newline. Responses are encoded with
``ensure_ascii``, so any string a request carried (a lone surrogate escape
included) can be sent back.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable
from typing import Any

from .errors import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    RpcError,
    RpcProtocolError,
)

__all__ = [
    "Dispatcher",
    "Params",
    "check_response",
    "decode",
    "encode",
    "error_line",
    "request",
]

log = logging.getLogger("pysmux.rpc")

#: What ``params`` may be: by position, by name, or absent.
Params = list[Any] | dict[str, Any] | None

_JSONRPC = "2.0"


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode(line: bytes) -> Any:
    """The JSON value of ``line`` (strict UTF-8, no NaN or Infinity).

    ``ValueError`` when it is not JSON, including nesting too deep to parse.
    """
    try:
        return json.loads(line.decode("utf-8"), parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def encode(value: Any) -> bytes:
    """Compact ASCII JSON. ``TypeError``/``ValueError`` if ``value`` is not JSON."""
    try:
        text = json.dumps(value, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    except RecursionError:
        raise ValueError("value nested too deeply for JSON") from None
    return text.encode("ascii")


def _valid_id(value: Any) -> bool:
    return value is None or (isinstance(value, (str, int, float)) and not isinstance(value, bool))


def _error(request_id: Any, error: RpcError) -> bytes:
    return encode({"jsonrpc": _JSONRPC, "error": error.to_json(), "id": request_id})


def error_line(code: int, message: str | None = None, data: Any = None) -> bytes:
    """A response line for an error that belongs to no request (id null)."""
    return _error(None, RpcError(code, message, data))


class _Method:
    __slots__ = ("fn", "raw", "signature")

    def __init__(self, fn: Callable[..., Any], raw: bool) -> None:
        self.fn = fn
        self.raw = raw
        self.signature: inspect.Signature | None = None
        if not raw:
            try:
                self.signature = inspect.signature(fn)
            except (TypeError, ValueError):  # some builtins have none: call and see
                self.signature = None


class Dispatcher:
    """Registered methods, and the answer to a request line.

    Handlers run in the calling task, one request after the other, batches in
    order. Thread-safe once the methods are registered.
    """

    def __init__(self) -> None:
        self._methods: dict[str, _Method] = {}

    def register(self, name: str, fn: Callable[..., Any], *, raw: bool = False) -> None:
        """Serve ``fn`` as method ``name``.

        ``params`` by position become positional arguments, by name keyword
        arguments; arguments that do not fit ``fn``'s signature are answered
        with ``INVALID_PARAMS`` without calling it. With ``raw=True``, ``fn``
        gets the ``params`` value itself (a list, a dict, or None when absent).
        Registering a name again replaces its function.
        """
        if not isinstance(name, str) or not name:
            raise ValueError(f"method name {name!r}: must be a non-empty str")
        if name.startswith("rpc."):
            raise ValueError(f"method name {name!r}: names starting 'rpc.' are reserved")
        if not callable(fn):
            raise TypeError(f"method {name!r}: {fn!r} is not callable")
        self._methods[name] = _Method(fn, raw)

    def names(self) -> list[str]:
        """The registered method names, sorted."""
        return sorted(self._methods)

    def handle_line(self, line: bytes) -> bytes | None:
        """The response line to one request line, or None when none is due."""
        try:
            message = decode(line)
        except ValueError as exc:
            return error_line(PARSE_ERROR, data=str(exc))
        if not isinstance(message, list):
            return self._handle_one(message)
        if not message:
            return error_line(INVALID_REQUEST, data="empty batch")
        replies = [r for r in map(self._handle_one, message) if r is not None]
        if not replies:
            return None
        return b"[" + b",".join(replies) + b"]"

    def _handle_one(self, message: Any) -> bytes | None:
        if not isinstance(message, dict):
            return error_line(INVALID_REQUEST, data="a request must be a JSON object")
        notification = "id" not in message
        request_id = message.get("id")
        if not _valid_id(request_id):
            return error_line(INVALID_REQUEST, data="id must be a string, a number or null")
        method = message.get("method")
        params = message.get("params")
        problem = None
        if message.get("jsonrpc") != _JSONRPC:
            problem = 'jsonrpc must be "2.0"'
        elif not isinstance(method, str):
            problem = "method must be a string"
        elif "params" in message and not isinstance(params, (list, dict)):
            problem = "params must be an array or an object"
        if problem is not None:
            return _error(request_id, RpcError(INVALID_REQUEST, data=problem))
        assert isinstance(method, str)
        try:
            result = self._call(method, params)
        except RpcError as exc:
            if notification:
                log.debug("notification %r: %s", method, exc)
                return None
            return _error(request_id, exc)
        except Exception:
            # The traceback is for the server's log only: it can reveal internals.
            log.exception("method %r failed", method)
            return None if notification else _error(request_id, RpcError(INTERNAL_ERROR))
        if notification:
            return None
        try:
            return encode({"jsonrpc": _JSONRPC, "result": result, "id": request_id})
        except (TypeError, ValueError):
            log.exception("method %r returned a result JSON cannot carry", method)
            return _error(request_id, RpcError(INTERNAL_ERROR))

    def _call(self, name: str, params: Params) -> Any:
        method = self._methods.get(name)
        if method is None:
            raise RpcError(METHOD_NOT_FOUND, data=name)
        if method.raw:
            return method.fn(params)
        args: list[Any] = params if isinstance(params, list) else []
        kwargs: dict[str, Any] = params if isinstance(params, dict) else {}
        if method.signature is not None:
            try:
                method.signature.bind(*args, **kwargs)
            except TypeError as exc:
                raise RpcError(INVALID_PARAMS, data=str(exc)) from None
        return method.fn(*args, **kwargs)


# -- the client's side -------------------------------------------------------------------


def request(method: str, params: Params, request_id: int | None) -> dict[str, Any]:
    """A request object; a notification when ``request_id`` is None."""
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, not {type(method).__name__}")
    if params is not None and not isinstance(params, (list, tuple, dict)):
        raise TypeError(
            f"params must be a list, a tuple, a dict or None, not {type(params).__name__}"
        )
    message: dict[str, Any] = {"jsonrpc": _JSONRPC, "method": method}
    if params is not None:
        message["params"] = list(params) if isinstance(params, tuple) else params
    if request_id is not None:
        message["id"] = request_id
    return message


def check_response(message: Any) -> tuple[Any, Any]:
    """``(id, result)`` of a response object, or ``(id, RpcError)`` for an error.

    ``RpcProtocolError`` when it is not a JSON-RPC 2.0 response.
    """
    if not isinstance(message, dict) or message.get("jsonrpc") != _JSONRPC:
        raise RpcProtocolError(f"not a JSON-RPC 2.0 response: {_short(message)}")
    if "id" not in message:
        raise RpcProtocolError(f"response without an id: {_short(message)}")
    request_id = message["id"]
    if "result" in message and "error" not in message:
        return request_id, message["result"]
    error = message.get("error")
    if "result" in message or not isinstance(error, dict):
        raise RpcProtocolError(f"response needs a result or an error object: {_short(message)}")
    code, text = error.get("code"), error.get("message")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(text, str):
        raise RpcProtocolError(f"error without an int code and a message: {_short(message)}")
    return request_id, RpcError(code, text, error.get("data"))


def _short(value: Any, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
