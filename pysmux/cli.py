"""The ``pysmux`` command: an smux tunnel with the flags kcptun users know.

::

    pysmux server -l 0.0.0.0:4000 -t 127.0.0.1:8080 --key-file KEY   # mux connections in,
    pysmux client -l 127.0.0.1:9000 -r server:4000 --key-file KEY    # each stream to -t
    pysmux echo   -l 127.0.0.1:4000                    # mux connections in, every stream echoed
    pysmux rpc    -l 127.0.0.1:4000                    # the same, every stream JSON-RPC 2.0

and the tools that run to completion: ``pysmux load``, ``pysmux attack`` and
``pysmux demo`` (:mod:`pysmux.load`, :mod:`pysmux.attack`, :mod:`pysmux.demo`).

``python -m pysmux`` is the same program. The command prints one line,
``listening on HOST:PORT``, on stdout once it listens (the real port when
port 0 was asked for), and ``metrics on HOST:PORT`` with ``--metrics``; it
logs to stderr. On SIGTERM or SIGINT it stops taking connections, lets those
in flight finish (``--drain-timeout``), then exits with status 0; a second
signal exits at once. SIGUSR1 logs its figures. Status 1: it could not start
(address in use, ...); 2: bad arguments, or a listener beyond loopback that
would let anyone in (see :mod:`pysmux.cli_security`). The work is done by
:mod:`pysmux.tunnel` (and :mod:`pysmux.rpc`), the process side by
:mod:`pysmux.runner`, the shared flags are :mod:`pysmux.cli_options`'s; this
module builds the parsers and runs the servers.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import socket
import sys
from collections.abc import Sequence
from typing import Any

from . import __version__
from . import demo as demo_command
from . import load as load_command
from .attack import command as attack_command
from .cli_options import (
    FLAG_OF_FIELD,
    add_smux_options,
    address,
    config_from_args,
    positive_int,
    positive_seconds,
    resolve_runtime,
    seconds,
)
from .cli_security import (
    CLIENT,
    DIAL,
    SERVER,
    add_security_options,
    describe_security,
    security_from_args,
)
from .config import Config
from .metrics import MetricsServer
from .rpc import RpcServer
from .rpc import command as rpc_command
from .runner import (
    FD_RESERVE,
    MAX_CONNS_CAP,
    ProcessSignals,
    StatsLog,
    log_stats,
    max_conns_for,
    size_process,
)
from .tunnel import (
    EchoServer,
    TunnelClient,
    TunnelServer,
    configfile,
    format_address,
)
from .tunnel.service import Service

__all__ = ["add_smux_options", "build_parser", "config_from_args", "main"]

log = logging.getLogger("pysmux.cli")

#: Commands that run to completion, each in a module of its own with HELP,
#: ``add_arguments(parser)`` and ``run(args, config, security)`` -> exit status.
_TOOLS: dict[str, Any] = {"load": load_command, "attack": attack_command, "demo": demo_command}
#: The tools that dial servers: they take the client's TLS and key flags.
_DIALLING = ("load", "attack")


def _add_address(
    parser: argparse.ArgumentParser, flags: tuple[str, str, str], help: str, default: str | None
) -> None:
    """``-X``, ``--NAME`` and kcptun's ``--NAMEaddr`` alias; required without a default."""
    parser.add_argument(
        *flags,
        dest=flags[1].lstrip("-"),
        type=address,
        required=default is None,
        default=default,
        metavar="ADDR",
        help=help if default is None else f"{help} (default: {default})",
    )


_LISTEN = ("-l", "--listen", "--localaddr")


#: Commands that carry TCP connections: each holds a descriptor, so --max-conns
#: follows the open-file limit.
_CARRIERS = ("server", "client")
#: --max-conns of the commands that serve streams only.
_MAX_STREAMS = 4096
#: Commands that serve until stopped: --runtime auto is their default.
_SERVICES = ("server", "client", "echo")
#: Listen backlog of the services: the kernel's cap (net.core.somaxconn), as Go's
#: listeners have it. A burst of connections beyond the backlog loses SYNs, and
#: each lost one costs its client a second or more.
_BACKLOG = socket.SOMAXCONN


