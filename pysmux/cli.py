"""The ``pysmux`` command: an smux tunnel with the flags kcptun users know.

::

    pysmux server -l 0.0.0.0:4000 -t 127.0.0.1:8080 --key-file KEY   # mux connections in,
    pysmux client -l 127.0.0.1:9000 -r server:4000 --key-file KEY    # each stream to -t
    pysmux echo   -l 127.0.0.1:4000                    # mux connections in, every stream echoed

``python -m pysmux`` is the same program. The command prints one line,
``listening on HOST:PORT``, on stdout once it listens (the real port when
port 0 was asked for), and ``metrics on HOST:PORT`` with ``--metrics``; it
logs to stderr. On SIGTERM or SIGINT it stops taking connections, lets those
in flight finish (``--drain-timeout``), then exits with status 0; a second
signal exits at once. SIGUSR1 logs its figures. Status 1: it could not start
(address in use, ...); 2: bad arguments, or a listener beyond loopback that
would let anyone in (see :mod:`pysmux.cli_security`). The work is done by
:mod:`pysmux.tunnel`, the process side by :mod:`pysmux.runner`; this module
parses flags.
"""

from __future__ import annotations

import argparse
import functools
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from . import __version__
from .cli_security import (
    CLIENT,
    SERVER,
    add_security_options,
    describe_security,
    security_from_args,
)
from .config import Config
from .metrics import MetricsServer
from .runner import ProcessSignals, StatsLog, log_stats
from .tunnel import (
    EchoServer,
    TunnelClient,
    TunnelServer,
    configfile,
    format_address,
    parse_address,
)
from .tunnel.service import MAX_SECONDS, Service

__all__ = ["add_smux_options", "build_parser", "config_from_args", "main"]

log = logging.getLogger("pysmux.cli")


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
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 and at most {MAX_SECONDS:g}")
    return value


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


class _SmuxFlag(NamedTuple):
    """One smux flag of every subcommand, and the ``Config`` field it sets."""

    flag: str
    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str


#: The smux flags after ``--smuxver``. Defaults are Config's but for ``_DEFAULTS``.
_SMUX_FLAGS = (
    _SmuxFlag("--smuxbuf", "max_receive_buffer", _positive_int, "BYTES", "session receive buffer"),
    _SmuxFlag(
        "--streambuf",
        "max_stream_buffer",
        _positive_int,
        "BYTES",
        "per-stream receive window, version 2 only; at most --smuxbuf",
    ),
    _SmuxFlag(
        "--framesize", "max_frame_size", _positive_int, "BYTES", "largest frame payload sent"
    ),
    _SmuxFlag(
        "--keepalive",
        "keepalive_interval",
        _seconds,
        "SECONDS",
        "keepalive interval; 0 turns keepalive off",
    ),
    _SmuxFlag(
        "--keepalive-timeout",
        "keepalive_timeout",
        _positive_seconds,
        "SECONDS",
        "end a mux connection silent this long (default: max(30, 3 x keepalive))",
    ),
)
#: The command's own defaults: kcptun's stream window, and a timeout that follows --keepalive.
_DEFAULTS: dict[str, Any] = {"max_stream_buffer": 2 * 1024 * 1024, "keepalive_timeout": None}
#: The flag that sets each Config field, for error messages.
_FLAG_OF_FIELD = {"version": "--smuxver", **{f.field: f.flag for f in _SMUX_FLAGS}}


