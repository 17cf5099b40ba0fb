"""cluster/launch.py itself: its port probe."""

from __future__ import annotations

import errno
import socket

import pytest

from clusterkit import REPO  # noqa: F401  (puts cluster/ on sys.path)
from launch import port_is_free


def _time_wait_port() -> int:
    """A port on 127.0.0.1 with a connection in TIME_WAIT and nothing bound:
    the state a node's SMTP port is in right after the node closed sessions
    (the side that closes first keeps TIME_WAIT) and stopped."""
    with socket.socket() as listener:
        # As tokio's TcpListener::bind does; Linux lets a new socket reuse a
        # TIME_WAIT port only when both sides set SO_REUSEADDR.
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        served, _ = listener.accept()
        served.close()  # the server closes first, like a node answering QUIT
        assert client.recv(1) == b""
        client.close()
    return port


def test_port_probe_ignores_time_wait_but_sees_a_listener():
    port = _time_wait_port()
    # The precondition the launcher tripped over: a plain bind fails.
    with socket.socket() as plain:
        with pytest.raises(OSError) as e:
            plain.bind(("127.0.0.1", port))
        assert e.value.errno == errno.EADDRINUSE
    # The node binds with SO_REUSEADDR, and so does the probe now.
    assert port_is_free("127.0.0.1", port)
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen()
        assert not port_is_free("127.0.0.1", port)
