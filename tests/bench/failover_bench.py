#!/usr/bin/env python3
"""Failover benchmark (issue 6): how long writes stop when a node fails.

    cargo build --release
    sudo python3 tests/bench/failover_bench.py              # 20 repetitions per fault, 10 idle minutes

Needs root: the cluster runs in a network namespace of its own (the failover
lab, tests/chaos/lab.py), where partitions are injected with iptables. Three
nodes on 127.0.0.1-3, the release binary, default settings (capture relay,
log level warn). Clients (cluster_bench.Prober: two threads per node, each
creating aliases through its node in a loop) write through every node all
the time. Each repetition starts from a ready cluster with one leader.

  kill -9 of the leader      time from the signal to the first 201 of a create
                             sent after it (through any node)
  SIGTERM of the leader      the longest stretch without a committed create,
                             from the signal until the new leader has served
                             20 creates; and the non-201 answers clients got
                             through the other nodes (and through the stopping
                             node, shown apart: it closes its listener)
  partitions (a)-(d)         per majority node, the time from the fault until
                             the first 201 of a create sent after it (the
                             figure is the slowest majority node); for the
                             node on the minority side, the time until /readyz,
                             an HTTP create and an RCPT settle on 503 / 503 /
                             451 4.3.0. Each fault lasts --fault-secs.
                             (a) the leader's inbound cut, (b) the leader
                             isolated, (c) a follower isolated, (d) the link
                             between the leader and a follower flapping every
                             300 ms
  idle                       the cluster left alone for --idle-minutes: leader
                             changes and term changes (0 expected)

Prints p50/p99/max per figure (p99 of 20 is the second largest, interpolated).
Asserts nothing. No traffic leaves the namespace.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "chaos"))
sys.path.insert(0, str(REPO / "tests" / "bench"))
sys.path.insert(0, str(REPO / "cluster"))

from cluster_bench import Prober, machine, stop_leader  # noqa: E402
from lab import Lab, MinorityProbe, create_alias, settled_after  # noqa: E402
from launch import find_binary, wait_until  # noqa: E402

# Default settings, as an operator would run them; quiet logs, and room for
# the many aliases the clients create.
NODE_CONFIG = {"log": {"level": "warn"}, "smtp": {"failed_rcpt_delay_ms": 0}, "ratelimit": {"enabled": False}}


def pct(xs, q: float) -> float:
    """Percentile with linear interpolation (q in 0..100)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


class NodeProber(Prober):
    """cluster_bench's Prober (two clients per node, every answer recorded
    with its node), with per-node queries."""

    def first_commit_after(self, t: float, node: int | None = None):
        with self.lock:
            ends = [e for (s, e, st, n) in self.records if st == 201 and s >= t and (node is None or n == node)]
        return min(ends) if ends else None


class Bench:
    def __init__(self, lab: Lab):
        self.lab = lab
        self.c = lab.cluster

    def ready(self) -> int:
        """Heals, restarts stopped nodes, waits for one leader with a quorum."""
        self.lab.heal_and_wait(timeout=90)
        return self.c.wait_leader(timeout=60)

    def load(self) -> NodeProber:
        p = NodeProber(list(self.c), per_node=2).start()
        wait_until(lambda: all(p.first_commit_after(0, nd.id) for nd in self.c), 30, "creates through every node")
        return p

    def stop_leader(self, sig: int) -> dict:
        """cluster_bench.stop_leader with clients on every node."""
        self.ready()
        return stop_leader(self.c, sig, load_all=True)

    def partition(self, kind: str, fault_secs: float) -> dict:
        leader = self.ready()
        fw, ip = self.lab.fw, self.lab.ip
        followers = [nd.id for nd in self.c if nd.id != leader]
        status, alias = create_alias(self.c.node(leader), 100)
        if status != 201:
            raise RuntimeError(f"create for the RCPT probe: {status}")
        victim = {"a": leader, "b": leader, "c": followers[0], "d": None}[kind]
        majority = [nd.id for nd in self.c if nd.id != victim]
        prober = self.load()
        probe = MinorityProbe(self.c.node(victim), alias["alias"]) if victim else None
        try:
            t = time.monotonic()
            if kind == "a":
                fw.cut_inbound(ip(victim), self.lab.others(victim))
            elif kind in ("b", "c"):
                fw.isolate(ip(victim), self.lab.others(victim))
            # Installing the rules takes a few iptables calls: writes that
            # started before the last rule was in place may still get
            # through, so "resumed" counts from the moment the fault is whole
            # (the minority's answers count from before the first rule).
            t_cut = time.monotonic() if kind != "d" else t
            if probe:
                probe.start()
            if kind == "d":
                fw.flap(ip(leader), ip(followers[0]), period=0.3, duration=fault_secs)
            else:
                time.sleep(fault_secs)  # the fault's duration; clients and probes run meanwhile
            t_heal = time.monotonic()
        finally:
            fw.heal()
            prober.stop()
            if probe:
                probe.stop()
        resumed = {n: prober.first_commit_after(t_cut, n) for n in majority}
        out = {"resume": max((r - t_cut) if r else float("inf") for r in resumed.values())}
        if probe:
            ps = probe.snapshot()
            for k in ("readyz", "create", "rcpt"):
                s = settled_after(ps, k, t, t_heal)
                out[k] = s if s is not None else float("inf")
        return out

    def idle(self, minutes: float) -> dict:
        """Samples term and leader every second for `minutes`; counts changes."""
        self.ready()
        end = time.monotonic() + minutes * 60
        terms, leaders = [], []
        while time.monotonic() < end:
            try:
                term = max((nd.metric("tempalias_raft_term") or 0) for nd in self.c)
                leader = self.c.leader_id()
            except OSError:
                leader = None  # a slow scrape is not a leader change
            if leader is not None:
                leaders.append(leader)
                terms.append(term)
            time.sleep(1.0)  # sampling interval of the idle watch
        changes = sum(1 for a, b in zip(leaders, leaders[1:]) if a != b)
        return {"term_changes": int(terms[-1] - terms[0]) if terms else -1, "leader_changes": changes, "samples": len(terms)}


