"""pysmux.rpc in-process: the dispatcher's answers line by line (every error code of
JSON-RPC 2.0), the bounded line reader, and server and client over a session pair
on both runtimes (pooled streams, timeouts, many tasks at once)."""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest

from pysmux.rpc import (
    INTERNAL_ERROR,
    INVALID_PARAMS,
    INVALID_REQUEST,
    METHOD_NOT_FOUND,
    PARSE_ERROR,
    SERVER_BUSY,
    Dispatcher,
    RpcChannel,
    RpcClient,
    RpcError,
    RpcProtocolError,
    RpcServer,
    register_builtins,
)
from pysmux.rpc.lines import ByteBudget, LineReader, LineTooLong, OverBudget
from pysmux.rpc.protocol import check_response
from pysmux.runtime import get_runtime
from tests.util import Event, Queue, recv_to_eof, spawn, wait_until

PURE = pytest.mark.runtime_independent(reason="pure functions, no I/O")


def dispatcher() -> Dispatcher:
    d = Dispatcher()
    d.register("echo", lambda params: params, raw=True)
    d.register("add", lambda a, b: a + b)
    d.register("fail", lambda: 1 / 0)
    d.register("refuse", lambda: (_ for _ in ()).throw(RpcError(-32001, "No", {"why": 1})))
    d.register("unjsonable", lambda: {1, 2})
    return d


def answer(d: Dispatcher, line: str | bytes) -> object:
    raw = line.encode() if isinstance(line, str) else line
    reply = d.handle_line(raw)
    return None if reply is None else json.loads(reply)


def err(code: int, request_id: object = None) -> tuple[int, object]:
    return code, request_id


def codes(reply: object) -> object:
    """(code, id) of an error response, or a list of them; results as ("ok", result)."""
    if isinstance(reply, list):
        return [codes(r) for r in reply]
    assert isinstance(reply, dict) and reply["jsonrpc"] == "2.0", reply
    if "error" in reply:
        return reply["error"]["code"], reply["id"]
    return "ok", reply["result"]


@PURE
def test_requests_and_results(runtime: str) -> None:
    """Params by position and by name, raw params, ids of every allowed type kept."""
    d = dispatcher()
    assert answer(d, '{"jsonrpc":"2.0","method":"add","params":[1,2],"id":1}') == {
        "jsonrpc": "2.0",
        "result": 3,
        "id": 1,
    }
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"add","params":{"a":1,"b":2},"id":"x"}')) \
        == ("ok", 3)  # fmt: skip
    for request_id in ("abc", 7, 1.5, None):
        msg = {"jsonrpc": "2.0", "method": "echo", "params": [], "id": request_id}
        assert answer(d, json.dumps(msg)) == {"jsonrpc": "2.0", "result": [], "id": request_id}
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"echo","id":1}')) == ("ok", None)
    # Strings a request carried come back intact, even a lone surrogate.
    reply = d.handle_line(b'{"jsonrpc":"2.0","method":"echo","params":["\\ud800\xc3\xa9"],"id":1}')
    assert reply is not None and reply.isascii()
    assert json.loads(reply)["result"] == ["\ud800\u00e9"]


@PURE
def test_every_error_code(runtime: str, caplog: pytest.LogCaptureFixture) -> None:
    d = dispatcher()
    for bad in ('{"jsonrpc":"2.0","method"', b"\xff\xfe{}", "[1,", "NaN", '{"x":Infinity}',
                "[" * 100_000, "1" * 5000):  # fmt: skip
        assert codes(answer(d, bad)) == err(PARSE_ERROR), bad[:20]
    for bad in ('{"method":"echo","id":1}', '{"jsonrpc":"1.0","method":"echo","id":1}',
                '{"jsonrpc":"2.0","method":5,"id":1}', '{"jsonrpc":"2.0","id":1}',
                '{"jsonrpc":"2.0","method":"echo","params":"x","id":1}'):  # fmt: skip
        assert codes(answer(d, bad)) == err(INVALID_REQUEST, 1), bad
    for bad in ("1", '"x"', "null", '{"jsonrpc":"2.0","method":"echo","id":true}',
                '{"jsonrpc":"2.0","method":"echo","id":{}}'):  # fmt: skip
        assert codes(answer(d, bad)) == err(INVALID_REQUEST), bad
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"nope","id":2}')) == err(METHOD_NOT_FOUND, 2)
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"rpc.x","id":2}')) == err(METHOD_NOT_FOUND, 2)
    for params in ("[1]", "[1,2,3]", '{"a":1}', '{"a":1,"b":2,"c":3}'):
        line = f'{{"jsonrpc":"2.0","method":"add","params":{params},"id":3}}'
        assert codes(answer(d, line)) == err(INVALID_PARAMS, 3), params
    caplog.set_level(logging.ERROR, logger="pysmux.rpc")
    reply = answer(d, '{"jsonrpc":"2.0","method":"fail","id":4}')
    assert reply == {"jsonrpc": "2.0", "error": {"code": INTERNAL_ERROR,
                     "message": "Internal error"}, "id": 4}  # fmt: skip
    assert "ZeroDivisionError" in caplog.text and "Traceback" in caplog.text
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"unjsonable","id":5}')) == err(
        INTERNAL_ERROR, 5
    )
    reply = answer(d, '{"jsonrpc":"2.0","method":"refuse","id":6}')
    assert reply == {"jsonrpc": "2.0", "error": {"code": -32001, "message": "No",
                     "data": {"why": 1}}, "id": 6}  # fmt: skip


