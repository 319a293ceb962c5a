"""A kcptun-style tunnel as a library: TCP connections carried as smux streams.

::

    TCP clients --> TunnelClient ==(N mux connections)==> TunnelServer --> target
                    (listen)        one stream per TCP                    (one TCP per
                                    connection, least loaded first        stream)

* :class:`TunnelClient` accepts TCP connections on its listen address and
  carries each as one stream over ``conn`` mux connections to the remote
  address, each on the one carrying the fewest. A mux connection that dies is dialled again with
  exponential backoff; a TCP connection that arrives while none is up waits for
  one (up to ``connect_timeout``).
* :class:`TunnelServer` accepts mux connections and forwards every stream as a
  new TCP connection to its target. A target that cannot be reached closes that
  stream only.
* :class:`EchoServer` accepts mux connections and echoes every stream (for
  tests and benchmarks).

The mux connections are plain TCP or TLS (kcptun runs smux over KCP/UDP instead), so
both ends speak the smux wire protocol of Go's ``xtaci/smux`` over TCP; either
end can be a Go program that does the same. Both ends must use the same
``Config.version``.

What each carried connection gets:

* a copy task (a thread, or a greenlet with ``runtime="gevent"``) from stream
  to TCP, and one from TCP to stream only while bytes arrive: an idle
  connection holds one task. Every task is joined when the connection ends;
* half-close in both directions: EOF from the TCP side becomes
  ``stream.shutdown(SHUT_WR)`` (a FIN), EOF of the stream becomes
  ``sock.shutdown(SHUT_WR)``, and the other direction carries on;
* a failure (the TCP peer resets, the mux connection dies, the tunnel closes)
  aborts both directions and resets the TCP side (on Linux with
  ``connect(AF_UNSPEC)``, which also wakes a ``send`` blocked on a peer that
  does not read; elsewhere ``SO_LINGER`` 0 and ``shutdown``): a connection cut
  short is not shown to a TCP peer as a clean EOF. smux has no stream reset,
  so across the mux a failure travels as a FIN.

Everything is bounded: ``max_conns`` carried connections at once (more are
refused at once: a TCP connection is reset, a stream closed), at most two tasks
per connection, ``max_sessions`` mux connections on a server. ``close()`` closes
the listener, then every mux session (so the peer sees its streams reset, not
end), then aborts every connection, and joins every task it started.

Version 1 caveat (``docs/design.md`` 7.1): one session-wide
receive budget. A TCP peer that stops reading stops its stream being read, and
once the budget is full every stream of that mux connection waits.
``Config(version=2)`` (on both ends) gives each stream its own window.

Logging goes to the ``pysmux.tunnel`` logger: mux connections coming and going
at INFO, problems at WARNING, each carried connection at DEBUG.

The package's modules, one role each (import the names above from
``pysmux.tunnel``; the modules' own names may change):

* ``net``: addresses (:func:`parse_address`, :func:`format_address`),
  resolving, and ending TCP connections with a reset;
* ``pipe``: one TCP connection carried by one stream;
* ``service``: the listener, task tracking and ``close()`` both ends share;
* ``server``: :class:`TunnelServer` and :class:`EchoServer` on their shared
  mux-server base;
* ``client``: :class:`TunnelClient` and its re-dialled mux connections;
* ``security``: the source filter, TLS contexts and the shared key;
* ``guard``: TLS and the key handshake on a new mux connection, before smux starts;
* ``handshake``: the NOP hello that starts every mux session, and the words for
  why one ended;
* ``configfile``: kcptun-style JSON config files (``-c FILE``).

Security (README, "Security"; ``docs/design.md`` 10.1): ``allow=`` filters
sources at accept, ``tls=`` (an ``ssl.SSLContext``) encrypts the mux
connections and, with certificates, authenticates the ends, and ``key=`` makes
every client prove it holds a shared secret before smux starts (it
authenticates; only TLS encrypts).
"""

from __future__ import annotations

from .client import TunnelClient
from .guard import HandshakeError
from .net import Address, format_address, parse_address
from .security import SharedKey, client_tls_context, server_tls_context
from .server import EchoServer, TunnelServer

__all__ = [
    "Address",
    "EchoServer",
    "HandshakeError",
    "SharedKey",
    "TunnelClient",
    "TunnelServer",
    "client_tls_context",
    "format_address",
    "parse_address",
    "server_tls_context",
]
