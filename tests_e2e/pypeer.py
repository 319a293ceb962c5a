"""A pysmux peer in its own process, for tests that kill the peer mid-transfer.

    python tests_e2e/pypeer.py server [--version V] [--streams N] [--runtime R]
        listen on 127.0.0.1:0, print {"event": "listening", "addr": ...}; on one
        connection, accept streams and write the test pattern on each forever.
    python tests_e2e/pypeer.py client --addr HOST:PORT [--version V] [--streams N] [--runtime R]
        connect, open N streams, write the test pattern on each forever.

``--runtime gevent`` monkey-patches the process first (threads become
greenlets, sockets cooperative) and gives the session ``runtime="gevent"``.

It prints one JSON object per stdout line (like gopeer), exits when stdin
reaches EOF, and after --deadline seconds in any case (status 3).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading

import pysmux

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from peers import iter_pattern

_out = threading.Lock()


def emit(event: str, **kv: object) -> None:
    with _out:
        print(json.dumps({"event": event, **kv}), flush=True)


def write_forever(st: pysmux.Stream) -> None:
    sent = 0
    try:
        while True:
            for part in iter_pattern(st.id, 1 << 24):
                st.sendall(part)
                sent += len(part)
    except OSError as exc:
        emit("stream", id=st.id, written=sent, err=repr(exc))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["client", "server"])
    ap.add_argument("--addr", default="127.0.0.1:0")
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--streams", type=int, default=1)
    ap.add_argument("--deadline", type=float, default=60.0)
    ap.add_argument("--runtime", choices=["thread", "gevent"], default="thread")
    args = ap.parse_args()

    def watch_stdin() -> None:
        sys.stdin.buffer.read()
        os._exit(0)

    if args.runtime == "gevent":
        from gevent import monkey

        monkey.patch_all()  # before any socket or thread is made (names are looked up at call time)
        # stdin is not cooperative: watch it from a real OS thread.
        monkey.get_original("_thread", "start_new_thread")(watch_stdin, ())
    else:
        threading.Thread(target=watch_stdin, daemon=True).start()
    threading.Timer(args.deadline, lambda: (emit("deadline"), os._exit(3))).start()

    host, _, port = args.addr.rpartition(":")
    config = pysmux.Config(version=args.version)
    if args.role == "server":
        lsock = socket.create_server((host, int(port)))
        emit("listening", addr="{}:{}".format(*lsock.getsockname()[:2]), pid=os.getpid())
        conn, _ = lsock.accept()
        sess = pysmux.server(conn, config=config, runtime=args.runtime)
        for _ in range(args.streams):
            st = sess.accept_stream()
            emit("accepted", id=st.id)
            threading.Thread(target=write_forever, args=(st,), daemon=True).start()
    else:
        conn = socket.create_connection((host, int(port)))
        sess = pysmux.client(conn, config=config, runtime=args.runtime)
        for _ in range(args.streams):
            st = sess.open_stream()
            emit("opened", id=st.id)
            threading.Thread(target=write_forever, args=(st,), daemon=True).start()
    emit("writing", pid=os.getpid())
    threading.Event().wait()  # until killed, stdin EOF or the deadline


if __name__ == "__main__":
    main()
