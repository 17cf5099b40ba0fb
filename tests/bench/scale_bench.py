"""Scale benchmark: a node (and optionally a three-node cluster) filled with
many live aliases, compared with the same node empty. Not part of the test run:

    python3 tests/bench/scale_bench.py [--aliases 1000000] [--cluster]

Everything goes through the real interfaces on loopback ports:

  * aliases are created with the HTTP API (POST /v1/aliases) by wrk (Debian
    package `wrk`), 32 keep-alive connections, 2 threads, until --aliases
    were answered 201 (each a Raft write; valid 30 days, so all stay live);
  * creation rate: wrk for --duration seconds, empty store and full store;
  * forwarding rate: --mails messages over smtplib (8 clients, one
    connection per message) to aliases created first, relayed to the node's
    capture relay, empty and full; every accepted message is checked to have
    reached the capture directory;
  * memory: VmRSS of the node (median over a quiet moment); disk: the
    database file plus the snapshot directory, per alias;
  * snapshot build and install times from the node's own log lines
    ("snapshot built" / "snapshot installed", with their `ms` field);
  * with --paired: after the fill, each run on the full node follows the
    same run on a node started empty for it (one creation and one
    forwarding run each), and the ratios of these back-to-back pairs are
    printed: on a shared machine the load changes between the empty
    figures taken before the fill and the full ones after it;
  * restart-to-ready: SIGTERM, start again, time until /readyz answers 200;
  * with --cluster: three nodes filled the same way through the leader, then
    a follower is stopped while more aliases are created (two connections,
    so about one log entry each) until the leader's purged index passes the
    follower's last entry, and started again: the time until its applied index
    (tempalias_raft_commit_index) reaches the leader's, which takes a
    snapshot; with --add-node also a new (empty) node added as a learner.

Uses TEMPALIAS_BIN or the newest build (cluster/launch.py); use a release
build. Prints one line per figure; quote them with the command line.
"""

from __future__ import annotations

import argparse
import re
import resource
import shutil
import smtplib
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))
sys.path.insert(0, str(REPO / "tests" / "cluster"))

from clusterkit import SENDER, create_ok, message, new_uid  # noqa: E402
from benchkit import rss_kib, settle  # noqa: E402
from launch import LocalCluster, LocalNode, free_ports, wait_until  # noqa: E402

CONNECTIONS = 32
WRK_THREADS = 2
SMTP_CLIENTS = 8
CREATE_BODY = '{"target":"me@example.net","days":30,"max-usage":100}'


def disk_bytes(nd: LocalNode) -> tuple[int, int]:
    """(database file, snapshot directory) in bytes allocated on disk."""
    db = nd.data_dir / "tempalias.redb"
    snaps = nd.data_dir / "tempalias.snapshots"
    db_size = db.stat().st_blocks * 512 if db.exists() else 0
    snap_size = sum(p.stat().st_blocks * 512 for p in snaps.glob("*")) if snaps.exists() else 0
    return db_size, snap_size


def wrk_create(nd: LocalNode, work: Path, duration: int, quota: int = 0,
               connections: int = CONNECTIONS, threads: int = WRK_THREADS) -> tuple[int, int, float]:
    """Creates aliases with wrk for `duration` seconds (whole seconds: wrk
    takes no fractions); with `quota`, each wrk thread stops sending after
    its share. Returns (created, failed, seconds)."""
    per_thread = (quota + threads - 1) // threads if quota else 0
    script = work / "create.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = '{CREATE_BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f"local quota = {per_thread}\n"
        "ok, bad = 0, 0\n"
        "local threads = {}\n"
        "function setup(thread) table.insert(threads, thread) end\n"
        "function response(status, headers, body)\n"
        "  if status == 201 then ok = ok + 1 else bad = bad + 1 end\n"
        "  if quota > 0 and ok >= quota then wrk.thread:stop() end\n"
        "end\n"
        "function done(summary, latency, requests)\n"
        "  local tok, tbad = 0, 0\n"
        "  for _, t in ipairs(threads) do tok = tok + t:get('ok'); tbad = tbad + t:get('bad') end\n"
        "  io.write(string.format('CREATED %d FAILED %d\\n', tok, tbad))\n"
        "end\n"
    )
    duration = max(1, int(duration))
    cmd = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration}s", "--timeout", "10s", "-s", str(script), nd.api + "/v1/aliases"]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 120).stdout
    took = time.monotonic() - t0
    m = re.search(r"CREATED (\d+) FAILED (\d+)", out)
    if not m:
        raise RuntimeError(f"wrk output not understood ({cmd}):\n{out}")
    return int(m.group(1)), int(m.group(2)), took


