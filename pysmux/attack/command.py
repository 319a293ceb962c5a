"""``pysmux attack``: check that an smux server you own survives hostile peers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli_options import address, positive_int, positive_seconds
from ..config import Config
from .kinds import KINDS, AttackSettings
from .probe import PROBES
from .runner import run_attack

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]

HELP = "a hostile peer, to check a server YOU OWN survives floods and malformed frames"
DESCRIPTION = (
    "A testing tool for smux servers you own or are allowed to test: it floods and "
    "misuses the protocol on purpose. While each attack runs, a legitimate session "
    "(--probe) keeps making small requests; the report says what the server did "
    "(refused streams, closed connections) and whether it stayed responsive. Exit "
    "status 1 when a probe request failed. Kinds: "
    + "; ".join(f"{name}: {text}" for name, (_, text) in KINDS.items())
    + ". Bounded by --duration, --max-bytes, --conns and --streams."
)


def _kinds(text: str) -> list[str]:
    names = list(KINDS) if text == "all" else [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in names if k not in KINDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown kind(s) {', '.join(unknown) or text!r}: expected all, or some of "
            f"{', '.join(KINDS)}"
        )
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-r", "--remote", "--remoteaddr", dest="remote", type=address, required=True,
        metavar="ADDR", help="the server to attack, HOST:PORT (one you own)",
    )  # fmt: skip
    parser.add_argument(
        "--kind", type=_kinds, required=True, metavar="KIND[,KIND...]|all",
        help=f"what to do: {', '.join(KINDS)}, or all of them one after the other",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=positive_seconds, default=3.0, metavar="SECONDS",
        help="how long each attack lasts at the most (default: 3)",
    )  # fmt: skip
    parser.add_argument(
        "--conns", type=positive_int, default=None, metavar="N",
        help="hostile connections (default: 50 for slowloris, 3 for garbage-version, "
        "2 for huge-length, 1 otherwise)",
    )  # fmt: skip
    parser.add_argument(
        "--streams", type=positive_int, default=5000, metavar="N",
        help="SYNs per connection of syn-flood (default: 5000)",
    )  # fmt: skip
    parser.add_argument(
        "--max-bytes", type=positive_int, default=64 << 20, metavar="BYTES",
        help="bytes each attack writes at the most (default: 67108864)",
    )  # fmt: skip
    parser.add_argument(
        "--probe", choices=PROBES, default="echo",
        help="the legitimate requests made meanwhile: echo (pysmux echo, or a tunnel to "
        "an echo service), rpc (pysmux rpc), none (default: echo)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-interval", type=positive_seconds, default=0.05, metavar="SECONDS",
        help="pause between probe requests (default: 0.05)",
    )  # fmt: skip
    parser.add_argument(
        "--probe-timeout", type=positive_seconds, default=5.0, metavar="SECONDS",
        help="a probe request slower than this failed (default: 5)",
    )  # fmt: skip
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object (all reports) instead"
    )


def run(args: argparse.Namespace, config: Config, security: dict[str, Any]) -> int:
    """``pysmux attack``: 0 when the server stayed responsive through every attack.
    ``security``: the keyword arguments of the TLS and key flags."""
    settings = AttackSettings(
        duration=args.duration,
        conns=args.conns,
        streams=args.streams,
        max_bytes=args.max_bytes,
        version=config.version,
        connect_timeout=args.probe_timeout,
    )
    reports = []
    for kind in args.kind:
        report = run_attack(
            args.remote,
            kind,
            settings=settings,
            probe=args.probe,
            config=config,
            runtime=args.runtime,
            probe_interval=args.probe_interval,
            probe_timeout=args.probe_timeout,
            **security,
        )
        reports.append(report)
        if not args.json:
            print(report.text(), flush=True)
    responsive = all(r.responsive for r in reports)
    if args.json:
        summary = {
            "target": reports[0].target,
            "responsive": responsive,
            "attacks": [r.as_dict() for r in reports],
        }
        print(json.dumps(summary), flush=True)
    return 0 if responsive else 1
