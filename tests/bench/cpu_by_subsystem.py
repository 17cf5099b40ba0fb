#!/usr/bin/env python3
"""Splits the nodes' CPU samples of a `perf record -g` profile by subsystem.

A flat profile (no symbol above a few percent) says little about where to
cut; summed by subsystem, the same samples say which part of a message's
path costs what. Needs a build with frame pointers, or the call chains stop
at the first frame of Rust code:

    RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only \\
        CARGO_TARGET_DIR=target/fp cargo build --release
    perf record -a -g -F 499 -o perf.data -- \\
        python3 tests/bench/forward_bench.py --binary target/fp/release/tempalias \\
        --runs 1 --duration 15 --only 3-node --loads new
    python3 tests/bench/cpu_by_subsystem.py perf.data

Only samples of the nodes' threads count (tokio names them
`tokio-rt-worker`; blocking-pool threads too). Each sample goes to the first
group, in the order below, that one of its frames matches; the rest is the
scheduler, kernel networking outside our syscalls, and the runtime itself.
"""

import argparse
import collections
import re
import subprocess
import sys

# (name, pattern over any frame of the sample); first match wins, so the
# storage groups come before the callers that reach them.
GROUPS = [
    ("state-machine apply (with its redb commit)", re.compile(r"raft::store::apply_entries")),
    (
        "Raft log and vote writes (redb commit, fdatasync)",
        re.compile(r"redb::transactions::WriteTransaction::commit_with"),
    ),
    ("outbound SMTP (relay client)", re.compile(r"relay::Relay::deliver|relay::client")),
    ("inbound SMTP session", re.compile(r"smtp::session|smtp::server")),
    # Before gRPC: the HTTP API is served by hyper too (HTTP/1.1).
    ("HTTP API (axum, hyper HTTP/1)", re.compile(r"tempalias::http::|hyper::proto::h1::")),
    ("gRPC (tonic, hyper, h2)", re.compile(r"tonic::|hyper::|h2::")),
    ("openraft core, replication, state-machine worker", re.compile(r"openraft::")),
    ("write forwarding and group proposal", re.compile(r"raft::forward|raft::batch|raft::node")),
]

# With --transport: where the cluster transport's share goes. A sample counts
# for every line one of its frames matches (the lines overlap).
TRANSPORT = [
    ("client: tonic Channel (Buffer worker, Reconnect, hyper's client tasks)",
     re.compile(r"tower::buffer|tonic::transport::channel|hyper::proto::h2::client")),
    ("client: tower Buffer worker alone", re.compile(r"tower::buffer")),
    ("client: cluster::channel (h2 driven directly, its connection task)", re.compile(r"cluster::channel")),
    ("client: tonic's generated client and codec", re.compile(r"tonic::client|cluster_client")),
    ("server: hyper's h2 server and tonic's server", re.compile(r"hyper::proto::h2::server|tonic::transport::server|tonic::server")),
    ("handlers (cluster::service)", re.compile(r"cluster::service")),
    ("kernel sends under the transport", None),
    ("HPACK", re.compile(r"hpack")),
]
TRANSPORT_ANY = re.compile(r"tonic::|hyper::proto::h2|h2::|tower::buffer|cluster::channel")
KERNEL_SEND = re.compile(r"tcp_sendmsg")


def samples(script):
    """Yields the frames (symbols, leaf first) of each sample."""
    frames = []
    for line in script:
        if line.startswith(("\t", " ")):
            parts = line.strip().split(" ", 1)
            frames.append(parts[1] if len(parts) > 1 else "?")
        else:
            if frames:
                yield frames
            frames = []
    if frames:
        yield frames


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("perf_data", help="file written by perf record -g")
    ap.add_argument("--comm", default="tokio-rt-worker", help="thread name to count")
    ap.add_argument("--transport", action="store_true", help="also split the cluster transport's samples")
    args = ap.parse_args()
    proc = subprocess.Popen(
        ["perf", "script", "-i", args.perf_data, "--comm", args.comm, "-F", "ip,sym"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    counts = collections.Counter()
    transport = collections.Counter()
    total = 0
    for frames in samples(proc.stdout):
        total += 1
        if args.transport and any(TRANSPORT_ANY.search(f) for f in frames):
            transport["all"] += 1
            for name, pattern in TRANSPORT:
                if pattern is None:
                    hit = any(KERNEL_SEND.search(f) for f in frames)
                else:
                    hit = any(pattern.search(f) for f in frames)
                if hit:
                    transport[name] += 1
        for name, pattern in GROUPS:
            if any(pattern.search(f) for f in frames):
                counts[name] += 1
                break
        else:
            counts["other (scheduler, kernel networking, runtime)"] += 1
    proc.wait()
    if total == 0:
        sys.exit(f"no samples of {args.comm!r} in {args.perf_data}")
    print(f"{total} samples of {args.comm}")
    for name, n in counts.most_common():
        print(f"{100 * n / total:5.1f}%  {name}")
    if args.transport:
        print(f"cluster transport, any frame (of all {total} samples): {100 * transport['all'] / total:.1f}%")
        for name, _ in TRANSPORT:
            print(f"{100 * transport[name] / total:5.1f}%  {name}")


if __name__ == "__main__":
    main()