def fill(nd: LocalNode, work: Path, total: int, step_secs: int, tolerate: bool = False) -> float:
    """Creates `total` aliases in wrk runs of at most `step_secs` (printing
    progress; the last run is sized from the rate so far and stops on its
    quota). A failed create stops the fill unless `tolerate` (then it is
    printed with its time and the fill goes on: a cluster's fill outlasts
    the leader's ten-minute purge, see docs/benchmarks.md). Returns the
    overall rate."""
    done, t0, rate = 0, time.monotonic(), 500.0
    while done < total:
        left = total - done
        secs = min(step_secs, int(left / rate * 1.15) + 1)
        created, failed, took = wrk_create(nd, work, secs, quota=left)
        if failed and not tolerate:
            raise RuntimeError(f"{failed} creates failed during the fill")
        if failed:
            print(f"  fill: {failed} creates failed in the run that ended at {time.strftime('%H:%M:%S')} "
                  f"(after {time.monotonic() - t0:.0f} s of fill)", flush=True)
        done += created
        rate = max(created / took, 50.0)
        print(f"  fill: {done} aliases, {created / took:.0f}/s in the last run, RSS {rss_kib(nd.pid) / 1024:.0f} MiB", flush=True)
    return done / (time.monotonic() - t0)


def smtp_load(nd: LocalNode, aliases: list[str], mails: int) -> float:
    """Sends `mails` messages (8 clients, one connection each) round-robin to
    `aliases`; every one must be accepted and captured. Returns messages/s."""
    before = len(list(nd.capture_dir.glob("*.eml"))) if nd.capture_dir.exists() else 0
    lock = threading.Lock()
    state = {"next": 0, "ok": 0, "errors": []}

    def worker():
        while True:
            with lock:
                i = state["next"]
                if i >= mails:
                    return
                state["next"] += 1
            to = aliases[i % len(aliases)]
            try:
                with smtplib.SMTP(nd.ip, nd.smtp_port, local_hostname="client.example.org", timeout=30) as s:
                    s.sendmail(SENDER, [to], message(new_uid(), to))
                with lock:
                    state["ok"] += 1
            except (smtplib.SMTPException, OSError) as e:
                with lock:
                    state["errors"].append(repr(e))

    t0 = time.monotonic()
    threads = [threading.Thread(target=worker) for _ in range(SMTP_CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    if state["errors"]:
        raise RuntimeError(f"{len(state['errors'])} messages refused: {state['errors'][:3]}")
    wait_until(lambda: len(list(nd.capture_dir.glob("*.eml"))) >= before + mails, 30, "captured messages")
    return state["ok"] / took


def log_ms(nd: LocalNode, what: str) -> list[int]:
    """The `ms` fields of the node's "snapshot built"/"snapshot installed" lines."""
    text = nd.log_path.read_text(errors="replace") if nd.log_path.exists() else ""
    return [int(m.group(1)) for line in text.splitlines() if what in line for m in [re.search(r"\bms=(\d+)", line)] if m]


def median(xs):
    xs = sorted(xs)
    return xs[len(xs) // 2] if xs else None


def restart_ready(c: LocalCluster, node_id: int) -> float:
    c.stop_node(node_id)
    t0 = time.monotonic()
    c.start_node(node_id, wait=False)
    nd = c.node(node_id)
    wait_until(lambda: nd.readyz() == 200, 300, f"{nd.name} ready after restart", interval=0.02)
    return time.monotonic() - t0


def config(args) -> dict:
    cluster_keys = {"snapshot_after_entries": args.snapshot_after}
    if args.cache_mb:
        cluster_keys["store_cache_mb"] = args.cache_mb
    return {
        "limits": {"max_usage": 100},
        "ratelimit": {"enabled": False},
        "smtp": {"max_connections_per_ip": 200},
        "log": {"level": "info,openraft=warn"},
        "cluster": cluster_keys,
    }


def rates(nd: LocalNode, work: Path, args, fwd: list[str], label: str) -> dict:
    out = {"create": [], "forward": []}
    for _ in range(args.runs):
        created, failed, took = wrk_create(nd, work, args.duration)
        if failed:
            raise RuntimeError(f"{failed} creates failed ({label})")
        out["create"].append(created / took)
        out["forward"].append(smtp_load(nd, fwd, args.mails))
    print(f"{label}: create {median(out['create']):.0f}/s (runs {', '.join(f'{x:.0f}' for x in out['create'])}), "
          f"forward {median(out['forward']):.1f} msg/s (runs {', '.join(f'{x:.1f}' for x in out['forward'])})", flush=True)
    return {k: median(v) for k, v in out.items()}


def fresh_peer_run(args, tmp: Path, run: int) -> tuple[float, float]:
    """One creation run and one forwarding run on a node started empty for
    this run alone (and removed after it), so the peer stays empty however
    many aliases a run creates. Returns (creations/s, messages/s)."""
    http, smtp, cl = free_ports(["127.0.0.1"], 3)
    work = tmp / f"peer{run}"
    c = LocalCluster(work / "node", n=1, binary=args.binary, ports={"http": http, "smtp": smtp, "cluster": cl}, extra_config=config(args))
    try:
        c.start(wait=True, timeout=60)
        nd = c.node(1)
        fwd = [create_ok(nd, days=30, max_usage=100)["alias"] for _ in range(100)]
        created, failed, took = wrk_create(nd, work, args.duration)
        if failed:
            raise RuntimeError(f"{failed} creates failed (empty peer)")
        return created / took, smtp_load(nd, fwd, args.mails)
    finally:
        c.cleanup()
        shutil.rmtree(work, ignore_errors=True)


def paired(nd: LocalNode, args, tmp: Path, fwd: list[str]) -> None:
    """Creation and forwarding rates of the full node, each run right after
    the same run on a fresh empty peer: on a shared machine whose load
    changes by the minute, ratios of back-to-back runs mean more than a
    comparison with figures taken before a long fill."""
    ratios = {"create": [], "forward": []}
    for run in range(args.runs):
        peer_create, peer_forward = fresh_peer_run(args, tmp, run)
        created, failed, took = wrk_create(nd, tmp, args.duration)
        if failed:
            raise RuntimeError(f"{failed} creates failed (full store, paired run)")
        full_create, full_forward = created / took, smtp_load(nd, fwd, args.mails)
        ratios["create"].append(full_create / peer_create)
        ratios["forward"].append(full_forward / peer_forward)
        print(f"  paired run {run + 1}: create empty peer {peer_create:.0f}/s, full {full_create:.0f}/s ({full_create / peer_create:.2f}); "
              f"forward empty peer {peer_forward:.1f}, full {full_forward:.1f} msg/s ({full_forward / peer_forward:.2f})", flush=True)
    print(f"paired full/empty (median of {args.runs}): create {median(ratios['create']):.2f}, forward {median(ratios['forward']):.2f}", flush=True)


def single(args, tmp: Path) -> None:
    http, smtp, cl = free_ports(["127.0.0.1"], 3)
    c = LocalCluster(tmp / "one", n=1, binary=args.binary, ports={"http": http, "smtp": smtp, "cluster": cl}, extra_config=config(args))
    try:
        c.start(wait=True, timeout=60)
        nd = c.node(1)
        print(f"binary: {c.binary}")
        # Each alias takes 100 messages (limits.max_usage): enough aliases for
        # every forwarding run on this node (empty, full and paired).
        runs = args.runs * (3 if args.paired else 2)
        fwd = [create_ok(nd, days=30, max_usage=100)["alias"] for _ in range(max(100, -(-args.mails * runs // 90)))]
        rss0 = settle(nd.pid)
        db0, snap0 = disk_bytes(nd)
        print(f"empty: RSS {rss0 / 1024:.1f} MiB, database {db0 / 1024:.0f} KiB, snapshots {snap0 / 1024:.0f} KiB", flush=True)
        empty = rates(nd, work=tmp, args=args, fwd=fwd, label="empty store")
        rate = fill(nd, tmp, args.aliases, args.step)
        live = args.aliases + len(fwd)
        rss1 = settle(nd.pid)
        db1, snap1 = disk_bytes(nd)
        print(f"filled {args.aliases} aliases at {rate:.0f}/s", flush=True)
        print(f"full ({live}+ live aliases): RSS {rss1 / 1024:.1f} MiB (+{(rss1 - rss0) * 1024 / live:.0f} B/alias), "
              f"database {db1 / 2**20:.0f} MiB + snapshots {snap1 / 2**20:.0f} MiB = {(db1 + snap1) / live:.0f} B/alias "
              f"(database alone {db1 / live:.0f} B/alias)", flush=True)
        built = log_ms(nd, "snapshot built")
        print(f"snapshot builds: {len(built)}, last three {built[-3:]} ms (median {median(built[-3:])} ms)", flush=True)
        full = rates(nd, work=tmp, args=args, fwd=fwd, label="full store")
        print(f"full/empty: create {full['create'] / empty['create']:.2f}, forward {full['forward'] / empty['forward']:.2f}")
        if args.paired:
            paired(nd, args, tmp, fwd)
        peak = max(rss_kib(nd.pid), rss1)
        ready = [restart_ready(c, 1) for _ in range(args.runs)]
        rss2 = settle(c.node(1).pid)
        print(f"restart to ready: median {median(ready):.2f} s (runs {', '.join(f'{x:.2f}' for x in ready)}); "
              f"RSS after restart {rss2 / 1024:.1f} MiB; RSS seen before restart {peak / 1024:.1f} MiB", flush=True)
    finally:
        if not args.keep:
            c.cleanup()


def raft_status(c: LocalCluster, node_id: int) -> dict:
    """`cluster status` as node `node_id` reports itself."""
    return next(m["status"] for m in c.status(via=node_id) if m["id"] == node_id)


def compact_past(c: LocalCluster, leader: LocalNode, tmp: Path, index: int, step: int) -> int:
    """Creates aliases until the leader's log is purged past `index` (so a
    follower whose log ends there can only catch up by snapshot). Several
    concurrent creates share one log entry (group commit), so creating
    2 x snapshot_after_entries aliases is not enough: this writes with two
    connections, about one entry per alias, and asks the leader for its
    purged index after each run. Returns the aliases created."""
    created_all, t0 = 0, time.monotonic()
    for _ in range(200):
        st = raft_status(c, leader.id)
        purged = st.get("purged_index") or 0
        if purged > index:
            print(f"  leader purged its log up to {purged} (snapshot at {st.get('snapshot_index')}, log at "
                  f"{st.get('last_log_index')}) after {created_all} more aliases in {time.monotonic() - t0:.0f} s", flush=True)
            return created_all
        created, failed, took = wrk_create(leader, tmp, step, connections=2, threads=1)
        if failed:
            print(f"  away: {failed} creates failed in the run that ended at {time.strftime('%H:%M:%S')}", flush=True)
        created_all += created
        print(f"  away: {created_all} more aliases ({created / took:.0f}/s), leader log at {st.get('last_log_index')}, "
              f"purged up to {purged}, the follower's log ends at {index}", flush=True)
    raise RuntimeError("the leader did not purge its log past the stopped follower")


def cluster(args, tmp: Path) -> None:
    if args.reuse:
        # A cluster kept (--keep) by an earlier run: its data as it was left.
        c = LocalCluster.load(Path(args.reuse) / "three", binary=args.binary, die_with_parent=True)
        c.extra_config = config(args)
    else:
        ips = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
        http, smtp, cl = free_ports(ips, 3)
        c = LocalCluster(tmp / "three", n=3, binary=args.binary, ports={"http": http, "smtp": smtp, "cluster": cl}, extra_config=config(args))
    try:
        t0 = time.monotonic()
        c.start(wait=True, timeout=300)
        leader = c.node(c.wait_leader())
        live = 0
        if args.reuse:
            # The gauge is set by a count a moment after the start.
            wait_until(lambda: (leader.metric("tempalias_aliases_active", default=0.0) or 0) > 0, 120, "alias count")
            live = int(leader.metric("tempalias_aliases_active", default=0.0) or 0)
            print(f"cluster: reused {args.reuse}, {len(c.nodes)} nodes ready in {time.monotonic() - t0:.1f} s, "
                  f"{live} live aliases", flush=True)
        if args.aliases > live:
            rate = fill(leader, tmp, args.aliases - live, args.step, tolerate=True)
            print(f"cluster: filled {args.aliases - live} aliases through the leader at {rate:.0f}/s "
                  f"in {time.monotonic() - t0:.0f} s", flush=True)
        for nd in c:
            if not nd.running():
                continue
            db, snap = disk_bytes(nd)
            print(f"  node {nd.id}: RSS {settle(nd.pid, 2.0) / 1024:.1f} MiB, database {db / 2**20:.0f} MiB, snapshots {snap / 2**20:.0f} MiB")
        # A follower that was away while the leader compacted its log past
        # the follower's last entry can only catch up by snapshot.
        follower = c.node(next(nd.id for nd in c if nd.id != leader.id and nd.id in c.members))
        c.stop_node(follower.id)
        away_from = raft_status(c, leader.id).get("last_log_index") or 0
        away = compact_past(c, leader, tmp, away_from, max(5, args.step // 2))
        target = leader.metric("tempalias_raft_commit_index")
        installed_before = len(log_ms(follower, "snapshot installed"))
        t0 = time.monotonic()
        c.start_node(follower.id, wait=False)
        wait_until(
            lambda: follower.running() and (follower.metric("tempalias_raft_commit_index", default=0.0) or 0) >= target,
            600, "returning follower caught up", interval=0.1)
        took = time.monotonic() - t0
        installed = log_ms(follower, "snapshot installed")[installed_before:]
        how = f"by snapshot, install took {installed} ms" if installed else "by log (no snapshot was needed)"
        print(f"follower away for {away} aliases caught up to index {target:.0f} in {took:.1f} s from its start "
              f"({how}; RSS {settle(follower.pid, 2.0) / 1024:.1f} MiB)", flush=True)
        if args.add_node:
            t0 = time.monotonic()
            nd = c.add_node(promote=False, timeout=600)
            print(f"a new node added as learner caught up (add-learner returned) in {time.monotonic() - t0:.1f} s; "
                  f"snapshot install {log_ms(nd, 'snapshot installed')} ms, RSS {settle(nd.pid, 2.0) / 1024:.1f} MiB", flush=True)
    finally:
        if not args.keep:
            c.cleanup()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")
    p.add_argument("--aliases", type=int, default=1_000_000, help="live aliases to fill (default: %(default)s)")
    p.add_argument("--step", type=int, default=60, help="seconds per fill run (a progress line each; default: %(default)s)")
    p.add_argument("--runs", type=int, default=3, help="runs per rate figure (default: %(default)s)")
    p.add_argument("--duration", type=int, default=8, help="seconds per creation-rate run (default: %(default)s)")
    p.add_argument("--mails", type=int, default=300, help="messages per forwarding run (default: %(default)s)")
    p.add_argument("--snapshot-after", type=int, default=100_000, help="cluster.snapshot_after_entries (default: %(default)s)")
    p.add_argument("--cache-mb", type=int, default=64, help="cluster.store_cache_mb; 0 leaves it out, for builds without the key (default: %(default)s)")
    p.add_argument("--cluster", action="store_true", help="also fill a three-node cluster and time a wiped follower's catch-up")
    p.add_argument("--add-node", action="store_true", help="with --cluster: also add a fourth node as a learner and time its catch-up")
    p.add_argument("--no-single", action="store_true", help="skip the single-node figures")
    p.add_argument("--paired", action="store_true",
                   help="single node: also measure the full node run by run against a fresh empty peer node (ratios of back-to-back runs)")
    p.add_argument("--reuse", metavar="DIR",
                   help="with --cluster: start the cluster kept in DIR by an earlier --keep run instead of filling a new one")
    p.add_argument("--keep", action="store_true", help="keep the working directory")
    args = p.parse_args(argv)
    if not shutil.which("wrk"):
        print("wrk is missing: apt-get install wrk", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 8192)), hard))
    tmp = Path(tempfile.mkdtemp(prefix="tempalias-scale-"))
    try:
        if not args.no_single:
            single(args, tmp)
        if args.cluster:
            cluster(args, tmp)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
