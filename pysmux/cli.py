"""The ``pysmux`` command: an smux tunnel with the flags kcptun users know.

::

    pysmux server -l 0.0.0.0:4000 -t 127.0.0.1:8080   # mux connections in, each stream to -t
    pysmux client -l 127.0.0.1:9000 -r server:4000     # TCP in, each connection a stream to -r
    pysmux echo   -l 127.0.0.1:4000                    # mux connections in, every stream echoed

``python -m pysmux`` is the same program. The command prints one line,
``listening on HOST:PORT``, on stdout once it listens (the real port when
port 0 was asked for), logs to stderr, and on SIGINT or SIGTERM closes its
listener and sessions and exits with status 0. Status 1: it could not start
(address in use, ...); 2: bad arguments. The work is done by
:mod:`pysmux.tunnel`; this module only parses flags and waits for a signal.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

from . import __version__
from . import demo as demo_command
from . import load as load_command
from .attack import command as attack_command
from .config import Config
from .rpc import RpcServer
from .rpc import command as rpc_command
from .tunnel import EchoServer, TunnelClient, TunnelServer, format_address, parse_address

__all__ = ["build_parser", "main"]

log = logging.getLogger("pysmux.cli")

_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: Commands defined in modules of their own: each has HELP, DESCRIPTION and
#: add_arguments(parser); a server has make_server(args, config), a command that
#: runs to completion run(args, config) -> exit status.
_SERVERS: dict[str, Any] = {"rpc": rpc_command}
_RUNNERS: dict[str, Any] = {
    "load": load_command,
    "attack": attack_command,
    "demo": demo_command,
}


def _address(text: str) -> str:
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text} must be >= 0")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pysmux`` command."""
    # No abbreviations: `server --conn 2` must be an error, not --connect-timeout 2.
    parser = argparse.ArgumentParser(
        prog="pysmux",
        allow_abbrev=False,
        description="smux stream multiplexer tunnel (wire-compatible with Go's xtaci/smux)",
    )
    parser.add_argument("--version", action="version", version=f"pysmux {__version__}")

    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    smux = common.add_argument_group("smux")
    smux.add_argument(
        "--smuxver",
        type=int,
        choices=(1, 2),
        default=1,
        help="smux protocol version; both ends must agree (default: 1)",
    )
    smux.add_argument(
        "--smuxbuf",
        type=_positive_int,
        default=4 * 1024 * 1024,
        metavar="BYTES",
        help="session receive buffer (default: 4194304)",
    )
    smux.add_argument(
        "--streambuf",
        type=_positive_int,
        default=2 * 1024 * 1024,
        metavar="BYTES",
        help="per-stream receive window, version 2 only (default: 2097152)",
    )
    smux.add_argument(
        "--framesize",
        type=_positive_int,
        default=32768,
        metavar="BYTES",
        help="largest frame payload sent (default: 32768)",
    )
    smux.add_argument(
        "--keepalive",
        type=_seconds,
        default=10.0,
        metavar="SECONDS",
        help="keepalive interval; 0 turns keepalive off (default: 10)",
    )
    smux.add_argument(
        "--keepalive-timeout",
        type=_positive_seconds,
        default=None,
        metavar="SECONDS",
        help="end a mux connection silent this long (default: max(30, 3 x keepalive))",
    )
    run = common.add_argument_group("process")
    run.add_argument(
        "--runtime",
        choices=("thread", "gevent"),
        default="thread",
        help="threads (default) or gevent greenlets (needs gevent installed)",
    )
    run.add_argument(
        "--max-conns",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="connections carried at once; more are refused (default: 4096)",
    )
    run.add_argument(
        "-q", "--quiet", action="count", default=0, help="log less (warnings and errors only)"
    )
    run.add_argument(
        "-v", "--verbose", action="count", default=0, help="log more (every connection)"
    )

    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    srv = sub.add_parser(
        "server",
        parents=[common],
        allow_abbrev=False,
        help="accept mux connections, forward each stream to a target",
        description="Accept mux connections on -l; forward each stream as a TCP connection to -t.",
    )
    srv.add_argument(
        "-l",
        "--listen",
        "--localaddr",
        dest="listen",
        type=_address,
        default="0.0.0.0:29900",
        metavar="ADDR",
        help="where mux connections come in (default: 0.0.0.0:29900)",
    )
    srv.add_argument(
        "-t",
        "--target",
        "--targetaddr",
        dest="target",
        type=_address,
        required=True,
        metavar="ADDR",
        help="where each stream goes, HOST:PORT",
    )
    srv.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="for connecting to the target (default: 10)",
    )

    cli = sub.add_parser(
        "client",
        parents=[common],
        allow_abbrev=False,
        help="accept TCP connections, carry each as a stream to a server",
        description="Accept TCP connections on -l; carry each as one stream over --conn mux "
        "connections to -r.",
    )
    cli.add_argument(
        "-l",
        "--listen",
        "--localaddr",
        dest="listen",
        type=_address,
        default="127.0.0.1:12948",
        metavar="ADDR",
        help="where TCP connections come in (default: 127.0.0.1:12948)",
    )
    cli.add_argument(
        "-r",
        "--remote",
        "--remoteaddr",
        dest="remote",
        type=_address,
        required=True,
        metavar="ADDR",
        help="the pysmux (or Go smux) server, HOST:PORT",
    )
    cli.add_argument(
        "--conn",
        type=_positive_int,
        default=1,
        metavar="N",
        help="parallel mux connections; streams are spread round-robin (default: 1)",
    )
    cli.add_argument(
        "--connect-timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="SECONDS",
        help="for dialling the server, and how long a new TCP connection waits for a "
        "mux connection (default: 10)",
    )

    echo = sub.add_parser(
        "echo",
        parents=[common],
        allow_abbrev=False,
        help="accept mux connections and echo every stream (for tests and benchmarks)",
        description="Accept mux connections on -l and echo every stream until its EOF.",
    )
    echo.add_argument(
        "-l",
        "--listen",
        "--localaddr",
        dest="listen",
        type=_address,
        default="127.0.0.1:29900",
        metavar="ADDR",
        help="where mux connections come in (default: 127.0.0.1:29900)",
    )
    for name, command in {**_SERVERS, **_RUNNERS}.items():
        command.add_arguments(
            sub.add_parser(
                name,
                parents=[common],
                allow_abbrev=False,
                help=command.HELP,
                description=command.DESCRIPTION,
            )
        )
    return parser


