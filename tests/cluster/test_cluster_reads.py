"""Status reads on a three-node cluster (issue 8): every read sees the writes
acknowledged before it, the leader serves read barriers from its read lease,
concurrent reads share barriers, and /readyz probes share cached verdicts.

The counters come from each node's /metrics:
  tempalias_raft_read_quorum_rounds_total  leader: barriers confirmed by a quorum round
  tempalias_raft_lease_reads_total         leader: barriers served from the read lease
  tempalias_http_read_barriers_total       barriers run for HTTP status reads
  tempalias_readiness_checks_total         readiness checks run for /readyz
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from clusterkit import create_ok, request, show_ok

ELECTION_TIMEOUT_S = 0.25  # the default cluster.election_timeout_ms: the lease's length
READYZ_MAX_AGE_S = 0.25  # src/http/readiness.rs MAX_AGE


def counter(node, name: str) -> float:
    return node.metric(f"tempalias_{name}_total", default=0.0)


def leader_and_followers(cluster):
    lid = cluster.wait_leader()
    leader = cluster.node(lid)
    return leader, [nd for nd in cluster if nd.id != lid]


def auth(alias: dict) -> dict:
    return {"Authorization": f"Bearer {alias['token']}"}


def test_reads_on_every_node_see_the_write_just_acknowledged(cluster):
    """A create or revoke acknowledged by one node is visible to an
    immediately following read on any node (the linearizable read the lease
    must not weaken), and the leader serves most barriers from its lease."""
    leader, followers = leader_and_followers(cluster)
    nodes = [leader, *followers]
    rounds0 = counter(leader, "raft_read_quorum_rounds")
    lease0 = counter(leader, "raft_lease_reads")
    t0 = time.monotonic()
    reads = 0
    for i in range(30):
        writer = nodes[i % 3]
        alias = create_ok(writer)
        for reader in nodes:
            assert show_ok(reader, alias)["id"] == alias["id"]
            reads += 1
        if i % 3 == 0:
            r = request(nodes[(i + 1) % 3], "DELETE", f"/v1/aliases/{alias['id']}", headers=auth(alias))
            assert r.status == 204, (r.status, r.body)
            for reader in nodes:
                r = request(reader, "GET", f"/v1/aliases/{alias['id']}", headers=auth(alias))
                assert r.status in (404, 410) or r.json().get("state") == "revoked", (reader.id, r.status, r.body)
                reads += 1
    elapsed = time.monotonic() - t0
    rounds = counter(leader, "raft_read_quorum_rounds") - rounds0
    lease = counter(leader, "raft_lease_reads") - lease0
    # Every barrier of the leader, and every follower's ReadIndex, is one or
    # the other; a quorum round is needed only once per lease.
    assert lease > 0, "the leader never served a barrier from its lease"
    assert rounds <= elapsed / ELECTION_TIMEOUT_S + 3, (
        f"{rounds} quorum rounds for {reads} reads in {elapsed:.1f} s: the lease is not used"
    )


def test_concurrent_reads_share_barrier_rounds(cluster_factory):
    """Reads that arrive together at a follower share ReadIndex round trips:
    fewer barriers run than reads are served. (Follower read leases are off:
    a follower within its lease runs no barrier at all.)"""
    cluster = cluster_factory(extra={"cluster": {"follower_read_leases": False}})
    leader, followers = leader_and_followers(cluster)
    follower = followers[0]
    alias = create_ok(leader)
    clients, per_client = 32, 10
    conns = [http.client.HTTPConnection(follower.ip, follower.http_port, timeout=20) for _ in range(clients)]
    start = threading.Barrier(clients)
    failures: list[str] = []

    def reader(conn):
        try:
            start.wait(timeout=20)
            for _ in range(per_client):
                conn.request("GET", f"/v1/aliases/{alias['id']}", headers=auth(alias))
                r = conn.getresponse()
                body = r.read()
                if r.status != 200:
                    failures.append(f"{r.status} {body!r}")
        except Exception as e:  # noqa: BLE001 - reported below
            failures.append(repr(e))
        finally:
            conn.close()

    before = counter(follower, "http_read_barriers")
    threads = [threading.Thread(target=reader, args=(c,)) for c in conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "readers did not finish"
    assert not failures, failures[:5]
    reads = clients * per_client
    barriers = counter(follower, "http_read_barriers") - before
    assert barriers >= 1
    # Without sharing there is one barrier per read.
    assert barriers <= reads * 0.75, f"{barriers:.0f} barriers for {reads} concurrent reads"


def test_readyz_probes_share_cached_verdicts(cluster):
    """Many probes of a follower's /readyz run at most one readiness check
    (one ReadIndex round trip to the leader) per refresh interval."""
    leader, followers = leader_and_followers(cluster)
    follower = followers[0]
    checks0 = counter(follower, "readiness_checks")
    rounds0 = counter(leader, "raft_read_quorum_rounds")
    probes = 0
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + 1.5

    def prober():
        nonlocal probes
        conn = http.client.HTTPConnection(follower.ip, follower.http_port, timeout=10)
        try:
            while time.monotonic() < stop:
                conn.request("GET", "/readyz")
                r = conn.getresponse()
                json.loads(r.read())
                with lock:
                    probes += 1
                    statuses[r.status] = statuses.get(r.status, 0) + 1
        finally:
            conn.close()

    t0 = time.monotonic()
    threads = [threading.Thread(target=prober) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - t0
    checks = counter(follower, "readiness_checks") - checks0
    rounds = counter(leader, "raft_read_quorum_rounds") - rounds0
    assert statuses.get(200, 0) == probes, statuses
    bound = elapsed / READYZ_MAX_AGE_S + 2
    assert probes >= 5 * bound, f"only {probes} probes in {elapsed:.1f} s: the test proves nothing"
    assert 1 <= checks <= bound, f"{checks:.0f} readiness checks for {probes} probes in {elapsed:.1f} s"
    # And the leader answers those ReadIndex calls mostly from its lease.
    assert rounds <= elapsed / ELECTION_TIMEOUT_S + 2, f"{rounds:.0f} quorum rounds on the leader"
