# ruff: noqa: F811 - the fixtures of test_cli.py and test_security.py are imported by name
"""``pysmux load``, ``pysmux attack`` and ``RpcClient.connect`` against servers that require
a shared key or TLS: with the tunnel client's flags (or keyword arguments) they get in and
do their work; without them they fail (and the server says why it refused them).

The servers run as ``pysmux echo``/``pysmux rpc`` children and, for the library, in-process
on the test's runtime (gevent's TLS sockets included). Certificates come from the ``pki``
fixture of test_security.py.
"""

from __future__ import annotations

import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pysmux import Config
from pysmux.attack import AttackSettings, run_attack
from pysmux.dialer import Dialer
from pysmux.load import run_load
from pysmux.rpc import RpcClient, RpcServer, register_builtins
from pysmux.tunnel import EchoServer, HandshakeError, client_tls_context, server_tls_context
from tests.util import sleep
from tests_e2e.test_cli import Cli, addr_arg, cli  # noqa: F401 - a fixture
from tests_e2e.test_security import KEY, Pki, pki  # noqa: F401 - a fixture


def load(cli: Callable[..., Cli], *args: str) -> tuple[int, dict[str, Any]]:
    """``pysmux load ... --json`` run to its end: its status and summary."""
    p = cli("load", "--json", "--duration", "1", *args)
    status = p.wait(60)
    assert p.out, p.describe()
    return status, json.loads(p.out[-1])


def one_example(summary: dict[str, Any]) -> str:
    """The error message a failed run gives (it must fail in one way only)."""
    assert summary["requests"] == 0 and summary["errors"] >= 1, summary
    (example,) = summary["error_examples"].values()
    assert isinstance(example, str)
    return example


@pytest.fixture
def keyfile(tmp_path: Path) -> str:
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    return str(path)


def test_load_with_the_key_of_a_keyed_server(
    runtime: str, cli: Callable[..., Cli], keyfile: str
) -> None:
    """An operator load-tests a ``pysmux echo --key-file`` server: ``pysmux load
    --key-file`` (the client's flag) gets every answer; without the key, or with another,
    the run fails (status 1); a wrong key is named as such."""
    server = cli("echo", "-l", "127.0.0.1:0", "--key-file", keyfile, "--runtime", runtime)
    address = addr_arg(server.address())
    flags = ("-r", address, "--runtime", runtime)
    status, summary = load(cli, *flags, "--key-file", keyfile, "--conns", "3", "--streams", "4")
    assert status == 0 and summary["errors"] == 0 and summary["requests"] > 0, summary
    assert summary["conns"] == 3, summary

    # What a client without a key reads first (the server's key challenge, or the reset
    # that answers its smux hello), and so how its streams fail, is a race; the server
    # always knows.
    status, summary = load(cli, *flags)
    assert status == 1 and summary["requests"] == 0 and summary["errors"] >= 1, summary
    server.wait_lines(r"refused: no key proof", stderr=True)
    status, summary = load(cli, *flags, "--key", "not " + KEY)
    assert status == 1 and summary["conns"] == 0, summary
    assert summary["error_kinds"] == {"HandshakeError": 1}, summary
    assert "refused the key proof" in one_example(summary), summary
    server.wait_lines(r"refused: wrong key", stderr=True)
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()


