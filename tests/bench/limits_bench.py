#!/usr/bin/env python3
"""Create throughput with the per-target rules off and on.

    cargo build --release
    python3 tests/bench/limits_bench.py        # 3 runs x 5 s per figure

Three single nodes on loopback (release binary, log level `warn`, capture
relay): one with `[limits]` defaults (no per-target rule: creates are plain
`CreateAlias` entries), one with `max_aliases_per_target = 20` (every create is
a `CreateLimited` entry, counted in the per-target index), and one with the cap
and `confirm_targets` (every create to a new target also asks it: a token row,
a target record and a confirmation mail written to the capture directory).
wrk (64 connections, 2 threads) posts creates whose target is drawn at random
from 100,000 addresses, so the cap is never reached and most creates meet a new
target. Runs of the three nodes are interleaved; each figure is the median run,
with its ratio to the node without rules in the same round. Prints a table;
asserts nothing about time.
"""

from __future__ import annotations

import argparse
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

CONNECTIONS = 64
THREADS = 2
LUA = """
math.randomseed(os.time() + tonumber(tostring({}):sub(8), 16))
request = function()
  local body = '{"target":"t' .. math.random(1, 100000) .. '@example.net","days":1,"max-usage":3}'
  return wrk.format("POST", "/v1/aliases", {["Content-Type"] = "application/json"}, body)
end
"""
NODES = {
    "no per-target rule": {},
    "cap 20": {"max_aliases_per_target": 20},
    "cap 20 + confirm": {"max_aliases_per_target": 20, "confirm_targets": True},
}


def wrk(url: str, duration: float, script: Path) -> dict:
    cmd = ["wrk", f"-t{THREADS}", f"-c{CONNECTIONS}", f"-d{duration:g}s", "--latency", "--timeout", "5s",
           "-s", str(script), url]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60).stdout
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    p99 = re.search(r"\s99%\s+([\d.]+)(us|ms|s)", out)
    p99_ms = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    return {"rate": rate, "errors": int(m.group(1)) if m else 0, "p99": p99_ms}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--duration", type=float, default=5.0)
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    binary = find_binary(args.binary)
    if "release" not in str(binary):
        print(f"warning: {binary} is not a release build; figures will be low", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="tempalias-limitsbench-"))
    script = tmp / "create.lua"
    script.write_text(LUA)
    big = 1_000_000_000
    clusters: dict[str, LocalCluster] = {}
    started = time.monotonic()
    try:
        for i, (name, limits) in enumerate(NODES.items()):
            ports = dict(zip(("http", "smtp", "cluster"), free_ports(["127.0.0.1"], 3)))
            extra = {
                "log": {"level": "warn"},
                "limits": {"max_usage": 100, **limits},
                "ratelimit": {"create_quota": big, "status_quota": big, "failed_quota": big},
            }
            c = LocalCluster(tmp / f"node{i}", n=1, binary=binary, ports=ports, extra_config=extra)
            c.start(timeout=60)
            clusters[name] = c
        figures: dict[str, list[dict]] = {k: [] for k in NODES}
        for run in range(args.runs):
            for name, c in clusters.items():
                nd = next(iter(c))
                r = wrk(f"http://{nd.ip}:{nd.http_port}", args.duration, script)
                figures[name].append(r)
                print(f"run {run + 1}/{args.runs} {name:<20} {r['rate']:8.0f} creates/s  p99 {r['p99']:7.2f} ms  "
                      f"non-2xx {r['errors']}", flush=True)
        mails = sum(1 for _ in (clusters["cap 20 + confirm"].dir).rglob("outbox/*.eml"))
    finally:
        for c in clusters.values():
            c.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    base = figures["no per-target rule"]
    print()
    print(f"tempalias per-target rules benchmark: {binary}")
    print(f"wrk {CONNECTIONS} connections, {THREADS} threads; {args.runs} runs x {args.duration:g} s, "
          f"interleaved; total {time.monotonic() - started:.0f} s; confirmation mails written: {mails}")
    print()
    print(f"| {'node':<20} | {'creates/s':>9} | {'x no rule':>9} | {'p99':>9} | {'non-2xx':>7} |")
    print(f"|{'-' * 22}|{'-' * 11}|{'-' * 11}|{'-' * 11}|{'-' * 9}|")
    for name, runs in figures.items():
        rate = statistics.median(r["rate"] for r in runs)
        ratio = statistics.median(r["rate"] / b["rate"] for r, b in zip(runs, base))
        p99 = statistics.median(r["p99"] for r in runs)
        errors = sum(r["errors"] for r in runs)
        print(f"| {name:<20} | {rate:9.0f} | {ratio:9.2f} | {p99:6.2f} ms | {errors:7d} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
