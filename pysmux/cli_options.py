"""The flags the ``pysmux`` subcommands share, and the parsing of flag values.

:func:`add_smux_options` adds the ``smux`` and ``process`` groups to a
subcommand's parser; :func:`config_from_args` turns them into a
:class:`~pysmux.Config` and :func:`resolve_runtime` turns ``--runtime auto``
into the runtime that runs. ``address``, ``positive_int``, ``seconds`` and
``positive_seconds`` are ``type=`` callables for ``add_argument`` that reject
a bad value with a message argparse shows next to the usage. A subcommand
declares its own valued flags as a table of :class:`Flag` for :func:`add_flags`.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from .config import Config
from .tunnel import parse_address
from .tunnel.service import MAX_SECONDS

__all__ = [
    "FLAG_OF_FIELD",
    "Flag",
    "add_flags",
    "add_remote",
    "add_smux_options",
    "address",
    "config_from_args",
    "positive_int",
    "positive_seconds",
    "resolve_runtime",
    "seconds",
]


def address(text: str) -> str:
    """``HOST:PORT`` as given, once it parses."""
    try:
        parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def positive_int(text: str) -> int:
    """An int > 0 (``0x`` prefixes too)."""
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


def seconds(text: str) -> float:
    """Seconds, from 0 up to the longest wait a timer takes."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 <= value <= MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"{text} must be >= 0 and at most {MAX_SECONDS:g}")
    return value


def positive_seconds(text: str) -> float:
    """Seconds > 0."""
    value = seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text} must be > 0")
    return value


class Flag(NamedTuple):
    """A flag that takes a value, as a row of a table for :func:`add_flags`.

    ``default`` None shows no default: ``help`` then says what happens without it.
    """

    flag: str
    parse: Callable[[str], Any]
    default: Any
    metavar: str
    help: str


def add_flags(parser: Any, flags: Iterable[Flag]) -> None:
    """Add each of ``flags`` to ``parser`` (a parser or an argument group); a help text
    ends with the default, as a user would type it."""
    for f in flags:
        parser.add_argument(
            f.flag,
            type=f.parse,
            default=f.default,
            metavar=f.metavar,
            help=f.help if f.default is None else f"{f.help} (default: {_shown(f.default)})",
        )


def add_remote(parser: argparse.ArgumentParser, help: str, many: bool = False) -> None:
    """``-r``/``--remote`` (kcptun's ``--remoteaddr`` too), required: the server a tool
    dials, as ``args.remote``; ``many``: repeatable, a list of them."""
    parser.add_argument(
        "-r",
        "--remote",
        "--remoteaddr",
        dest="remote",
        action="append" if many else "store",
        type=address,
        required=True,
        metavar="ADDR",
        help=help,
    )


class _SmuxFlag(NamedTuple):
    """One smux flag of every subcommand, and the ``Config`` field it sets."""

    flag: str
    field: str
    parse: Callable[[str], Any]
    metavar: str
    help: str


#: The smux flags after ``--smuxver``. Defaults are Config's but for ``_DEFAULTS``.
_SMUX_FLAGS = (
    _SmuxFlag("--smuxbuf", "max_receive_buffer", positive_int, "BYTES", "session receive buffer"),
    _SmuxFlag(
        "--streambuf",
        "max_stream_buffer",
        positive_int,
        "BYTES",
        "per-stream receive window, version 2 only; at most --smuxbuf",
    ),
    _SmuxFlag("--framesize", "max_frame_size", positive_int, "BYTES", "largest frame payload sent"),
    _SmuxFlag(
        "--keepalive",
        "keepalive_interval",
        seconds,
        "SECONDS",
        "keepalive interval; 0 turns keepalive off",
    ),
    _SmuxFlag(
        "--keepalive-timeout",
        "keepalive_timeout",
        positive_seconds,
        "SECONDS",
        "end a mux connection silent this long (default: max(30, 3 x keepalive))",
    ),
)
#: The command's own defaults: kcptun's stream window, and a timeout that follows --keepalive.
_DEFAULTS: dict[str, Any] = {"max_stream_buffer": 2 * 1024 * 1024, "keepalive_timeout": None}
#: The flag that sets each Config field, for error messages.
FLAG_OF_FIELD = {"version": "--smuxver", **{f.field: f.flag for f in _SMUX_FLAGS}}


def add_smux_options(parser: argparse.ArgumentParser, runtime: str = "thread") -> None:
    """Add the flags every subcommand shares to ``parser`` (a subcommand's parser).

    The ``smux`` group (``--smuxver``, ``--smuxbuf``, ``--streambuf``,
    ``--framesize``, ``--keepalive``, ``--keepalive-timeout``) and
    ``--runtime`` (default ``runtime``), ``-q``, ``-v``.
    :func:`config_from_args` turns the smux flags into a
    :class:`~pysmux.Config`; ``args.runtime`` is the runtime's name (``auto``
    until :func:`resolve_runtime`) and ``args.quiet - args.verbose`` how much
    less to log.
    """
    smux = parser.add_argument_group("smux")
    smux.add_argument(
        "--smuxver",
        type=int,
        choices=(1, 2),
        default=Config.version,
        help="smux protocol version; both ends must agree (default: %(default)s)",
    )
    add_flags(
        smux,
        (
            Flag(
                f.flag, f.parse, _DEFAULTS.get(f.field, getattr(Config, f.field)), f.metavar, f.help
            )
            for f in _SMUX_FLAGS
        ),
    )
    run = parser.add_argument_group("process")
    run.add_argument(
        "--runtime",
        choices=RUNTIME_CHOICES,
        default=runtime,
        help="threads, gevent greenlets (needs gevent installed), or auto: gevent if it is "
        f"installed, else threads (default: {runtime})",
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


#: What ``--runtime`` takes.
RUNTIME_CHOICES = ("auto", "thread", "gevent")


def resolve_runtime(choice: str) -> tuple[str, str]:
    """The runtime ``--runtime CHOICE`` runs, and why: ``("gevent", "auto: gevent is
    installed")``. ``auto`` is gevent when it can be imported (thousands of idle
    connections cost a greenlet each, not a thread), else threads."""
    if choice != "auto":
        return choice, f"--runtime {choice}"
    try:
        import gevent  # noqa: F401
    except ImportError as exc:
        return "thread", f"auto: gevent cannot be imported ({exc})"
    return "gevent", "auto: gevent is installed"


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
    if match is None or match.group(1) not in FLAG_OF_FIELD:
        return message
    field, why = match.groups()
    flag = FLAG_OF_FIELD[field]
    for other, other_flag in FLAG_OF_FIELD.items():
        why = re.sub(rf"\b{other}\b", other_flag, why)
    value = getattr(args, flag.lstrip("-").replace("-", "_"))
    return f"{flag} {_shown(value)}: {why}"


def _shown(value: object) -> str:
    """A flag's value as a user would type it: ``10``, not ``10.0``."""
    return f"{value:g}" if isinstance(value, float) else str(value)
