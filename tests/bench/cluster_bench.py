#!/usr/bin/env python3
"""Cluster benchmark (issue 3): alias creations/s and the failover gap.

    cargo build --release
    python3 tests/bench/cluster_bench.py            # 5 runs x 5 s per figure, 5 kills

Starts, through cluster/launch.py, a 3-node cluster on 127.0.0.1-3 and a
single-node cluster (the peer, on other ports), both with the release binary
and the default Raft timings, and measures:

  * alias creations/s (POST /v1/aliases answered 201) with 1 and with 64
    concurrent HTTP clients. Each client sends its requests round-robin over
    the cluster's nodes, on one keep-alive connection per node (so on the
    3-node cluster two thirds of the writes are forwarded by a follower to the
    leader, as with DNS round-robin). Runs of the two clusters are
    interleaved; the figure is the median over the runs;
  * the failover gap: kill -9 of the leader -> the next create that commits
    (clients keep writing to the two other nodes; the gap is the time from the
    kill to the first 201 of a request sent after the kill). The killed node is
    restarted and the cluster is ready again before the next kill. Median over
    the kills. The same for a graceful stop (SIGTERM: leadership hand-over).

Prints a table. Asserts nothing about time. Only 127.0.0.0/8 is used.
Clients are Python threads (http.client) in processes of their own: on a small
machine they share the CPUs with the nodes, which the figures include.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

from benchkit import cpu_model  # noqa: E402
from launch import LocalCluster, find_binary, free_ports, wait_until  # noqa: E402

BODY = json.dumps({"target": "me@example.net", "days": 1, "max-usage": 3}).encode()
HEADERS = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------- throughput


def _client_thread(addrs, first, stop_at, start_at, out, lock):
    """One client: POSTs until stop_at, request i to addrs[(first + i) % len]
    over one keep-alive connection per node (DNS round-robin in small); counts
    what started after start_at and ended before stop_at."""
    conns = [None] * len(addrs)
    ok = other = 0
    lat = []
    i = first
    while True:
        if time.monotonic() >= stop_at:
            break
        k = i % len(addrs)
        i += 1
        if conns[k] is None:
            conns[k] = http.client.HTTPConnection(*addrs[k], timeout=30)
        conn = conns[k]
        t0 = time.monotonic()
        try:
            conn.request("POST", "/v1/aliases", body=BODY, headers=HEADERS)
            r = conn.getresponse()
            r.read()
            status = r.status
            if r.getheader("connection", "").lower() == "close":
                conn.close()
                conns[k] = None
        except (OSError, http.client.HTTPException):
            status = 0
            conn.close()
            conns[k] = None
        t1 = time.monotonic()
        if t0 >= start_at and t1 <= stop_at:
            if status == 201:
                ok += 1
                lat.append(t1 - t0)
            else:
                other += 1
    for conn in conns:
        if conn is not None:
            conn.close()
    with lock:
        out["ok"] += ok
        out["other"] += other
        out["lat"] += lat


def _client_process(addrs, n_threads, first, start_at_wall, warmup, duration, queue):
    """Runs `n_threads` clients (thread i starts at node first + i); reports totals."""
    # Wall-clock start shared across processes; converted to this process's monotonic clock.
    delay = start_at_wall - time.time()
    base = time.monotonic() + max(0.0, delay)
    start_at = base + warmup
    stop_at = start_at + duration
    out = {"ok": 0, "other": 0, "lat": []}
    lock = threading.Lock()
    cpu0 = time.process_time()
    threads = []
    while time.monotonic() < base:
        time.sleep(min(0.01, max(0.0, base - time.monotonic())))
    for i in range(n_threads):
        t = threading.Thread(target=_client_thread, args=(addrs, first + i, stop_at, start_at, out, lock), daemon=True)
        t.start()
        threads.append(t)
    for t in threads:
        t.join(duration + warmup + 60)
    out["cpu"] = time.process_time() - cpu0
    queue.put(out)


def throughput(addrs, clients: int, duration: float, warmup: float = 1.0, processes: int | None = None) -> dict:
    """Creations/s with `clients` concurrent keep-alive clients over `addrs`."""
    processes = processes or min(clients, max(1, os.cpu_count() or 1))
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    q = mp.Queue()
    start_wall = time.time() + 0.3
    procs = []
    offset = 0
    for n in per:
        p = mp.Process(target=_client_process, args=(addrs, n, offset, start_wall, warmup, duration, q), daemon=True)
        offset += n
        p.start()
        procs.append(p)
    results = [q.get(timeout=duration + warmup + 120) for _ in procs]
    for p in procs:
        p.join(30)
    ok = sum(r["ok"] for r in results)
    lat = sorted(x for r in results for x in r["lat"])
    return {
        "rate": ok / duration,
        "errors": sum(r["other"] for r in results),
        "p50_ms": 1000 * lat[len(lat) // 2] if lat else float("nan"),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))] if lat else float("nan"),
        "client_cpu": sum(r["cpu"] for r in results) / (duration + warmup),
    }


# --------------------------------------------------------------------------- failover


class Prober:
    """Clients writing continuously to the given nodes; records
    (start, end, status, node id)."""

    def __init__(self, nodes, per_node: int = 2):
        self.nodes = nodes
        self.records = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(nd,), daemon=True) for nd in nodes for _ in range(per_node)]

    def _run(self, nd):
        conn = None
        while not self.stop_event.is_set():
            if conn is None:
                conn = http.client.HTTPConnection(nd.ip, nd.http_port, timeout=30)
            t0 = time.monotonic()
            try:
                conn.request("POST", "/v1/aliases", body=BODY, headers=HEADERS)
                r = conn.getresponse()
                r.read()
                status = r.status
            except (OSError, http.client.HTTPException):
                status = 0
                conn.close()
                conn = None
            t1 = time.monotonic()
            with self.lock:
                self.records.append((t0, t1, status, nd.id))
            if status != 201:
                self.stop_event.wait(0.01)
        if conn is not None:
            conn.close()

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def first_commit_after(self, t: float):
        with self.lock:
            ends = [e for (s, e, st, _n) in self.records if st == 201 and s >= t]
        return min(ends) if ends else None

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(40)


def stop_leader(cluster: LocalCluster, sig: int, load_all: bool = False) -> dict:
    """Stops the leader with `sig` while clients write through the other nodes
    (`load_all`: through every node, the stopped one included), then starts
    it again and waits until the cluster is ready.

    Returns {"first", "stall", "errors", "errors_stopped", "old", "new"}:
    seconds from the signal to the first commit of a create sent after it;
    the longest stretch without any commit from the signal until the new
    leader has served 20 creates (for a graceful stop the old leader may go
    on committing for a while and stall later); non-201 answers through the
    other nodes after the signal; through the stopped node, requests in
    flight at the signal that got no 201 and HTTP error answers after it (a
    refused connection once its listener is closed is not counted: a client
    moves on to another address); the old and the new leader."""
    leader = cluster.wait_leader(timeout=30)
    others = [nd for nd in cluster if nd.id != leader]
    prober = Prober(list(cluster) if load_all else others).start()
    try:
        wait_until(lambda: prober.first_commit_after(0) is not None, 30, "probes to commit before the stop")
        t = time.monotonic()
        cluster.kill(leader, sig, wait=False)
        first = wait_until(lambda: prober.first_commit_after(t), 60, "a commit after the stop", interval=0.005)
        cluster.node(leader).wait_exit(60)
        new = cluster.wait_leader(among=[nd.id for nd in others], timeout=60)
        t_led = time.monotonic()
        wait_until(lambda: sum(1 for (s, e, st, _n) in list(prober.records) if st == 201 and s >= t_led) >= 20, 60, "commits under the new leader")
    finally:
        prober.stop()
    recs = [r for r in prober.records if r[1] >= t]
    ends = sorted([t] + [e for (s, e, st, _n) in recs if st == 201])
    stall = max(b - a for a, b in zip(ends, ends[1:]))
    errors = sum(1 for (s, e, st, n) in recs if st != 201 and n != leader)
    errors_stopped = sum(1 for (s, e, st, n) in recs if n == leader and st != 201 and (s < t or st != 0))
    cluster.start_node(leader, wait=False)
    cluster.wait_ready(timeout=60)
    return {"first": first - t, "stall": stall, "errors": errors, "errors_stopped": errors_stopped, "old": leader, "new": new}


def failover_gap(cluster: LocalCluster, sig: int) -> tuple[float, float]:
    """(first, stall) of `stop_leader` with clients on the other nodes."""
    r = stop_leader(cluster, sig)
    return r["first"], r["stall"]


# --------------------------------------------------------------------------- main


def machine() -> str:
    mem = ""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB RAM"
    except OSError:
        pass
    cpu = cpu_model()
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else '?'}), {mem}, {cpu}, {platform.system()} {platform.release()}"


def fmt_runs(xs, spec="{:.0f}"):
    return " ".join(spec.format(x) for x in xs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--runs", type=int, default=5, help="runs per throughput figure (default: %(default)s)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default: %(default)s)")
    p.add_argument("--clients", default="1,64", help="concurrent clients, comma-separated (default: %(default)s)")
    p.add_argument("--kills", type=int, default=5, help="leader kills for the failover gap (default: %(default)s)")
    p.add_argument("--no-graceful", action="store_true", help="skip the SIGTERM hand-over measurement")
    p.add_argument("--keep", action="store_true", help="keep the cluster directories")
    args = p.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",")]
    binary = find_binary(args.binary)
    if "release" not in str(binary):
        print(f"warning: {binary} is not a release build; figures will be low", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="tempalias-bench-"))
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    p3 = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
    # Quiet logs: the benchmark measures the nodes, not their log output.
    extra = {"log": {"level": "warn"}, "limits": {"max_usage": 100}, "ratelimit": {"enabled": False}}
    three = LocalCluster(tmp / "three", n=3, binary=binary, ports=p3, extra_config=extra)
    one = None
    started = time.monotonic()
    try:
        three.start(timeout=60)
        # The peer: one node on 127.0.0.1, on ports the 3-node cluster does not use.
        p1 = dict(zip(("http", "smtp", "cluster"), free_ports(ips[:1], 3)))
        one = LocalCluster(tmp / "one", n=1, binary=binary, ports=p1, extra_config=extra)
        one.start(timeout=60)
        addrs3 = [(nd.ip, nd.http_port) for nd in three]
        addrs1 = [(nd.ip, nd.http_port) for nd in one]
        results = {(name, c): [] for name in ("3-node", "1-node") for c in clients}
        for run in range(args.runs):
            for c in clients:
                for name, cl, addrs in (("3-node", three, addrs3), ("1-node", one, addrs1)):
                    cl.wait_ready(timeout=30)
                    r = throughput(addrs, c, args.duration)
                    results[(name, c)].append(r)
                    print(
                        f"run {run + 1}/{args.runs} {name} {c:>3} clients: {r['rate']:8.1f} creations/s  "
                        f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms  non-201 {r['errors']}  client CPU {r['client_cpu']:.2f}",
                        flush=True,
                    )
        one.stop()

        kills, graceful, kill_stalls, term_stalls = [], [], [], []
        for k in range(args.kills):
            g, stall = failover_gap(three, signal.SIGKILL)
            kills.append(g)
            kill_stalls.append(stall)
            print(f"kill -9 {k + 1}/{args.kills}: next committed write after {g:.3f} s, longest stretch without a commit {stall:.3f} s", flush=True)
        if not args.no_graceful:
            for k in range(args.kills):
                g, stall = failover_gap(three, signal.SIGTERM)
                graceful.append(g)
                term_stalls.append(stall)
                print(f"SIGTERM {k + 1}/{args.kills}: next committed write after {g:.3f} s, longest stretch without a commit {stall:.3f} s", flush=True)
        three.stop()
    finally:
        three.cleanup()
        if one is not None:
            one.cleanup()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)

    med = lambda rs, key="rate": statistics.median(r[key] for r in rs)  # noqa: E731
    print()
    print(f"tempalias cluster benchmark: {binary}")
    print(f"machine: {machine()}")
    print(f"{args.runs} runs x {args.duration:g} s per figure (medians), {args.kills} kills; total {time.monotonic() - started:.0f} s")
    print()
    print(f"| {'figure':<32} | {'3-node':>10} | {'1-node':>10} | {'3-node / 1-node':>15} |")
    print(f"|{'-' * 34}|{'-' * 12}|{'-' * 12}|{'-' * 17}|")
    for c in clients:
        a, b = med(results[("3-node", c)]), med(results[("1-node", c)])
        print(f"| {f'creations/s, {c} client(s)':<32} | {a:>10.0f} | {b:>10.0f} | {a / b:>15.2f} |")
    for c in clients:
        a, b = med(results[("3-node", c)], "p50_ms"), med(results[("1-node", c)], "p50_ms")
        print(f"| {f'create latency p50, {c} client(s)':<32} | {a:>7.1f} ms | {b:>7.1f} ms | {a / b:>15.2f} |")
    for c in clients:
        a, b = med(results[("3-node", c)], "p99_ms"), med(results[("1-node", c)], "p99_ms")
        print(f"| {f'create latency p99, {c} client(s)':<32} | {a:>7.1f} ms | {b:>7.1f} ms | {a / b:>15.2f} |")
    print()
    print(f"| {'failover gap':<44} | {'median':>8} | {'min':>8} | {'max':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    rows = [("kill -9 leader -> next committed write", kills), ("kill -9 leader: longest stretch w/o commit", kill_stalls)]
    if graceful:
        rows += [("SIGTERM leader -> next committed write", graceful), ("SIGTERM leader: longest stretch w/o commit", term_stalls)]
    for label, xs in rows:
        if not xs:  # --kills 0 / --no-graceful
            continue
        print(f"| {label:<44} | {statistics.median(xs):>6.2f} s | {min(xs):>6.2f} s | {max(xs):>6.2f} s |")
    print()
    print("per-run creations/s:")
    for (name, c), rs in results.items():
        print(f"  {name} {c:>3} clients: {fmt_runs(r['rate'] for r in rs)}  (non-201: {sum(r['errors'] for r in rs)})")
    print(f"kill -9 gaps (s): {fmt_runs(kills, '{:.3f}')}; longest stretches w/o commit (s): {fmt_runs(kill_stalls, '{:.3f}')}")
    if graceful:
        print(f"SIGTERM gaps (s): {fmt_runs(graceful, '{:.3f}')}; longest stretches w/o commit (s): {fmt_runs(term_stalls, '{:.3f}')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
