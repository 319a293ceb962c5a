"""One attack with a probe watching: what the server did, and whether it stayed
responsive to a legitimate client meanwhile and afterwards."""

from __future__ import annotations

import dataclasses
import ssl
from typing import Any

from ..config import Config
from ..dialer import Dialer
from ..loadstats import format_bytes
from ..runtime import Runtime
from ..tcp import Address, as_address
from ..tunnel import SharedKey, format_address
from .kinds import KINDS, AttackSettings, Run
from .probe import Probe

__all__ = ["AttackReport", "run_attack"]

#: Probe requests before the attack (the server must answer them) and after it.
_BEFORE = 3
_AFTER = 10


@dataclasses.dataclass
class AttackReport:
    """What happened; ``responsive``: every probe request before, during and after the
    attack was answered in time (always True with probe ``none``)."""

    kind: str
    target: str
    version: int
    duration_s: float
    observed: dict[str, Any]
    probe: str
    ready_s: float  # how long the server took to answer the probe before the attack
    probe_before: dict[str, Any]
    probe_during: dict[str, Any]
    probe_after: dict[str, Any]
    responsive: bool

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def text(self) -> str:
        o = self.observed
        lines = [
            f"attack {self.kind} on {self.target} (smux v{self.version}, {self.duration_s:.1f} s)",
            f"  sent      {o['frames_sent']} frames, {format_bytes(o['bytes_sent'])} on "
            f"{o['connections']} connection(s)",
            f"  server    closed {o['closed_by_server']} of {o['connections']} connection(s)"
            + (f" (first after {o['first_close_s']} s)" if o["first_close_s"] is not None else "")
            + f"; refused {o['refused_streams']} stream(s); sent "
            f"{format_bytes(o['server_data_bytes'])} of data",
        ]
        lines += [f"  note      {note}" for note in o["notes"]]
        if self.probe != "none":
            lines.append(f"  probe     ready after {self.ready_s} s")
            for name, phase in (("before", self.probe_before), ("during", self.probe_during),
                                ("after", self.probe_after)):  # fmt: skip
                lines.append(
                    f"  probe     {name}: {phase['ok']} ok, {phase['failed']} failed, "
                    f"p50 {phase['p50_ms']} ms, max {phase['max_ms']} ms"
                    + (f" ({phase['first_failure']})" if phase["first_failure"] else "")
                )
        verdict = "stayed responsive" if self.responsive else "NOT RESPONSIVE to the probe"
        lines.append(f"  verdict   {verdict}")
        return "\n".join(lines)


def run_attack(
    target: str | Address,
    kind: str,
    *,
    settings: AttackSettings | None = None,
    probe: str = "echo",
    config: Config | None = None,
    runtime: str | Runtime | None = None,
    probe_interval: float = 0.05,
    probe_timeout: float = 5.0,
    tls: ssl.SSLContext | None = None,
    key: SharedKey | bytes | str | None = None,
    server_hostname: str | None = None,
    handshake_timeout: float = 10.0,
) -> AttackReport:
    """Attack a server you own with ``kind`` (a name of :data:`KINDS`) and report.

    ``config`` is the probe session's (its version is the attack's too; default:
    ``settings.version``). ``probe`` is ``echo``, ``rpc`` or ``none``. A server that
    requires a shared key or TLS is reached with ``tls``, ``key``, ``server_hostname``
    and ``handshake_timeout``, as by :class:`~pysmux.tunnel.TunnelClient`: every
    hostile connection does the handshakes first, so the attack reaches smux.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: expected one of {', '.join(KINDS)}")
    settings = settings or AttackSettings()
    if config is None:
        config = Config(version=settings.version)
    elif config.version != settings.version:
        settings = dataclasses.replace(settings, version=config.version)
    dialer = Dialer(
        config=config,
        runtime=runtime,
        tls=tls,
        key=key,
        server_hostname=server_hostname,
        handshake_timeout=handshake_timeout,
        connect_timeout=settings.connect_timeout,
    )
    address = as_address(target)
    attack, _ = KINDS[kind]
    watcher = Probe(dialer, address, probe, probe_interval, probe_timeout)
    try:
        ready_s = watcher.wait_ready(probe_timeout)
        ready = not watcher.before.failed  # no use attacking what does not work already
        if ready:
            watcher.burst(watcher.before, _BEFORE)
        run = Run(dialer, address, settings)  # the attack's clock starts now
        try:
            if ready:
                watcher.start()
                attack(run)
            else:
                run.notes.append("not attacked: the server did not answer the probe first")
        finally:
            run.close()  # the server cleaning up after the attack is still "during"
            watcher.stop()
        if ready:
            watcher.burst(watcher.after, _AFTER)
        observed = run.observations()
    finally:
        watcher.close()
    before, during, after = watcher.before, watcher.during, watcher.after
    responsive = probe == "none" or (
        before.failed == during.failed == after.failed == 0
        and before.ok == _BEFORE
        and after.ok == _AFTER
    )
    return AttackReport(
        kind=kind,
        target=format_address(address),
        version=settings.version,
        duration_s=round(settings.duration, 3),
        observed=observed,
        probe=probe,
        ready_s=round(ready_s, 3),
        probe_before=before.as_dict(),
        probe_during=during.as_dict(),
        probe_after=after.as_dict(),
        responsive=responsive,
    )