def row(label: str, xs, unit: str = "s") -> str:
    fin = [x for x in xs if x != float("inf")]
    never = len(xs) - len(fin)
    extra = f"  ({never} never within the fault)" if never else ""
    if not fin:
        return f"| {label:<62} | {'-':>8} | {'-':>8} | {'-':>8} |{extra}"
    f = (lambda v: f"{v:6.3f} s") if unit == "s" else (lambda v: f"{v:8.0f}")
    return f"| {label:<62} | {f(pct(fin, 50)):>8} | {f(pct(fin, 99)):>8} | {f(max(fin)):>8} |{extra}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--reps", type=int, default=20, help="repetitions per fault (default: %(default)s)")
    p.add_argument("--fault-secs", type=float, default=8.0, help="how long each partition lasts (default: %(default)s)")
    p.add_argument("--idle-minutes", type=float, default=10.0, help="idle watch; 0 skips it (default: %(default)s)")
    p.add_argument("--only", default="kill,term,a,b,c,d", help="figures to measure, comma-separated (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the lab directory")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    binary = find_binary(args.binary)
    if "release" not in str(binary):
        print(f"warning: {binary} is not a release build", file=sys.stderr)
    started = time.monotonic()
    res: dict[str, list] = {}
    notes = []
    with Lab(binary, node_config=NODE_CONFIG, mail=False, keep=args.keep) as lab:
        b = Bench(lab)
        for sig, key in ((signal.SIGKILL, "kill"), (signal.SIGTERM, "term")):
            if key not in only:
                continue
            for i in range(args.reps):
                r = b.stop_leader(sig)
                res.setdefault(key, []).append(r)
                print(f"{sig.name} leader {i + 1}/{args.reps}: node{r['old']} -> node{r['new']}: next commit {r['first']:.3f} s, "
                      f"longest stretch w/o commit {r['stall']:.3f} s, client errors {r['errors']} (+{r['errors_stopped']} in flight or answered by the stopped node)", flush=True)
        kinds = [k for k in "abcd" if k in only]
        if kinds:
            # Partitions need nodes that bind outbound cluster connections to their own address.
            b.ready()
            for nd in lab.cluster:
                create_alias(nd)
            if not lab.cluster.binds_outbound():
                notes.append("partitions skipped: this binary does not open its cluster connections from its listen address, "
                             "so iptables cannot tell the nodes apart")
                kinds = []
        for k in kinds:
            for i in range(args.reps):
                r = b.partition(k, args.fault_secs)
                res.setdefault(k, []).append(r)
                print(f"partition ({k}) {i + 1}/{args.reps}: " + ", ".join(f"{n} {v:.3f} s" for n, v in r.items()), flush=True)
        idle = b.idle(args.idle_minutes) if args.idle_minutes > 0 else None

    print()
    print(f"tempalias failover benchmark: {binary}")
    print(f"machine: {machine()}")
    print(f"{args.reps} repetitions per fault, partitions last {args.fault_secs:g} s; total {time.monotonic() - started:.0f} s")
    print()
    print(f"| {'figure':<62} | {'p50':>8} | {'p99':>8} | {'max':>8} |")
    print(f"|{'-' * 64}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    if "kill" in res:
        print(row("kill -9 leader -> next committed write", [r["first"] for r in res["kill"]]))
    if "term" in res:
        print(row("SIGTERM leader: longest stretch without a commit", [r["stall"] for r in res["term"]]))
        print(row("SIGTERM leader: client errors via the other nodes", [r["errors"] for r in res["term"]], unit="n"))
    names = {"a": "(a) leader inbound cut", "b": "(b) leader isolated", "c": "(c) follower isolated", "d": "(d) link flapping"}
    for k in "abcd":
        if k not in res:
            continue
        print(row(f"{names[k]}: writes resume on every majority node", [r["resume"] for r in res[k]]))
        if k != "d":
            for what, label in (("readyz", "/readyz 503"), ("create", "HTTP create 503"), ("rcpt", "RCPT 451 4.3.0")):
                print(row(f"{names[k]}: minority answers {label}", [r[what] for r in res[k]]))
    if "term" in res:
        print(f"\nSIGTERM: requests through the stopping node in flight at the signal, or answered with an error after it: "
              f"{[r['errors_stopped'] for r in res['term']]}")
    if idle:
        print(f"\nidle {args.idle_minutes:g} min ({idle['samples']} samples): {idle['leader_changes']} leader changes, "
              f"{idle['term_changes']} term changes (0 expected)")
    for n in notes:
        print(f"note: {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
