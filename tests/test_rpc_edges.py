"""pysmux.rpc at its edges, in-process over a session pair on both runtimes: a client facing
a server that answers wrongly (or not at all) gets an ``RpcProtocolError`` that says what
was wrong and never reuses that stream; arguments that cannot work are refused; the pool
and the server's bounds do what they promise."""

from __future__ import annotations

import json
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest

import pysmux
from pysmux.rpc import (
    INVALID_REQUEST,
    SERVER_BUSY,
    Dispatcher,
    RpcChannel,
    RpcClient,
    RpcError,
    RpcProtocolError,
    RpcServer,
    register_builtins,
)
from pysmux.rpc.lines import ByteBudget, LineReader
from pysmux.rpc.protocol import encode, request
from pysmux.runtime import get_runtime
from tests.runtimes import current
from tests.util import recv_to_eof, spawn, wait_until

PURE = pytest.mark.runtime_independent(reason="pure functions, no I/O")


def read_line(stream: pysmux.Stream) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = stream.recv(4096)
        assert chunk, "EOF before a whole request line"
        data += chunk
    return data


def scripted_server(session: pysmux.Session, replies: list[tuple[bytes, str]]) -> list[Any]:
    """For each ``(reply, then)``: read one request line (on a newly accepted stream, unless
    the previous entry said "same"), write the reply as it is (nothing if empty), then
    "close" the stream, leave it "open", or wait for the "same" stream's next request.
    Returns the requests, decoded."""
    requests = []
    st = None
    for reply, then in replies:
        if st is None:
            st = session.accept_stream(timeout=10)
        requests.append(json.loads(read_line(st)))
        if reply:
            st.sendall(reply)
        if then == "close":
            st.close()
        if then != "same":
            st = None
    return requests


@pytest.fixture
def sessions(pair: Any) -> tuple[pysmux.Session, pysmux.Session]:
    client_session, server_session = pair()
    return client_session, server_session


@pytest.fixture
def served(pair: Any, runtime: str) -> Iterator[tuple[pysmux.Session, RpcServer]]:
    """A client session, and an RpcServer with the builtins serving its peer."""
    client_session, server_session = pair()
    server = register_builtins(RpcServer(runtime=runtime, max_buffered=100))
    serving = spawn(server.serve_session, server_session, name="serve-session")
    yield client_session, server
    server.close()
    serving.result(10)


def test_wrong_answers_are_protocol_errors_and_the_stream_is_dropped(
    sessions: tuple[pysmux.Session, pysmux.Session],
) -> None:
    """No answer, an answer that is not JSON, an answer to another request, and batch
    answers of the wrong shape: each raises ``RpcProtocolError`` naming the problem (a
    batch refused as a whole raises the server's ``RpcError``); every call after one of
    them goes out on a fresh stream."""
    client_session, server_session = sessions
    ok = b'{"jsonrpc":"2.0","result":"fine","id":%d}\n'
    replies = [
        (b"", "close"),  # the stream ends without an answer
        (b"this is not json\n", "close"),
        (b'{"jsonrpc":"2.0","result":1,"id":99}\n', "close"),
        # A batch refused as a whole: a complete answer, so the stream is used again.
        (b'{"jsonrpc":"2.0","error":{"code":-32600,"message":"Invalid Request"},"id":null}\n',
         "same"),
        (b'{"jsonrpc":"2.0","result":"not a batch","id":null}\n', "close"),
        (b"7\n", "close"),
        (b'[{"jsonrpc":"2.0","result":1,"id":7}]\n', "close"),  # the answer to id 8 is missing
        (ok % 9, "close"),
    ]  # fmt: skip
    fake = spawn(scripted_server, server_session, replies, name="fake-server")
    client = RpcClient(client_session, timeout=10)
    try:
        cases = [
            (lambda: client.call("a"), "stream 3: the server ended it without answering"),
            (lambda: client.call("b"), "stream 5: the response is not JSON"),
            (lambda: client.call("c"), "response id 99 answers no request (3)"),
        ]
        for call, message in cases:
            with pytest.raises(RpcProtocolError) as info:
                call()
            assert message in str(info.value)
        with pytest.raises(RpcError) as refused:
            client.batch([("d", None)])
        assert refused.value.code == INVALID_REQUEST
        with pytest.raises(RpcProtocolError, match="not a batch"):
            client.batch([("e", None)])
        with pytest.raises(RpcProtocolError, match="a batch answered with int"):
            client.batch([("f", None)])
        with pytest.raises(RpcProtocolError, match=r"ids \[8\] missing or duplicated"):
            client.batch([("g", None), ("h", None)])
        assert client.call("i") == "fine"
    finally:
        client.close()
    requests = fake.result(10)
    assert [r["method"] if isinstance(r, dict) else [x["method"] for x in r] for r in requests] \
        == ["a", "b", "c", ["d"], ["e"], ["f"], ["g", "h"], "i"]  # fmt: skip
    # A stream that went wrong was never used again; the one whose batch was refused as
    # a whole (an answer read to its end) carried the next request.
    assert client_session.stats()["streams_opened"] == len(replies) - 1


