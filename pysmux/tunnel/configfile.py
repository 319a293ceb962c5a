"""kcptun-style JSON configuration files (``pysmux client -c FILE``).

A kcptun config is one JSON object. The keys that mean something over TCP
(addresses, ``conn``, the smux settings, ``autoexpire``, ``scavengettl``,
``quiet``) map to the command's flags, and so does ``key``: kcptun's
pre-shared secret is pysmux's shared key (never shown in a message). The
security settings have keys of their own (``tls_cert``, ``tls_ca``,
``allow``, ...; case, ``_`` and ``-`` do not matter in a key's name). The keys
of KCP and of kcptun's ciphers (``crypt`` included: TLS is what encrypts here)
mean nothing over TCP and are ignored with a warning each, as are keys nobody
knows. Turning values into flags, and saying which value is wrong, is the
command's job: :func:`load` only reads.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
from collections.abc import Callable
from typing import Any, NamedTuple

__all__ = ["IGNORED_KEYS", "KEYS", "Loaded", "apply", "apply_argv", "load"]

#: Config key -> the flag's ``dest``. kcptun's client says localaddr/remoteaddr,
#: its server listen/target.
KEYS = {
    "localaddr": "listen",
    "listen": "listen",
    "remoteaddr": "remote",
    "targetaddr": "target",
    "target": "target",
    "conn": "conn",
    "smuxver": "smuxver",
    "smuxbuf": "smuxbuf",
    "streambuf": "streambuf",
    "framesize": "framesize",
    "keepalive": "keepalive",
    "autoexpire": "autoexpire",
    "scavengettl": "scavengettl",
    "quiet": "quiet",
    # pysmux's own
    "keepalivetimeout": "keepalive_timeout",
    "maxconns": "max_conns",
    "connecttimeout": "connect_timeout",
    "metrics": "metrics",
    "statsinterval": "stats_interval",
    "draintimeout": "drain_timeout",
    "runtime": "runtime",
    # security: the flags' own settings, but for the two kept apart from their flags
    "tlscert": "tls_cert",
    "tlskey": "tls_key",
    "tlsclientca": "tls_client_ca",
    "tls": "tls",
    "tlsca": "tls_ca",
    "tlsservername": "tls_server_name",
    "tlsinsecure": "tls_insecure",
    "noauth": "no_auth",
    "handshaketimeout": "handshake_timeout",
    "key": "config_key",
    "allow": "config_allow",
}

#: kcptun keys about KCP, its ciphers, or its process, which smux over TCP has no use for.
IGNORED_KEYS = frozenset(
    {
        "crypt", "mode", "mtu", "sndwnd", "rcvwnd", "datashard", "parityshard",
        "dscp", "nocomp", "acknodelay", "nodelay", "interval", "resend", "nc", "sockbuf",
        "tcp", "log", "snmplog", "snmpperiod", "pprof", "closewait", "ratelimit", "tcpfast",
    }
)  # fmt: skip


class Loaded(NamedTuple):
    """What a config file sets (``dest -> (key, value)``), and what to warn about."""

    values: dict[str, tuple[str, Any]]
    warnings: list[str]


def load(path: str) -> Loaded:
    """Read ``path``. ``OSError`` if it cannot be read; ``ValueError`` if it is not a JSON
    object (the message names the file and, for bad JSON, the line)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    values: dict[str, tuple[str, Any]] = {}
    warnings: list[str] = []
    for key, value in data.items():
        name = key.lower().replace("_", "").replace("-", "")
        if name in KEYS:
            values[KEYS[name]] = (key, value)
        elif name in IGNORED_KEYS:
            why = "use TLS to encrypt" if name == "crypt" else "without KCP"
            warnings.append(f"{path}: {key!r} ignored: pysmux carries smux over TCP ({why})")
        else:
            warnings.append(f"{path}: unknown key {key!r} ignored")
    return Loaded(values, warnings)


def apply(parser: argparse.ArgumentParser, path: str) -> list[str]:
    """Make the settings of ``path`` the defaults of a subcommand's ``parser``.

    Flags given on the command line still win. Each value goes through its
    flag's own parsing; a bad one raises ``ValueError`` naming the file and
    the key. Returns the warnings to log (ignored and unknown keys, and keys
    this subcommand has no flag for).
    """
    loaded = load(path)
    actions = {a.dest: a for a in parser._actions}  # argparse has no public lookup
    defaults: dict[str, Any] = {}
    warnings = list(loaded.warnings)
    for dest, (key, value) in loaded.values.items():
        if dest in _FILE_ONLY:
            flag_dest, convert = _FILE_ONLY[dest]
            if flag_dest not in actions:
                warnings.append(f"{path}: {key!r} ignored: `{parser.prog}` has no use for it")
                continue
            try:  # no value in the message: it may be the key
                defaults[dest] = convert(value)
            except ValueError as exc:
                raise ValueError(f"{path}: {key}: {exc}") from None
            continue
        action = actions.get(dest)
        if action is None:
            warnings.append(f"{path}: {key!r} ignored: `{parser.prog}` has no use for it")
            continue
        try:
            defaults[dest] = _convert(action, value)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {key}={json.dumps(value)}: {exc}") from None
        action.required = False
    parser.set_defaults(**defaults)
    return warnings


def apply_argv(argv: list[str], commands: dict[str, argparse.ArgumentParser]) -> list[str]:
    """Apply the ``-c FILE`` of ``argv`` (if any) to its subcommand's parser (one of
    ``commands``, by name) before parsing: a required address may come from the file.

    Returns the warnings to log; a bad file or value exits through the
    subcommand's ``error()`` (status 2).
    """
    name = next((a for a in argv if not a.startswith("-")), None)
    command = commands.get(name or "")
    if command is None:
        return []
    path = None
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            path = argv[i + 1]
        elif arg.startswith("--config="):
            path = arg.partition("=")[2]
    if path is None:
        return []
    try:
        return apply(command, path)
    except (OSError, ValueError) as exc:
        command.error(str(exc))


def _secret(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected the shared key as a non-empty string")
    return value


def _networks(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ValueError('expected a list of networks, as in ["10.0.0.0/8", "192.0.2.7"]')
    for item in items:
        try:
            ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not a network (as in 10.0.0.0/8)") from None
    return [item.strip() for item in items]


#: Settings a file gives apart from their flag (dest -> the flag's dest, and how to read
#: the value): the key, so that --key-file or PYSMUX_KEY can win over it without
#: contradicting it, and allow, so that --allow on the command line replaces the
#: file's list instead of adding to it.
_FILE_ONLY: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "config_key": ("key", _secret),
    "config_allow": ("allow", _networks),
}


def _convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the flag of ``action`` would have it."""
    if isinstance(action, argparse._StoreTrueAction):  # --tls, --no-auth: true or false
        if isinstance(value, bool):
            return value
        raise ValueError("expected true or false")
    if isinstance(action, argparse._CountAction):  # -q: true/false or a count
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and value >= 0:
            return value
        raise ValueError("expected true, false or a count")
    if isinstance(value, (dict, list)) or value is None:
        raise ValueError("expected a number or a string")
    if isinstance(value, bool):
        raise ValueError("expected a number or a string, not true/false")
    converted = action.type(str(value)) if callable(action.type) else value
    if action.choices is not None and converted not in action.choices:
        choices = ", ".join(map(str, action.choices))
        raise ValueError(f"must be one of {choices}")
    return converted
