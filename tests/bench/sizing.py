"""Memory and disk per alias and memory per SMTP session, for the sizing
advice in docs/operations.md. Not part of the test run:

    python3 tests/bench/sizing.py [--aliases 5000] [--sessions 500]

Starts one node (cluster/launch.py) on loopback ports, reads its VmRSS from
/proc and the size of its database, creates aliases through the HTTP API
with 8 clients, then holds SMTP sessions open (greeted, after EHLO), and
prints the differences. Uses TEMPALIAS_BIN or the newest build (launch.py).
"""

from __future__ import annotations

import argparse
import smtplib
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from clusterkit import create  # noqa: E402
from benchkit import settle  # noqa: E402
from launch import LocalCluster, free_ports  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--aliases", type=int, default=5000)
    ap.add_argument("--sessions", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="tempalias-sizing-") as tmp:
        http, smtp, cl = free_ports(["127.0.0.1"], 3)
        c = LocalCluster(
            Path(tmp) / "c",
            n=1,
            ports={"http": http, "smtp": smtp, "cluster": cl},
            extra_config={
                "smtp": {"max_connections": args.sessions + 100, "max_connections_per_ip": args.sessions + 100, "idle_timeout_secs": 600},
                "limits": {"max_usage": 100},
                "log": {"level": "warn"},
                "ratelimit": {"enabled": False},
            },
        )
        try:
            c.start(wait=True, timeout=60)
            nd = c.node(1)
            pid = nd.pid
            db = nd.data_dir / "tempalias.redb"
            rss0, disk0 = settle(pid, interval=0.25), db.stat().st_size
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                codes = list(pool.map(lambda _: create(nd, days=30, max_usage=10).status, range(args.aliases)))
            took = time.monotonic() - started
            bad = [s for s in codes if s != 201]
            assert not bad, f"{len(bad)} creates failed: {bad[:5]}"
            rss1, disk1 = settle(pid, interval=0.25), db.stat().st_size
            sessions = []
            for _ in range(args.sessions):
                s = smtplib.SMTP(nd.ip, nd.smtp_port, local_hostname="client.example.org", timeout=30)
                s.ehlo()
                sessions.append(s)
            rss2 = settle(pid, interval=0.25)
            for s in sessions:
                s.close()
            print(f"binary: {c.binary}")
            print(f"idle node: RSS {rss0 / 1024:.1f} MiB, database {disk0 / 1024:.0f} KiB")
            print(
                f"{args.aliases} aliases ({args.aliases / took:.0f}/s): RSS +{(rss1 - rss0) / 1024:.1f} MiB "
                f"({(rss1 - rss0) * 1024 / args.aliases:.0f} B/alias), database +{(disk1 - disk0) / 1024:.0f} KiB "
                f"({(disk1 - disk0) / args.aliases:.0f} B/alias)"
            )
            print(f"{args.sessions} idle SMTP sessions: RSS +{(rss2 - rss1) / 1024:.1f} MiB ({(rss2 - rss1) * 1024 / args.sessions:.0f} B/session)")
        finally:
            c.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
