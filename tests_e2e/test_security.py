# ruff: noqa: F811 - the fixtures of test_cli.py are imported under the names tests ask for
"""Who may use a tunnel: TLS, the shared key, the source filter and the no-open-relay rule.

In-process tunnels run on both runtimes; the command runs in child processes
(``Cli`` of test_cli.py); Go's crypto/tls is the other end in the interop
tests. Certificates are made once per run with the ``openssl`` command: a CA,
a server certificate for localhost and 127.0.0.1, a client certificate, and a
second, unrelated CA with a client certificate of its own.

Every test that is refused also checks that the target saw no connection at
all: a refused client must never reach it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest

import pysmux
from pysmux.metrics import render
from pysmux.tunnel import (
    EchoServer,
    SharedKey,
    TunnelClient,
    TunnelServer,
    client_tls_context,
    server_tls_context,
)
from pysmux.tunnel.guard import HELLO_SIZE, MAC_SIZE, MAGIC, NONCE_SIZE, VERSION
from tests.runtimes import current
from tests_e2e.conftest import StartPeer
from tests_e2e.test_cli import (  # noqa: F401 - fixtures
    CHILD,
    VERSIONS,
    Cli,
    TcpTarget,
    addr_arg,
    cli,
    connect,
    echo_many,
    target,
    tunnels,
    wait_until,
)

KEY = "correct horse battery staple"
#: What a client without a key logs when the server asks for one.
TOLD_TO_GIVE_KEY = "began a key handshake: give this end the same key"


class Pki(NamedTuple):
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ca(folder: Path, name: str) -> tuple[Path, Path]:
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-days", "2", "-subj", f"/CN=pysmux test {name}", "-keyout", str(key),
             "-out", str(cert), "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    return cert, key


def _leaf(folder: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    extfile = folder / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(csr))  # fmt: skip
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "2", "-out", str(cert),
             "-extfile", str(extfile))  # fmt: skip
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Throw-away certificates, made with the openssl command."""
    if shutil.which("openssl") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("openssl is missing on CI; .ci/run expects Debian's openssl package")
        pytest.skip("the openssl command is needed to make test certificates")
    folder = tmp_path_factory.mktemp("pki")
    ca = _ca(folder, "ca")
    other = _ca(folder, "other-ca")
    server_ext = "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"
    server = _leaf(folder, "localhost", ca, server_ext)
    client = _leaf(folder, "client", ca, "extendedKeyUsage=clientAuth\n")
    stranger = _leaf(folder, "stranger", other, "extendedKeyUsage=clientAuth\n")
    return Pki(ca[0], *server, *client, other[0], *stranger)


def wait_refused(srv: Any, count: int) -> None:
    wait_until(lambda: srv.refused >= count, 10, f"{count} connection(s) refused")


def messages(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records]


def assert_refused_without_reaching(
    client: TunnelClient, echo: TcpTarget, no_session: bool = True
) -> None:
    """A TCP connection through ``client`` (whose mux connection cannot come up) is reset
    after its connect_timeout, and the target never sees a connection. ``no_session``:
    the client never thought it had a mux connection (``dials == 0``)."""
    sock = connect(client.address)
    try:
        sock.sendall(b"let me in")
        try:
            data = sock.recv(1)
        except ConnectionResetError:
            data = b""
        assert data == b""
    finally:
        sock.close()
    if no_session:
        assert client.connected == 0 and client.dials == 0
    assert echo.conns == [], "a refused client reached the target"


# ---------------------------------------------------------------------------
# TLS, in-process


