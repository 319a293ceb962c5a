"""kcptun-style JSON configuration files (``pysmux client -c FILE``).

A kcptun config is one JSON object. The keys that mean something over TCP
(addresses, ``conn``, the smux settings, ``autoexpire``, ``scavengettl``,
``quiet``) map to the command's flags; the keys of KCP and of kcptun's
ciphers mean nothing here (pysmux carries smux over TCP) and are ignored with
a warning each, as are keys nobody knows. Turning values into flags, and
saying which value is wrong, is the command's job: :func:`load` only reads.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, NamedTuple

__all__ = ["IGNORED_KEYS", "KEYS", "Loaded", "apply", "load"]

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
}

#: kcptun keys about KCP, its ciphers, or its process, which smux over TCP has no use for.
IGNORED_KEYS = frozenset(
    {
        "crypt", "key", "mode", "mtu", "sndwnd", "rcvwnd", "datashard", "parityshard",
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
        name = key.lower()
        if name in KEYS:
            values[KEYS[name]] = (key, value)
        elif name in IGNORED_KEYS:
            warnings.append(
                f"{path}: {key!r} ignored: pysmux carries smux over TCP, "
                "without KCP or kcptun's encryption"
            )
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


def _convert(action: argparse.Action, value: Any) -> Any:
    """``value`` as the flag of ``action`` would have it."""
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
