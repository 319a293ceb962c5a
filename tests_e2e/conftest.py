"""Fixtures of the end-to-end tests: the Go peer binary, peer processes, TCP sessions.

The Go peer is built offline from Debian's golang-github-xtaci-smux-dev
(GOPATH mode: that package has no dependency outside the standard library),
at most once per test run, and kept in pytest's cache (``.pytest_cache``) under
a name made from everything it is built from, so that the next run on the same
tree (CI's monkey-patched pass, say) reuses it. Without a ``go`` binary the Go
tests are skipped, except when ``CI=true``, where they fail.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import pysmux
from tests.runtimes import current, in_ci

from .peers import HERE, PeerProcess, pypeer_argv, pypeer_env

GO_SMUX_GOPATH = "/usr/share/gocode"
GO_SMUX_SOURCE = Path(GO_SMUX_GOPATH, "src/github.com/xtaci/smux")


def _unavailable(reason: str) -> None:
    if in_ci():
        pytest.fail(f"CI=true and the Go peer is unavailable: {reason}", pytrace=False)
    pytest.skip(f"Go interop tests need the Go peer: {reason}")


def _gopeer_build_key(go: str) -> str:
    """A digest of what the gopeer binary is built from: its source, Go smux's, the
    toolchain (``go version``). A binary of the same key is the same build."""
    digest = hashlib.sha256()
    version = subprocess.run(
        [go, "version"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    digest.update(version.encode())
    for source in [*sorted((HERE / "gopeer").glob("*.go")), *sorted(GO_SMUX_SOURCE.glob("*.go"))]:
        digest.update(f"{source.name}:{source.stat().st_size}:".encode())
        digest.update(source.read_bytes())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def gopeer_binary(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of the gopeer binary, built without network access unless pytest's cache
    holds one built from the same sources and toolchain."""
    go = shutil.which("go")
    if go is None:
        _unavailable("no `go` on PATH (apt-get install golang-go)")
    if not (GO_SMUX_SOURCE / "session.go").is_file():
        _unavailable(
            f"no Go smux source in {GO_SMUX_SOURCE} (apt-get install golang-github-xtaci-smux-dev)"
        )
    assert go is not None
    cache = getattr(request.config, "cache", None)  # None under -p no:cacheprovider
    kept = cache.mkdir("gopeer") if cache is not None else tmp_path_factory.mktemp("gopeer")
    binary = kept / f"gopeer-{_gopeer_build_key(go)}"
    if binary.is_file():
        return str(binary)
    work = tmp_path_factory.mktemp("gopeer-build")
    env = dict(os.environ)
    env.update(
        GO111MODULE="off",  # GOPATH mode: imports come from the Debian source tree
        GOPATH=f"{work / 'gopath'}{os.pathsep}{GO_SMUX_GOPATH}",
        GOCACHE=str(work / "gocache"),
        GOFLAGS="",
        GOPROXY="off",  # never touch the network
        GOTOOLCHAIN="local",
        CGO_ENABLED="0",
    )
    partial = kept / f"building-{os.getpid()}"
    build = subprocess.run(
        [go, "build", "-o", str(partial), "."],
        cwd=HERE / "gopeer",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if build.returncode != 0:
        pytest.fail(f"building gopeer failed:\n{build.stdout}\n{build.stderr}", pytrace=False)
    for stale in kept.glob("gopeer-*"):  # builds from older sources
        stale.unlink(missing_ok=True)
    os.replace(partial, binary)  # atomic: a concurrent run sees all of it or nothing
    return str(binary)


StartPeer = Callable[..., PeerProcess]


@pytest.fixture
def gopeer(gopeer_binary: str) -> Iterator[StartPeer]:
    """Start Go peers: ``gopeer("-role=server", ...)``; all are stopped and reaped after."""
    procs: list[PeerProcess] = []

    def start(*args: str, deadline: float = 60.0) -> PeerProcess:
        peer = PeerProcess([gopeer_binary, *args, f"-deadline={deadline}s"])
        procs.append(peer)
        return peer

    yield start
    for p in procs:
        p.stop()


@pytest.fixture
def pypeer(runtime: str) -> Iterator[StartPeer]:
    """Start Python peers (tests_e2e/pypeer.py) in child processes, on the test's runtime
    (gevent: a monkey-patched child); stopped and reaped after."""
    procs: list[PeerProcess] = []

    def start(*args: str) -> PeerProcess:
        peer = PeerProcess(pypeer_argv(*args, f"--runtime={runtime}"), env=pypeer_env())
        procs.append(peer)
        return peer

    yield start
    for p in procs:
        p.stop()


class Net:
    """Loopback sockets and pysmux sessions of one test, all closed in teardown.

    Sockets are plain or gevent ones and sessions get ``runtime=``, after the
    test's runtime.
    """

    def __init__(self, runtime: str) -> None:
        self.runtime = runtime
        self.harness = current()
        self.sockets: list[Any] = []
        self.sessions: list[pysmux.Session] = []

    def listen(self) -> Any:
        lsock = self.harness.listen("127.0.0.1")
        lsock.settimeout(20)
        self.sockets.append(lsock)
        return lsock

    def accept(self, lsock: Any) -> Any:
        conn, _ = lsock.accept()
        conn.settimeout(None)
        self.sockets.append(conn)
        return conn

    def connect(self, addr: tuple[str, int]) -> Any:
        sock = self.harness.connect(addr, timeout=20)
        sock.settimeout(None)
        self.sockets.append(sock)
        return sock

    def client(self, sock: Any, **config: Any) -> pysmux.Session:
        sess = pysmux.client(sock, config=pysmux.Config(**config), runtime=self.runtime)
        self.sessions.append(sess)
        return sess

    def server(self, sock: Any, **config: Any) -> pysmux.Session:
        sess = pysmux.server(sock, config=pysmux.Config(**config), runtime=self.runtime)
        self.sessions.append(sess)
        return sess

    def close(self) -> None:
        for sess in self.sessions:
            sess.close()
        for sock in self.sockets:
            sock.close()


@pytest.fixture
def net(runtime: str) -> Iterator[Net]:
    n = Net(runtime)
    yield n
    n.close()
