"""The leak checks of the root conftest.py catch what they promise to catch.

Runs a small probe suite in a subprocess with a copy of the root conftest and
the same warning filters as setup.cfg.
"""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

PROBES = """
import socket, threading

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
    threading.Thread(target=ev.wait, args=(0.3,)).start()

def test_clean():
    with socket.socket():
        pass
"""


def test_root_conftest_catches_leaked_sockets_and_threads(tmp_path):
    root = pathlib.Path(__file__).resolve().parent.parent
    shutil.copy(root / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\nfilterwarnings =\n    error\n")
    (tmp_path / "test_probes.py").write_text(PROBES)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", "test_probes.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    for name in ("test_leaked_socket", "test_leaked_socket_in_a_cycle", "test_leaked_thread"):
        assert f"test_probes.py::{name} " in out and (
            f"FAILED test_probes.py::{name} " in out or f"ERROR test_probes.py::{name} " in out
        ), out
    assert "PASSED test_probes.py::test_thread_that_ends_soon_is_fine" in out, out
    assert "PASSED test_probes.py::test_clean" in out, out
    assert "left 1 thread(s) running" in out, out