@PURE
def test_batches_and_notifications(runtime: str, caplog: pytest.LogCaptureFixture) -> None:
    d = dispatcher()
    batch = json.dumps([
        {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": "a"},
        {"jsonrpc": "2.0", "method": "add", "params": [5, 5]},  # a notification
        {"foo": "boo"},
        {"jsonrpc": "2.0", "method": "nope", "id": "b"},
        1,
        {"jsonrpc": "2.0", "method": "echo", "params": {"k": [1]}, "id": "c"},
    ])  # fmt: skip
    assert codes(answer(d, batch)) == [
        ("ok", 3),
        err(INVALID_REQUEST),
        err(METHOD_NOT_FOUND, "b"),
        err(INVALID_REQUEST),
        ("ok", {"k": [1]}),
    ]
    assert codes(answer(d, "[]")) == err(INVALID_REQUEST)  # one response, not an array
    assert codes(answer(d, "[1,2,3]")) == [err(INVALID_REQUEST)] * 3
    # Notifications get nothing back, errors included; a batch of them gets no line.
    caplog.set_level(logging.ERROR, logger="pysmux.rpc")
    for note in ('{"jsonrpc":"2.0","method":"add","params":[1,2]}',
                 '{"jsonrpc":"2.0","method":"nope"}', '{"jsonrpc":"2.0","method":"fail"}',
                 '[{"jsonrpc":"2.0","method":"add","params":[1]},'
                 '{"jsonrpc":"2.0","method":"echo"}]'):  # fmt: skip
        assert d.handle_line(note.encode()) is None, note
    assert "ZeroDivisionError" in caplog.text  # a failing notification is still logged


@PURE
def test_registration(runtime: str) -> None:
    server = RpcServer()

    @server.method
    def hello(name: str = "world") -> str:
        return f"hello {name}"

    @server.method(name="math.neg")
    def negate(x: int) -> int:
        return -x

    assert server.methods == ["hello", "math.neg"]
    d = server._dispatcher
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"hello","id":1}')) == ("ok", "hello world")
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"math.neg","params":[4],"id":1}')) == (
        "ok",
        -4,
    )
    register_builtins(server)
    assert {"echo", "add", "get_time", "sleep"} <= set(server.methods)
    for name, fn, exc in [("rpc.x", print, ValueError), ("", print, ValueError),
                          ("x", 3, TypeError), (5, print, ValueError)]:  # fmt: skip
        with pytest.raises(exc):
            server.register(name, fn)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_line"):
        RpcServer(max_line=0)
    with pytest.raises(ValueError, match="idle_timeout"):
        RpcServer(idle_timeout=0)


@PURE
def test_builtin_params_are_checked(runtime: str) -> None:
    d = register_builtins(RpcServer())._dispatcher
    for params in ('["1",2]', "[true,1]", "[1.5,1]", '{"a":1}'):
        line = f'{{"jsonrpc":"2.0","method":"add","params":{params},"id":1}}'
        assert codes(answer(d, line)) == err(INVALID_PARAMS, 1), params
    for params in ("[-1]", "[10.5]", '["1"]', "[true]", '{"secs":1}', "[]"):
        line = f'{{"jsonrpc":"2.0","method":"sleep","params":{params},"id":1}}'
        assert codes(answer(d, line)) == err(INVALID_PARAMS, 1), params
    assert codes(answer(d, '{"jsonrpc":"2.0","method":"add","params":[2,3],"id":1}')) == ("ok", 5)
    now = answer(d, '{"jsonrpc":"2.0","method":"get_time","id":1}')
    assert isinstance(now, dict) and abs(now["result"] - time.time()) < 5


