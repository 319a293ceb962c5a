"""JSON-RPC 2.0 over pysmux: a server of plain functions and a client, over real TCP.

    python examples/rpc_client.py              # starts its own server on a loopback port
    python examples/rpc_client.py HOST:PORT    # talks to a running `pysmux rpc -l HOST:PORT`

The client makes calls (by position and by name), a batch, a notification, a call
that fails on the server, and a call that times out; then many calls at once from
several threads, which share one mux connection (each call gets a stream of its own).
"""

from __future__ import annotations

import sys
import threading

from pysmux.rpc import RpcClient, RpcError, RpcServer, register_builtins


def main() -> None:
    server = None
    if len(sys.argv) > 1:
        address = sys.argv[1]
    else:
        server = register_builtins(RpcServer("127.0.0.1:0"))  # echo, add, get_time, sleep
        server.start()
        address = "{}:{}".format(*server.address)
    print(f"server on {address}")
    try:
        with RpcClient.connect(address, timeout=10) as rpc:
            print("add [1, 2] ->", rpc.call("add", [1, 2]))
            print("add {a: 40, b: 2} ->", rpc.call("add", {"a": 40, "b": 2}))
            print("echo ->", rpc.call("echo", {"hello": ["smux", 1]}))
            print("batch ->", rpc.batch([("add", [2, 2]), ("echo", ["x"])]))
            rpc.notify("echo", ["nobody answers a notification"])
            try:
                rpc.call("no_such_method")
            except RpcError as exc:
                print(f"error {exc.code}: {exc.message}")
            try:
                rpc.call("sleep", {"seconds": 5}, timeout=0.2)
            except TimeoutError as exc:
                print("timeout:", exc)

            sums: list[int] = []

            def worker(k: int) -> None:
                total = sum(rpc.call("add", [k, i]) for i in range(100))
                sums.append(total)

            threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            expected = sum(100 * k + 4950 for k in range(8))
            print(f"800 calls from 8 threads: {'ok' if sum(sums) == expected else 'WRONG'}")
    finally:
        if server is not None:
            server.close()


if __name__ == "__main__":
    main()