def _add_tunnel_options(parser: argparse.ArgumentParser, connect_timeout_help: str | None) -> None:
    """The flags of the tunnel subcommands besides -l: --max-conns, --connect-timeout,
    and those of running in production (--metrics, --stats-interval, --drain-timeout).
    A subcommand with a ``--connect-timeout`` carries TCP connections."""
    carrier = connect_timeout_help is not None
    default = (
        f"the open-file limit less {FD_RESERVE}, at most {MAX_CONNS_CAP}"
        if carrier
        else str(_MAX_STREAMS)
    )
    parser.add_argument(
        "--max-conns",
        type=positive_int,
        default=None if carrier else _MAX_STREAMS,
        metavar="N",
        help=f"connections carried at once; more are refused (default: {default})",
    )
    ops = parser.add_argument_group("production")
    ops.add_argument(
        "--metrics",
        type=address,
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics (':PORT' is 127.0.0.1)",
    )
    ops.add_argument(
        "--stats-interval",
        type=positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="with -v, log the figures this often (default: 60); SIGUSR1 logs them at once",
    )
    ops.add_argument(
        "--drain-timeout",
        type=seconds,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, let connections finish this long, then reset them "
        "(default: 30)",
    )
    if connect_timeout_help is not None:
        parser.add_argument(
            "--connect-timeout",
            type=positive_seconds,
            default=10.0,
            metavar="SECONDS",
            help=f"{connect_timeout_help} (default: 10)",
        )