def add_smux_options(parser: argparse.ArgumentParser) -> None:
    """Add the flags every subcommand shares to ``parser`` (a subcommand's parser).

    The ``smux`` group (``--smuxver``, ``--smuxbuf``, ``--streambuf``,
    ``--framesize``, ``--keepalive``, ``--keepalive-timeout``) and
    ``--runtime``, ``-q``, ``-v``. :func:`config_from_args` turns the smux
    flags into a :class:`~pysmux.Config`; ``args.runtime`` is the runtime name
    and ``args.quiet - args.verbose`` how much less to log.
    """
    smux = parser.add_argument_group("smux")
    smux.add_argument(
        "--smuxver",
        type=int,
        choices=(1, 2),
        default=Config.version,
        help="smux protocol version; both ends must agree (default: %(default)s)",
    )
    for f in _SMUX_FLAGS:
        default = _DEFAULTS.get(f.field, getattr(Config, f.field))
        smux.add_argument(
            f.flag,
            type=f.parse,
            default=default,
            metavar=f.metavar,
            help=f.help if default is None else f"{f.help} (default: {_shown(default)})",
        )
    run = parser.add_argument_group("process")
    run.add_argument(
        "--runtime",
        choices=("thread", "gevent"),
        default="thread",
        help="threads (default) or gevent greenlets (needs gevent installed)",
    )
    run.add_argument(
        "-q", "--quiet", action="count", default=0, help="log less (warnings and errors only)"
    )
    run.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="log more: -v the figures every --stats-interval, -vv every connection",
    )


def config_from_args(args: argparse.Namespace) -> Config:
    """The session :class:`~pysmux.Config` of the flags :func:`add_smux_options` added.

    A value ``Config`` refuses raises ``ValueError`` naming the flag, as in
    ``--framesize 70000: must be in 1..65535``; pass it to the subcommand
    parser's ``error()`` to report it like any other bad flag (usage, status 2).
    """
    keepalive = args.keepalive > 0
    interval = args.keepalive if keepalive else Config.keepalive_interval
    timeout = args.keepalive_timeout
    if timeout is None:
        timeout = max(30.0, 3 * interval)
    elif not keepalive:
        interval = min(interval, timeout)  # both unused without keepalive: nothing to refuse
    try:
        return Config(
            version=args.smuxver,
            keepalive=keepalive,
            keepalive_interval=interval,
            keepalive_timeout=timeout,
            max_frame_size=args.framesize,
            max_receive_buffer=args.smuxbuf,
            max_stream_buffer=min(args.streambuf, args.smuxbuf),
        )
    except ValueError as exc:
        raise ValueError(_in_flags(str(exc), args)) from None


def _in_flags(message: str, args: argparse.Namespace) -> str:
    """``Config.FIELD=VALUE: WHY`` said with the flags the user typed; else ``message``."""
    match = re.fullmatch(r"Config\.(\w+)=\S*: (.*)", message, re.DOTALL)
    if match is None or match.group(1) not in _FLAG_OF_FIELD:
        return message
    field, why = match.groups()
    flag = _FLAG_OF_FIELD[field]
    for other, other_flag in _FLAG_OF_FIELD.items():
        why = re.sub(rf"\b{other}\b", other_flag, why)
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return f"{flag} {_shown(value)}: {why}"


def _shown(value: object) -> str:
    """A flag's value as a user would type it: ``10``, not ``10.0``."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def _add_address(
    parser: argparse.ArgumentParser, flags: tuple[str, str, str], help: str, default: str | None
) -> None:
    """``-X``, ``--NAME`` and kcptun's ``--NAMEaddr`` alias; required without a default."""
    parser.add_argument(
        *flags,
        dest=flags[1].lstrip("-"),
        type=_address,
        required=default is None,
        default=default,
        metavar="ADDR",
        help=help if default is None else f"{help} (default: {default})",
    )


_LISTEN = ("-l", "--listen", "--localaddr")