def test_load_over_mutual_tls_to_an_rpc_server(
    runtime: str, cli: Callable[..., Cli], pki: Pki
) -> None:
    """``pysmux rpc`` with a certificate and a client CA (mutual TLS): ``pysmux load --mode
    rpc`` with ``--tls-ca``, its certificate and key checks every call; one that trusts only
    the system's CAs fails on the server's certificate, and one that speaks plain smux gets
    nothing through."""
    server = cli("rpc", "-l", "127.0.0.1:0", "--runtime", runtime, "--tls-cert",
                 str(pki.server_cert), "--tls-key", str(pki.server_key),
                 "--tls-client-ca", str(pki.ca))  # fmt: skip
    flags = ("-r", addr_arg(server.address()), "--runtime", runtime, "--mode", "rpc")
    mtls = ("--tls-ca", str(pki.ca), "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key))  # fmt: skip
    status, summary = load(cli, *flags, *mtls, "--streams", "4")
    assert status == 0 and summary["errors"] == 0 and summary["requests"] > 0, summary

    status, summary = load(cli, *flags, "--tls")
    assert status == 1 and "certificate verify failed" in one_example(summary), summary
    status, summary = load(cli, *flags)
    assert status == 1 and summary["requests"] == 0, summary
    p = cli("load", *flags, "--tls-cert", str(pki.client_cert))
    assert p.wait() == 2 and "--tls-cert needs --tls-key" in p.err[-1], p.describe()
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()


def test_attack_on_a_server_with_tls_and_a_key(
    runtime: str, cli: Callable[..., Cli], pki: Pki, keyfile: str
) -> None:
    """An operator checks a deployment that requires TLS and a key: ``pysmux attack`` with
    the client's flags does both handshakes on every hostile connection, so the attacks
    reach smux itself (the server logs protocol errors, never a refused handshake) while
    the probe, secured the same way, is answered throughout."""
    server = cli("echo", "-l", "127.0.0.1:0", "--runtime", runtime, "--tls-cert",
                 str(pki.server_cert), "--tls-key", str(pki.server_key), "--key-file", keyfile,
                 "--smuxver", "2")  # fmt: skip
    address = addr_arg(server.address())
    attack = cli("attack", "-r", address, "--runtime", runtime, "--smuxver", "2",
                 "--kind", "garbage-version,nop-flood,window-abuse,huge-length",
                 "--duration", "0.5", "--tls-ca", str(pki.ca), "--key-file", keyfile,
                 "--json")  # fmt: skip
    assert attack.wait(120) == 0, attack.describe()
    summary = json.loads(attack.out[-1])
    assert summary["responsive"], summary
    seen = {r["kind"]: r["observed"] for r in summary["attacks"]}
    for kind in ("garbage-version", "nop-flood", "window-abuse"):
        assert seen[kind]["closed_by_server"] == seen[kind]["connections"] >= 1, seen[kind]
    # Each garbage-version connection met smux, and smux said why it ended it.
    server.wait_lines(r"does not speak smux \(it sent bytes 7f", count=3, stderr=True)
    assert not [line for line in server.err if "refused" in line], server.describe()

    keyless = cli("attack", "-r", address, "--runtime", runtime, "--smuxver", "2",
                  "--kind", "garbage-version", "--tls-ca", str(pki.ca),
                  "--probe-timeout", "1")  # fmt: skip
    assert keyless.wait(60) == 1, keyless.describe()
    text = "\n".join(keyless.out)
    assert "not attacked" in text and "NOT RESPONSIVE" in text, text
    server.wait_lines(r"refused: no key proof", stderr=True)
    server.send_signal(signal.SIGTERM)
    assert server.wait() == 0, server.describe()


def test_library_clients_reach_a_server_with_tls_and_a_key(
    runtime: str, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    """As a library, on the test's runtime: ``RpcClient.connect``, ``run_load`` and
    ``run_attack`` take ``tls=``, ``key=`` (and ``server_hostname=``) as ``TunnelClient``
    does, and reach in-process servers that require both; a wrong key raises
    ``HandshakeError`` before any call, bad arguments are refused at once, and a context
    that verifies nothing is warned about."""
    cfg = Config(version=2)
    server_tls = server_tls_context(pki.server_cert, pki.server_key)
    client_tls = client_tls_context(pki.ca)
    secured: dict[str, Any] = {"tls": client_tls, "key": KEY, "server_hostname": "localhost"}
    rpc_server = register_builtins(
        RpcServer("127.0.0.1:0", config=cfg, runtime=runtime, tls=server_tls, key=KEY)
    )
    echo = EchoServer("127.0.0.1:0", config=cfg, runtime=runtime, tls=server_tls, key=KEY)
    with rpc_server, echo:
        with RpcClient.connect(rpc_server.address, config=cfg, runtime=runtime, timeout=10,
                               **secured) as rpc:  # fmt: skip
            assert rpc.call("add", [2, 3]) == 5
            assert rpc.session.stats()["streams_opened"] == 1
        with pytest.raises(HandshakeError, match="refused the key proof"):
            RpcClient.connect(rpc_server.address, config=cfg, runtime=runtime,
                              tls=client_tls, key="other")  # fmt: skip
        for server, mode in ((echo, "echo"), (rpc_server, "rpc")):
            summary = run_load([server.address], mode=mode, conns=2, streams=3, requests=300,
                               config=cfg, runtime=runtime, **secured)  # fmt: skip
            assert (summary.requests, summary.errors) == (300, 0), summary.text()
        report = run_attack(echo.address, "garbage-version", config=cfg, runtime=runtime,
                            settings=AttackSettings(duration=2, version=2),
                            **secured)  # fmt: skip
        assert report.responsive, report.text()
        assert report.observed["closed_by_server"] == 3, report.text()
        assert rpc_server.refused == 1 and echo.refused == 0
    insecure = client_tls_context(insecure=True)
    with caplog.at_level(logging.WARNING, logger="pysmux.dialer"):
        Dialer(tls=insecure)
    assert "without verifying the server's certificate" in caplog.text
    with pytest.raises(TypeError, match=r"ssl\.SSLContext"):
        Dialer(tls="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="client context"):
        Dialer(tls=server_tls)
    with pytest.raises(ValueError, match="empty"):
        run_load(["127.0.0.1:1"], key="")
    with pytest.raises(ValueError, match="handshake_timeout"):
        RpcClient.connect("127.0.0.1:1", key=KEY, handshake_timeout=0)


def test_slow_handshakes_do_not_eat_the_attack(
    runtime: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Connecting is not part of an attack's duration: with handshakes slower than the
    whole duration (a loaded machine, a far server), every hostile connection still gets
    its frames sent and is closed for them."""
    real = Dialer.transport

    def slow_transport(self: Dialer, address: Any) -> Any:
        sleep(0.6)  # stands for a slow TLS and key handshake; nothing waits on it
        return real(self, address)

    monkeypatch.setattr(Dialer, "transport", slow_transport)
    cfg = Config(version=2)
    with EchoServer("127.0.0.1:0", config=cfg, runtime=runtime, key=KEY) as server:
        report = run_attack(server.address, "garbage-version", config=cfg, runtime=runtime,
                            settings=AttackSettings(duration=1.0, version=2, conns=3),
                            key=KEY)  # fmt: skip
    assert report.responsive, report.text()
    assert report.observed["connections"] == report.observed["frames_sent"] == 3, report.text()
    assert report.observed["closed_by_server"] == 3, report.text()
