"""The security flags of the ``pysmux`` command, and the rule that nothing runs open by mistake.

:func:`add_security_options` adds a ``security`` group to a subcommand;
:func:`security_from_args` turns the flags into keyword arguments of the
tunnel classes (``tls``, ``key``, ``allow``, ...) and applies the rule: a
server listening beyond loopback needs a key or TLS client certificates, and
a client listening beyond loopback needs ``--allow``, unless ``--no-auth``
says that is meant. A mistake raises ``ValueError`` with a message for the
subcommand's ``error()`` (usage, status 2).

Roles: ``server`` (mux connections in: server, echo, rpc), ``client`` (the
tunnel's client: it dials and listens) and ``dial`` (the tools that only dial,
load and attack: the client's TLS and key flags, nothing about a listener).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import ssl
from collections.abc import Callable
from typing import Any

from .tunnel import SharedKey, client_tls_context, parse_address, server_tls_context
from .tunnel.security import KEY_ENV, is_loopback

__all__ = [
    "CLIENT",
    "DIAL",
    "SERVER",
    "add_security_options",
    "describe_security",
    "security_from_args",
]

#: Roles: mux connections in; the tunnel's client; a tool that only dials.
SERVER, CLIENT, DIAL = "server", "client", "dial"


def _network(text: str) -> str:
    try:
        ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a network (as in 10.0.0.0/8, 192.0.2.7 or ::1/128)"
        ) from None
    return text


def add_security_options(
    parser: argparse.ArgumentParser, role: str, seconds: Callable[[str], float]
) -> None:
    """The ``security`` flags of a subcommand that accepts mux connections (``role``
    ``"server"``), dials them and listens (``"client"``) or only dials them
    (``"dial"``); ``seconds`` parses a timeout flag."""
    group = parser.add_argument_group(
        "security",
        "TLS encrypts the mux connections; the key authenticates both ends (it does not "
        "encrypt). See the README's Security section.",
    )
    if role == SERVER:
        group.add_argument("--tls-cert", metavar="FILE", help="TLS on: this certificate (PEM)")
        group.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
        group.add_argument(
            "--tls-client-ca",
            metavar="FILE",
            help="mutual TLS: only clients with a certificate this CA signed get in",
        )
    else:
        group.add_argument(
            "--tls", action="store_true", help="TLS on; the server is checked against system CAs"
        )
        group.add_argument(
            "--tls-ca", metavar="FILE", help="check the server against this CA (implies --tls)"
        )
        group.add_argument(
            "--tls-cert", metavar="FILE", help="present this client certificate (implies --tls)"
        )
        group.add_argument("--tls-key", metavar="FILE", help="the private key of --tls-cert")
        group.add_argument(
            "--tls-server-name",
            metavar="NAME",
            help="the name to send (SNI) and to check the certificate for (default: -r's host)",
        )
        group.add_argument(
            "--tls-insecure",
            action="store_true",
            help="do not check the server's certificate (anyone in the path can pose as it)",
        )
    group.add_argument(
        "--key",
        metavar="SECRET",
        help=f"the shared key (visible to other local users: prefer --key-file or {KEY_ENV})",
    )
    group.add_argument("--key-file", metavar="FILE", help="read the shared key from FILE")
    if role != DIAL:
        _add_listener_options(group, role)
    group.add_argument(
        "--handshake-timeout",
        type=seconds,
        default=10.0,
        metavar="SECONDS",
        help="TLS and key handshakes must be done within this (default: 10)",
    )


def _add_listener_options(group: Any, role: str) -> None:
    listener = "mux connections" if role == SERVER else "TCP connections"
    group.add_argument(
        "--allow",
        action="append",
        type=_network,
        metavar="CIDR",
        help=f"accept {listener} only from this network (repeatable); others are closed",
    )
    group.add_argument(
        "--no-auth",
        action="store_true",
        help="allow listening beyond loopback with no "
        + ("key or client certificates" if role == SERVER else "--allow")
        + " (anyone who reaches it can use it)",
    )


def security_from_args(args: argparse.Namespace, role: str) -> dict[str, Any]:
    """The tunnel keyword arguments of the flags :func:`add_security_options` added.

    ``ValueError`` (for the subcommand's ``error()``) on contradictory flags,
    unreadable TLS or key files, or an open listener without ``--no-auth``.
    """
    key = _key(args)
    kwargs: dict[str, Any] = {"handshake_timeout": args.handshake_timeout, "key": key}
    # --allow replaces -c's list; a tool that only dials has neither.
    allow = getattr(args, "allow", None) or getattr(args, "config_allow", None)
    if allow:
        kwargs["allow"] = allow
    if args.tls_key and not args.tls_cert:
        raise ValueError("--tls-key needs --tls-cert")
    if args.tls_cert and not args.tls_key:
        raise ValueError("--tls-cert needs --tls-key")
    try:
        if role == SERVER:
            kwargs["tls"] = _server_tls(args)
        else:
            kwargs["tls"] = _client_tls(args)
            if args.tls_server_name:
                kwargs["server_hostname"] = args.tls_server_name
    except OSError as exc:  # ssl.SSLError included: a file that is not PEM, a key that does not fit
        raise ValueError(f"TLS files: {exc}") from None
    if role != DIAL:
        authenticated = key is not None or bool(getattr(args, "tls_client_ca", None))
        _check_open(args, role, authenticated, allow)
    return kwargs


def describe_security(kwargs: dict[str, Any]) -> str:
    """One line for the log: what protects the mux connections (never the key itself)."""
    tls = kwargs.get("tls")
    parts = []
    if tls is None:
        parts.append("plain TCP")
    elif tls.verify_mode == ssl.CERT_REQUIRED and tls.protocol == ssl.PROTOCOL_TLS_SERVER:
        parts.append("TLS with client certificates")
    else:
        parts.append("TLS")
    parts.append("shared key" if kwargs.get("key") is not None else "no key")
    if kwargs.get("allow"):
        parts.append("allow " + ",".join(kwargs["allow"]))
    return ", ".join(parts)


def _key(args: argparse.Namespace) -> SharedKey | None:
    """The key of --key or --key-file, else of PYSMUX_KEY, else of the -c file's ``key``."""
    if args.key is not None and args.key_file is not None:
        raise ValueError("--key and --key-file: give one")
    env = os.environ.get(KEY_ENV)
    try:
        if args.key is not None:
            return SharedKey(args.key)
        if args.key_file is not None:
            return SharedKey.from_file(args.key_file)
        if env is not None:
            return SharedKey(env)
        from_file = getattr(args, "config_key", None)  # checked when the file was read
        return None if from_file is None else SharedKey(from_file)
    except OSError as exc:
        raise ValueError(f"--key-file: {exc}") from None
    except ValueError as exc:  # an empty key; the message never holds the key
        source = "--key" if args.key is not None else "--key-file" if args.key_file else KEY_ENV
        raise ValueError(f"{source}: {exc}") from None


def _server_tls(args: argparse.Namespace) -> Any:
    if args.tls_client_ca and not args.tls_cert:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key (TLS on)")
    if not args.tls_cert:
        return None
    return server_tls_context(args.tls_cert, args.tls_key, args.tls_client_ca)


def _client_tls(args: argparse.Namespace) -> Any:
    if args.tls_insecure and args.tls_ca:
        raise ValueError("--tls-insecure and --tls-ca: give one")
    wanted = args.tls or args.tls_ca or args.tls_cert or args.tls_insecure or args.tls_server_name
    if not wanted:
        return None
    return client_tls_context(
        args.tls_ca, args.tls_cert, args.tls_key, insecure=bool(args.tls_insecure)
    )


def _check_open(
    args: argparse.Namespace, role: str, authenticated: bool, allow: list[str] | None
) -> None:
    """A listener beyond loopback must say who may use it, or ``--no-auth`` that anyone may."""
    host = parse_address(args.listen)[0] or ("0.0.0.0" if role == SERVER else "127.0.0.1")
    if role == SERVER:
        if args.no_auth and authenticated:
            raise ValueError("--no-auth with a key or --tls-client-ca: give one or the other")
        if authenticated or args.no_auth or is_loopback(host):
            return
        raise ValueError(
            f"listening on {args.listen} with no authentication would let anyone who reaches "
            f"it use this {args.command}: add --key-file FILE (or --key, or {KEY_ENV}) on "
            "both ends, or --tls-client-ca FILE with --tls-cert and --tls-key, "
            "or --no-auth to run it open on purpose"
        )
    if args.no_auth and allow:
        raise ValueError("--no-auth with --allow: give one or the other")
    if allow or args.no_auth or is_loopback(host):
        return
    raise ValueError(
        f"listening on {args.listen} would let anyone who reaches it through to the server's "
        "target: add --allow CIDR for the hosts that may connect, "
        "or --no-auth to let anyone on purpose"
    )
