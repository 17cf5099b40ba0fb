"""Smarthost connection reuse through a real node against aiosmtpd: messages
share connections (STARTTLS and implicit TLS with AUTH included), each
arrives once with its own envelope, with reuse off every message has a
connection of its own, and a smarthost entry's own reuse keys win over the
relay-wide ones. The cancel-safety and stale-connection cases are in
the Rust tests (src/relay/reuse_tests.rs), where the upstream's timing can be
steered."""

from __future__ import annotations

import re

import pytest

from harness import TARGET, message
from peers import AioSmtpd


def metric(text: str, name: str, upstream: str) -> float:
    m = re.search(rf'^{re.escape(name)}\{{upstream="{re.escape(upstream)}"\}} (\S+)$', text, re.M)
    assert m, f"no {name} for {upstream} in:\n{text}"
    return float(m.group(1))


def send_several(node, n: int) -> list[str]:
    """Sends n messages, each in its own SMTP session to the node, to one
    alias; returns their subjects."""
    alias = node.create_alias(days=1, max_usage=n + 1)
    subjects = [f"reuse {i}" for i in range(n)]
    for s in subjects:
        assert node.send([alias["alias"]], message(s, to=alias["alias"])) == {}
    assert node.remaining(alias) == 1
    return subjects


def arrived_once(peer: AioSmtpd, subjects: list[str]):
    """Every subject exactly once at the peer, each to the alias's target."""
    got = [re.search(rb"^Subject: (.*?)\r?$", m.data, re.M).group(1).decode() for m in peer.messages]
    assert sorted(got) == sorted(subjects), got
    assert all(m.rcpt_to == [TARGET] for m in peer.messages)


@pytest.mark.parametrize("tls", ["starttls", "implicit-auth"])
def test_messages_share_a_connection(node_factory, aiosmtpd_factory, ca, tmp_path, tls):
    if tls == "starttls":
        peer = aiosmtpd_factory(cert=ca.issue("reuse-starttls"))
        url = f"smtp+starttls://localhost:{peer.port}"
        relay = {"ca_file": str(ca.pem_path)}
    else:
        peer = aiosmtpd_factory(cert=ca.issue("reuse-smtps"), implicit_tls=True, auth=("forwarder", "pw-reuse"))
        (tmp_path / "pw").write_text("pw-reuse\n")
        url = f"smtps://forwarder@localhost:{peer.port}"
        relay = {"ca_file": str(ca.pem_path), "password_file": str(tmp_path / "pw")}
    # A generous idle time, so that a slow test machine does not close the
    # connection between two messages.
    node = node_factory(relay="smarthost", smarthosts=[url],
                        config={"relay": {**relay, "reuse_idle_secs": 30}})
    subjects = send_several(node, 6)
    peer.wait_for(6)
    arrived_once(peer, subjects)
    assert all(m.tls for m in peer.messages)
    if tls == "implicit-auth":
        assert all(m.auth_user == "forwarder" for m in peer.messages)
        # One login for all six.
        assert [ok for _, ok in peer.auth_attempts] == [True]
    connections = {m.peer for m in peer.messages}
    assert len(connections) == 1, connections
    label = url.replace("forwarder@", "")
    m = node.metrics()
    assert metric(m, "tempalias_relay_connections_total", label) == 1
    assert metric(m, "tempalias_relay_reused_total", label) == 5
    assert metric(m, "tempalias_relay_idle", label) == 1


def test_reuse_off_is_a_connection_per_message(node_factory, aiosmtpd_factory):
    peer = aiosmtpd_factory()
    node = node_factory(relay="smarthost", smarthosts=[peer.url],
                        config={"relay": {"reuse_connections": False}})
    subjects = send_several(node, 4)
    peer.wait_for(4)
    arrived_once(peer, subjects)
    assert len({m.peer for m in peer.messages}) == 4
    m = node.metrics()
    assert metric(m, "tempalias_relay_connections_total", peer.url) == 4
    assert metric(m, "tempalias_relay_reused_total", peer.url) == 0
    assert metric(m, "tempalias_relay_idle", peer.url) == 0


def test_each_smarthost_entry_keeps_its_own_reuse_bounds(node_factory, aiosmtpd_factory):
    # Reuse off relay-wide; on for the first entry alone (with an idle time
    # of its own), off for the second, which inherits the relay-wide value.
    # The first entry takes every message.
    kept, other = aiosmtpd_factory(), aiosmtpd_factory()
    node = node_factory(
        relay="smarthost",
        smarthosts=[{"url": kept.url, "reuse_connections": True, "reuse_idle_secs": 30}, other.url],
        config={"relay": {"reuse_connections": False}},
    )
    subjects = send_several(node, 4)
    kept.wait_for(4)
    arrived_once(kept, subjects)
    assert len({m.peer for m in kept.messages}) == 1
    m = node.metrics()
    assert metric(m, "tempalias_relay_connections_total", kept.url) == 1
    assert metric(m, "tempalias_relay_reused_total", kept.url) == 3
    assert metric(m, "tempalias_relay_idle", kept.url) == 1
    assert metric(m, "tempalias_relay_idle", other.url) == 0
    # The other way round on a second node: reuse on relay-wide, off for
    # the one entry.
    node = node_factory(
        name="node2",
        relay="smarthost",
        smarthosts=[{"url": other.url, "reuse_connections": False}],
        config={"relay": {"reuse_idle_secs": 30}},
    )
    subjects = send_several(node, 3)
    other.wait_for(3)
    arrived_once(other, subjects)
    assert len({m.peer for m in other.messages}) == 3
    m = node.metrics()
    assert metric(m, "tempalias_relay_connections_total", other.url) == 3
    assert metric(m, "tempalias_relay_reused_total", other.url) == 0
