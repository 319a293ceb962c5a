"""The root conftest.py does what it promises: every test runs on both runtimes,
leaked sockets, threads, greenlets and sessions fail the test that leaked them, and a
CI run without gevent fails instead of skipping half the suite.

Runs a small probe suite in a child pytest with a copy of the root conftest and
the same warning filters as setup.cfg.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from tests import runtimes

PROBES = """
import socket, threading

import pysmux
from tests.util import Event, socketpair, spawn

def test_leaked_socket():
    s = socket.socket()

def test_leaked_socket_in_a_cycle():
    holder = {"s": socket.socket()}
    holder["self"] = holder

def test_leaked_thread():
    ev = threading.Event()
    threading.Thread(target=ev.wait, args=(4,), daemon=True).start()

def test_thread_that_ends_soon_is_fine():
    ev = threading.Event()
    threading.Thread(target=ev.wait, args=(0.1,)).start()

def test_leaked_task():
    ev = Event()
    spawn(ev.wait, 4, name="probe-task")

def test_task_that_ends_soon_is_fine():
    ev = Event()
    spawn(ev.wait, 0.1)

PEERS = []  # the peer ends stay open (and referenced): the sessions have no reason to end

def test_unclosed_session(runtime):
    a, b = socketpair()
    PEERS.append(b)
    pysmux.client(a, runtime=runtime).open_stream()

def test_clean(runtime):
    a, b = socketpair()
    with a, b, pysmux.client(a, runtime=runtime):
        pass

def test_runtime_matches_sockets(runtime):
    a, b = socketpair()
    with a, b:
        assert type(a).__module__.startswith("gevent") == (runtime == "gevent")
"""

ROOT = pathlib.Path(__file__).resolve().parent.parent


def child_pytest(
    tmp_path: pathlib.Path, probes: str, env: dict[str, str], report: str
) -> subprocess.CompletedProcess[str]:
    """Run ``probes`` (a test module) in a child pytest on both runtimes, with a copy of
    the root conftest and the warning filters of setup.cfg; ``report`` is its -r flag."""
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    (tmp_path / "test_probes.py").write_text(probes)
    env["PYSMUX_TEST_RUNTIME"] = "thread,gevent"
    # The probes need the root conftest alone: no installed plugin (Hypothesis', coverage's,
    # ...), whose loading was most of each child's start-up.
    env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", report, "-p", "no:cacheprovider", "test_probes.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
    )


def run_probes(tmp_path: pathlib.Path) -> str:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["PYSMUX_TEST_LEAK_GRACE"] = "0.5"
    proc = child_pytest(tmp_path, PROBES, env, "-rA")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    return proc.stdout


@pytest.mark.runtime_independent(reason="the probes run in a child pytest, on both runtimes")
def test_root_conftest_runs_both_runtimes_and_catches_leaks(tmp_path):
    out = run_probes(tmp_path)
    names = ["thread", "gevent"] if runtimes.gevent_available() else ["thread"]

    def outcome(test: str, rt: str) -> str:
        for word in ("FAILED", "ERROR", "PASSED"):  # -rA: an error at teardown follows PASSED
            if f"{word} test_probes.py::{test}[{rt}]" in out:
                return word
        raise AssertionError(f"{test}[{rt}] did not run:\n{out}")

    for rt in names:
        for test in (
            "test_leaked_socket",
            "test_leaked_socket_in_a_cycle",
            "test_leaked_thread",
            "test_leaked_task",
            "test_unclosed_session",
        ):
            assert outcome(test, rt) in ("FAILED", "ERROR"), (test, rt, out)
        for test in (
            "test_thread_that_ends_soon_is_fine",
            "test_task_that_ends_soon_is_fine",
            "test_clean",
            "test_runtime_matches_sockets",
        ):
            assert outcome(test, rt) == "PASSED", (test, rt, out)
    assert "left 1 thread(s) running: Thread" in out, out
    assert "left 1 thread(s) running: probe-task" in out, out
    if "gevent" in names:
        assert "left 1 greenlet(s) running: probe-task" in out, out
        assert "greenlet(s) running: pysmux-client-" in out, out
    assert "thread(s) running: pysmux-client-" in out, out


GEVENT_STUB = 'raise ImportError("gevent is hidden from this run by a stub module")\n'

RUNTIME_PROBE = """
def test_probe(runtime):
    assert runtime in ("thread", "gevent")
"""


def run_probe(
    tmp_path: pathlib.Path, ci: str | None, hide_gevent: bool = True
) -> subprocess.CompletedProcess[str]:
    """A child pytest (the root conftest, one test on both runtimes) with ``CI`` set to
    ``ci``, in which ``import gevent`` fails (``hide_gevent``: a stub module shadows it)."""
    stub = tmp_path / "stub"
    stub.mkdir(exist_ok=True)
    if hide_gevent:
        (stub / "gevent.py").write_text(GEVENT_STUB)
    else:
        (stub / "gevent.py").unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COVERAGE_", "PYTEST_"))}
    # No coverage in the child: configured for gevent, it would fail to start without it.
    env["PYTHONPATH"] = os.pathsep.join([str(stub), str(ROOT)])
    env.pop("CI", None)
    if ci is not None:
        env["CI"] = ci
    return child_pytest(tmp_path, RUNTIME_PROBE, env, "-rs")


@pytest.mark.runtime_independent(reason="the runs under test are child pytests")
def test_missing_gevent_fails_a_ci_run_and_only_skips_elsewhere(tmp_path):
    """A developer without gevent gets the gevent half of the suite skipped, with the
    reason; under CI=true the same run fails at once, so CI cannot pass on half a suite."""
    local = run_probe(tmp_path, ci=None)
    assert local.returncode == 0, local.stdout + local.stderr
    assert "1 passed, 1 skipped" in local.stdout, local.stdout
    assert "gevent is not installed" in local.stdout, local.stdout

    ci = run_probe(tmp_path, ci="true")
    assert ci.returncode == pytest.ExitCode.USAGE_ERROR, ci.stdout + ci.stderr
    assert "CI=true and gevent is not installed" in ci.stderr, ci.stdout + ci.stderr
    assert "passed" not in ci.stdout, ci.stdout

    if runtimes.gevent_available():  # without the stub the same CI run passes
        ci = run_probe(tmp_path, ci="true", hide_gevent=False)
        assert ci.returncode == 0, ci.stdout + ci.stderr
        assert "2 passed" in ci.stdout, ci.stdout
