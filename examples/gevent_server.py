"""pysmux on gevent: a StreamServer that echoes smux streams, and a client, in one file.

    python examples/gevent_server.py

The server is a ``gevent.server.StreamServer`` on 127.0.0.1 (an ephemeral
port). Each TCP connection it accepts carries one smux session
(``runtime="gevent"``), and each stream of that session is echoed by a greenlet
of its own. The client opens one TCP connection, sends a message on several
concurrent streams, prints the replies and closes; then the server stops and
the program exits. Nothing is monkey-patched: the sockets come from
``gevent.socket``, which is what ``runtime="gevent"`` asks for.
"""

from __future__ import annotations

import socket

import gevent
import gevent.pool
import gevent.socket
from gevent.server import StreamServer

import pysmux


def echo(stream: pysmux.Stream) -> None:
    """Send back everything the peer sends; close (FIN) once it half-closes."""
    with stream:
        while data := stream.recv(65536):
            stream.sendall(data)


def handle_connection(sock: gevent.socket.socket, address: tuple[str, int]) -> None:
    """StreamServer handler: one TCP connection = one smux session (server side)."""
    streams = gevent.pool.Group()
    with pysmux.server(sock, runtime="gevent") as session:  # the session owns sock
        while True:
            try:
                stream = session.accept_stream()
            except pysmux.SessionClosedError:  # the client closed its session
                break
            streams.spawn(echo, stream)
    streams.join()  # every stream ended with the session


def ask(session: pysmux.Session, message: bytes) -> tuple[int, bytes]:
    """One request on a stream of its own: send, half-close, read the whole reply."""
    with session.open_stream() as stream:
        stream.sendall(message)
        stream.shutdown(socket.SHUT_WR)  # FIN: we send no more, but still read
        reply = b""
        while data := stream.recv(65536):
            reply += data
        return stream.id, reply


def main() -> None:
    server = StreamServer(("127.0.0.1", 0), handle_connection)
    server.start()
    host, port = server.address[:2]
    print(f"gevent smux echo server on {host}:{port}")
    try:
        sock = gevent.socket.create_connection((host, port))
        with pysmux.client(sock, runtime="gevent") as client:
            messages = [f"hello {n} from a greenlet".encode() for n in range(5)]
            jobs = [gevent.spawn(ask, client, message) for message in messages]
            gevent.joinall(jobs, timeout=10, raise_error=True)
            for message, job in zip(messages, jobs, strict=True):
                stream_id, reply = job.get(block=False)
                assert reply == message, (reply, message)
                print(f"stream {stream_id}: {reply.decode()}")
    finally:
        server.stop(timeout=5)  # waits for the handlers, which end with their sessions
    print("done")


if __name__ == "__main__":
    with gevent.Timeout(30):  # never hang, whatever happens
        main()
