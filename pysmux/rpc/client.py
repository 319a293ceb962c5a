"""The JSON-RPC 2.0 client: calls over the streams of one smux session.

A call takes an idle stream of the client's pool (or opens one), writes its
request line, reads the response line and puts the stream back: calls from
many threads or greenlets at once each get a stream of their own, so a slow
call never holds up another, and a quick one reuses a stream instead of
opening a new one. A call that times out or fails drops its stream (a late
response must not answer the next call).

:class:`RpcChannel` is the part that works on one stream; use it directly to
own a stream, or to pipeline (``send`` several requests, then ``receive``
their responses in order).
"""

from __future__ import annotations

import itertools
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from ..config import Config
from ..dialer import Dialer
from ..runtime import Runtime
from ..session import Session
from ..stream import Stream
from ..tcp import Address
from ..tunnel import SharedKey
from .errors import RpcError, RpcProtocolError
from .lines import LineReader
from .protocol import Params, check_response, decode, encode, request

__all__ = ["RpcChannel", "RpcClient"]

#: A call in a batch: ``(method, params)``.
Call = tuple[str, Params]

_T = TypeVar("_T")


def _deadline(timeout: float | None) -> float | None:
    if timeout is None:
        return None
    if not timeout > 0:
        raise ValueError(f"timeout={timeout!r}: must be > 0 or None")
    return time.monotonic() + timeout


def _left(deadline: float | None, what: str) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError(f"{what}: no answer in time")
    return left


class RpcChannel:
    """JSON-RPC on one stream: whole request lines out, response lines in, in order.

    Not for several tasks at once (that is what :class:`RpcClient` is for).
    """

    __slots__ = ("_reader", "idle_since", "received_bytes", "sent_bytes", "stream")

    def __init__(self, stream: Stream, max_line: int = 1 << 20) -> None:
        self.stream = stream
        self._reader = LineReader(stream, max_line)
        self.idle_since = time.monotonic()
        self.sent_bytes = 0  # request lines, newlines included
        self.received_bytes = 0  # response lines, newlines included

    def send(self, message: Any, deadline: float | None = None) -> int:
        """Write one request object (or a batch list) as a line; its size in bytes."""
        return self.send_line(encode(message) + b"\n", deadline)

    def send_line(self, line: bytes, deadline: float | None = None) -> int:
        """Write an encoded request line (newline included)."""
        self.stream.settimeout(_left(deadline, "sending"))
        self.stream.sendall(line)
        self.sent_bytes += len(line)
        return len(line)

    def receive(self, deadline: float | None = None) -> Any:
        """The next response line, decoded. ``RpcProtocolError`` at EOF or on a bad line."""
        line = self._reader.readline(deadline=deadline)
        if line is None:
            raise RpcProtocolError(
                f"stream {self.stream.id}: the server ended it without answering"
            )
        self.received_bytes += len(line) + 1
        try:
            return decode(line)
        except ValueError as exc:
            raise RpcProtocolError(
                f"stream {self.stream.id}: the response is not JSON: {exc}"
            ) from None

    def call(
        self, method: str, params: Params, request_id: int, deadline: float | None = None
    ) -> Any:
        """One call; its result, or ``RpcError`` raised."""
        self.send(request(method, params, request_id), deadline)
        return self.answer(request_id, deadline)

    def answer(self, request_id: int, deadline: float | None = None) -> Any:
        """Read the response to the request ``request_id`` (the next line): its result,
        or ``RpcError`` raised."""
        reply_id, result = check_response(self.receive(deadline))
        if reply_id != request_id:
            raise RpcProtocolError(f"response id {reply_id!r} answers no request ({request_id})")
        if isinstance(result, RpcError):
            raise result
        return result

    def usable(self) -> bool:
        """Still open and nothing unexpected buffered (the server may have ended it)."""
        if self._reader.pending:
            return False
        try:
            self.stream.settimeout(0.0)
            self.stream.recv(1)  # EOF, or a byte nobody asked for: not reusable either way
        except BlockingIOError:
            return True
        except OSError:
            pass
        return False

    def close(self) -> None:
        self._reader.close()
        self.stream.close()


