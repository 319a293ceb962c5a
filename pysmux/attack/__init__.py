"""Attack simulation: a hostile smux peer, for checking servers you own.

**A testing tool.** Use it only against servers you run or are allowed to
test: it floods and misuses the protocol on purpose. Every attack is bounded
in time (``duration``), volume (``max_bytes``) and connections.

Each kind (:data:`KINDS`) misuses the protocol one way: ``syn-flood``,
``nop-flood``, ``psh-flood`` (1-byte frames), ``window-abuse`` (v2),
``slowloris``, ``garbage-version``, ``huge-length``. While it runs, a legitimate
session (the probe) keeps making small requests; the report says what the
server did to the hostile connections (refused streams, closed connections)
and whether the probe's requests were all answered in time, before, during
and after::

    from pysmux.attack import AttackSettings, run_attack

    report = run_attack("127.0.0.1:4000", "nop-flood", settings=AttackSettings(duration=2))
    print(report.text())
    assert report.responsive

``pysmux attack -r ADDR --kind all`` is the same from the command line.
"""

from __future__ import annotations

from .kinds import KINDS, AttackSettings
from .probe import PROBES
from .runner import AttackReport, run_attack

__all__ = ["KINDS", "PROBES", "AttackReport", "AttackSettings", "run_attack"]
