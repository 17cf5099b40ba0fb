"""The lab's own pieces, without tempalias: the iptables helpers tell node
addresses apart by source address (checked with plain sockets bound to
127.0.0.1-3, as the nodes bind their outbound cluster connections), and
leave other ports alone."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from lab import CHAIN, Firewall, Netns, dns_query, tcp_reaches
from launch import free_ports

IPS = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]


@pytest.fixture
def sockets_lab():
    """A namespace of its own with a listener on every node address, on two
    ports (the "cluster" port the firewall guards, and another)."""
    ns = Netns(name=f"tachaoslab{threading.get_native_id()}")
    listeners = []
    try:
        ns.create()
        ns.enter()
        port, other = free_ports(IPS, 2)
        for ip in IPS:
            for p in (port, other):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.bind((ip, p))
                s.listen(4096)  # never accepted: the kernel's queue completes the handshakes
                listeners.append(s)
        fw = Firewall(ns, port)
        yield fw, port, other
        fw.close()
    finally:
        for s in listeners:
            s.close()
        ns.close()


def reach_matrix(port: int) -> dict[tuple[str, str], bool]:
    return {(a, b): tcp_reaches(a, b, port, timeout=0.3) for a in IPS for b in IPS if a != b}


def test_cuts_tell_nodes_apart_by_source_address(sockets_lab):
    fw, port, other = sockets_lab
    assert all(reach_matrix(port).values()), "nothing is cut yet"

    # (a) node 1's inbound cut: nobody reaches it, it reaches everyone.
    fw.cut_inbound(IPS[0], IPS[1:])
    m = reach_matrix(port)
    assert not m[(IPS[1], IPS[0])] and not m[(IPS[2], IPS[0])]
    assert m[(IPS[0], IPS[1])] and m[(IPS[0], IPS[2])] and m[(IPS[1], IPS[2])] and m[(IPS[2], IPS[1])]
    assert all(reach_matrix(other).values()), "another port is never cut"
    fw.heal()
    assert all(reach_matrix(port).values()), "healed"

    # (b)/(c) node 3 isolated: no cluster traffic to or from it.
    fw.isolate(IPS[2], IPS[:2])
    m = reach_matrix(port)
    assert {k for k, v in m.items() if not v} == {(IPS[2], IPS[0]), (IPS[2], IPS[1]), (IPS[0], IPS[2]), (IPS[1], IPS[2])}
    assert all(reach_matrix(other).values())
    fw.heal()
    assert all(reach_matrix(port).values())
    assert fw.rules().strip().splitlines() == [f"-N {CHAIN}"], "heal leaves an empty chain"


def test_flapping_link_goes_up_and_down_and_ends_healed(sockets_lab):
    fw, port, _other = sockets_lab
    seen = []
    done = threading.Event()

    def watch():
        deadline = time.monotonic() + 10
        while not done.is_set() and time.monotonic() < deadline:
            seen.append(tcp_reaches(IPS[0], IPS[1], port, timeout=0.1))
            time.sleep(0.02)  # sampling interval, so the listen queue never fills

    t = threading.Thread(target=watch)
    t.start()
    cuts = fw.flap(IPS[0], IPS[1], period=0.3, duration=2.0)
    done.set()
    t.join(15)
    assert cuts >= 3
    assert True in seen and False in seen, f"the link never changed state: {seen}"
    assert tcp_reaches(IPS[0], IPS[1], port) and tcp_reaches(IPS[1], IPS[0], port), "flap ends healed"
    assert tcp_reaches(IPS[2], IPS[0], port), "the third node was never cut"


def test_dns_query_helper_sees_no_server_as_an_error(sockets_lab):
    # Nothing listens on 127.0.0.53 in this namespace: the readiness check
    # behind Nsd.start() must fail rather than pass.
    with pytest.raises(OSError):
        dns_query("127.0.0.53", "tempalias.test", 15, timeout=0.3)