def _add_tunnel_options(parser: argparse.ArgumentParser, connect_timeout_help: str | None) -> None:
    """The flags of the tunnel subcommands besides -l: --max-conns, --connect-timeout,
    and those of running in production (--metrics, --stats-interval, --drain-timeout)."""
    parser.add_argument(
        "--max-conns",
        type=_positive_int,
        default=4096,
        metavar="N",
        help="connections carried at once; more are refused (default: %(default)s)",
    )
    ops = parser.add_argument_group("production")
    ops.add_argument(
        "--metrics",
        type=_address,
        metavar="ADDR",
        help="serve Prometheus metrics at http://ADDR/metrics (':PORT' is 127.0.0.1)",
    )
    ops.add_argument(
        "--stats-interval",
        type=_positive_seconds,
        default=60.0,
        metavar="SECONDS",
        help="with -v, log the figures this often (default: 60); SIGUSR1 logs them at once",
    )
    ops.add_argument(
        "--drain-timeout",
        type=_seconds,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM or SIGINT, let connections finish this long, then reset them "
        "(default: 30)",
    )
    if connect_timeout_help is not None:
        parser.add_argument(
            "--connect-timeout",
            type=_positive_seconds,
            default=10.0,
            metavar="SECONDS",
            help=f"{connect_timeout_help} (default: 10)",
        )


def _command(sub: Any, name: str, description: str) -> argparse.ArgumentParser:
    """A subcommand's parser, with the shared flags."""
    # No abbreviations: `server --conn 2` must be an error, not --connect-timeout 2.
    parser: argparse.ArgumentParser = sub.add_parser(
        name, allow_abbrev=False, help=description, description=description
    )
    add_smux_options(parser)
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
    add_security_options(srv, SERVER, _positive_seconds)

    cli = _command(sub, "client", "Accept TCP connections; carry each as a stream to a server.")
    _add_address(cli, _LISTEN, "where TCP connections come in", "127.0.0.1:12948")
    _add_address(
        cli, ("-r", "--remote", "--remoteaddr"), "the pysmux (or Go smux) server, HOST:PORT", None
    )
    cli.add_argument(
        "--conn",
        type=_positive_int,
        default=1,
        metavar="N",
        help="parallel mux connections; each new connection goes to the one carrying the "
        "fewest (default: 1)",
    )
    cli.add_argument(
        "--autoexpire",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="renew a mux connection this old: new connections go to a fresh one, old ones "
        "finish (default: 0, never)",
    )
    cli.add_argument(
        "--scavengettl",
        type=_positive_seconds,
        default=600.0,
        metavar="SECONDS",
        help="how long a renewed mux connection may keep its connections before it is "
        "closed (default: 600)",
    )
    _add_tunnel_options(
        cli,
        "for dialling the server, and how long a new TCP connection waits for a mux connection",
    )
    add_security_options(cli, CLIENT, _positive_seconds)

    echo = _command(sub, "echo", "Accept mux connections; echo every stream (for trying clients).")
    _add_address(echo, _LISTEN, "where mux connections come in", "127.0.0.1:29900")
    _add_tunnel_options(echo, None)
    add_security_options(echo, SERVER, _positive_seconds)
    return parser, dict(sub.choices)


def _service(
    args: argparse.Namespace, config: Config, security: dict[str, Any]
) -> TunnelServer | TunnelClient | EchoServer:
    if args.command == "server":
        return TunnelServer(
            args.listen,
            args.target,
            config=config,
            runtime=args.runtime,
            connect_timeout=args.connect_timeout,
            max_conns=args.max_conns,
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
            **security,
        )
    return EchoServer(
        args.listen, config=config, runtime=args.runtime, max_conns=args.max_conns, **security
    )


class _FlagNames(logging.Filter):
    """Log messages name the flags a user typed: ``Config.version`` is ``--smuxver``."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "Config." in message:
            record.msg = re.sub(
                r"\bConfig\.(\w+)",
                lambda m: _FLAG_OF_FIELD.get(m.group(1), m.group(0)),
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
    if args.runtime == "gevent":
        try:
            import gevent  # noqa: F401
        except ImportError:
            command.error("--runtime gevent needs gevent: pip install 'pysmux[gevent]'")
    try:
        security = security_from_args(args, CLIENT if args.command == "client" else SERVER)
        service = _service(args, config, security)
    except ValueError as exc:
        command.error(str(exc))
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
