#!/usr/bin/env python3
"""Forwarding throughput of one node through a smarthost (TCP_NODELAY).

    cargo build --release
    python3 tests/bench/relay_bench.py [--before OLD_BINARY] [--runs 5] [--messages 300]

One smtplib client sends messages one after the other over one SMTP
connection to a single tempalias node (release binary, log level `warn`),
whose smarthost is Postfix's smtp-sink (no dump files) on loopback. In the
same run, interleaved, the same client against:

  * the same binary with the capture relay (each message fsynced to disk);
  * with --before, another binary (e.g. one built without TCP_NODELAY on its
    outbound connections) with the same smarthost.

Each figure is the median of the runs: messages per second and the median
time from sending the end of data to the reply. Asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import smtplib
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

from peerkit import start_smtp_sink, stop_process  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--binary", default=str(REPO / "target" / "release" / "tempalias"))
    ap.add_argument("--before", help="a second binary measured with the same smarthost")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--messages", type=int, default=300)
    args = ap.parse_args()

    os.environ["TEMPALIAS_BIN"] = args.binary
    import harness  # noqa: E402  (reads TEMPALIAS_BIN)

    base = Path(tempfile.mkdtemp(prefix="tempalias-relay-bench-"))
    sink_port = harness.free_port()
    sink = start_smtp_sink("127.0.0.1", sink_port, base / "smtp-sink.log", backlog=256)
    nodes = {}
    try:
        common = {"limits": {"max_usage": 1_000_000}, "log": {"level": "warn"}}
        targets = [("smarthost", args.binary, "smarthost"), ("capture", args.binary, "capture")]
        if args.before:
            targets.insert(1, ("smarthost (before)", args.before, "smarthost"))
        for name, binary, relay in targets:
            node = harness.Node(base, name=name.replace(" ", "_").strip("()"), relay=relay,
                                smarthosts=[f"smtp://127.0.0.1:{sink_port}"], config=common)
            harness.BIN = Path(binary)  # Node.start uses the module's binary
            node.start()
            nodes[name] = node
        results = {name: [] for name in nodes}
        for run in range(args.runs):
            for name, node in nodes.items():
                results[name].append(measure(node, args.messages))
        print(f"\n{args.messages} messages per run, {args.runs} runs, one smtplib client, one connection")
        print(f"{'relay':<22} {'msgs/s (median)':>16} {'end-of-data reply ms (median)':>30}")
        for name, rs in results.items():
            rate = statistics.median(r[0] for r in rs)
            lat = statistics.median(r[1] for r in rs)
            print(f"{name:<22} {rate:>16.1f} {lat:>30.2f}")
        if args.before:
            a = statistics.median(r[0] for r in results["smarthost"])
            b = statistics.median(r[0] for r in results["smarthost (before)"])
            print(f"\nratio smarthost / smarthost (before): {a / b:.1f}x")
    finally:
        for node in nodes.values():
            node.cleanup()
        stop_process(sink)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def measure(node, count: int) -> tuple[float, float]:
    import harness

    alias = node.create_alias(days=1, max_usage=count + 10)
    msg = harness.message("bench", body="x" * 1000 + "\r\n", to=alias["alias"])
    latencies = []
    with node.smtp() as s:
        s.ehlo("bench.test")
        t0 = time.perf_counter()
        for _ in range(count):
            s.mail(harness.SENDER)
            s.rcpt(alias["alias"])
            code, _ = s.docmd("DATA")
            assert code == 354, code
            s.send(msg + b"\r\n.\r\n")
            t = time.perf_counter()
            code, text = s.getreply()
            latencies.append(time.perf_counter() - t)
            assert code == 250, (code, text)
        elapsed = time.perf_counter() - t0
    return count / elapsed, statistics.median(latencies) * 1000


if __name__ == "__main__":
    sys.exit(main())
