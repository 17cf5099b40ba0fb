#!/usr/bin/env python3
"""HTTP load benchmark (issue 8): status reads and creates against nginx.

    cargo build --release
    python3 tests/bench/http_bench.py          # 3 runs x 5 s per figure

In one run, on loopback only, it starts:

  * Debian's nginx serving a static `200` (`return 200`), the ceiling;
  * a single tempalias node and a three-node cluster (127.0.0.1-3), release
    binary, default HTTP settings except `http.max_connections_per_ip = 4096`
    (every connection comes from one address), log level `warn`;

and drives each with wrk (Debian package `wrk`), 64 connections, 2 threads:

  * `GET /v1/aliases/{id}` with a valid bearer token (a linearizable read: on
    the three-node cluster the 64 connections are spread over the three nodes,
    so two thirds of the reads are served by followers after a ReadIndex round
    trip to the leader);
  * `POST /v1/aliases` (a Raft write; spread over the nodes the same way);
  * nginx's static `200` with the same wrk settings.

Runs of the targets are interleaved; each figure is the median run. It then
times creates on fresh connections to the single node (one every 0.12 s for
`--held-seconds`), first with nothing else connected, then while 2,000 idle
connections and 500 slowloris clients (an incomplete request head, one more
header line every second) are held open by a process of its own, which
reopens any the node closes. Prints tables; asserts nothing about time.

    python3 tests/bench/http_bench.py --only-held    # just that part

With `--leases-off-peer` a second three-node cluster runs beside the first
with `cluster.follower_read_leases = false` (every follower read asks the
leader for its read index), interleaved with the others as `3-node/no lease`:
the follower read leases' effect, measured in the same run. It then also
times creates on the leader of each (one every 0.02 s on fresh connections),
alone and while wrk reads on the two followers: what a lease costs the
writes it makes wait for the lease holders.
"""

from __future__ import annotations

import argparse
import http.client
import json
import multiprocessing
import os
import platform
import re
import resource
import shutil
import socket
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

CREATE = json.dumps({"target": "me@example.net", "days": 1, "max-usage": 3})
CONNECTIONS = 64
THREADS = 2


def machine() -> str:
    cpu = cpu_model()
    return f"{os.cpu_count()} CPUs ({cpu}), Linux {platform.release()}"


# --------------------------------------------------------------------------- nginx