def test_an_unasked_line_keeps_the_stream_out_of_the_pool(
    sessions: tuple[pysmux.Session, pysmux.Session],
) -> None:
    """A server that sends a line nobody asked for along with an answer: the answer is
    returned, and the stream (whose next line would answer nothing) is not reused."""
    client_session, server_session = sessions
    replies = [
        (b'{"jsonrpc":"2.0","result":1,"id":1}\n{"jsonrpc":"2.0","result":2,"id":2}\n', "open"),
        (b'{"jsonrpc":"2.0","result":3,"id":2}\n', "close"),
    ]
    fake = spawn(scripted_server, server_session, replies, name="fake-server")
    client = RpcClient(client_session, timeout=10)
    try:
        assert client.call("one") == 1
        assert client.call("two") == 3  # from the second stream, not the stray "2"
    finally:
        client.close()
    fake.result(10)
    assert client_session.stats()["streams_opened"] == 2


def test_pool_of_zero_opens_a_stream_per_call(served: tuple[pysmux.Session, RpcServer]) -> None:
    client_session, _ = served
    client = RpcClient(client_session, timeout=10, max_idle_streams=0)
    try:
        assert [client.call("add", [i, 1]) for i in range(3)] == [1, 2, 3]
    finally:
        client.close()
    assert client_session.stats()["streams_opened"] == 3


def test_client_arguments_and_a_closed_client(served: tuple[pysmux.Session, RpcServer]) -> None:
    """A timeout that is not > 0 is a ValueError (at construction and per call); a closed
    client refuses calls; ``session`` is the session it was given."""
    client_session, _ = served
    with pytest.raises(ValueError, match=r"timeout=0: must be > 0 or None"):
        RpcClient(client_session, timeout=0)
    client = RpcClient(client_session)
    assert client.session is client_session
    with pytest.raises(ValueError, match=r"timeout=-1: must be > 0 or None"):
        client.call("echo", [1], timeout=-1)
    assert client.call("echo", [1]) == [1]
    client.close()
    with pytest.raises(RpcProtocolError, match="the client is closed"):
        client.call("echo", [2])
    assert client_session.stats()["streams_opened"] == 1  # the refused call opened none


def test_channel_call_and_a_deadline_already_past(
    served: tuple[pysmux.Session, RpcServer],
) -> None:
    """``RpcChannel.call`` makes one call on its stream; a send whose deadline has passed
    raises TimeoutError before writing anything."""
    client_session, _ = served
    channel = RpcChannel(client_session.open_stream())
    try:
        assert channel.call("add", [20, 22], 1, deadline=time.monotonic() + 10) == 42
        with pytest.raises(TimeoutError, match="sending: no answer in time"):
            channel.send({"jsonrpc": "2.0", "method": "add", "params": [1, 1], "id": 2},
                         deadline=time.monotonic() - 1)  # fmt: skip
        assert channel.sent_bytes == len(b'{"jsonrpc":"2.0","method":"add","params":[20,22],'
                                         b'"id":1}\n')  # fmt: skip
    finally:
        channel.close()


