"""``pysmux attack``: check that an smux server you own survives hostile peers."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..cli_options import (
    Flag,
    add_flags,
    add_remote,
    positive_int,
    positive_seconds,
)
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


#: The attack's bounds and the probe's pace.
_FLAGS = (
    Flag("--duration", positive_seconds, 3.0, "SECONDS",
         "how long each attack lasts at the most, connecting not counted"),
    Flag("--conns", positive_int, None, "N", "hostile connections (default: 50 for slowloris, "
         "3 for garbage-version, 2 for huge-length, 1 otherwise)"),
    Flag("--streams", positive_int, 5000, "N", "SYNs per connection of syn-flood"),
    Flag("--max-bytes", positive_int, 64 << 20, "BYTES", "bytes each attack writes at the most"),
    Flag("--probe-interval", positive_seconds, 0.05, "SECONDS", "pause between probe requests"),
    Flag("--probe-timeout", positive_seconds, 5.0, "SECONDS",
         "a probe request slower than this failed"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_remote(parser, "the server to attack, HOST:PORT (one you own)")
    parser.add_argument(
        "--kind", type=_kinds, required=True, metavar="KIND[,KIND...]|all",
        help=f"what to do: {', '.join(KINDS)}, or all of them one after the other",
    )  # fmt: skip
    add_flags(parser, _FLAGS)
    parser.add_argument(
        "--probe", choices=PROBES, default="echo",
        help="the legitimate requests made meanwhile: echo (pysmux echo, or a tunnel to "
        "an echo service), rpc (pysmux rpc), none (default: echo)",
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
