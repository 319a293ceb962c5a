"""Hypothesis settings of the property-based tests.

Two profiles, chosen by the environment when this module is imported:

* ``pysmux-ci`` (default): few examples per test (each test names its own
  count, see :func:`examples`), derandomized so that a run is repeatable, no
  example database. The whole fuzzing suite stays within CI's time budget.
* ``pysmux-fuzz``: chosen by setting ``PYSMUX_FUZZ_EXAMPLES=N``; every
  property test then runs ``N`` random examples (new ones on every run) and
  keeps failing examples in ``.hypothesis/`` to replay them first next time::

      PYSMUX_FUZZ_EXAMPLES=2000 python -m pytest tests/test_hostile_peer.py

Every example bounds its own calls with timeouts; the deadline is only a
backstop against an example that hangs.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta

from hypothesis import HealthCheck, settings

__all__ = ["EXAMPLES_ENV", "examples"]

#: Environment variable: run this many examples per property test.
EXAMPLES_ENV = "PYSMUX_FUZZ_EXAMPLES"

_FUZZ_EXAMPLES = os.environ.get(EXAMPLES_ENV, "").strip()

#: Under a tracer (coverage, in CI's measured run) Python runs several times
#: slower: the CI profile runs a quarter of its examples there. The
#: monkey-patched run, without a tracer, runs them all.
_TRACED = sys.gettrace() is not None

_common = {
    # An example makes sessions and threads; timing varies on a loaded machine.
    "deadline": timedelta(seconds=20),
    # The `runtime` fixture only names the runtime; every example makes its own sessions.
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    "print_blob": True,
}
settings.register_profile("pysmux-ci", derandomize=True, database=None, **_common)
settings.register_profile("pysmux-fuzz", derandomize=False, **_common)
settings.load_profile("pysmux-fuzz" if _FUZZ_EXAMPLES else "pysmux-ci")


def examples(ci: int) -> int:
    """Examples for one test: ``ci`` in the CI profile, else what the environment asks."""
    if not _FUZZ_EXAMPLES:
        return max(5, ci // 4) if _TRACED else ci
    count = int(_FUZZ_EXAMPLES)
    if count <= 0:
        raise ValueError(f"{EXAMPLES_ENV}={_FUZZ_EXAMPLES!r}: expected a positive number")
    return count
