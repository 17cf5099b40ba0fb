#!/usr/bin/env python3
"""Forwarding benchmark: messages/s through tempalias beside Postfix and a bare hop.

    cargo build --release
    python3 tests/bench/forward_bench.py            # 3 interleaved runs, ~8 s per figure

Needs Postfix's `smtp-source`, `smtp-sink` and `postfix` (Debian package
`postfix`; scripts/test installs it) and root for the Postfix instance (it
drops to the `postfix` user; nothing of the system's Postfix configuration is
read or touched: the instance has its own config, queue and data directories
under a temporary directory and is started and stopped with `postfix -c DIR`).

Starts, in one run and on 127.0.0.0/8 only:

  * smtp-sink on an ephemeral port: the upstream of everything below;
  * the bare hop: smtp-source -> smtp-sink directly (the ceiling);
  * Postfix as a virtual-alias relay (`virtual_alias_maps`, `relayhost` =
    the sink; its queue is fsync'd as always): the peer;
  * a one-node and a three-node tempalias cluster (cluster/launch.py; nodes
    on 127.0.0.1-3), relay mode `smarthost` with the sink as smarthost,
    default Raft settings and durability (every entry fsync'd on a quorum
    before the 250), log level `warn`, and `[smtp] trusted_networks =
    ["127.0.0.0/8"]`: without it the per-address cap of 20 sessions
    (`max_connections_per_ip`) answers a 20-session load with `421 4.7.0`.

Each target gets the same smtp-source load: 5 KB messages (`-l 5120`), 20
sessions (on the three-node cluster spread 7/7/6 over the nodes, as senders
spread over round-robin MX records), first with a new connection per message,
then with connection reuse (`-d`). Each session is a single-session
smtp-source process sending up to 100 messages to one alias, then the next
ones to a fresh alias (aliases of 100 uses, the default `limits.max_usage`,
created before the clock starts; smaller chunks when a run is short, so that
every session is busy until the end; an alias is meant for a handful of messages, and one
alias taking thousands would measure the growth of its record instead);
Postfix and the bare hop get the same processes with one fixed recipient.
Runs of the targets are interleaved; each figure is the median of `--runs`
runs.

Measured per run:

  * msgs/s: messages smtp-source sent / its wall time (all processes);
  * latency: smtp-source prints none, so a probe (two Python smtplib threads,
    a new connection per message, to the same endpoints round-robin, each
    pausing 0.1 s between messages, so at most 20 messages/s) sends 5 KB
    messages during the load and times connect -> `250` after DATA; p50/p99
    of those;
  * CPU seconds per 1,000 messages: utime+stime from /proc/PID/stat of the
    tempalias node processes, or of every process of the Postfix instance
    (master and its children, plus what master reaped), taken after Postfix's
    queue has drained, so its deliveries to the sink are included;
  * for tempalias, the mean time of one Raft write (a Reserve or Commit, as
    the nodes' `tempalias_raft_write_duration_seconds` histogram says) and of
    one upstream delivery (`tempalias_forward_duration_seconds`): where a
    message's time goes; and how many forwarded writes one forward call to
    the leader carried (`tempalias_raft_forwarded_writes_total` over
    `tempalias_raft_forward_calls_total`, summed over the nodes), and how many
    messages one connection to the smarthost carried (upstream deliveries
    over `tempalias_relay_connections_total`; 1 with
    `--set relay.reuse_connections=false`, more with reuse, the default:
    smtp-sink takes any number of transactions per connection);
  * errors: smtp-source error lines and probe failures.

Prints the figures and the ratios to Postfix and to the bare hop of the same
run. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import smtplib
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

# The Postfix instance and smtp-sink as the tests start them.
sys.path.insert(0, str(REPO / "tests" / "integration"))
from peerkit import PostfixInstance, start_smtp_sink, stop_process  # noqa: E402

HZ = os.sysconf("SC_CLK_TCK")
SENDER = "bench@sender.test"
POSTFIX_RCPT = "bench@tempalias.test"
TARGET = "me@example.net"
MSG_LEN = 5120
# Messages per alias: the default `limits.max_usage`. An alias keeps the ids of
# its committed uses (so a repeated Commit is recognised), which makes each
# write on it cost O(uses so far); aliases are meant for a handful of uses.
PER_ALIAS = 100


def tool(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
        p = Path(d) / name
        if p.is_file():
            return str(p)
    found = shutil.which(name)
    if not found:
        sys.exit(f"{name} not found: install the Debian package postfix (scripts/test does)")
    return found


# --------------------------------------------------------------------------- CPU accounting


def proc_stat(pid: int) -> tuple[int, int, float, float] | None:
    """(ppid, state-is-zombie, utime+stime s, cutime+cstime s) of `pid`."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    rest = raw.rsplit(")", 1)[1].split()
    # fields after the command: state ppid ... utime(12) stime(13) cutime(14) cstime(15)
    return int(rest[1]), rest[0] == "Z", (int(rest[11]) + int(rest[12])) / HZ, (int(rest[13]) + int(rest[14])) / HZ