class RpcClient:
    """JSON-RPC 2.0 calls over ``session``; safe to use from many threads or greenlets.

    ``timeout`` is the default of every call (None: wait as long as it takes).
    Up to ``max_idle_streams`` streams are kept for reuse, each for at most
    ``max_idle_seconds``. :meth:`connect` dials a server and owns the session
    it makes; otherwise ``close()`` leaves ``session`` open.

    >>> with RpcClient.connect("127.0.0.1:4000") as rpc:  # doctest: +SKIP
    ...     rpc.call("add", [1, 2])
    3
    """

    def __init__(
        self,
        session: Session,
        *,
        timeout: float | None = None,
        max_line: int = 1 << 20,
        max_idle_streams: int = 16,
        max_idle_seconds: float = 60.0,
        owns_session: bool = False,
    ) -> None:
        _deadline(timeout)  # checks it
        self._session = session
        self.timeout = timeout
        self._max_line = max_line
        self._max_idle = max_idle_streams
        self._max_idle_seconds = max_idle_seconds
        self._owns_session = owns_session
        self._ids = itertools.count(1)
        # Held for a few list operations that never block or switch greenlets, so a
        # plain lock serves both runtimes.
        self._lock = threading.Lock()
        self._idle: list[RpcChannel] = []
        self._closed = False

    @classmethod
    def connect(
        cls,
        address: str | Address,
        *,
        config: Config | None = None,
        runtime: str | Runtime | None = None,
        connect_timeout: float = 10.0,
        tls: ssl.SSLContext | None = None,
        key: SharedKey | bytes | str | None = None,
        server_hostname: str | None = None,
        handshake_timeout: float = 10.0,
        **options: Any,
    ) -> RpcClient:
        """Dial ``address`` (``"host:port"``), start a session, and return a client
        that closes it on ``close()``. ``tls``, ``key``, ``server_hostname`` and
        ``handshake_timeout`` reach a server that requires them (as for
        :class:`~pysmux.tunnel.TunnelClient`); ``options`` are those of the constructor."""
        dialer = Dialer(
            config=config,
            runtime=runtime,
            tls=tls,
            key=key,
            server_hostname=server_hostname,
            handshake_timeout=handshake_timeout,
            connect_timeout=connect_timeout,
        )
        session = dialer.session(address)
        try:
            return cls(session, owns_session=True, **options)
        except BaseException:
            session.close()
            raise

    @property
    def session(self) -> Session:
        return self._session

    # -- calls -----------------------------------------------------------------------

    def call(self, method: str, params: Params = None, timeout: float | None = None) -> Any:
        """Call ``method``; its result. ``RpcError`` if the server answered with an error,
        ``TimeoutError`` after ``timeout`` seconds (default: the client's)."""
        timeout = self.timeout if timeout is None else timeout
        deadline = _deadline(timeout)
        request_id = next(self._ids)
        line = encode(request(method, params, request_id)) + b"\n"  # bad params: no stream used

        def run(channel: RpcChannel) -> Any:
            channel.send_line(line, deadline)
            return channel.answer(request_id, deadline)

        try:
            return self._use(run)
        except TimeoutError:
            raise TimeoutError(f"{method!r}: no answer within {timeout} s") from None

    def notify(self, method: str, params: Params = None, timeout: float | None = None) -> None:
        """Send a notification: no answer comes, not even an error."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        line = encode(request(method, params, None)) + b"\n"
        self._use(lambda ch: ch.send_line(line, deadline))

    def batch(
        self,
        calls: Sequence[Call],
        *,
        notifications: Iterable[Call] = (),
        timeout: float | None = None,
    ) -> list[Any]:
        """Send ``calls`` (and ``notifications``) as one batch; one entry per call, in
        order: its result, or the ``RpcError`` it got (returned, not raised)."""
        deadline = _deadline(self.timeout if timeout is None else timeout)
        ids = [next(self._ids) for _ in calls]
        messages = [request(m, p, i) for (m, p), i in zip(calls, ids, strict=True)]
        messages += [request(m, p, None) for m, p in notifications]
        if not messages:
            raise ValueError("a batch needs at least one call or notification")
        line = encode(messages) + b"\n"

        def run(channel: RpcChannel) -> list[Any]:
            channel.send_line(line, deadline)
            if not ids:
                return []
            reply = channel.receive(deadline)
            if isinstance(reply, dict):  # the server could not take the batch at all
                _, error = check_response(reply)
                raise error if isinstance(error, RpcError) else RpcProtocolError(repr(reply))
            if not isinstance(reply, list):
                raise RpcProtocolError(f"a batch answered with {type(reply).__name__}")
            by_id = dict(map(check_response, reply))
            missing = [i for i in ids if i not in by_id]
            if missing or len(by_id) != len(reply):
                raise RpcProtocolError(f"batch response: ids {missing} missing or duplicated")
            return [by_id[i] for i in ids]

        return self._use(run)

    def _use(self, work: Callable[[RpcChannel], _T]) -> _T:
        channel = self._take()
        try:
            result = work(channel)
        except RpcError:  # a whole answer was read: the stream is fine
            self._give(channel)
            raise
        except BaseException:
            channel.close()
            raise
        self._give(channel)
        return result

    # -- the pool --------------------------------------------------------------------

    def _take(self) -> RpcChannel:
        while True:
            with self._lock:
                if self._closed:
                    raise RpcProtocolError("the client is closed")
                channel = self._idle.pop() if self._idle else None
            if channel is None:
                return RpcChannel(self._session.open_stream(), self._max_line)
            fresh = time.monotonic() - channel.idle_since < self._max_idle_seconds
            if fresh and channel.usable():
                return channel
            channel.close()

    def _give(self, channel: RpcChannel) -> None:
        channel.idle_since = time.monotonic()
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(channel)
                return
        channel.close()

    def close(self) -> None:
        """Close the idle streams (and the session, if the client made it). Idempotent."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for channel in idle:
            channel.close()
        if self._owns_session:
            self._session.close()

    def __enter__(self) -> RpcClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