def start_nginx(directory: Path, port: int) -> subprocess.Popen:
    directory.mkdir(parents=True, exist_ok=True)
    conf = directory / "nginx.conf"
    conf.write_text(f"""
worker_processes auto;
daemon off;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{{"status":"ok"}}'; }}
    }}
}}
""")
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    proc = subprocess.Popen([nginx, "-c", str(conf), "-p", str(directory)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def up():
        if proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(directory / 'error.log').read_text()}")
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True

    wait_until(lambda: _quiet(up), 15, "nginx")
    return proc


def _quiet(f):
    try:
        return f()
    except OSError:
        return False


# --------------------------------------------------------------------------- wrk


def cpu_ticks(pids: list[int]) -> int:
    """User + system clock ticks used so far by the processes `pids` (all threads)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total


def wrk(urls: list[str], duration: float, directory: Path, method="GET", body=None, headers=None,
        pids: list[int] = ()) -> dict:
    """Runs one wrk per URL at once (64 connections split over them); sums.
    `cpu_us` is the CPU time the server processes `pids` spent per answered
    request, in microseconds: unlike the rate it barely depends on how much
    of the machine others take."""
    script = None
    if method != "GET" or body:
        script = directory / "req.lua"
        lua_body = json.dumps(body) if body else "nil"
        script.write_text(f'wrk.method = "{method}"\nwrk.body = {lua_body}\n'
                          'wrk.headers["Content-Type"] = "application/json"\n')
    procs = []
    ticks0 = cpu_ticks(pids)
    per = CONNECTIONS // len(urls)
    for i, url in enumerate(urls):
        conns = per + (1 if i < CONNECTIONS % len(urls) else 0)
        cmd = ["wrk", f"-t{min(THREADS, conns)}", f"-c{conns}", f"-d{duration:g}s", "--latency", "--timeout", "5s"]
        for k, v in (headers or {}).items():
            cmd += ["-H", f"{k}: {v}"]
        if script:
            cmd += ["-s", str(script)]
        cmd.append(url)
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    rate, errors, p50s, p99s = 0.0, 0, [], []
    for p in procs:
        out, _ = p.communicate(timeout=duration + 60)
        m = re.search(r"Requests/sec:\s+([\d.]+)", out)
        if not m:
            raise RuntimeError(f"wrk output not understood:\n{out}")
        rate += float(m.group(1))
        m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
        errors += int(m.group(1)) if m else 0
        m = re.search(r"Socket errors:.*", out)
        if m:
            errors += sum(int(x) for x in re.findall(r"\d+", m.group(0)))
        p50s.append(_ms(re.search(r"\s50%\s+([\d.]+\w+)", out).group(1)))
        p99s.append(_ms(re.search(r"\s99%\s+([\d.]+\w+)", out).group(1)))
    ticks = cpu_ticks(pids) - ticks0
    cpu_us = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / max(1.0, rate * duration)
    return {"rate": rate, "errors": errors, "p50": max(p50s), "p99": max(p99s), "cpu_us": cpu_us}


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", text)
    value, unit = float(m.group(1)), m.group(2)
    return value * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


# --------------------------------------------------------------------------- tempalias


def create(ip: str, port: int) -> dict:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("POST", "/v1/aliases", CREATE, {"Content-Type": "application/json"})
        r = conn.getresponse()
        body = r.read()
        if r.status != 201:
            raise RuntimeError(f"create: {r.status} {body!r}")
        return json.loads(body)
    finally:
        conn.close()


def timed_create(ip: str, port: int) -> float:
    t0 = time.perf_counter()
    create(ip, port)
    return (time.perf_counter() - t0) * 1000


class Holder:
    """Holds `idle` connections that never send a byte and `slow` slowloris
    clients (an incomplete request head, one more header line every second)
    against `port`, from a process of its own (so that its work does not
    slow the measuring client down). The node closes both kinds after a
    while (`http.header_read_timeout_secs` once a byte came,
    `http.keepalive_idle_secs` otherwise); a closed one is opened again
    within a second, as a real attacker would, so the count stays up for as
    long as the holder runs."""

    HEAD = b"POST /v1/aliases HTTP/1.1\r\nHost: t\r\n"

    def __init__(self, port: int, idle: int, slow: int):
        ctx = multiprocessing.get_context("fork")
        self._reopened = ctx.Value("i", 0)
        self._ready = ctx.Event()
        self._stop = ctx.Event()
        self._proc = ctx.Process(target=self._run, args=(port, idle, slow), daemon=True)
        self._proc.start()
        if not self._ready.wait(120):
            self.close()
            raise RuntimeError("the connection holder did not get its connections open")

    @property
    def reopened(self) -> int:
        return self._reopened.value

    def _run(self, port: int, idle: int, slow: int):
        def open_one(slowloris: bool) -> socket.socket:
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            if slowloris:
                s.send(self.HEAD)
            return s

        def closed(s: socket.socket) -> bool:
            try:
                return s.recv(4096, socket.MSG_PEEK) == b""
            except BlockingIOError:
                return False
            except OSError:
                return True

        groups = ([open_one(False) for _ in range(idle)], [open_one(True) for _ in range(slow)])
        self._ready.set()
        while not self._stop.wait(1.0):
            for group, slowloris in zip(groups, (False, True)):
                for i, s in enumerate(group):
                    try:
                        if closed(s):
                            raise ConnectionError
                        if slowloris:
                            s.send(b"X-Trickle: 1\r\n")
                    except OSError:
                        s.close()
                        try:
                            group[i] = open_one(slowloris)
                            with self._reopened.get_lock():
                                self._reopened.value += 1
                        except OSError:
                            pass
        for group in groups:
            for s in group:
                s.close()

    def close(self):
        self._stop.set()
        self._proc.join(timeout=30)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=10)


def paced_creates(node, seconds: float, every: float = 0.12) -> list[float]:
    """Creates on fresh connections, one every `every` seconds; their times (ms)."""
    times = []
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        t = time.monotonic()
        times.append(timed_create(node.ip, node.http_port))
        time.sleep(max(0.0, every - (time.monotonic() - t)))
    return times


def creates_beside_reads(cluster, seconds: float, directory: Path, read_path: str, headers: dict) -> tuple:
    """Paced creates on the leader alone, then the same while wrk reads on
    the followers (64 connections between them); both lists of times (ms)."""
    leader = cluster.node(cluster.wait_leader())
    followers = [nd for nd in cluster if nd is not leader]
    alone = paced_creates(leader, seconds, every=0.02)
    done = {}
    t = threading.Thread(target=lambda: done.setdefault("wrk", wrk(
        [f"http://{nd.ip}:{nd.http_port}{read_path}" for nd in followers], seconds + 1.0, directory,
        headers=headers)))
    t.start()
    beside = paced_creates(leader, seconds, every=0.02)
    t.join(timeout=seconds + 90)
    return alone, beside, done.get("wrk", {}).get("rate", 0.0)


def connections_active(ip: str, port: int) -> float:
    conn = http.client.HTTPConnection(ip, port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    m = re.search(r"^tempalias_http_connections_active (\S+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--runs", type=int, default=3, help="runs per figure (default: %(default)s)")
    p.add_argument("--duration", type=float, default=5.0, help="seconds per run (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    p.add_argument("--idle", type=int, default=2000, help="idle connections held (default: %(default)s)")
    p.add_argument("--slowloris", type=int, default=500, help="slowloris clients held (default: %(default)s)")
    p.add_argument("--held-seconds", type=float, default=12.0,
                   help="seconds of creates while they are held (default: %(default)s)")
    p.add_argument("--only-held", action="store_true", help="skip the wrk rounds (only the held-connection part)")
    p.add_argument("--leases-off-peer", action="store_true",
                   help="also a three-node cluster with cluster.follower_read_leases = false")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    binary = find_binary(args.binary)
    if "release" not in str(binary):
        print(f"warning: {binary} is not a release build; figures will be low", file=sys.stderr)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))

    tmp = Path(tempfile.mkdtemp(prefix="tempalias-httpbench-"))
    ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    # The limiter stays on (its cost is part of the figures) with quotas no
    # benchmark reaches: every wrk connection is the same client.
    big = 1_000_000_000
    extra = {
        "log": {"level": "warn"},
        # Every connection here comes from one loopback address: its cap is
        # raised to the node's (http.max_connections, 4096) so the 2,000 idle
        # and 500 slowloris connections are held; the per-address
        # accounting stays in the measured path.
        "http": {"max_connections_per_ip": 4096},
        "limits": {"max_usage": 100},
        "ratelimit": {"create_quota": big, "status_quota": big, "failed_quota": big},
    }
    started = time.monotonic()
    nginx = one = three = plain = None
    try:
        nginx_port = free_ports(ips[:1], 1)[0]
        nginx = start_nginx(tmp / "nginx", nginx_port)
        p3 = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
        three = LocalCluster(tmp / "three", n=3, binary=binary, ports=p3, extra_config=extra)
        three.start(timeout=60)
        if args.leases_off_peer:
            off = {**extra, "cluster": {"follower_read_leases": False}}
            pp = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
            plain = LocalCluster(tmp / "plain", n=3, binary=binary, ports=pp, extra_config=off)
            plain.start(timeout=60)
        p1 = dict(zip(("http", "smtp", "cluster"), free_ports(ips[:1], 3)))
        one = LocalCluster(tmp / "one", n=1, binary=binary, ports=p1, extra_config=extra)
        one.start(timeout=60)

        targets = {}
        clusters = [("1-node", one), ("3-node", three)] + ([("3-node/no lease", plain)] if plain else [])
        for name, cl in clusters:
            nodes = list(cl)
            alias = create(nodes[0].ip, nodes[0].http_port)
            targets[name] = {
                "read": ([f"http://{nd.ip}:{nd.http_port}/v1/aliases/{alias['id']}" for nd in nodes],
                         {"Authorization": f"Bearer {alias['token']}"}),
                "create": [f"http://{nd.ip}:{nd.http_port}/v1/aliases" for nd in nodes],
                "pids": [nd.pid for nd in nodes],
            }
        master = int((tmp / "nginx" / "nginx.pid").read_text())
        nginx_pids = [master] + [int(x) for x in subprocess.run(
            ["pgrep", "-P", str(master)], capture_output=True, text=True).stdout.split()]
        figures: dict[str, list[dict]] = {}
        for run in range(0 if args.only_held else args.runs):
            jobs = [("nginx static 200", lambda: wrk([f"http://127.0.0.1:{nginx_port}/"], args.duration, tmp,
                                                     pids=nginx_pids))]
            for name, _ in clusters:
                urls, hdrs = targets[name]["read"]
                pids = targets[name]["pids"]
                jobs.append((f"{name} GET status", lambda u=urls, h=hdrs, p=pids: wrk(
                    u, args.duration, tmp, headers=h, pids=p)))
                jobs.append((f"{name} POST create", lambda n=name, p=pids: wrk(
                    targets[n]["create"], args.duration, tmp, method="POST", body=CREATE, pids=p)))
            for label, job in jobs:
                r = job()
                figures.setdefault(label, []).append(r)
                print(f"run {run + 1}/{args.runs} {label:<24} {r['rate']:9.0f} req/s  p50 {r['p50']:6.2f} ms  "
                      f"p99 {r['p99']:6.2f} ms  cpu {r['cpu_us']:7.1f} us/req  errors {r['errors']}", flush=True)

        mixed: dict[str, list] = {}
        if plain is not None:
            for run in range(args.runs):
                for name, cl in (("3-node", three), ("3-node/no lease", plain)):
                    alias_url = targets[name]["read"][0][0]
                    path = "/" + alias_url.split("/", 3)[3]
                    alone, beside, reads = creates_beside_reads(cl, args.duration, tmp, path, targets[name]["read"][1])
                    mixed.setdefault(name, []).append((alone, beside, reads))
                    print(f"run {run + 1}/{args.runs} {name:<16} creates on the leader: alone median "
                          f"{statistics.median(alone):.2f} ms, beside follower reads ({reads:.0f}/s) median "
                          f"{statistics.median(beside):.2f} ms", flush=True)

        # Creates while idle and slowloris connections are held open: one
        # every 0.12 s for 12 s, longer than the header-read timeout (10 s),
        # so the node also closes and the holder reopens them meanwhile.
        # The same paced creates with nothing held are the peer.
        node = next(iter(one))
        quiet = paced_creates(node, args.held_seconds)
        holder = Holder(node.http_port, args.idle, args.slowloris)
        try:
            held_active = connections_active(node.ip, node.http_port)
            loaded = paced_creates(node, args.held_seconds)
            held_active_end = connections_active(node.ip, node.http_port)
            reopened = holder.reopened
        finally:
            holder.close()
        one.stop()
        three.stop()
        if plain is not None:
            plain.stop()
    finally:
        for cl in (one, three, plain):
            if cl is not None:
                cl.cleanup()
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)

    if figures:
        med = {k: {f: statistics.median(r[f] for r in v) for f in ("rate", "p50", "p99")} for k, v in figures.items()}
        errs = {k: sum(r["errors"] for r in v) for k, v in figures.items()}
        ceiling = med["nginx static 200"]["rate"]
        print()
        print(f"tempalias HTTP benchmark: {binary}")
        print(f"machine: {machine()}")
        print(f"wrk, {CONNECTIONS} connections, {THREADS} threads per wrk; {args.runs} runs x {args.duration:g} s "
              f"(medians); total {time.monotonic() - started:.0f} s")
        print()
        print(f"| {'target':<24} | {'req/s':>9} | {'x nginx':>7} | {'p50':>8} | {'p99':>8} | {'errors':>6} |")
        print(f"|{'-' * 26}|{'-' * 11}|{'-' * 9}|{'-' * 10}|{'-' * 10}|{'-' * 8}|")
        for k, v in med.items():
            print(f"| {k:<24} | {v['rate']:9.0f} | {v['rate'] / ceiling:7.2f} | {v['p50']:5.2f} ms | {v['p99']:5.2f} ms | {errs[k]:6d} |")
        print()
        print("Per run (req/s):")
        for k, v in figures.items():
            print(f"    {k:<24} " + " ".join(f"{r['rate']:.0f}" for r in v))
        # The machine may be shared: a ratio to the nginx run of the same round is
        # steadier than a ratio of medians.
        print()
        print("Per run, x nginx of the same round (median):")
        for k, v in figures.items():
            if k == "nginx static 200":
                continue
            ratios = [r["rate"] / n["rate"] for r, n in zip(v, figures["nginx static 200"])]
            print(f"    {k:<24} " + " ".join(f"{x:.2f}" for x in ratios) + f"   (median {statistics.median(ratios):.2f})")
        print()
        print("Server CPU time per request (all server processes, user + system), median of runs:")
        cpu_nginx = statistics.median(r["cpu_us"] for r in figures["nginx static 200"])
        for k, v in figures.items():
            c = statistics.median(r["cpu_us"] for r in v)
            print(f"    {k:<24} {c:8.1f} us   {c / cpu_nginx:6.2f} x nginx's cost  "
                  f"(rate at equal CPU: {cpu_nginx / c:.2f} x nginx)")
        print()

    if mixed:
        print("Creates on the leader (one every 0.02 s, fresh connections), alone and while wrk reads on the")
        print("two followers; all runs pooled:")
        for name, rs in mixed.items():
            alone = [x for r in rs for x in r[0]]
            beside = [x for r in rs for x in r[1]]
            p99 = lambda xs: sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]  # noqa: E731
            print(f"    {name:<16} alone: median {statistics.median(alone):6.2f} ms  p99 {p99(alone):6.2f} ms;  "
                  f"beside reads: median {statistics.median(beside):6.2f} ms  p99 {p99(beside):6.2f} ms  "
                  f"(reads {statistics.median(r[2] for r in rs):.0f}/s)")
        print()

    def line(label, xs):
        p99 = sorted(xs)[max(0, int(len(xs) * 0.99) - 1)]
        print(f"    {label:<38} {len(xs):3d} creates: median {statistics.median(xs):6.2f} ms  p99 {p99:6.2f} ms  "
              f"max {max(xs):7.2f} ms  over 1 s: {sum(1 for x in xs if x > 1000)}")

    print(f"create on a fresh connection, one every 0.12 s for {args.held_seconds:g} s (1-node):")
    line("nothing held", quiet)
    line(f"{args.idle:,} idle + {args.slowloris} slowloris held", loaded)
    print(f"    ratio of medians {statistics.median(loaded) / statistics.median(quiet):.2f}")
    print(f"    connections the node held: {held_active:.0f} at the start, {held_active_end:.0f} at the end; "
          f"{reopened} reopened by the holder after the node closed them")
    return 0


if __name__ == "__main__":
    sys.exit(main())
