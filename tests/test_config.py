"""Config defaults (Go's DefaultConfig) and validation: every bad value names its field."""

from __future__ import annotations

import re

import pytest

import pysmux
from tests.util import socketpair, wait_until


def test_defaults_equal_go_default_config():
    c = pysmux.Config()
    assert c.version == 1
    assert c.keepalive_interval == 10
    assert c.keepalive_timeout == 30
    assert c.max_frame_size == 32768
    assert c.max_receive_buffer == 4 * 1024 * 1024
    assert c.max_stream_buffer == 65536
    assert c.accept_backlog == 1024
    assert c.keepalive is True


def test_valid_non_defaults_accepted():
    c = pysmux.Config(
        version=2,
        keepalive_interval=0.1,
        keepalive_timeout=0.1,
        max_frame_size=65535,
        max_receive_buffer=1,
        max_stream_buffer=1,
        accept_backlog=1,
        keepalive=False,
        max_streams=1,
        max_junk_frames_per_second=0,
    )
    assert c.version == 2


INVALID = [
    ("version", {"version": 0}),
    ("version", {"version": 3}),
    ("version", {"version": "1"}),
    ("version", {"version": True}),
    ("keepalive_interval", {"keepalive_interval": 0}),
    ("keepalive_interval", {"keepalive_interval": -1.0}),
    ("keepalive_interval", {"keepalive_interval": "10"}),
    ("keepalive_timeout", {"keepalive_timeout": 0}),
    ("keepalive_timeout", {"keepalive_timeout": -5}),
    ("keepalive_timeout", {"keepalive_interval": 10, "keepalive_timeout": 5}),
    ("max_frame_size", {"max_frame_size": 0}),
    ("max_frame_size", {"max_frame_size": 65536}),
    ("max_frame_size", {"max_frame_size": 1.5}),
    ("max_receive_buffer", {"max_receive_buffer": 0}),
    ("max_receive_buffer", {"max_receive_buffer": -1}),
    ("max_stream_buffer", {"max_stream_buffer": 0}),
    ("max_stream_buffer", {"max_stream_buffer": 2**31, "max_receive_buffer": 2**32}),
    ("max_stream_buffer", {"max_stream_buffer": 8192, "max_receive_buffer": 4096}),
    ("accept_backlog", {"accept_backlog": 0}),
    ("accept_backlog", {"accept_backlog": None}),
    ("keepalive", {"keepalive": 1}),
    ("max_streams", {"max_streams": 0}),
    ("max_junk_frames_per_second", {"max_junk_frames_per_second": -1}),
]


@pytest.mark.parametrize(("field", "kwargs"), INVALID, ids=[f"{f}={kw}" for f, kw in INVALID])
def test_invalid_value_raises_value_error_naming_field(field, kwargs):
    with pytest.raises(ValueError, match=rf"\b{re.escape(field)}\b"):
        pysmux.Config(**kwargs)


def test_unknown_runtime_rejected():
    a, b = socketpair()
    with a, b, pytest.raises(ValueError, match="runtime"):
        pysmux.client(a, runtime="no-such-runtime")


def test_config_must_be_a_config(runtime):
    a, b = socketpair()
    with a, b, pytest.raises(TypeError):
        pysmux.client(a, config={"version": 2}, runtime=runtime)


def test_version_mismatch_between_ends_is_a_protocol_error(pair):
    p = pair(client_config=pysmux.Config(version=1), server_config=pysmux.Config(version=2))
    client, server = p
    st = client.open_stream()
    st.sendall(b"hello")
    wait_until(lambda: server.closed and client.closed, 2, "sessions end")
    assert isinstance(server.error, pysmux.ProtocolError)
    with pytest.raises(pysmux.StreamResetError):
        st.recv(1)