@PURE
def test_check_response(runtime: str) -> None:
    assert check_response({"jsonrpc": "2.0", "result": None, "id": 1}) == (1, None)
    request_id, error = check_response(
        {"jsonrpc": "2.0", "error": {"code": 1, "message": "m", "data": [2]}, "id": None}
    )
    assert request_id is None and isinstance(error, RpcError)
    assert (error.code, error.message, error.data) == (1, "m", [2])
    assert isinstance(error, OSError) and "JSON-RPC error 1" in str(error)
    for bad in [[], {"result": 1, "id": 1}, {"jsonrpc": "2.0", "result": 1},
                {"jsonrpc": "2.0", "result": 1, "error": {}, "id": 1},
                {"jsonrpc": "2.0", "error": {"code": "x", "message": "m"}, "id": 1}]:  # fmt: skip
        with pytest.raises(RpcProtocolError):
            check_response(bad)


# ---------------------------------------------------------------------------
# the line reader, on a stream


@pytest.fixture
def streams(pair):
    client, server = pair()
    st = client.open_stream()
    st.sendall(b"\n")
    peer = server.accept_stream(timeout=5)
    return st, peer


def test_line_reader_lines_blank_lines_and_eof(streams) -> None:
    st, peer = streams
    reader = LineReader(peer, max_line=64)
    st.sendall(b"\r\n  \nfirst\nsec")
    assert reader.readline(idle_timeout=5) == b"first"
    assert (reader.pending, reader.lines_begun()) == (3, 1)  # "sec"
    st.sendall(b"ond\r\nlast without newline")
    assert reader.readline(idle_timeout=5) == b"second\r"
    st.shutdown(socket.SHUT_WR)
    assert reader.readline(idle_timeout=5) == b"last without newline"
    assert reader.readline(idle_timeout=5) is None


def test_line_reader_bounds(streams, runtime: str) -> None:
    """A line past max_line raises without more than max_line + 1 bytes read; a half
    line that goes silent, and silence between lines, time out; a shared budget is
    enforced and given back."""
    st, peer = streams
    reader = LineReader(peer, max_line=1000)
    st.sendall(b"x" * 5000)
    with pytest.raises(LineTooLong):
        reader.readline(idle_timeout=5)
    assert reader.pending == 1001
    reader.close()

    reader = LineReader(peer, max_line=10_000)
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        reader.readline(idle_timeout=0.2)  # the rest of the 5000 bytes, then silence
    assert 0.15 < time.monotonic() - began < 2
    reader.close()

    st2, peer2 = st, peer
    budget = ByteBudget(100, get_runtime(runtime))
    first, second = LineReader(peer2, 1000, budget), LineReader(peer2, 1000, budget)
    st2.sendall(b"\n" + b"y" * 80)
    with pytest.raises(TimeoutError):
        first.readline(line_timeout=0.2)  # drains the 80 bytes, starts a line, times out
    assert budget.held == 80
    st2.sendall(b"z" * 30)
    with pytest.raises(OverBudget) as info:
        second.readline(idle_timeout=1)
    assert info.value.code == SERVER_BUSY
    first.close()
    assert budget.held == 0


# ---------------------------------------------------------------------------
# server and client over a session pair


@pytest.fixture
def rpc(pair, runtime: str):
    """(client, server) over a fresh pair: the builtins plus a few test methods."""
    client_session, server_session = pair(version=2)
    server = register_builtins(RpcServer(runtime=runtime, line_timeout=0.5, idle_timeout=1.0))
    server.register("fail", lambda: 1 / 0)
    serving = spawn(server.serve_session, server_session, name="serve-session")
    client = RpcClient(client_session, timeout=10)
    yield client, server
    client.close()
    server.close()
    serving.result(10)