def _command(
    sub: Any, name: str, description: str, config_file: bool = True
) -> argparse.ArgumentParser:
    """A subcommand's parser, with the shared flags (and ``-c FILE`` if ``config_file``)."""
    # No abbreviations: `server --conn 2` must be an error, not --connect-timeout 2.
    parser: argparse.ArgumentParser = sub.add_parser(
        name, allow_abbrev=False, help=description, description=description
    )
    add_smux_options(parser, runtime="auto" if name in _SERVICES else "thread")
    if not config_file:
        return parser
    parser.add_argument(
        "-c",
        "--config",
        metavar="FILE",
        help="a kcptun-style JSON config; flags given here override it",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``pysmux`` command."""
    return _build_parsers()[0]


def _build_parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The ``pysmux`` parser, and each subcommand's parser by name (for its usage in errors)."""
    parser = argparse.ArgumentParser(
        prog="pysmux",
        allow_abbrev=False,
        description="smux stream multiplexer tunnel (wire-compatible with Go's xtaci/smux)",
    )
    parser.add_argument("--version", action="version", version=f"pysmux {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    srv = _command(sub, "server", "Accept mux connections; forward each stream to a target.")
    _add_address(srv, _LISTEN, "where mux connections come in", "0.0.0.0:29900")
    _add_address(srv, ("-t", "--target", "--targetaddr"), "where each stream goes, HOST:PORT", None)
    _add_tunnel_options(srv, "for connecting to the target")
    add_security_options(srv, SERVER, positive_seconds)

    cli = _command(sub, "client", "Accept TCP connections; carry each as a stream to a server.")
    _add_address(cli, _LISTEN, "where TCP connections come in", "127.0.0.1:12948")
    _add_address(
        cli, ("-r", "--remote", "--remoteaddr"), "the pysmux (or Go smux) server, HOST:PORT", None
    )
    cli.add_argument(
        "--conn",
        type=positive_int,
        default=1,
        metavar="N",
        help="parallel mux connections; each new connection goes to the one carrying the "
        "fewest (default: 1)",
    )
    cli.add_argument(
        "--autoexpire",
        type=seconds,
        default=0.0,
        metavar="SECONDS",
        help="renew a mux connection this old: new connections go to a fresh one, old ones "
        "finish (default: 0, never)",
    )
    cli.add_argument(
        "--scavengettl",
        type=positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long a renewed mux connection may keep its connections before it is "
        "closed (default: 600)",
    )
    _add_tunnel_options(
        cli,
        "for dialling the server, and how long a new TCP connection waits for a mux connection",
    )
    add_security_options(cli, CLIENT, positive_seconds)

    echo = _command(sub, "echo", "Accept mux connections; echo every stream (for trying clients).")
    _add_address(echo, _LISTEN, "where mux connections come in", "127.0.0.1:29900")
    _add_tunnel_options(echo, None)
    add_security_options(echo, SERVER, positive_seconds)

    rpc = _command(sub, "rpc", rpc_command.DESCRIPTION)
    _add_address(rpc, _LISTEN, "where mux connections come in", "127.0.0.1:29900")
    _add_tunnel_options(rpc, None)
    rpc_command.add_arguments(rpc)
    add_security_options(rpc, SERVER, positive_seconds)

    for name, tool in _TOOLS.items():
        tool_parser = _command(sub, name, tool.DESCRIPTION, config_file=False)
        tool.add_arguments(tool_parser)
        if name in _DIALLING:
            add_security_options(tool_parser, DIAL, positive_seconds)
    return parser, dict(sub.choices)


def _service(
    args: argparse.Namespace, config: Config, security: dict[str, Any]
) -> TunnelServer | TunnelClient | EchoServer | RpcServer:
    if args.command == "rpc":
        return rpc_command.make_server(args, config, security)
    if args.command == "server":
        return TunnelServer(
            args.listen,
            args.target,
            config=config,
            runtime=args.runtime,
            connect_timeout=args.connect_timeout,
            max_conns=args.max_conns,
            backlog=_BACKLOG,
            **security,
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
            autoexpire=args.autoexpire or None,
            scavenge_ttl=args.scavengettl,
            backlog=_BACKLOG,
            **security,
        )
    return EchoServer(
        args.listen,
        config=config,
        runtime=args.runtime,
        max_conns=args.max_conns,
        backlog=_BACKLOG,
        **security,
    )


class _FlagNames(logging.Filter):
    """Log messages name the flags a user typed: ``Config.version`` is ``--smuxver``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Config." in message:
            record.msg = re.sub(
                r"\bConfig\.(\w+)",
                lambda m: FLAG_OF_FIELD.get(m.group(1), m.group(0)),
                message,
            )
            record.args = ()
        return True


def _setup_logging(args: argparse.Namespace) -> None:
    # -v adds the periodic stats line; every connection is logged from -vv on.
    level = logging.INFO + 10 * (args.quiet - max(0, args.verbose - 1))
    level = max(logging.DEBUG, min(logging.CRITICAL, level))
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_FlagNames())


def _start(service: Service, announce: str, where: str) -> bool:
    """Start ``service`` and print ``ANNOUNCE on HOST:PORT``; False (logged) if it cannot listen."""
    try:
        service.start()
    except OSError as exc:
        log.error("cannot listen on %s: %s", where, exc)
        return False
    print(f"{announce} on {format_address(service.address)}", flush=True)
    return True


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``pysmux`` command; returns the exit status."""
    parser, commands = _build_parsers()
    argv = list(sys.argv[1:] if argv is None else argv)
    notes = configfile.apply_argv(argv, commands)
    args = parser.parse_args(argv)
    command = commands[args.command]  # its usage goes with every error below
    _setup_logging(args)
    for note in notes:
        log.warning("%s", note)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        command.error(str(exc))
    args.runtime, why = resolve_runtime(args.runtime)
    if args.runtime == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            command.error("--runtime gevent needs gevent: pip install 'pysmux[gevent]'")
    role = DIAL if args.command in _DIALLING else CLIENT if args.command == "client" else SERVER
    open_files, sized_max_conns = 0, False
    if args.command in _SERVICES:
        open_files = size_process(args.runtime)
        if args.command in _CARRIERS and args.max_conns is None:
            args.max_conns = max_conns_for(open_files)
            sized_max_conns = True
    try:
        security = security_from_args(args, role) if args.command != "demo" else {}
        if args.command not in _TOOLS:
            service = _service(args, config, security)
    except ValueError as exc:
        command.error(str(exc))
    if args.command in _TOOLS:
        status: int = _TOOLS[args.command].run(args, config, security)
        return status
    # The limits are logged once the flags passed every check (an error comes first).
    if args.command in _SERVICES:
        log.info("runtime: %s (%s)", args.runtime, why)
        if sized_max_conns:
            log.info(
                "at most %d connections at once (open-file limit %d)", args.max_conns, open_files
            )
    # Before listening: a signal from now on is graceful.
    signals = ProcessSignals(args.runtime, functools.partial(log_stats, service.stats))
    metrics: MetricsServer | None = None
    stats_log: StatsLog | None = None
    try:
        if not _start(service, "listening", args.listen):
            return 1
        log.info("mux connections: %s", describe_security(security))
        if args.metrics is not None:
            metrics = MetricsServer(args.metrics, service.stats, args.command, runtime=args.runtime)
            if not _start(metrics, "metrics", args.metrics):
                return 1
        if args.verbose:
            stats_log = StatsLog(service.stats, args.stats_interval, args.runtime)
        if isinstance(service, TunnelClient):
            log.info(
                "carrying connections to %s over %d mux connection(s), smux v%d",
                format_address(service.remote),
                args.conn,
                config.version,
            )
        elif isinstance(service, TunnelServer):
            log.info("forwarding streams to %s, smux v%d", args.target, config.version)
        signals.wait()
        if not service.drain(args.drain_timeout):
            log.warning("drain timeout (%g s): connections were reset", args.drain_timeout)
    except KeyboardInterrupt:  # a SIGINT before the handler was in place
        pass
    finally:
        service.close()
        if stats_log is not None:
            stats_log.close()
        if metrics is not None:
            metrics.close()
        signals.restore()
    log.info("stopped")
    return 0
