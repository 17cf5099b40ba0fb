"""Cluster-wide maintenance: one command, replicated through Raft, drains
every node (SMTP 421 4.3.2, HTTP 503, /readyz 503), and one command ends it.
Per-node maintenance of one node leaves the others serving."""

from __future__ import annotations

import json
import socket
import subprocess

from clusterkit import create_ok, request, wait_until
from launch import child_env


def maintenance(cluster, via, *args) -> subprocess.CompletedProcess:
    nd = cluster.node(via)
    return subprocess.run(
        [str(cluster.binary), "maintenance", "--config", str(nd.config_path), *args],
        capture_output=True, text=True, timeout=30, env=child_env(),
    )


def greeting(nd) -> str:
    with socket.create_connection(nd.smtp_addr, timeout=10) as s:
        return s.recv(512).decode(errors="replace")


def test_cluster_wide_maintenance_drains_every_node(cluster):
    alias = create_ok(cluster.node(1), days=1, max_usage=3)
    follower = next(nd.id for nd in cluster if nd.id != cluster.wait_leader())

    r = maintenance(cluster, follower, "on", "--cluster")
    assert r.returncode == 0, r.stderr
    for nd in cluster:
        wait_until(lambda nd=nd: nd.readyz() == 503, 10, f"{nd.name} /readyz 503")
        assert greeting(nd).startswith("421 4.3.2"), nd.name
        res = request(nd, "POST", "/v1/aliases", {"target": "me@example.net", "days": 1})
        assert res.status == 503 and res.headers.get("retry-after"), (nd.name, res)
        assert request(nd, "GET", "/healthz").status == 200
    st = json.loads(maintenance(cluster, 3, "status", "--json").stdout)
    assert st["cluster"] is True and st["node"] is False and st["draining"] is True

    r = maintenance(cluster, 1, "off", "--cluster")
    assert r.returncode == 0, r.stderr
    for nd in cluster:
        wait_until(lambda nd=nd: nd.readyz() == 200, 10, f"{nd.name} /readyz 200")
        assert greeting(nd).startswith("220"), nd.name
    assert create_ok(cluster.node(2), days=1, max_usage=1)["remaining"] == 1
    assert alias["id"]


def test_node_maintenance_drains_only_that_node(cluster):
    r = maintenance(cluster, 2, "on")
    assert r.returncode == 0, r.stderr
    assert cluster.node(2).readyz() == 503
    assert greeting(cluster.node(2)).startswith("421 4.3.2")
    for other in (1, 3):
        assert cluster.node(other).readyz() == 200
        assert greeting(cluster.node(other)).startswith("220")
    # Writes keep working through the others while node 2 drains.
    create_ok(cluster.node(3), days=1, max_usage=1)
    assert maintenance(cluster, 2, "off").returncode == 0
    wait_until(lambda: cluster.node(2).readyz() == 200, 10, "node 2 ready again")