def tree_cpu(root: int) -> float:
    """CPU seconds of `root`, its live descendants and the children it reaped."""
    children: dict[int, list[int]] = {}
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = proc_stat(int(entry))
            if st:
                stats[int(entry)] = st
                children.setdefault(st[0], []).append(int(entry))
    total = 0.0
    todo = [root]
    while todo:
        pid = todo.pop()
        st = stats.get(pid)
        if not st:
            continue
        total += st[2] + (st[3] if pid == root else 0.0)
        todo += children.get(pid, [])
    return total


def pids_cpu(pids) -> float:
    total = 0.0
    for pid in pids:
        st = proc_stat(pid)
        if st:
            total += st[2]
    return total


# --------------------------------------------------------------------------- peers


class Sink:
    """smtp-sink on 127.0.0.1:port; stores nothing."""

    def __init__(self, base: Path):
        self.port = free_ports(["127.0.0.1"], 1)[0]
        self.log = base / "smtp-sink.log"
        self.proc = start_smtp_sink("127.0.0.1", self.port, self.log, backlog=1024)

    def stop(self):
        stop_process(self.proc)


class Postfix(PostfixInstance):
    """A Postfix instance of its own as a virtual-alias relay to the sink.
    Default settings otherwise (fsync'd queue, in_flow_delay, process limits)."""

    def __init__(self, base: Path, sink_port: int):
        if os.geteuid() != 0:
            sys.exit("the Postfix peer needs root (postfix -c DIR start); run as root")
        port = free_ports(["127.0.0.1"], 1)[0]
        settings = {
            "myhostname": "relay.bench.test",
            "mydomain": "bench.test",
            "virtual_alias_domains": "tempalias.test",
            "virtual_alias_maps": f"inline:{{ {POSTFIX_RCPT}={TARGET} }}",
            "relayhost": f"[127.0.0.1]:{sink_port}",
        }
        super().__init__(base / "postfix", settings, port=port, service=f"127.0.0.1:{port}")

    def cpu(self) -> float:
        return tree_cpu(self.master_pid())

    def settle(self):
        wait_until(lambda: self.queue_files() == 0, 300, "Postfix's queue to drain", interval=0.05)


# --------------------------------------------------------------------------- targets


class Target:
    def __init__(self, name, endpoints, rcpt, cpu=None, settle=None, sums=None, fresh=None):
        self.name = name
        self.endpoints = endpoints  # [(ip, port)]
        self.rcpt = rcpt
        # (n) -> n recipients, each good for PER_ALIAS messages; None: `rcpt` for all
        self.fresh = fresh
        self.cpu = cpu  # () -> CPU seconds so far, or None
        self.settle = settle or (lambda: None)
        self.sums = sums  # () -> {histogram: (sum, count)} over the nodes, or None


HISTOGRAMS = ("tempalias_raft_write_duration_seconds", "tempalias_forward_duration_seconds")
# Writes forwarded by followers, and the calls that carried them (one call
# carries every write forwarded meanwhile).
COUNTERS = ("tempalias_raft_forwarded_writes_total", "tempalias_raft_forward_calls_total")
# Connections the nodes opened to the smarthost (labelled by upstream; summed):
# with the upstream deliveries, how many messages one connection carried.
LABELLED = ("tempalias_relay_connections_total",)


def histogram_sums(cluster: LocalCluster) -> dict:
    """Sum and count of the write and upstream histograms over every node."""
    out = {h: [0.0, 0.0] for h in HISTOGRAMS + COUNTERS + LABELLED}
    for nd in cluster:
        for line in nd.metrics().splitlines():
            for c in COUNTERS:
                if line.startswith(c + " "):
                    out[c][0] += float(line.split()[-1])
            for c in LABELLED:
                if line.startswith(c + "{"):
                    out[c][0] += float(line.split()[-1])
            for h in HISTOGRAMS:
                if line.startswith(h + "_sum"):
                    out[h][0] += float(line.split()[-1])
                elif line.startswith(h + "_count"):
                    out[h][1] += float(line.split()[-1])
    return out