def test_calls_notifications_batches_and_errors(rpc, caplog) -> None:
    client, server = rpc
    assert client.call("add", [2, 3]) == 5
    assert client.call("add", {"a": 2, "b": -3}) == -1
    assert client.call("echo", ("t", 1)) == ["t", 1]
    with pytest.raises(RpcError) as info:
        client.call("missing", {"x": 1})
    assert (info.value.code, info.value.data) == (METHOD_NOT_FOUND, "missing")
    with pytest.raises(RpcError) as info:
        client.call("fail")
    assert info.value.code == INTERNAL_ERROR and info.value.data is None
    client.notify("add", [1, 1])
    results = client.batch(
        [("add", [1, 2]), ("nope", None), ("echo", {"a": [1]})], notifications=[("echo", [0])]
    )
    assert results[0] == 3 and results[2] == {"a": [1]}
    assert isinstance(results[1], RpcError) and results[1].code == METHOD_NOT_FOUND
    assert client.batch([], notifications=[("echo", None)]) == []
    with pytest.raises(ValueError):
        client.batch([])
    with pytest.raises(TypeError):
        client.call("echo", "not params")  # type: ignore[arg-type]
    # All of that went over one pooled stream: every call waited for the previous one.
    assert len(client._idle) == 1 and server.streams == 1


def test_timeout_drops_the_stream_and_the_next_call_works(rpc) -> None:
    client, _ = rpc
    began = time.monotonic()
    with pytest.raises(TimeoutError, match=r"'sleep': no answer within 0\.2 s"):
        client.call("sleep", [2], timeout=0.2)
    assert 0.15 < time.monotonic() - began < 1.5
    assert client._idle == []  # the stream that will still get the late answer is gone
    assert client.call("echo", ["next"]) == ["next"]


def test_idle_stream_closed_by_server_is_not_reused(rpc) -> None:
    """The server closes a stream silent for idle_timeout; the client notices before
    reusing it and opens a new one."""
    client, server = rpc
    assert client.call("echo", [1]) == [1]
    (stale,) = client._idle
    wait_until(lambda: server.streams == 0, 5, "the server closed the idle stream")
    wait_until(lambda: not stale.usable(), 5, "the client sees the FIN")
    assert client.call("echo", [2]) == [2]
    assert client._idle[0] is not stale


def test_many_tasks_at_once(rpc) -> None:
    """16 tasks x 50 calls share one client: each gets its own answers, and the pool
    keeps at most max_idle_streams streams."""
    client, _ = rpc

    def work(k: int) -> list[int]:
        return [client.call("add", [k, i]) for i in range(50)]

    workers = [spawn(work, k, name=f"caller-{k}") for k in range(16)]
    for k, w in enumerate(workers):
        assert w.result(60) == [k + i for i in range(50)]
    assert 1 <= len(client._idle) <= 16


def test_pipelining_on_one_stream(pair, runtime: str) -> None:
    """RpcChannel writes several requests before reading; the answers come in order."""
    client_session, server_session = pair()
    server = register_builtins(RpcServer(runtime=runtime))
    serving = spawn(server.serve_session, server_session, name="serve-session")
    try:
        channel = RpcChannel(client_session.open_stream())
        for i in range(20):
            channel.send({"jsonrpc": "2.0", "method": "add", "params": [i, i], "id": i})
        channel.send({"jsonrpc": "2.0", "method": "echo"})  # a notification in between
        channel.send({"jsonrpc": "2.0", "method": "echo", "params": ["end"], "id": "end"})
        answers = [channel.receive(time.monotonic() + 10) for _ in range(21)]
        assert [a["id"] for a in answers] == [*range(20), "end"]
        assert [a["result"] for a in answers[:20]] == [2 * i for i in range(20)]
        channel.stream.shutdown(socket.SHUT_WR)
        assert recv_to_eof(channel.stream) == b""
        channel.close()
    finally:
        server.close()
        serving.result(10)


def test_oversized_and_unfinished_lines_close_the_stream(pair, runtime: str) -> None:
    client_session, server_session = pair()
    server = RpcServer(runtime=runtime, max_line=1000, line_timeout=0.3)
    serving = spawn(server.serve_session, server_session, name="serve-session")
    try:
        st = client_session.open_stream()
        st.sendall(b"[" * 4000)
        reply = json.loads(recv_to_eof(st))
        assert reply["error"]["code"] == INVALID_REQUEST and reply["id"] is None
        assert "1000 bytes" in reply["error"]["data"]
        st.close()

        st = client_session.open_stream()
        st.sendall(b'{"jsonrpc":"2.0",')
        began = time.monotonic()
        assert recv_to_eof(st) == b""  # closed without an answer
        assert 0.2 < time.monotonic() - began < 3
        st.close()
    finally:
        server.close()
        serving.result(10)


