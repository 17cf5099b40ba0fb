#!/usr/bin/env python3
"""One-client write latency (issue 11): alias creates, one at a time, per node.

    cargo build --release
    python3 tests/bench/write_latency_bench.py                      # 3 runs
    python3 tests/bench/write_latency_bench.py --binary new=target/release/tempalias \\
        --binary old=/path/to/an/older/tempalias --runs 5           # before/after

For every binary given (label=path; default: the release build), it starts a
three-node cluster on 127.0.0.1-3 and a single node on other ports (release
defaults, log level `warn`, rate limit off), all at once. Then, in each run
and for every binary in turn (interleaved, so the machine's load affects
them alike), one client sends `--requests` `POST /v1/aliases` one after the
other over one keep-alive connection to:

  * the single node;
  * the three-node cluster's leader (a write proposed where it is taken);
  * each follower of the three-node cluster (a write forwarded to the leader);
  * round-robin over the three nodes (what `cluster_bench.py` measures with
    one client: two thirds forwarded).

It prints p50 and p99 per target and run, the context switches (voluntary
and not, every thread of the cluster's node processes, from /proc) and the
node CPU time per create, then the medians over the runs of each figure.
The switches count the hand-overs between tasks and threads a write takes
(runtime workers, the blocking pool): steadier than a latency on a shared
machine. With `--fsyncs` it also counts, with `strace -f -e
trace=fsync,fdatasync` attached to every node of the first binary's clusters
for one extra round-robin run, the fsyncs per create on each node (strace
slows the nodes down: that run's latencies are not reported).

With `--stages` (root, `perf`), it also records, for every binary, the
nodes' `pwrite64` and `fdatasync` system calls (kernel tracepoints through
`perf record -k CLOCK_MONOTONIC`, the client's clock) while one client
creates `--requests` aliases through the leader and then through one
follower, and splits each create at the disk writes into stages: from the
request to the leader's first write; the leader's log append (its writes
and fsync); from the end of that fsync to the first follower's first write
(the entry travelling to the followers); the first follower's append (to
the end of the first follower fsync, the quorum); from the quorum to the
answer (back to the leader, commit, apply, answer). Medians over the
creates whose window holds one append per node. Recording slows the
nodes a little; these runs are not in the latency table.

Only 127.0.0.0/8 is used. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import bisect
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

from launch import LocalCluster, find_binary, free_ports  # noqa: E402

BODY = json.dumps({"target": "me@example.net", "days": 1, "max-usage": 3}).encode()
HEADERS = {"Content-Type": "application/json"}
EXTRA = {"log": {"level": "warn"}, "ratelimit": {"enabled": False}}


def creates(addrs, n: int, warmup: int = 20) -> list[float]:
    """Latencies (s) of `n` creates sent one at a time, request i to
    addrs[i % len], one keep-alive connection per address."""
    conns = [http.client.HTTPConnection(*a, timeout=30) for a in addrs]
    lat = []
    try:
        for i in range(n + warmup):
            conn = conns[i % len(conns)]
            t0 = time.perf_counter()
            conn.request("POST", "/v1/aliases", body=BODY, headers=HEADERS)
            r = conn.getresponse()
            r.read()
            t1 = time.perf_counter()
            if r.status != 201:
                raise RuntimeError(f"create answered {r.status}")
            if i >= warmup:
                lat.append(t1 - t0)
    finally:
        for c in conns:
            c.close()
    return lat


def counters(pids) -> tuple[int, float]:
    """(context switches, CPU seconds) summed over every thread of `pids`:
    each hop of a write from one task or thread to another is a switch, so
    their number per create counts the hops (steadier than a time on a
    shared machine)."""
    switches, ticks = 0, 0
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                for line in (task / "status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        switches += int(line.split()[1])
            except OSError:
                pass  # the thread ended meanwhile
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])
    return switches, ticks / os.sysconf("SC_CLK_TCK")


def pct(xs, q: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, int(len(xs) * q))]


def count_fsyncs(pids: dict, addrs, n: int) -> dict:
    """fsync + fdatasync calls per node while `n` creates run round-robin."""
    if shutil.which("strace") is None:
        print("strace not installed; skipping --fsyncs", file=sys.stderr)
        return {}
    tmp = Path(tempfile.mkdtemp(prefix="tempalias-strace-"))
    procs = {}
    for name, pid in pids.items():
        out = tmp / f"{name}.txt"
        procs[name] = (
            subprocess.Popen(
                ["strace", "-c", "-f", "-e", "trace=fsync,fdatasync", "-o", str(out), "-p", str(pid)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            out,
        )
    time.sleep(1.0)  # strace attaches to every thread before it counts
    creates(addrs, n, warmup=0)
    counts = {}
    for name, (p, out) in procs.items():
        p.send_signal(2)
        p.wait(30)
        total = 0
        for line in out.read_text().splitlines():
            m = re.match(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(fsync|fdatasync)\s*$", line)
            if m:
                total += int(m.group(1))
        counts[name] = total / n
    shutil.rmtree(tmp, ignore_errors=True)
    return counts


STAGES = ("request to leader write", "leader append + fsync", "to first follower write", "follower append + fsync", "quorum to answer", "total")


def stages(cluster, target_id: int, n: int) -> dict | None:
    """Median stage times (ms) of `n` creates sent to node `target_id`."""
    if shutil.which("perf") is None:
        print("perf not installed; skipping --stages", file=sys.stderr)
        return None
    leader = cluster.wait_leader(timeout=30)
    node_of = {nd.proc.pid: nd.id for nd in cluster}
    tmp = Path(tempfile.mkdtemp(prefix="tempalias-perf-"))
    data = tmp / "perf.data"
    events = []
    for call in ("pwrite64", "fdatasync"):
        events += ["-e", f"syscalls:sys_enter_{call}", "-e", f"syscalls:sys_exit_{call}"]
    rec = subprocess.Popen(
        ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-o", str(data), "-p", ",".join(map(str, node_of))] + events,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(2.0)  # perf attaches to every thread
        nd = cluster.node(target_id)
        conn = http.client.HTTPConnection(nd.ip, nd.http_port, timeout=30)
        spans = []
        for i in range(n + 20):
            t0 = time.monotonic()
            conn.request("POST", "/v1/aliases", body=BODY, headers=HEADERS)
            r = conn.getresponse()
            r.read()
            t1 = time.monotonic()
            if i >= 20 and r.status == 201:
                spans.append((t0, t1))
        conn.close()
        time.sleep(0.2)
    finally:
        rec.send_signal(2)
        rec.wait(60)
    script = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "pid,time,event"], capture_output=True, text=True, check=False
    ).stdout
    shutil.rmtree(tmp, ignore_errors=True)
    ev = []
    for line in script.splitlines():
        m = re.match(r"\s*(\d+)\s+([\d.]+):\s+syscalls:sys_(enter|exit)_(\w+)", line)
        if m and int(m.group(1)) in node_of:
            ev.append((float(m.group(2)), node_of[int(m.group(1))], m.group(3), m.group(4)))
    ev.sort()
    times = [e[0] for e in ev]
    rows = []
    for t0, t1 in spans:
        w = ev[bisect.bisect_left(times, t0) : bisect.bisect_right(times, t1)]

        def first(node, kind, call, after=0.0):
            return next((e[0] for e in w if e[1] == node and e[2] == kind and e[3] == call and e[0] >= after), None)

        def count(node):
            return sum(1 for e in w if e[1] == node and e[2] == "exit" and e[3] == "fdatasync")

        if any(count(nd.id) != 1 for nd in cluster):
            continue
        lw = first(leader, "enter", "pwrite64")
        ls = first(leader, "exit", "fdatasync")
        followers = [nd.id for nd in cluster if nd.id != leader]
        fw = {f: first(f, "enter", "pwrite64", ls or 0.0) for f in followers}
        fs = {f: first(f, "exit", "fdatasync", ls or 0.0) for f in followers}
        if lw is None or ls is None or None in fw.values() or None in fs.values():
            continue
        quorum = min(fs, key=fs.get)
        rows.append((lw - t0, ls - lw, min(fw.values()) - ls, fs[quorum] - fw[quorum], t1 - fs[quorum], t1 - t0))
    if not rows:
        return None
    out = {name: 1000 * statistics.median(r[k] for r in rows) for k, name in enumerate(STAGES)}
    out["creates"] = len(rows)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", action="append", help="LABEL=PATH (repeatable; default: the release build)")
    p.add_argument("--runs", type=int, default=3, help="runs (default: %(default)s)")
    p.add_argument("--requests", type=int, default=500, help="creates per target and run (default: %(default)s)")
    p.add_argument("--fsyncs", action="store_true", help="count fsyncs per create with strace (first binary)")
    p.add_argument("--stages", action="store_true", help="split creates into stages with perf (root)")
    args = p.parse_args(argv)
    binaries = []
    for b in args.binary or [f"this={find_binary(None)}"]:
        label, _, path = b.partition("=")
        binaries.append((label, find_binary(path or None)))

    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    tmp = Path(tempfile.mkdtemp(prefix="tempalias-wlat-"))
    clusters = []
    targets = {}  # label -> [(target name, addrs)]
    try:
        for label, binary in binaries:
            p3 = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
            three = LocalCluster(tmp / f"{label}-three", n=3, binary=binary, ports=p3, extra_config=EXTRA)
            clusters.append(three)
            three.start(timeout=60)
            p1 = dict(zip(("http", "smtp", "cluster"), free_ports(ips[:1], 3)))
            one = LocalCluster(tmp / f"{label}-one", n=1, binary=binary, ports=p1, extra_config=EXTRA)
            clusters.append(one)
            one.start(timeout=60)
            leader = three.wait_leader(timeout=30)
            lead = three.node(leader)
            followers = [nd for nd in three if nd.id != leader]
            targets[label] = [
                ("1 node", [(one.node(1).ip, one.node(1).http_port)], one),
                ("3 nodes, leader", [(lead.ip, lead.http_port)], three),
            ]
            for i, f in enumerate(followers, 1):
                targets[label].append((f"3 nodes, follower {i}", [(f.ip, f.http_port)], three))
            targets[label].append(("3 nodes, round-robin", [(nd.ip, nd.http_port) for nd in three], three))

        results: dict = {}
        for run in range(args.runs):
            for label, _ in binaries:
                for name, addrs, cl in targets[label]:
                    cl.wait_ready(timeout=30)
                    pids = [nd.proc.pid for nd in cl]
                    creates(addrs, 20, warmup=0)  # warm-up, not counted
                    s0, c0 = counters(pids)
                    lat = creates(addrs, args.requests, warmup=0)
                    s1, c1 = counters(pids)
                    n = len(lat)
                    r = (pct(lat, 0.5), pct(lat, 0.99), (s1 - s0) / n, 1000 * (c1 - c0) / n)
                    results.setdefault((label, name), []).append(r)
                    print(
                        f"run {run + 1}/{args.runs} {label:>8} {name:<22} p50 {r[0]:6.2f} ms  p99 {r[1]:6.2f} ms  "
                        f"switches/create {r[2]:5.1f}  node CPU/create {r[3]:5.2f} ms",
                        flush=True,
                    )

        breakdown = {}
        if args.stages:
            for run in range(args.runs):
                for label, _ in binaries:
                    three = targets[label][1][2]
                    leader = three.wait_leader(timeout=30)
                    follower = next(nd.id for nd in three if nd.id != leader)
                    for name, node_id in (("via leader", leader), ("via follower", follower)):
                        st = stages(three, node_id, args.requests)
                        if st is not None:
                            breakdown.setdefault((label, name), []).append(st)
                            print(f"stages run {run + 1}/{args.runs} {label:>8} {name:<13} " + "  ".join(f"{k} {st[k]:.2f}" for k in STAGES), flush=True)

        fsyncs = {}
        if args.fsyncs:
            label = binaries[0][0]
            three = targets[label][1][2]
            one = targets[label][0][2]
            leader = three.wait_leader(timeout=30)
            pids = {f"3 nodes, node {nd.id}{' (leader)' if nd.id == leader else ''}": nd.proc.pid for nd in three}
            fsyncs.update(count_fsyncs(pids, [(nd.ip, nd.http_port) for nd in three], args.requests))
            fsyncs.update(count_fsyncs({"1 node": one.node(1).proc.pid}, [(one.node(1).ip, one.node(1).http_port)], args.requests))
    finally:
        for cl in clusters:
            try:
                cl.stop()
            finally:
                cl.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)

    print()
    print(f"one client, {args.requests} creates per target and run, medians of {args.runs} runs")
    print(f"| {'binary':<8} | {'target':<22} | {'p50':>8} | {'p99':>8} | switches/create | CPU ms/create |")
    print(f"|{'-' * 10}|{'-' * 24}|{'-' * 10}|{'-' * 10}|{'-' * 17}|{'-' * 15}|")
    for (label, name), rs in results.items():
        med = [statistics.median(r[k] for r in rs) for k in range(4)]
        print(f"| {label:<8} | {name:<22} | {med[0]:5.2f} ms | {med[1]:5.2f} ms | {med[2]:>15.1f} | {med[3]:>13.2f} |")
    if breakdown:
        print()
        print(f"stages of one create on three nodes, ms, medians over creates, then over {args.runs} runs")
        print("| binary   | taken by      | " + " | ".join(STAGES) + " |")
        print("|----------|---------------|" + "|".join("-" * (len(k) + 2) for k in STAGES) + "|")
        for (label, name), sts in breakdown.items():
            cells = " | ".join(f"{statistics.median(st[k] for st in sts):>{len(k)}.2f}" for k in STAGES)
            print(f"| {label:<8} | {name:<13} | {cells} |")
    if fsyncs:
        print()
        print(f"fsync + fdatasync per create ({binaries[0][0]}):")
        for name, v in fsyncs.items():
            print(f"  {name}: {v:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
