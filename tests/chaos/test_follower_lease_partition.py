"""Follower read leases (issue 8) under a one-way partition: the lease
holder stays reachable for clients and can still call the leader, but no
append reaches it (its cluster port is cut, as in the lab's fault (a)).

This is the fault a follower lease must survive: a holder that cannot
receive writes must not answer reads from its own replica once a write it
lacks has been acknowledged. The leader may acknowledge such a write only
after the holder's lease ended (it cannot wait for an acknowledgement that
never comes), and by then the holder no longer reads locally. And the holder
must not get new leases meanwhile, or every write would wait for one.

Only the three nodes and the firewall of the lab (no Postfix); needs root
like the rest of tests/chaos. Takes about 5 s.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import Counter

import pytest

from lab import Lab, create_alias, readyz, show_alias, wait_until

CONFIG = {"ratelimit": {"enabled": False}, "log": {"level": "info,openraft=warn"}}
CUT_SECS = 3.0  # how long the holder stays cut off while writes go on
HELD_WRITE_BOUND_S = 3.0  # generous bound on the one write held for the holder's lease (~0.31 s)
# Writes held for the cut-off holder: its lease at the cut, and at most a
# renewal or two already under way; a leader that kept granting it leases
# would hold one write per lease (a dozen in CUT_SECS).
MAX_HOLDS = 4


def counter(node, name: str) -> float:
    return node.metric(f"tempalias_{name}_total", default=0.0)


@pytest.fixture
def lab(request, binary):
    """Nodes and firewall only, torn down whatever the outcome."""
    with Lab(binary, mail=False, node_config=CONFIG, name=f"taflease{threading.get_native_id()}") as the_lab:
        request.node._chaos_lab = the_lab
        yield the_lab


def create_ok(node, max_usage: int = 2) -> dict:
    status, body = create_alias(node, max_usage)
    assert status == 201, f"create through node{node.id}: {status} {body}"
    return body


def test_cut_off_lease_holder_never_serves_a_stale_read(lab):
    c = lab.cluster
    for nd in c:
        create_ok(nd)  # followers forward: every node opens cluster connections
    if not c.binds_outbound():
        pytest.skip("this binary opens its cluster connections from the default source address; iptables cannot tell the nodes apart")
    leader = c.node(c.wait_leader())
    holder, other = [nd for nd in c if nd.id != leader.id]
    mailbox = create_ok(leader)

    # The holder holds a lease a few milliseconds old when the cut begins.
    def lease_just_granted():
        before = counter(leader, "raft_follower_leases_granted")
        status, _ = show_alias(holder, mailbox)
        return status == 200 and counter(leader, "raft_follower_leases_granted") > before

    wait_until(lease_just_granted, 10, f"a follower lease granted to node{holder.id}", interval=0.0)
    assert counter(holder, "raft_follower_lease_reads") > 0

    acked: list[tuple[float, dict]] = []  # (acknowledged at, alias), in order
    reads: list[int] = []  # statuses of the holder's reads
    wrong: list[str] = []
    probes: Counter = Counter()
    stop = threading.Event()

    def reader():
        """Reads, on the holder, the newest alias acknowledged so far."""
        while not stop.is_set():
            target = acked[-1][1] if acked else mailbox
            status, body = show_alias(holder, target, timeout=20)
            reads.append(status)
            # 503 while it cannot confirm it is current; never 404 (or no
            # answer) for an alias acknowledged before the read started.
            if status not in (200, 503) or (status == 200 and (body or {}).get("id") != target["id"]):
                wrong.append(f"read of {target['id']} (acknowledged before the read) on node{holder.id}: {status} {body}")

    def prober():
        """A load balancer's health check of the holder (each one may ask the leader)."""
        while not stop.wait(0.1):
            probes[readyz(holder, timeout=5)] += 1

    threads = [threading.Thread(target=reader, daemon=True, name=f"reader{i}") for i in range(2)]
    threads.append(threading.Thread(target=prober, daemon=True, name="prober"))
    holds0 = counter(leader, "raft_lease_holds")
    latencies: list[float] = []
    try:
        for t in threads:
            t.start()
        lab.fw.cut_inbound(lab.ip(holder.id), lab.others(holder.id))
        t_cut = time.monotonic()
        while time.monotonic() - t_cut < CUT_SECS:
            t0 = time.monotonic()
            alias = create_ok(leader)
            latencies.append(time.monotonic() - t0)
            acked.append((time.monotonic(), alias))
        holds = counter(leader, "raft_lease_holds") - holds0
        granted_at_heal = counter(leader, "raft_follower_leases_granted")
    finally:
        lab.fw.heal()
        stop.set()
        for t in threads:
            t.join(30)
    assert not any(t.is_alive() for t in threads), "client threads did not stop"

    print(
        f"\nnode{holder.id} cut off for {CUT_SECS:.0f} s: {len(latencies)} creates through node{leader.id}, "
        f"first {latencies[0] * 1000:.0f} ms, median {statistics.median(latencies) * 1000:.1f} ms, "
        f"{sum(1 for x in latencies if x > 0.1)} over 100 ms; lease holds {holds:.0f}; "
        f"reads on the holder {dict(Counter(reads))}; /readyz {dict(probes)}"
    )
    assert not wrong, wrong[:5]
    assert latencies[0] < HELD_WRITE_BOUND_S, f"the first write waited {latencies[0]:.2f} s for the cut-off holder"
    assert 1 <= holds <= MAX_HOLDS, f"{holds:.0f} writes held for a holder that could not acknowledge them"
    late = [round(x, 3) for x in latencies[1:] if x >= 2.5]
    assert not late, f"writes still waited after the holder's lease ended: {late}"

    # After the heal the holder catches up: every acknowledged alias is there.
    def caught_up():
        return all(show_alias(holder, a, timeout=10)[0] == 200 for _, a in acked[-20:])

    wait_until(caught_up, 30, f"node{holder.id} to serve the aliases created while it was cut off")
    for _, a in acked[:20]:
        status, body = show_alias(holder, a)
        assert status == 200 and body["id"] == a["id"], (status, body)
    # And it gets leases again.
    wait_until(lambda: show_alias(holder, mailbox)[0] == 200 and counter(leader, "raft_follower_leases_granted") > granted_at_heal,
               10, f"a new lease for node{holder.id}")
    assert show_alias(other, acked[-1][1])[0] == 200
