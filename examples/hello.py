"""pysmux in one file: an echo server and a client over real TCP.

    python examples/hello.py

The server accepts TCP connections on 127.0.0.1 (an ephemeral port), runs one
smux session per connection and echoes every stream on a thread of its own.
The client opens a single TCP connection, carries a few streams over it, and
everything is closed cleanly before the program exits.
"""

from __future__ import annotations

import socket
import socketserver
import threading

import pysmux


def echo(stream: pysmux.Stream) -> None:
    """Send back everything the peer sends, then close (FIN) when it half-closes."""
    with stream:
        while data := stream.recv(65536):
            stream.sendall(data.upper())


class SmuxHandler(socketserver.BaseRequestHandler):
    """One accepted TCP connection = one smux session (server side)."""

    def handle(self) -> None:
        workers = []
        with pysmux.server(self.request) as session:
            while True:
                try:
                    stream = session.accept_stream()
                except pysmux.SessionClosedError:  # the client closed its session
                    break
                worker = threading.Thread(target=echo, args=(stream,))
                worker.start()
                workers.append(worker)
        for worker in workers:
            worker.join()


def main() -> None:
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), SmuxHandler) as server:
        serve = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        serve.start()
        host, port = server.socket.getsockname()
        print(f"server listening on {host}:{port}")

        sock = socket.create_connection((host, port))
        with pysmux.client(sock) as client:  # the session owns sock: close() closes it
            streams = [client.open_stream() for _ in range(3)]
            for n, stream in enumerate(streams):
                stream.sendall(f"hello from stream {stream.id}, message {n}".encode())
                stream.shutdown(socket.SHUT_WR)  # FIN: we send no more, but still read
            for stream in streams:
                with stream, stream.makefile("rb") as f:
                    reply = f.read()  # everything, up to the server's FIN
                print(f"stream {stream.id} got {reply.decode()!r}")

        server.shutdown()  # stop serve_forever; leaving `with` joins the handler threads
        serve.join()
    print("all closed, bye")


if __name__ == "__main__":
    main()