def test_connect_with_a_bad_config_leaves_no_socket_open(runtime: str) -> None:
    """``RpcClient.connect`` that fails after dialling closes the socket it made (an open
    one would surface here as a ResourceWarning, which this suite turns into an error)."""
    listener = current().listen("127.0.0.1")
    try:
        with pytest.raises(TypeError, match=r"config must be a pysmux\.Config"):
            RpcClient.connect(listener.getsockname(), config="v2", runtime=runtime)  # type: ignore[arg-type]
    finally:
        listener.close()


def test_server_arguments_lifecycle_and_budget(
    served: tuple[pysmux.Session, RpcServer], runtime: str
) -> None:
    """``max_session_streams`` must be > 0; a server made without a listen address has
    nothing to start (RuntimeError) but works as a context manager; half lines count in
    ``buffered`` until the stream that sent more than ``max_buffered`` allows is answered
    SERVER_BUSY and closed."""
    with pytest.raises(ValueError, match=r"max_session_streams=0: must be an int > 0"):
        RpcServer(max_session_streams=0)
    bare = RpcServer(runtime=runtime)
    assert repr(bare) == "<pysmux.rpc.RpcServer not listening sessions=0 streams=0>"
    assert bare.runtime is get_runtime(runtime)
    with pytest.raises(RuntimeError, match="no listen address given"):
        bare.start()
    with bare as same:
        assert same is bare and not bare.closed
    assert bare.closed

    client_session, server = served
    half = b'{"jsonrpc":"2.0","method":"echo","params":["' + b"x" * 40
    first = client_session.open_stream()
    first.sendall(half)
    wait_until(lambda: server.buffered == len(half), 5, "the half line is held")
    second = client_session.open_stream()
    second.sendall(b"y" * (101 - len(half)))  # one byte past the budget
    reply = json.loads(recv_to_eof(second))
    assert reply["error"]["code"] == SERVER_BUSY and reply["id"] is None
    second.close()
    first.sendall(b'"],"id":1}\n')  # the first stream is still served
    assert json.loads(read_line(first))["result"] == ["x" * 40]
    first.close()
    wait_until(lambda: server.buffered == 0, 5, "nothing held")


@PURE
def test_pure_argument_checks(runtime: str) -> None:
    """The bounded readers refuse limits that are not > 0; a method name must be a str; a
    value nested past the JSON encoder's depth is a ValueError; an RpcError survives
    pickling (it crosses process pools)."""
    with pytest.raises(ValueError, match=r"limit=0: must be an int > 0"):
        ByteBudget(0, get_runtime("thread"))
    with pytest.raises(ValueError, match=r"max_line=0: must be an int > 0"):
        LineReader(None, 0)
    with pytest.raises(TypeError, match="method must be a str, not int"):
        request(7, None, 1)  # type: ignore[arg-type]
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(ValueError, match="nested too deeply"):
        encode(deep)
    err = RpcError(-32001, "No", {"why": 1})
    back = pickle.loads(pickle.dumps(err))
    assert (type(back), back.code, back.message, back.data) == (RpcError, -32001, "No", {"why": 1})


@PURE
def test_a_builtin_without_a_signature_is_called_as_it_is(runtime: str) -> None:
    """Some C functions have no signature to check arguments against: they are called, and
    a bad call comes back as an error answer, not a crash."""
    d = Dispatcher()
    d.register("max", max)
    reply = json.loads(d.handle_line(b'{"jsonrpc":"2.0","method":"max","params":[3,9],"id":1}'))
    assert reply["result"] == 9
    bad = json.loads(d.handle_line(b'{"jsonrpc":"2.0","method":"max","params":[],"id":2}'))
    assert "error" in bad and bad["id"] == 2
