"""The public HTTP listener under hostile clients: header-read timeout
(slowloris), keep-alive idle timeout, the connection cap with its fast 503
(probes still answered), the cap per client address (another address and a
trusted proxy unaffected, slots given back on close), and a normal client
creating an alias while 2,000 idle connections and 500 slowloris clients are
held open."""

from __future__ import annotations

import resource
import socket
import time

import pytest

from harness import TARGET, wait_until

CREATE = b'{"target": "me@example.net", "days": 1}'
REFUSED_GLOBAL = 'tempalias_http_connections_refused_total{limit="max_connections"}'
REFUSED_PER_IP = 'tempalias_http_connections_refused_total{limit="max_connections_per_ip"}'
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n"


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the server closes `sock` (EOF or reset) within `seconds`."""
    sock.settimeout(seconds)
    try:
        while True:
            chunk = sock.recv(4096)
            if not chunk:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def raw_request(port: int, data: bytes, timeout: float = 10, source: str = "127.0.0.1") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        s.sendall(data)
        out = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        except ConnectionResetError:
            pass
        return out


def admitted(port: int, attempts: int = 20) -> socket.socket:
    """A keep-alive connection that holds a slot under the global cap: its
    request (not a probe) was answered with something other than the cap's
    503."""
    for _ in range(attempts):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /no-such-page HTTP/1.1\r\nHost: t\r\n\r\n")
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, "the node closed a held connection"
            head += chunk
        if not head.startswith(b"HTTP/1.1 503"):
            return s
        s.close()
    raise AssertionError(f"no slot within {attempts} connections")


def create_request() -> bytes:
    return (b"POST /v1/aliases HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(CREATE), CREATE))


def test_slow_headers_and_idle_connections_are_cut(node_factory):
    node = node_factory(config={"http": {"header_read_timeout_secs": 1, "keepalive_idle_secs": 2}})
    # A request head that never completes: closed after the header timeout.
    slow = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
    slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: 1\r\n")
    t0 = time.monotonic()
    assert closed_within(slow, 8), "a connection with an incomplete request head stayed open"
    assert time.monotonic() - t0 < 6
    slow.close()

    # A keep-alive connection that goes quiet after a request: closed when idle.
    idle = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
    idle.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
    first = idle.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    assert closed_within(idle, 10), "an idle keep-alive connection stayed open"
    idle.close()


def test_connection_cap_refuses_fast_but_answers_probes(node_factory):
    cap = 20
    node = node_factory(config={"http": {"max_connections": cap, "header_read_timeout_secs": 30}})
    # The readiness polls of the start may still hold slots for a moment.
    quiet(node)
    # Each held connection proves it has a slot: a request that is not a
    # probe gets its answer on it (a connection accepted past the cap, e.g.
    # while the last scrape's slot was still being given back, gets the 503
    # instead, and another one is opened in its place).
    held = [admitted(node.http_port) for _ in range(cap)]
    try:
        t0 = time.monotonic()
        answer = raw_request(node.http_port, create_request())
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 2" in answer.lower() and b'"overloaded"' in answer
        assert time.monotonic() - t0 < 2
        # Probes and scrapes past the cap are still served.
        probe = raw_request(node.http_port, b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 200"), probe
        metrics = raw_request(node.http_port, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        refused = [l for l in metrics.decode().splitlines() if l.startswith(REFUSED_GLOBAL + " ")]
        assert refused and float(refused[0].split()[1]) >= 1, refused
    finally:
        for s in held:
            s.close()
    # Once the held connections are gone, creates work again.
    wait_until(lambda: raw_request(node.http_port, create_request()).startswith(b"HTTP/1.1 201"), 10,
               "a create after the held connections closed")


def metric(node, series: str, source: str = "127.0.0.2") -> float:
    """One sample of /metrics, scraped from `source`."""
    scrape = raw_request(node.http_port, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                         source=source).decode()
    lines = [l for l in scrape.splitlines() if l.startswith(series + " ")]
    assert lines, f"{series} missing from /metrics"
    return float(lines[0].split()[1])


def hold(node, source: str, n: int) -> list[socket.socket]:
    """`n` keep-alive connections from `source`, each proven served (a
    `/healthz` answered `200` on it), so each holds a slot of the node."""
    held = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", node.http_port), timeout=10, source_address=(source, 0))
            held.append(s)
            s.sendall(HEALTHZ)
            answer = s.recv(4096)
            assert answer.startswith(b"HTTP/1.1 200"), (source, len(held), answer)
    except BaseException:
        for s in held:
            s.close()
        raise
    return held


def quiet(node):
    """Waits until no connection but the scrape asking is open, so slots
    still held by connections the harness used are given back."""
    wait_until(lambda: metric(node, "tempalias_http_connections_active") == 1, 10,
               "only the scrape itself to be open")


def test_connections_per_address_are_capped_others_and_trusted_proxies_are_not(node_factory):
    cap = 5
    node = node_factory(config={"http": {"max_connections_per_ip": cap, "header_read_timeout_secs": 30,
                                         "trusted_proxies": ["127.0.0.3"]}})
    quiet(node)
    held = hold(node, "127.0.0.1", cap)
    try:
        # The next connection from that address is refused at once, with
        # the fixed 503 that names the client's own limit.
        t0 = time.monotonic()
        answer = raw_request(node.http_port, create_request())
        assert time.monotonic() - t0 < 2
        assert answer.startswith(b"HTTP/1.1 503"), answer
        assert b"retry-after: 2" in answer.lower() and b'"too_many_connections"' in answer, answer
        # Probes are not an exception: the node is not overloaded.
        probe = raw_request(node.http_port, b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        assert probe.startswith(b"HTTP/1.1 503") and b"too_many_connections" in probe, probe
        # Another address connects and creates an alias meanwhile.
        other = raw_request(node.http_port, create_request(), source="127.0.0.2")
        assert other.startswith(b"HTTP/1.1 201"), other
        assert metric(node, REFUSED_PER_IP) == 2
        assert metric(node, REFUSED_GLOBAL) == 0
        # The held connections were not disturbed: each still answers.
        for s in held:
            s.sendall(HEALTHZ)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        for s in held:
            s.close()

    # Closing gives the slots back: once the node has seen the closes, the
    # address holds its full share again, and only that.
    quiet(node)
    held = hold(node, "127.0.0.1", cap)
    try:
        answer = raw_request(node.http_port, create_request())
        assert answer.startswith(b"HTTP/1.1 503") and b"too_many_connections" in answer, answer
        assert metric(node, REFUSED_PER_IP) == 3
    finally:
        for s in held:
            s.close()
    quiet(node)
    answer = raw_request(node.http_port, create_request())
    assert answer.startswith(b"HTTP/1.1 201"), answer

    # A trusted proxy carries many clients on one address: never capped.
    proxied = hold(node, "127.0.0.3", cap * 3)
    try:
        answer = raw_request(node.http_port, create_request(), source="127.0.0.3")
        assert answer.startswith(b"HTTP/1.1 201"), answer
        assert metric(node, REFUSED_PER_IP) == 3
        assert metric(node, "tempalias_http_connections_active") >= cap * 3 + 1
    finally:
        for s in proxied:
            s.close()


IDLE = 2000
SLOWLORIS = 500


@pytest.fixture
def many_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE + SLOWLORIS + 1000
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"needs {want} file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_create_succeeds_while_idle_and_slowloris_clients_are_held(many_fds, node_factory):
    # The node inherits the raised descriptor limit from this process. On
    # the internet these connections would come from many addresses (one
    # address is capped at http.max_connections_per_ip, tested above); here
    # they all come from 127.0.0.1, so its cap is raised above them.
    node = node_factory(config={"http": {"header_read_timeout_secs": 120, "keepalive_idle_secs": 120,
                                         "max_connections_per_ip": IDLE + SLOWLORIS + 100}})
    sockets = []
    try:
        for _ in range(IDLE):
            sockets.append(socket.create_connection(("127.0.0.1", node.http_port), timeout=10))
        slow = []
        for _ in range(SLOWLORIS):
            s = socket.create_connection(("127.0.0.1", node.http_port), timeout=10)
            s.sendall(b"POST /v1/aliases HTTP/1.1\r\nHost: t\r\n")
            slow.append(s)
        sockets += slow
        for s in slow:  # one more trickled header line each
            s.sendall(b"X-Trickle: 1\r\n")
        t0 = time.monotonic()
        answer = raw_request(node.http_port, create_request(), timeout=10)
        took = time.monotonic() - t0
        assert answer.startswith(b"HTTP/1.1 201"), answer[:300]
        assert TARGET.encode() in answer
        print(f"create with {IDLE} idle + {SLOWLORIS} slowloris connections held: {took * 1000:.1f} ms")
        # They were all still held (none was refused or closed by the node).
        status = raw_request(node.http_port, b"GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").decode()
        active = [l for l in status.splitlines() if l.startswith("tempalias_http_connections_active ")]
        assert active and float(active[0].split()[1]) >= IDLE + SLOWLORIS, active
    finally:
        for s in sockets:
            s.close()