def _config(args: argparse.Namespace) -> Config:
    """The session config of the flags; ``ValueError`` names the flag's field."""
    keepalive = args.keepalive > 0
    interval = args.keepalive if keepalive else 10.0
    timeout = args.keepalive_timeout
    if timeout is None:
        timeout = max(30.0, 3 * interval)
    return Config(
        version=args.smuxver,
        keepalive=keepalive,
        keepalive_interval=interval,
        keepalive_timeout=timeout,
        max_frame_size=args.framesize,
        max_receive_buffer=args.smuxbuf,
        max_stream_buffer=min(args.streambuf, args.smuxbuf),
    )


def _service(
    args: argparse.Namespace, config: Config
) -> TunnelServer | TunnelClient | EchoServer | RpcServer:
    if args.command in _SERVERS:
        server: RpcServer = _SERVERS[args.command].make_server(args, config)
        return server
    if args.command == "server":
        return TunnelServer(
            args.listen,
            args.target,
            config=config,
            runtime=args.runtime,
            connect_timeout=args.connect_timeout,
            max_conns=args.max_conns,
        )
    if args.command == "client":
        return TunnelClient(
            args.listen,
            args.remote,
            conn=args.conn,
            config=config,
            runtime=args.runtime,
            connect_timeout=args.connect_timeout,
            max_conns=args.max_conns,
        )
    return EchoServer(args.listen, config=config, runtime=args.runtime, max_conns=args.max_conns)


class _StopSignal:
    """Waits for SIGINT or SIGTERM; a second one ends the process at once (status 1).

    Threads: ``signal.signal`` handlers and a ``threading.Event``. gevent: the
    handlers must run in the hub (``gevent.signal_handler``) and the wait must
    let greenlets run.
    """

    def __init__(self, runtime: str) -> None:
        self._count = 0
        self._restore: list[Any] = []
        self._event: Any
        if runtime == "gevent":
            import gevent
            import gevent.event

            self._event = gevent.event.Event()
            for sig in _SIGNALS:
                self._restore.append(gevent.signal_handler(sig, self._fire, sig))
        else:
            self._event = threading.Event()
            for sig in _SIGNALS:
                previous = signal.signal(sig, self._on_signal)
                self._restore.append((sig, previous))

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._fire(signum)

    def _fire(self, signum: int) -> None:
        self._count += 1
        if self._count > 1:
            os.write(2, b"pysmux: second signal, exiting at once\n")
            os._exit(1)
        log.info("%s: shutting down", signal.Signals(signum).name)
        self._event.set()

    def wait(self) -> None:
        # A timeout keeps gevent's loop alive (its signal watchers do not) and
        # lets the thread runtime's main thread run the Python signal handler.
        while not self._event.wait(3600):
            pass

    def restore(self) -> None:
        for item in self._restore:
            if isinstance(item, tuple):
                signal.signal(*item)
            else:
                item.cancel()
        self._restore.clear()


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.INFO + 10 * (args.quiet - args.verbose)
    level = max(logging.DEBUG, min(logging.CRITICAL, level))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pysmux`` command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        config = _config(args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.runtime == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            parser.error("--runtime gevent needs gevent: pip install 'pysmux[gevent]'")
    if args.command in _RUNNERS:
        status: int = _RUNNERS[args.command].run(args, config)
        return status
    try:
        service = _service(args, config)
    except ValueError as exc:
        parser.error(str(exc))
    stop = _StopSignal(args.runtime)  # before listening: a signal from now on is graceful
    try:
        try:
            service.start()
        except OSError as exc:
            log.error("cannot listen on %s: %s", args.listen, exc)
            return 1
        print(f"listening on {format_address(service.address)}", flush=True)
        if isinstance(service, TunnelClient):
            log.info(
                "carrying connections to %s over %d mux connection(s), smux v%d",
                format_address(service.remote),
                args.conn,
                config.version,
            )
        elif isinstance(service, TunnelServer):
            log.info("forwarding streams to %s, smux v%d", args.target, config.version)
        stop.wait()
    except KeyboardInterrupt:  # a SIGINT before the handler was in place
        pass
    finally:
        service.close()
        stop.restore()
    log.info("stopped")
    return 0