def create_aliases(nd, n: int) -> list[str]:
    """`n` aliases of PER_ALIAS uses each, created through `nd` (one keep-alive
    connection)."""
    body = json.dumps({"target": TARGET, "days": 1, "max-usage": PER_ALIAS}).encode()
    conn = http.client.HTTPConnection(nd.ip, nd.http_port, timeout=30)
    out = []
    try:
        while len(out) < n:
            conn.request("POST", "/v1/aliases", body=body, headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            data = r.read()
            if r.status != 201:
                raise RuntimeError(f"create answered {r.status}: {data!r}")
            out.append(json.loads(data)["alias"])
    finally:
        conn.close()
    return out


def tempalias_target(name: str, cluster: LocalCluster) -> Target:
    nd = next(iter(cluster))
    pids = [n.pid for n in cluster]
    return Target(
        name,
        [(n.ip, n.smtp_port) for n in cluster],
        create_aliases(nd, 1)[0],
        cpu=lambda: pids_cpu(pids),
        sums=lambda: histogram_sums(cluster),
        fresh=lambda n: create_aliases(nd, n),
    )


# --------------------------------------------------------------------------- load


def message_bytes(uid: int) -> bytes:
    head = f"From: <{SENDER}>\r\nTo: <x@tempalias.test>\r\nSubject: probe {uid}\r\nMessage-ID: <{uid}.{time.time_ns()}@bench.test>\r\n\r\n"
    line = ("x" * 76 + "\r\n").encode()
    return head.encode() + line * (MSG_LEN // len(line))


class Probe:
    """Latency probe: `threads` smtplib clients, a new connection per message,
    round-robin over the endpoints, each pausing `pause` s between messages
    (so the probe stays a small part of the load); records connect -> 250
    after DATA."""

    def __init__(self, endpoints, rcpts, threads: int = 2, pause: float = 0.1):
        self.endpoints = endpoints
        self.rcpts = rcpts
        self.pause = pause
        self.stop_event = threading.Event()
        self.lat: list[float] = []
        self.errors = 0
        self.error_text = ""
        self.sent = 0
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def _run(self, i):
        n = i
        while not self.stop_event.is_set():
            host, port = self.endpoints[n % len(self.endpoints)]
            n += 1
            t0 = time.monotonic()
            try:
                s = smtplib.SMTP(host, port, local_hostname="probe.bench.test", timeout=30)
                try:
                    with self.lock:
                        rcpt = self.rcpts[min(len(self.rcpts) - 1, self.sent // PER_ALIAS)] if len(self.rcpts) > 1 else self.rcpts[0]
                    s.sendmail(SENDER, [rcpt], message_bytes(n))
                    t1 = time.monotonic()
                finally:
                    try:
                        s.quit()
                    except (smtplib.SMTPException, OSError):
                        s.close()
                with self.lock:
                    self.lat.append(t1 - t0)
                    self.sent += 1
                self.stop_event.wait(self.pause)
            except (smtplib.SMTPException, OSError) as e:
                with self.lock:
                    self.errors += 1
                    self.error_text = f"probe: {e!r}"[:200]
                self.stop_event.wait(0.05)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(60)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def run_load(target: Target, sessions: int, messages: int, reuse: bool, probe: bool = True) -> dict:
    """`sessions` single-session smtp-source processes at a time, session i
    on endpoint i mod k; each sends chunks of at most PER_ALIAS messages, one
    fresh alias per chunk (created before the clock starts), until
    `messages` are sent (chunks are smaller when `messages` is not enough
    for two full chunks per session). Wall time from the first start to the last exit."""
    k = len(target.endpoints)
    # Chunks small enough that every session has work from start to end.
    size = max(1, min(PER_ALIAS, messages // (2 * sessions)))
    chunks = [size] * (messages // size) + ([messages % size] if messages % size else [])
    rcpts = target.fresh(len(chunks)) if target.fresh else [target.rcpt] * len(chunks)
    work = list(zip(chunks, rcpts))
    lock = threading.Lock()
    errors = [0]
    err_text = [""]

    def session(i):
        host, port = target.endpoints[i % k]
        while True:
            with lock:
                if not work:
                    return
                m, rcpt = work.pop()
            args = [tool("smtp-source"), "-s", "1", "-m", str(m), "-l", str(MSG_LEN), "-f", SENDER, "-t", rcpt, "-M", "source.bench.test"]
            if reuse:
                args.append("-d")
            args.append(f"{host}:{port}")
            p = subprocess.run(args, capture_output=True, stdin=subprocess.DEVNULL, timeout=1800)
            lines = [ln for ln in (p.stdout + p.stderr).decode(errors="replace").splitlines() if ln.strip()]
            with lock:
                errors[0] += len(lines) + (1 if p.returncode != 0 else 0)
                if lines and not err_text[0]:
                    err_text[0] = lines[0][:200]

    cpu0 = target.cpu() if target.cpu else None
    sums0 = target.sums() if target.sums else None
    # The probe sends at most 20 messages/s: ten aliases last 50 s.
    pr = Probe(target.endpoints, target.fresh(10) if target.fresh else [target.rcpt]).start() if probe else None
    t0 = time.monotonic()
    threads = [threading.Thread(target=session, args=(i,), daemon=True) for i in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(1800)
    errors, err_text = errors[0], err_text[0]
    elapsed = time.monotonic() - t0
    if pr:
        pr.stop()
    target.settle()
    cpu = (target.cpu() - cpu0) if target.cpu else None
    done = messages + (pr.sent if pr else 0)
    means = {}
    if sums0 is not None:
        sums1 = target.sums()
        for h in HISTOGRAMS:
            n = sums1[h][1] - sums0[h][1]
            means[h] = 1000 * (sums1[h][0] - sums0[h][0]) / n if n else float("nan")
        writes, calls = (sums1[c][0] - sums0[c][0] for c in COUNTERS)
        means["per_call"] = writes / calls if calls else float("nan")
        delivered = sums1[HISTOGRAMS[1]][1] - sums0[HISTOGRAMS[1]][1]
        conns = sums1[LABELLED[0]][0] - sums0[LABELLED[0]][0]
        means["per_conn"] = delivered / conns if conns else float("nan")
    return {
        "write_ms": means.get(HISTOGRAMS[0], float("nan")),
        "upstream_ms": means.get(HISTOGRAMS[1], float("nan")),
        "writes_per_forward": means.get("per_call", float("nan")),
        "msgs_per_conn": means.get("per_conn", float("nan")),
        "rate": messages / elapsed,
        "elapsed": elapsed,
        "p50_ms": 1000 * pct(pr.lat, 0.5) if pr else float("nan"),
        "p99_ms": 1000 * pct(pr.lat, 0.99) if pr else float("nan"),
        "probe_n": pr.sent if pr else 0,
        "cpu_per_1000": (1000 * cpu / done) if cpu is not None else float("nan"),
        "errors": errors + (pr.errors if pr else 0),
        "err_text": err_text or (pr.error_text if pr else ""),
    }


# --------------------------------------------------------------------------- main


def machine() -> str:
    cpu = cpu_model()
    return f"{os.cpu_count()} CPUs, {cpu}, {platform.system()} {platform.release()}, load avg {os.getloadavg()[0]:.1f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs (default: %(default)s)")
    p.add_argument("--duration", type=float, default=8.0, help="aimed-at seconds per figure (default: %(default)s)")
    p.add_argument("--sessions", type=int, default=20, help="smtp-source sessions (default: %(default)s)")
    p.add_argument("--only", default="bare,postfix,1-node,3-node", help="targets (default: %(default)s)")
    p.add_argument("--loads", default="new,reuse", help="new (connection per message), reuse (-d) (default: %(default)s)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=JSON", help="extra tempalias config, e.g. cluster.heartbeat_ms=80")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = p.parse_args(argv)
    only = args.only.split(",")
    loads = args.loads.split(",")
    binary = find_binary(args.binary)
    if "release" not in str(binary):
        print(f"warning: {binary} is not a release build; figures will be low", file=sys.stderr)

    tmp = Path(tempfile.mkdtemp(prefix="tempalias-fwdbench-"))
    os.chmod(tmp, 0o755)  # Postfix's daemons (user postfix) reach their queue below it
    started = time.monotonic()
    sink = postfix = three = one = None
    try:
        sink = Sink(tmp)
        extra = {
            "log": {"level": "warn"},
            "ratelimit": {"enabled": False},
            "relay": {"mode": "smarthost", "smarthosts": [f"smtp://127.0.0.1:{sink.port}"]},
            "smtp": {"trusted_networks": ["127.0.0.0/8"]},
        }
        for item in args.set:
            key, _, raw = item.partition("=")
            section, _, name = key.partition(".")
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
            extra.setdefault(section, {})[name] = value
        targets: list[Target] = []
        if "bare" in only:
            targets.append(Target("bare", [("127.0.0.1", sink.port)], "x@tempalias.test"))
        if "postfix" in only:
            postfix = Postfix(tmp, sink.port).start()
            targets.append(Target("postfix", [("127.0.0.1", postfix.port)], POSTFIX_RCPT, cpu=postfix.cpu, settle=postfix.settle))
        ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        if "1-node" in only:
            p1 = dict(zip(("http", "smtp", "cluster"), free_ports(ips[:1], 3)))
            one = LocalCluster(tmp / "one", n=1, binary=binary, ports=p1, extra_config=extra)
            one.start(timeout=60)
            targets.append(tempalias_target("1-node", one))
        if "3-node" in only:
            p3 = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
            three = LocalCluster(tmp / "three", n=3, binary=binary, ports=p3, extra_config=extra)
            three.start(timeout=60)
            three.wait_ready(timeout=60)
            targets.append(tempalias_target("3-node", three))

        # Warm-up (also the first rate estimate for sizing the runs).
        estimate = {}
        for load in loads:
            for t in targets:
                r = run_load(t, args.sessions, 800, load == "reuse", probe=False)
                estimate[(t.name, load)] = r["rate"]
                print(f"warm-up {t.name:8} {load:5}: {r['rate']:8.0f} msgs/s  errors {r['errors']} {r['err_text']}", flush=True)

        results = {(t.name, load): [] for t in targets for load in loads}
        for run in range(args.runs):
            for load in loads:
                for t in targets:
                    n = int(min(100_000, max(1000, estimate[(t.name, load)] * args.duration)))
                    r = run_load(t, args.sessions, n, load == "reuse")
                    estimate[(t.name, load)] = r["rate"]
                    results[(t.name, load)].append(r)
                    print(
                        f"run {run + 1}/{args.runs} {t.name:8} {load:5}: {r['rate']:8.0f} msgs/s ({n} in {r['elapsed']:.1f} s)  "
                        f"p50 {r['p50_ms']:6.1f} ms  p99 {r['p99_ms']:6.1f} ms (probe n={r['probe_n']})  "
                        f"CPU {r['cpu_per_1000']:6.2f} s/1000  mean Raft write {r['write_ms']:.1f} ms, upstream {r['upstream_ms']:.1f} ms, forwarded writes per call {r['writes_per_forward']:.2f}, messages per upstream connection {r['msgs_per_conn']:.1f}  "
                        f"errors {r['errors']} {r['err_text']}",
                        flush=True,
                    )
    finally:
        for c in (three, one):
            if c is not None:
                try:
                    c.stop()
                except Exception as e:  # noqa: BLE001 - report and go on cleaning up
                    print(f"stopping a cluster: {e}", file=sys.stderr)
                c.cleanup()
        if postfix is not None:
            postfix.stop()
        if sink is not None:
            sink.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")

    med = lambda rs, key: statistics.median(r[key] for r in rs)  # noqa: E731
    print()
    print(f"tempalias forwarding benchmark: {binary}")
    print(f"machine: {machine()}")
    print(f"{args.runs} interleaved runs, {args.sessions} sessions, {MSG_LEN}-byte messages; medians; total {time.monotonic() - started:.0f} s")
    print("latency: a 2-thread smtplib probe (<= 20 msgs/s) during the load, new connection per message, connect -> 250 after DATA")
    print()
    hdr = f"| {'target':<8} | {'load':<5} | {'msgs/s':>8} | {'x postfix':>9} | {'x bare':>7} | {'p50':>8} | {'p99':>8} | {'CPU s/1000':>10} | {'errors':>6} |"
    print(hdr)
    print("|" + "|".join("-" * (len(c)) for c in hdr.split("|")[1:-1]) + "|")
    for load in loads:
        for t in targets:
            rs = results[(t.name, load)]
            rate = med(rs, "rate")

            def ratio(peer):
                # Ratio per run against the peer measured in the same run, then the median.
                prs = results.get((peer, load))
                if not prs:
                    return float("nan")
                return statistics.median(a["rate"] / b["rate"] for a, b in zip(rs, prs))

            cpu = med(rs, "cpu_per_1000")
            print(
                f"| {t.name:<8} | {load:<5} | {rate:>8.0f} | {ratio('postfix'):>9.2f} | {ratio('bare'):>7.2f} | "
                f"{med(rs, 'p50_ms'):>5.1f} ms | {med(rs, 'p99_ms'):>5.1f} ms | {cpu:>10.2f} | {sum(r['errors'] for r in rs):>6} |"
            )
    print()
    print("per run (msgs/s):")
    for (name, load), rs in results.items():
        print(f"  {name:8} {load:5}: " + " ".join(f"{r['rate']:.0f}" for r in rs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