@VERSIONS
def test_tls_with_client_certificates_and_key_carries_data(
    runtime: str,
    version: int,
    pki: Pki,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A tunnel across an untrusted network: mutual TLS and a shared key on both ends. Four
    connections x 1 MiB come back intact over two mux connections, both ends logged no
    warning, and the key appears in no log line and no repr."""
    echo = target()
    cfg = pysmux.Config(version=version)
    srv = TunnelServer(
        "127.0.0.1:0",
        echo.address,
        config=cfg,
        runtime=runtime,
        tls=server_tls_context(pki.server_cert, pki.server_key, pki.ca),
        key=KEY,
    )
    tunnels.append(srv.start())
    cli = TunnelClient(
        "127.0.0.1:0",
        srv.address,
        conn=2,
        config=cfg,
        runtime=runtime,
        tls=client_tls_context(pki.ca, pki.client_cert, pki.client_key),
        server_hostname="localhost",
        key=KEY.encode(),
    )
    tunnels.append(cli.start())
    assert cli.wait_connected(timeout=10)
    assert srv.authenticated
    echo_many(cli.address, count=4, size=1 << 20)
    assert srv.sessions == 2 and srv.refused == 0
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], messages(caplog)
    shown = [*messages(caplog), repr(srv), repr(cli), repr(srv._guard), repr(SharedKey(KEY))]
    assert not [m for m in shown if KEY in m]


def test_client_that_does_not_trust_the_server_fails_clearly(
    runtime: str,
    pki: Pki,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client that checks the server against another CA (or the system's CAs, which do not
    know the test CA) refuses it: its log says the certificate could not be verified, it
    retries, and no connection it accepted reaches the target."""
    echo = target()
    srv = TunnelServer(
        "127.0.0.1:0",
        echo.address,
        runtime=runtime,
        tls=server_tls_context(pki.server_cert, pki.server_key),
    )
    tunnels.append(srv.start())
    for ca in (pki.other_ca, None):
        caplog.clear()
        cli = TunnelClient(
            "127.0.0.1:0",
            srv.address,
            runtime=runtime,
            tls=client_tls_context(ca),
            connect_timeout=0.5,
            backoff_max=0.2,
        )
        tunnels.append(cli.start())
        assert_refused_without_reaching(cli, echo)
        cli.close()
        refused = [m for m in messages(caplog) if m.startswith("mux connection 1: cannot")]
        assert refused, messages(caplog)
        assert "certificate verify failed" in refused[0], refused[0]
    wait_until(lambda: srv.sessions == 0, 10, "no session on the server")


def test_mutual_tls_refuses_clients_without_a_good_certificate(
    runtime: str,
    pki: Pki,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server that requires client certificates refuses a client that has none and one
    whose certificate another CA signed; each refusal is logged with the client's address,
    and neither client reaches the target."""
    echo = target()
    srv = TunnelServer(
        "127.0.0.1:0",
        echo.address,
        runtime=runtime,
        tls=server_tls_context(pki.server_cert, pki.server_key, pki.ca),
        handshake_timeout=5,
    )
    tunnels.append(srv.start())
    for cert, key in [(None, None), (pki.other_client_cert, pki.other_client_key)]:
        before = srv.refused
        cli = TunnelClient(
            "127.0.0.1:0",
            srv.address,
            runtime=runtime,
            tls=client_tls_context(pki.ca, cert, key),
            server_hostname="localhost",
            connect_timeout=0.5,
            backoff_max=0.2,
        )
        tunnels.append(cli.start())
        wait_refused(srv, before + 1)
        # TLS 1.3: a client's handshake is done before the server checks its certificate,
        # so the client learns of the refusal from its first read (its session then ends).
        assert_refused_without_reaching(cli, echo, no_session=False)
        cli.close()
    refusals = [m for m in messages(caplog) if m.startswith("mux connection from 127.0.0.1:")]
    assert any("certificate" in m for m in refusals), refusals
    assert srv.sessions == 0


def test_tls_handshake_stallers_are_dropped_after_the_timeout(
    runtime: str, pki: Pki, tunnels: list[Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A peer that connects and says nothing, and one that trickles bytes of a TLS record
    (each byte well within any socket timeout), are both dropped once the handshake timeout
    has passed; meanwhile a real client gets in, and the accept loop was never held up."""
    harness = current()
    srv = EchoServer(
        "127.0.0.1:0",
        runtime=runtime,
        tls=server_tls_context(pki.server_cert, pki.server_key),
        handshake_timeout=0.6,
    )
    tunnels.append(srv.start())
    silent = connect(srv.address)
    trickler = connect(srv.address)
    stop = harness.Event()

    def trickle() -> None:
        record = b"\x16\x03\x01\x02\x00" + b"\x01" * 512  # a TLS handshake record, slowly
        for byte in record:
            try:
                trickler.sendall(bytes([byte]))
            except OSError:
                return
            if stop.wait(0.1):
                return

    began = time.monotonic()
    dripping = harness.spawn(trickle, name="trickle")
    try:
        cli = TunnelClient(
            "127.0.0.1:0", srv.address, runtime=runtime, tls=client_tls_context(pki.ca),
            server_hostname="localhost",
        )  # fmt: skip
        tunnels.append(cli.start())
        assert cli.wait_connected(timeout=10)
        echo_many(cli.address, count=1, size=64 * 1024)
        for sock in (silent, trickler):
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(1) == b""
        took = time.monotonic() - began
        assert 0.5 < took < 5, took
    finally:
        stop.set()
        dripping.join(10)
        silent.close()
        trickler.close()
    wait_until(lambda: srv.refused == 2 and srv.handshakes == 0, 10, "both refused")
    timeouts = [m for m in messages(caplog) if "not done within 0.6 s" in m]
    assert len(timeouts) == 2, messages(caplog)


# ---------------------------------------------------------------------------
# the shared key, in-process


def test_wrong_or_missing_key_and_stallers_never_reach_the_target(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server with a key admits the client with the right key, and refuses (logging the
    client's address and why) a client with a wrong key, a plain smux client with no key,
    and a peer that takes the challenge and never answers; none of them reaches the
    target. A client with a key facing a server without one says so."""
    echo = target()
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=runtime, key=KEY, handshake_timeout=0.8)
    tunnels.append(srv.start())
    quick = {"connect_timeout": 0.5, "backoff_max": 0.2, "runtime": runtime}

    for key, reason in [("not the key", "wrong key"), (None, "key proof")]:
        before = srv.refused
        cli = TunnelClient("127.0.0.1:0", srv.address, key=key, **quick)
        tunnels.append(cli.start())
        if key is None:  # plain smux: its session comes up, the server drops it
            sock = connect(cli.address)
            try:
                sock.sendall(b"x" * 200)
                wait_refused(srv, before + 1)
            finally:
                sock.close()
            wait_until(lambda: any(TOLD_TO_GIVE_KEY in m for m in messages(caplog)), 10, "told")
        else:
            wait_refused(srv, before + 1)
            assert_refused_without_reaching(cli, echo)
        cli.close()
        # Counted, then logged: wait for the line rather than race it.
        wait_until(
            lambda reason=reason: any(
                reason in m and "from 127.0.0.1:" in m for m in messages(caplog)
            ),
            5,
            reason,
        )

    staller = connect(srv.address)
    try:
        hello = harness_recv_exactly(staller, HELLO_SIZE)
        assert hello.startswith(MAGIC + bytes([VERSION]))
        began = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert staller.recv(1) == b""
        assert 0.3 < time.monotonic() - began < 5
    finally:
        staller.close()
    # The server logs the refusal as it drops the connection: the line may follow the close.
    wait_until(
        lambda: any("not done within 0.8 s" in m for m in messages(caplog)), 5, "staller logged"
    )

    good = TunnelClient("127.0.0.1:0", srv.address, key=KEY, runtime=runtime)
    tunnels.append(good.start())
    assert good.wait_connected(timeout=10)
    echo_many(good.address, count=2, size=256 * 1024)
    assert len(echo.conns) == 2  # the two carried connections, and nothing else
    failures = srv.stats()["handshake_failures"]
    assert failures == srv.refused >= 3  # wrong key, no key, the staller
    assert f'pysmux_handshake_failures_total{{role="server"}} {failures}' in render(
        srv.stats(), "server"
    )

    plain = TunnelServer("127.0.0.1:0", echo.address, runtime=runtime)
    tunnels.append(plain.start())
    caplog.clear()
    lost = TunnelClient("127.0.0.1:0", plain.address, key=KEY, handshake_timeout=0.3, **quick)
    tunnels.append(lost.start())
    wait_until(lambda: any("key challenge" in m for m in messages(caplog)), 10, "said so")
    lost.close()
    assert not [m for m in messages(caplog) if KEY in m]


def harness_recv_exactly(sock: Any, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} bytes"
        out += chunk
    return out


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc (Linux)")
def test_a_thousand_failed_attempts_leave_the_server_bounded_and_responsive(
    runtime: str, target: Callable[..., TcpTarget], tunnels: list[Any]
) -> None:
    """1,000 key proofs with a wrong MAC, from 8 concurrent attackers, are each refused; the
    server's handshakes in progress never pass ``max_handshakes``, its tasks and file
    descriptors go back to what they were, and a client with the right key then gets in
    and carries data."""
    harness = current()
    echo = target()
    srv = TunnelServer("127.0.0.1:0", echo.address, runtime=runtime, key=KEY, max_handshakes=16)
    tunnels.append(srv.start())
    threads_before, fds_before = threading.active_count(), _fd_count()
    peak = [0]

    def attack(count: int) -> None:
        for _ in range(count):
            sock = connect(srv.address)
            try:
                harness_recv_exactly(sock, HELLO_SIZE)
                sock.sendall(MAGIC + bytes([VERSION, 0]) + b"n" * NONCE_SIZE + b"m" * MAC_SIZE)
                peak[0] = max(peak[0], srv.handshakes)
                with contextlib.suppress(ConnectionResetError):
                    assert sock.recv(1) == b""
            finally:
                sock.close()

    began = time.monotonic()
    attackers = [harness.spawn(attack, 125, name=f"attacker-{i}") for i in range(8)]
    for a in attackers:
        a.result(120)
    took = time.monotonic() - began
    wait_until(lambda: srv.refused == 1000 and srv.handshakes == 0, 10, "all refused")
    assert peak[0] <= 16
    wait_until(lambda: _fd_count() <= fds_before, 10, "fds back to before")
    if runtime == "thread":
        wait_until(lambda: threading.active_count() <= threads_before, 10, "threads back")
    assert echo.conns == []
    good = TunnelClient("127.0.0.1:0", srv.address, key=KEY, runtime=runtime)
    tunnels.append(good.start())
    assert good.wait_connected(timeout=10)
    echo_many(good.address, count=2, size=64 * 1024)
    assert took < 60, took


def test_allow_admits_and_refuses_by_source_address(
    runtime: str,
    target: Callable[..., TcpTarget],
    tunnels: list[Any],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """``allow=["127.0.0.1/32"]`` admits a client on 127.0.0.1; a server that allows only
    10.0.0.0/8 and 192.0.2.0/24 closes the connection at accept, before any handshake
    (with a key, the client never even sees the challenge), and logs it. A TunnelClient's
    ``allow`` filters the TCP connections it carries the same way."""
    echo = target()
    open_to_me = TunnelServer(
        "127.0.0.1:0", echo.address, runtime=runtime, allow=["127.0.0.1/32"], key=KEY
    )
    tunnels.append(open_to_me.start())
    cli = TunnelClient("127.0.0.1:0", open_to_me.address, runtime=runtime, key=KEY)
    tunnels.append(cli.start())
    assert cli.wait_connected(timeout=10)
    echo_many(cli.address, count=1, size=64 * 1024)

    closed_to_me = TunnelServer(
        "127.0.0.1:0", echo.address, runtime=runtime, allow=["10.0.0.0/8", "192.0.2.0/24"],
        key=KEY,
    )  # fmt: skip
    tunnels.append(closed_to_me.start())
    with contextlib.suppress(ConnectionResetError):  # the reset can beat connect() itself
        sock = connect(closed_to_me.address)
        try:
            assert sock.recv(HELLO_SIZE) == b""
        finally:
            sock.close()
    wait_until(lambda: any("not allowed" in m for m in messages(caplog)), 10, "logged")
    refused = [m for m in messages(caplog) if "address not allowed" in m]
    assert len(refused) == 1 and "127.0.0.1:" in refused[0], messages(caplog)
    assert closed_to_me.refused == 0 and closed_to_me.sessions == 0  # no handshake at all
    assert closed_to_me.stats()["connections_not_allowed"] == 1
    assert open_to_me.stats()["connections_not_allowed"] == 0
    assert len(echo.conns) == 1
    picky = TunnelClient("127.0.0.1:0", open_to_me.address, runtime=runtime, key=KEY,
                         allow=["::1/128"])  # fmt: skip
    tunnels.append(picky.start())
    with contextlib.suppress(ConnectionResetError):
        sock = connect(picky.address)
        try:
            assert sock.recv(1) == b""
        finally:
            sock.close()
    wait_until(lambda: len([m for m in messages(caplog) if "not allowed" in m]) == 2, 10, "2")
    assert picky.connections == 0 and len(echo.conns) == 1
    assert picky.stats()["connections_not_allowed"] == 1
    with pytest.raises(ValueError, match="not a network"):
        TunnelServer("127.0.0.1:0", echo.address, allow=["10.0.0.0/33"])


@pytest.mark.runtime_independent(reason="checks arguments only; nothing starts")
def test_library_refuses_weak_tls_and_hides_the_key(runtime: str, tmp_path: Path) -> None:
    """The library refuses a TLS context that allows TLS below 1.2 or is for the wrong side,
    and an empty key or key file; a key shows in no repr or str."""
    import ssl

    weak = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    weak.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED  # TLS 1.0 and up
    with pytest.raises(ValueError, match=r"below 1\.2"):
        TunnelServer("127.0.0.1:0", "127.0.0.1:1", tls=weak)
    with pytest.raises(ValueError, match="client context"):
        TunnelClient("127.0.0.1:0", "127.0.0.1:1", tls=ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    with pytest.raises(ValueError, match="empty"):
        TunnelServer("127.0.0.1:0", "127.0.0.1:1", key="")
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        SharedKey.from_file(empty)
    key = SharedKey(KEY)
    assert KEY not in repr(key) and KEY not in str(key)
    srv = TunnelServer("127.0.0.1:0", "127.0.0.1:1", key=key)
    assert KEY not in repr(srv) and KEY not in repr(vars(srv).get("_guard"))


# ---------------------------------------------------------------------------
# the command, in child processes


@CHILD
def test_cli_refuses_an_open_relay_unless_told(
    runtime: str, cli: Callable[..., Cli], target: Callable[..., TcpTarget]
) -> None:
    """``pysmux server`` (and ``echo``) on a non-loopback address without a key or client
    certificates refuses to start with status 2 and names the flags to add; a ``client``
    listening beyond loopback wants ``--allow``. ``--no-auth`` starts the server anyway with
    a warning, and it carries data; loopback needs nothing and warns nothing."""
    echo = target()
    for args, flags in [
        (("server", "-l", "0.0.0.0:0", "-t", addr_arg(echo.address)),
         ("--key-file", "--tls-client-ca", "--no-auth")),
        (("server", "-t", addr_arg(echo.address)), ("--key-file", "--no-auth")),  # 0.0.0.0:29900
        (("echo", "-l", "0.0.0.0:0"), ("--key-file", "--no-auth")),
        (("client", "-l", "0.0.0.0:0", "-r", "127.0.0.1:1"), ("--allow", "--no-auth")),
        (("server", "-l", "127.0.0.1:0", "-t", "127.0.0.1:1", "--key", "k", "--no-auth"),
         ("--no-auth",)),
        (("server", "-l", "127.0.0.1:0", "-t", "127.0.0.1:1", "--key", "k", "--key-file", "f"),
         ("--key-file",)),
        (("client", "-r", "127.0.0.1:1", "--tls-cert", "c.pem"), ("--tls-key",)),
    ]:  # fmt: skip
        p = cli(*args)
        assert p.wait() == 2, p.describe()
        assert p.out == [], p.describe()
        for flag in flags:
            assert flag in p.err[-1], p.describe()

    server = cli("server", "-l", "0.0.0.0:0", "-t", addr_arg(echo.address), "--no-auth")
    port = server.address()[1]
    server.wait_lines(r"WARNING .* lets anyone who can reach it in", stderr=True)
    client = cli("client", "-l", "127.0.0.1:0", "-r", f"127.0.0.1:{port}")
    echo_many(client.address(), count=2, size=256 * 1024)
    client.assert_clean_exit()
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()

    quiet = cli("server", "-l", "127.0.0.1:0", "-t", addr_arg(echo.address), "-q")
    quiet.address()
    quiet.assert_clean_exit()
    assert quiet.err == []


@CHILD
def test_cli_tls_and_key_across_processes(
    runtime: str,
    cli: Callable[..., Cli],
    pki: Pki,
    target: Callable[..., TcpTarget],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The command run as across a network: the server on a non-loopback listen with a
    certificate, a client CA and ``--key-file``; the client with ``--tls-ca``, its
    certificate and the same key file. Data flows, nothing warns. A client with the wrong
    ``--key`` is refused (both logs say so, no log shows the key) and never reaches the
    target; a ``--tls-insecure`` client with the key in ``PYSMUX_KEY`` warns at start and
    gets in."""
    echo = target()
    keyfile = tmp_path / "key"
    keyfile.write_text(KEY + "\n")
    server = cli(
        "server", "-l", "0.0.0.0:0", "-t", addr_arg(echo.address), "--tls-cert",
        str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
        "--key-file", str(keyfile), "--runtime", runtime,
    )  # fmt: skip
    remote = f"127.0.0.1:{server.address()[1]}"
    mtls = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key))  # fmt: skip
    good = cli("client", "-l", "127.0.0.1:0", "-r", remote, *mtls, "--key-file", str(keyfile),
               "--runtime", runtime)  # fmt: skip
    echo_many(good.address(), count=2, size=1 << 20)
    good.wait_lines(r"mux connections: TLS, shared key", stderr=True)
    assert len(echo.conns) == 2
    secret = "guess-" + KEY
    wrong = cli("client", "-l", "127.0.0.1:0", "-r", remote, *mtls, "--key", secret,
                "--connect-timeout", "0.5")  # fmt: skip
    wrong.wait_lines(r"cannot connect to .*: the server refused the key proof", stderr=True)
    server.wait_lines(r"mux connection from 127\.0\.0\.1:\d+ refused: wrong key", stderr=True)
    sock = connect(wrong.address())
    try:
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    finally:
        sock.close()
    assert len(echo.conns) == 2
    monkeypatch.setenv("PYSMUX_KEY", KEY)  # this child takes the key from its environment
    mine = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    insecure = cli("client", "-l", "127.0.0.1:0", "-r", remote, "--tls-insecure", *mine)
    insecure.wait_lines(r"WARNING .*without verifying the server's certificate", stderr=True)
    echo_many(insecure.address(), count=1, size=64 * 1024)
    good.assert_clean_exit()
    for p in (wrong, insecure, server):
        p.send_signal(signal.SIGTERM)
        assert p.wait() == 0, p.describe()
    for p in (good, wrong, insecure, server):
        assert not [line for line in p.err if KEY in line], p.describe()


@CHILD
def test_cli_config_file_carries_key_tls_and_allow(
    runtime: str,
    cli: Callable[..., Cli],
    pki: Pki,
    target: Callable[..., TcpTarget],
    tmp_path: Path,
) -> None:
    """A user keeps the security settings in the ``-c FILE`` configs: the server's file has
    the key, its certificate and a client CA and listens beyond loopback; the client's file
    has the key, the CA, its certificate, the server name and ``allow``, and listens beyond
    loopback too. Data flows over TLS with the key; a client file with another key is
    refused. A bad key or allow value stops the command (status 2) naming the key of the
    file, never the key's value; ``crypt`` is still ignored with a warning. No log shows
    the key."""
    echo = target()
    server_json = tmp_path / "server.json"
    server_json.write_text(json.dumps({
        "listen": "0.0.0.0:0", "target": addr_arg(echo.address), "key": KEY, "crypt": "aes",
        "tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca),
    }))  # fmt: skip
    server = cli("server", "-c", str(server_json), "--runtime", runtime)
    remote = f"127.0.0.1:{server.address()[1]}"
    server.wait_lines(r"mux connections: TLS with client certificates, shared key", stderr=True)
    assert [line for line in server.err if "'crypt' ignored" in line and "TLS" in line]
    client_settings = {
        "localaddr": "0.0.0.0:0", "remoteaddr": remote, "key": KEY, "tls_ca": str(pki.ca),
        "tls_cert": str(pki.client_cert), "tls_key": str(pki.client_key),
        "tls_server_name": "localhost", "allow": ["127.0.0.1/32", "::1"],
    }  # fmt: skip
    client_json = tmp_path / "client.json"
    client_json.write_text(json.dumps(client_settings))
    good = cli("client", "-c", str(client_json), "--runtime", runtime)
    port = good.address()[1]
    good.wait_lines(r"mux connections: TLS, shared key, allow 127\.0\.0\.1/32,::1", stderr=True)
    echo_many(("127.0.0.1", port), count=2, size=256 * 1024)
    assert len(echo.conns) == 2

    wrong_json = tmp_path / "wrong.json"
    wrong_json.write_text(json.dumps({**client_settings, "localaddr": "127.0.0.1:0",
                                      "key": "guess-" + KEY}))  # fmt: skip
    wrong = cli("client", "-c", str(wrong_json), "--connect-timeout", "0.5")
    wrong.wait_lines(r"cannot connect to .*: the server refused the key proof", stderr=True)
    server.wait_lines(r"refused: wrong key", stderr=True)
    assert len(echo.conns) == 2

    for bad, message in [
        ({"key": ["hunter2", KEY]}, r"key: expected the shared key as a non-empty string"),
        ({"key": ""}, r"key: expected the shared key"),
        ({"allow": ["10.0.0.0/33"]}, r"allow: '10\.0\.0\.0/33' is not a network"),
        ({"tls": "yes"}, r"tls=\"yes\": expected true or false"),
    ]:
        path = tmp_path / "bad.json"
        path.write_text(json.dumps({**client_settings, **bad}))
        p = cli("client", "-c", str(path))
        assert p.wait() == 2, p.describe()
        assert p.out == [] and re.search(message, p.err[-1]), p.describe()
        assert not [line for line in p.err if KEY in line or "hunter2" in line], p.describe()
    for p in (good, wrong, server):
        p.send_signal(signal.SIGTERM)
        assert p.wait() == 0, p.describe()
        assert not [line for line in p.err if KEY in line], p.describe()


@pytest.mark.runtime_independent(reason="parses arguments only; nothing starts")
def test_config_file_key_and_allow_give_way_to_flags(
    runtime: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ``-c FILE`` key is used when nothing else gives one; ``--key`` and ``PYSMUX_KEY``
    win over it (no "give one" error), and ``--allow`` replaces the file's list instead of
    adding to it."""
    from pysmux.cli import _build_parsers
    from pysmux.cli_security import CLIENT, security_from_args
    from pysmux.tunnel import configfile

    path = tmp_path / "client.json"
    settings_in_file = {
        "remoteaddr": "127.0.0.1:1",
        "localaddr": "0.0.0.0:0",
        "key": "from the file",
        "allow": "10.0.0.0/8, 192.0.2.7",
    }
    path.write_text(json.dumps(settings_in_file))

    def settings(*flags: str) -> dict[str, Any]:
        parser, commands = _build_parsers()
        argv = ["client", "-c", str(path), *flags]
        assert configfile.apply_argv(argv, commands) == []
        return security_from_args(parser.parse_args(argv), CLIENT)

    monkeypatch.delenv("PYSMUX_KEY", raising=False)
    got = settings()
    assert got["key"].secret == b"from the file" and got["allow"] == ["10.0.0.0/8", "192.0.2.7"]
    got = settings("--key", "from the flag", "--allow", "127.0.0.1")
    assert got["key"].secret == b"from the flag" and got["allow"] == ["127.0.0.1"]
    monkeypatch.setenv("PYSMUX_KEY", "from the environment")
    assert settings()["key"].secret == b"from the environment"


# ---------------------------------------------------------------------------
# Go's smux and crypto/tls


@CHILD
def test_go_client_against_no_auth_and_tls_servers(
    runtime: str, cli: Callable[..., Cli], gopeer: StartPeer, pki: Pki
) -> None:
    """A Go smux client still works against a ``--no-auth`` pysmux echo on a non-loopback
    listen, and over mutual TLS (Go's crypto/tls with a client certificate): 8 streams x
    256 KiB echo back intact each time."""
    open_echo = cli("echo", "-l", "0.0.0.0:0", "--no-auth")
    tls_echo = cli("echo", "-l", "127.0.0.1:0", "--tls-cert", str(pki.server_cert),
                   "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca))  # fmt: skip
    for server, extra in [
        (open_echo, ()),
        (tls_echo, ("-tls", f"-tls-ca={pki.ca}", f"-tls-cert={pki.client_cert}",
                    f"-tls-key={pki.client_key}")),
    ]:  # fmt: skip
        port = server.address()[1]
        peer = gopeer("-role=client", f"-addr=127.0.0.1:{port}", "-mode=client-echo",
                      "-streams=8", f"-size={256 * 1024}", *extra)  # fmt: skip
        summary = peer.wait_for("summary", timeout=60)[0]
        assert summary["ok"] == 8 and summary["failed"] == 0, peer.describe()
        peer.wait()
    for server in (open_echo, tls_echo):
        server.send_signal(signal.SIGTERM)
        assert server.wait() == 0, server.describe()


@CHILD
def test_pysmux_client_over_tls_to_a_go_server(
    runtime: str,
    cli: Callable[..., Cli],
    gopeer: StartPeer,
    pki: Pki,
    target: Callable[..., TcpTarget],
) -> None:
    """``pysmux client --tls-ca`` carries TCP connections to a Go smux echo server behind
    crypto/tls, checking its certificate for 127.0.0.1; every byte comes back."""
    go = gopeer("-role=server", "-addr=127.0.0.1:0", "-mode=echo", "-tls",
                f"-tls-cert={pki.server_cert}", f"-tls-key={pki.server_key}")  # fmt: skip
    addr = go.wait_for("listening")[0]["addr"]
    client = cli("client", "-l", "127.0.0.1:0", "-r", addr, "--tls-ca", str(pki.ca))
    echo_many(client.address(), count=4, size=256 * 1024)
    client.assert_clean_exit()