def test_server_close_ends_sleeping_calls_promptly(pair, runtime: str) -> None:
    client_session, server_session = pair()
    server = register_builtins(RpcServer(runtime=runtime))
    serving = spawn(server.serve_session, server_session, name="serve-session")
    client = RpcClient(client_session)
    results = Queue()

    def sleeper() -> None:
        try:
            client.call("sleep", [10])
        except OSError as exc:
            results.put(exc)

    worker = spawn(sleeper)
    wait_until(lambda: server.streams == 1, 5, "the call arrived")
    began = time.monotonic()
    server.close()
    serving.result(10)
    worker.result(10)
    assert time.monotonic() - began < 3
    assert isinstance(results.get(timeout=1), OSError)
    client.close()


# ---------------------------------------------------------------------------
# draining


@pytest.fixture
def holding(pair, runtime: str):
    """(client session, server, started, release): a server with a method ``hold`` that
    returns "done" once the test sets ``release`` (``started`` is set when it begins)."""
    client_session, server_session = pair()
    server = register_builtins(RpcServer(runtime=runtime))  # idle_timeout: 300 s
    started, release = Event(), Event()

    def hold() -> str:
        started.set()
        assert release.wait(20), "the test never released the call"
        return "done"

    server.register("hold", hold)
    serving = spawn(server.serve_session, server_session, name="serve-session")
    yield client_session, server, started, release
    release.set()
    server.close()
    serving.result(10)


def test_drain_closes_idle_pooled_streams_and_answers_the_call_in_flight(holding) -> None:
    """A draining server (SIGTERM, ``drain()``) does not wait for the idle streams of
    clients' pools (they would hold it for the whole drain timeout): it closes them at
    once, the call in flight still gets its answer, and the drain ends as soon as that
    call is answered. The idle client's next call then fails at once."""
    client_session, server, started, release = holding
    idle = RpcClient(client_session, timeout=10)
    assert idle.call("add", [1, 2]) == 3  # its stream stays pooled, idle on the server
    busy = RpcClient(client_session, timeout=20)
    call = spawn(busy.call, "hold", name="call-in-flight")
    assert started.wait(5)
    wait_until(lambda: server.streams == 2, 5, "two streams served")
    drained = spawn(server.drain, 30, name="drain")
    wait_until(lambda: server.streams == 1, 5, "the idle stream closed at once")
    assert server.draining and not server.closed  # the call in flight holds the drain
    began = time.monotonic()
    release.set()
    assert call.result(10) == "done"
    assert drained.result(10) is True
    assert time.monotonic() - began < 3, "the drain waited past the last answer"
    with pytest.raises(OSError):
        idle.call("add", [1, 2])
    idle.close()
    busy.close()


def test_drain_answers_the_requests_received_and_nothing_new(holding) -> None:
    """A client pipelining on one stream: the requests the server had received when the
    drain began (the last of them only in part) are answered in order, then the stream
    ends; requests sent after that get no answer (the stream's end, not a hang), even
    when they come with the rest of a request the server must finish reading."""
    client_session, server, started, release = holding
    channel = RpcChannel(client_session.open_stream())
    lines = [json.dumps(line).encode() + b"\n" for line in (
        {"jsonrpc": "2.0", "method": "hold", "id": 1},
        {"jsonrpc": "2.0", "method": "add", "params": [1, 2], "id": 2},
        {"jsonrpc": "2.0", "method": "echo", "params": ["x"], "id": 3},
        {"jsonrpc": "2.0", "method": "add", "params": [5, 5], "id": 4},
        {"jsonrpc": "2.0", "method": "add", "params": [6, 6], "id": 5},
    )]  # fmt: skip
    # One frame, read at once: the first two requests and half of the third.
    channel.send_line(lines[0] + lines[1] + lines[2][:10])
    assert started.wait(5)
    drained = spawn(server.drain, 30, name="drain")
    wait_until(lambda: server.draining, 5, "draining")
    channel.send_line(lines[2][10:] + lines[3])  # the third's end comes with a new one
    channel.send_line(lines[4])
    release.set()
    deadline = time.monotonic() + 10
    assert [channel.answer(i, deadline) for i in (1, 2, 3)] == ["done", 3, ["x"]]
    with pytest.raises(RpcProtocolError, match="without answering"):
        channel.receive(deadline)
    assert drained.result(10) is True
    channel.close()
