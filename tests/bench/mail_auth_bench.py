"""What DKIM signing and ARC sealing cost a forwarded message. Not part of
the test run:

    python3 tests/bench/mail_auth_bench.py [--messages 200] [--clients 4] [--size 5000] [--runs 5] [--tls [--rsa-cert] [--cluster N] [--rate R]] [--dkim-algorithm rsa|ed25519|both ...] [--bin PATH]

Starts three single nodes (capture relay, HTTP rate limits off so the
script can make its aliases, each of 100 uses: one alias taking thousands of
messages would measure the growth of its record) that differ only in what
they add:
`plain` (SRS only, no key), `dkim` (an RSA-2048 key, ARC off) and `dkim+arc`
(the same key, ARC on, its resolver an nsd on loopback that serves the sender
domain's SPF and DMARC records: every message costs its SPF, DMARC and DKIM
lookups, uncached, at loopback latency). Each run sends the same messages through each node in turn
(clients keep their connection, one transaction per message) and prints
messages per second; the summary gives medians over the runs and the ratios
to `plain`, measured in the same run. Uses TEMPALIAS_BIN (or --bin) or
target/debug.

With --tls it measures what STARTTLS inbound and DKIM signing cost instead:
two nodes (`plain`: no key; `dkim`: the RSA-2048 key, ARC off) and four
variants, `plain`, `tls` (the client says STARTTLS to the plain node's
zero-config self-signed certificate, not verified), `dkim` and `tls+dkim`,
each in three connection modes: a new connection per message with a full
TLS handshake each time, a new connection per message resuming the TLS
session of the client's previous connection (as a sending MTA with a TLS
session cache does), and the connection kept (for 100 messages). Within a
run and mode the variants take turns in chunks of 100 messages, in an order
rotated from run to run, so that they meet the same load. Besides msg/s, it reads the node's own CPU time
(user + system, /proc/PID/stat) before and after each variant: CPU per
message does not count the client's side of the handshake, which here runs
in Python on the same cores. --rsa-cert gives both nodes an RSA-2048
certificate (made with openssl) instead of the zero-config ECDSA P-256 one:
a full handshake then costs the node an RSA signature. --dkim-algorithm
ed25519 signs with an Ed25519 key instead of RSA-2048 (RFC 8463); `both`
with the two keys of `dkim keygen --algorithm both` (two signatures per
message, RSA first). Given several (`--dkim-algorithm rsa ed25519 both`),
each gets its own signing node and its own variants (`dkim:rsa`,
`tls+dkim:rsa`, `dkim:ed25519`, ...), all measured in the same runs
against the same `plain`.

--cluster N (with --tls) makes each of those nodes a cluster of N nodes on
127.0.0.1..N relaying to one smtp-sink smarthost, with default Raft settings
and durability: the setup of the forwarding benchmark
(tests/bench/forward_bench.py). Client k connects to node k mod N, as
senders spread over round-robin MX records; CPU per message is the whole
cluster's. --rate R offers every variant the same load, R messages/s over
all clients, instead of as much as each takes: a cluster spends less CPU
per message the more writes one fsync carries, so at full speed a variant
slowed by its client (the Python client's side of every handshake runs on
the same cores) would also be charged for smaller Raft batches.
"""

from __future__ import annotations

import argparse
import os
import smtplib
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "integration"))

if "--bin" in sys.argv[:-1]:
    os.environ["TEMPALIAS_BIN"] = os.path.abspath(sys.argv[sys.argv.index("--bin") + 1])

from harness import BIN, Node, http_request  # noqa: E402
from peerkit import start_smtp_sink, stop_process  # noqa: E402
from test_mail_auth import Nsd  # noqa: E402

sys.path.insert(0, str(REPO / "cluster"))
from launch import LocalCluster, free_ports  # noqa: E402

# The node's self-signed certificate: encrypted, not verified (as most MTAs
# do for opportunistic STARTTLS).
TLS_CONTEXT = ssl.create_default_context()
TLS_CONTEXT.check_hostname = False
TLS_CONTEXT.verify_mode = ssl.CERT_NONE


def message(i: int, size: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    body = line * max(1, size // len(line))
    return (
        f"From: Alice <alice@sender.example>\r\nTo: <bench@tempalias.test>\r\nSubject: bench {i}\r\n"
        f"Date: Sun, 29 Nov 2026 12:00:00 +0000\r\nMessage-ID: <{i}.{time.time_ns()}@sender.example>\r\n\r\n"
    ).encode() + body


class SMTP(smtplib.SMTP):
    """smtplib's client, whose STARTTLS can offer an earlier TLS session."""

    def starttls_resuming(self, session: ssl.SSLSession | None) -> None:
        self.ehlo_or_helo_if_needed()
        code, reply = self.docmd("STARTTLS")
        if code != 220:
            raise smtplib.SMTPResponseException(code, reply)
        self.sock = TLS_CONTEXT.wrap_socket(self.sock, server_hostname=self._host, session=session)
        # As smtplib's own starttls(): everything learnt in plaintext is forgotten.
        self.file = None
        self.helo_resp = self.ehlo_resp = None
        self.esmtp_features = {}
        self.does_esmtp = False


def endpoints(node) -> list[tuple[str, int]]:
    """The SMTP listeners of a target: a Node's one, or a ClusterTarget's."""
    return getattr(node, "endpoints", None) or [("127.0.0.1", node.smtp_port)]


def node_cpu(node) -> float:
    """CPU seconds used so far by a target's node processes."""
    return sum(cpu_seconds(pid) for pid in getattr(node, "pids", None) or [node.pid])


def connect(node, tls: bool, session: ssl.SSLSession | None = None, k: int = 0) -> SMTP:
    """A connection to the target's listener k (round robin over a cluster's
    nodes, as senders spread over round-robin MX records)."""
    host, port = endpoints(node)[k % len(endpoints(node))]
    s = SMTP(host, port, local_hostname="client.example.org", timeout=60)
    if tls:
        s.starttls_resuming(session)
    return s


# Messages per alias. An alias keeps the ids of its committed uses (so a
# repeated Commit is recognised), which makes each write on it cost O(uses so
# far): one alias taking thousands of messages would measure the growth of its
# record, not the forwarding. Aliases are meant for a handful of uses.
PER_ALIAS = 100


def fresh_aliases(node: Node, n: int) -> list[str]:
    """Enough new aliases of PER_ALIAS uses for n messages (made before the
    clock starts)."""
    return [node.create_alias(days=1, max_usage=PER_ALIAS)["alias"] for _ in range(-(-n // PER_ALIAS))]


def send_all(node: Node, n: int, clients: int, size: int, tls: bool = False,
             reuse: bool = True, resume: bool = False, aliases: list[str] | None = None,
             sessions: dict | None = None, rate: float = 0.0) -> tuple[float, int]:
    """Messages per second for n messages (message i to alias i // PER_ALIAS
    of `aliases`, fresh ones when not given) from `clients` threads, each over
    one connection (`reuse`) or a new connection per message, and how many
    TLS handshakes resumed a session. With `resume`, each thread offers the
    newest session it has (taken after the message, when the TLS 1.3 ticket
    has arrived), as a sender's session cache would; `sessions` keeps them
    from one call to the next. With `rate` (messages/s, all clients
    together), message j of a client is not started before t0 + j * clients
    / rate (client k offset by k / rate, so that the messages come one at a
    time, evenly spaced, not in bursts of `clients`): every variant then
    meets the same offered load, below what the slowest can take, instead of
    each running as fast as it can."""
    aliases = aliases or fresh_aliases(node, n)
    msgs = [(aliases[i // PER_ALIAS], message(i, size)) for i in range(n)]
    sessions = {} if sessions is None else sessions

    def pace(k: int, j: int):
        if rate:
            delay = t0 + (j * clients + k) / rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def worker(k: int) -> int:
        resumed = 0
        if reuse:
            with connect(node, tls, k=k) as s:
                for j, (alias, m) in enumerate(msgs[k::clients]):
                    pace(k, j)
                    s.sendmail("alice@sender.example", [alias], m)
            return resumed
        for j, (alias, m) in enumerate(msgs[k::clients]):
            pace(k, j)
            with connect(node, tls, sessions.get(k), k) as s:
                s.sendmail("alice@sender.example", [alias], m)
                if tls:
                    resumed += s.sock.session_reused
                    if resume:
                        sessions[k] = s.sock.session
        return resumed

    t0 = time.monotonic()
    with ThreadPoolExecutor(clients) as ex:
        resumed = sum(ex.map(worker, range(clients)))
    return n / (time.monotonic() - t0), resumed


class ClusterTarget:
    """A LocalCluster of `n` nodes (127.0.0.1..n) relaying to a smarthost, as
    in the forwarding benchmark (tests/bench/forward_bench.py): what
    send_all and the CPU reading need of it."""

    def __init__(self, base: Path, name: str, n: int, config: dict):
        ips = [f"127.0.0.{i}" for i in range(1, n + 1)]
        ports = dict(zip(("http", "smtp", "cluster"), free_ports(ips, 3)))
        self.cluster = LocalCluster(base / name, n=n, binary=BIN, ports=ports, extra_config=config)
        try:
            self.cluster.start(timeout=60)
            self.cluster.wait_ready(timeout=60)
        except BaseException:
            self.cluster.stop()
            raise
        self.endpoints = [nd.smtp_addr for nd in self.cluster]
        self.pids = [nd.pid for nd in self.cluster]
        self.api = next(iter(self.cluster)).api

    def create_alias(self, days=None, max_usage=None) -> dict:
        r = http_request(self.api + "/v1/aliases", "POST",
                         {"target": "me@example.net", "days": days, "max-usage": max_usage})
        assert r.status == 201, f"create: {r.status} {r.body!r}"
        return r.json()

    def stop(self):
        self.cluster.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        # The command name may hold spaces: the fields after it start past ")".
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_keys(base: Path, algorithm: str) -> list[dict]:
    """`dkim keygen` for `algorithm` (rsa, ed25519 or both): the
    [[dkim.keys]] entries of the signing node."""
    out = base / f"keys-{algorithm}"
    out.mkdir()
    subprocess.run([str(BIN), "dkim", "keygen", "--domain", "tempalias.test", "--selector", "b1",
                    "--algorithm", algorithm, "--out-dir", str(out)],
                   check=True, capture_output=True, timeout=60)
    selectors = {"rsa": ["b1"], "ed25519": ["b1"], "both": ["b1-rsa", "b1-ed25519"]}[algorithm]
    return [{"domain": "tempalias.test", "selector": s, "key_file": str(out / f"{s}.tempalias.test.key")}
            for s in selectors]


def suffix(args, algorithm: str) -> str:
    """The variant names' suffix: none with one algorithm (the names of
    earlier figures), `:ALG` with several."""
    return "" if len(args.dkim_algorithm) == 1 else f":{algorithm}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--size", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tls", action="store_true", help="plain / tls / dkim / tls+dkim instead")
    ap.add_argument("--rsa-cert", action="store_true",
                    help="with --tls: an RSA-2048 certificate (made with openssl) instead of the ECDSA P-256 self-signed one")
    ap.add_argument("--dkim-algorithm", choices=("rsa", "ed25519", "both"), nargs="+", default=["rsa"],
                    help="the DKIM keys of the signing node: rsa (2048 bits, the default of `dkim keygen`), ed25519,"
                         " or both (two signatures); several: one signing node each, in the same runs")
    ap.add_argument("--cluster", type=int, default=0, metavar="N",
                    help="with --tls: each variant's node is a cluster of N nodes relaying to a "
                         "smtp-sink smarthost (the forwarding benchmark's setup) instead of one "
                         "node writing to its capture directory; CPU is the cluster's")
    ap.add_argument("--rate", type=float, default=0.0, metavar="MSGS_PER_S",
                    help="with --tls: offer every variant this load (all clients together) instead "
                         "of as much as it takes: CPU per message then compares like with like "
                         "(a cluster spends less per message the more writes one fsync carries)")
    ap.add_argument("--bin", help="the tempalias binary (instead of TEMPALIAS_BIN)")
    args = ap.parse_args()
    if (args.cluster or args.rate) and not args.tls:
        ap.error("--cluster and --rate go with --tls")
    if args.tls:
        return tls_bench(args)
    with tempfile.TemporaryDirectory(prefix="tempalias-mailauth-bench-") as tmp:
        base = Path(tmp)
        common = {"log": {"level": "warn"}, "ratelimit": {"enabled": False}}
        variants = {"plain": {}}
        for alg in args.dkim_algorithm:
            dkim = {"keys": make_keys(base, alg)}
            variants[f"dkim{suffix(args, alg)}"] = {"dkim": dkim, "arc": {"enabled": False}}
            variants[f"dkim+arc{suffix(args, alg)}"] = {"dkim": dkim, "arc": {"enabled": True, "dns_servers": []}}
        nsd = Nsd(base, {
            "sender.example": ['@ IN TXT "v=spf1 ip4:127.0.0.1 -all"', '_dmarc IN TXT "v=DMARC1; p=none"'],
            "example": [],
        })
        for name, extra in variants.items():
            if name.startswith("dkim+arc"):
                extra["arc"]["dns_servers"] = [f"127.0.0.1:{nsd.port}"]
        nodes = {}
        try:
            for name, extra in variants.items():
                n = Node(base, name.replace("+", "_").replace(":", "_"), config={**common, **extra})
                n.start()
                send_all(n, min(20, args.messages), args.clients, args.size)  # warm-up
                nodes[name] = n
            results: dict[str, list[float]] = {name: [] for name in variants}
            ratios: dict[str, list[float]] = {name: [] for name in variants}
            print(f"{args.messages} messages of ~{args.size} bytes, {args.clients} clients, "
                  f"DKIM keys {' '.join(args.dkim_algorithm)}, binary {BIN}")
            for run in range(args.runs):
                row = {}
                for name, n in nodes.items():
                    aliases = fresh_aliases(n, args.messages)
                    row[name] = send_all(n, args.messages, args.clients, args.size, aliases=aliases)[0]
                    results[name].append(row[name])
                for name in variants:
                    ratios[name].append(row[name] / row["plain"])
                print(f"run {run + 1}: " + ", ".join(f"{k} {v:.1f} msg/s" for k, v in row.items()))
            print("median: " + ", ".join(
                f"{k} {statistics.median(v):.1f} msg/s (x{statistics.median(ratios[k]):.2f} of plain)" for k, v in results.items()))
        finally:
            for n in nodes.values():
                n.stop()
            nsd.stop()
    return 0


def tls_bench(args) -> int:
    """STARTTLS and DKIM, alone and together, against plaintext unsigned:
    throughput and the node's CPU per message."""
    with tempfile.TemporaryDirectory(prefix="tempalias-tls-bench-") as tmp:
        base = Path(tmp)
        common = {"log": {"level": "warn"}, "ratelimit": {"enabled": False}}
        if args.rsa_cert:
            cert_file, key_file = base / "rsa-cert.pem", base / "rsa-key.pem"
            subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                            "-subj", "/CN=mx1.tempalias.test", "-keyout", str(key_file), "-out", str(cert_file)],
                           check=True, capture_output=True, timeout=60)
            common["smtp"] = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
        configs = {"plain": {}}
        variants = {"plain": ("plain", False), "tls": ("plain", True)}
        for alg in args.dkim_algorithm:
            node = f"dkim{suffix(args, alg)}"
            configs[node] = {"dkim": {"keys": make_keys(base, alg)}, "arc": {"enabled": False}}
            variants[node] = (node, False)
            variants[f"tls+{node}"] = (node, True)
        # Mode: (connection kept, TLS session resumed).
        modes = {"new connection, full handshake": (False, False),
                 "new connection, resumed session": (False, True),
                 "connection kept": (True, False)}
        nodes = {}
        sink = None
        try:
            if args.cluster:
                sink_port = free_ports(["127.0.0.1"], 1)[0]
                sink = start_smtp_sink("127.0.0.1", sink_port, base / "smtp-sink.log", backlog=1024)
                common["relay"] = {"mode": "smarthost", "smarthosts": [f"smtp://127.0.0.1:{sink_port}"]}
                # As forward_bench.py: no per-address session cap for the loopback clients.
                common["smtp"] = {**common.get("smtp", {}), "trusted_networks": ["127.0.0.0/8"]}
            for name, extra in configs.items():
                if args.cluster:
                    n = ClusterTarget(base, name.replace(":", "_"), args.cluster, {**common, **extra})
                else:
                    n = Node(base, name.replace(":", "_"), config={**common, **extra})
                    nodes[name] = n  # before start(): stopped in `finally` if it fails
                    n.start()
                nodes[name] = n
                send_all(n, min(20, args.messages), args.clients, args.size, tls=True)  # warm-up
            print(f"{args.messages} messages of ~{args.size} bytes, {args.clients} clients, "
                  f"DKIM keys {' '.join(args.dkim_algorithm)}, binary {BIN}, "
                  + (f"{args.cluster}-node clusters relaying to smtp-sink" if args.cluster
                     else "single nodes relaying to their capture directory"))
            with connect(nodes["plain"], True) as s:
                print(f"STARTTLS: {s.sock.version()}, {s.sock.cipher()[0]}, "
                      f"{'RSA-2048' if args.rsa_cert else 'ECDSA P-256'} certificate")
            names = list(variants)
            rates = {(m, v): [] for m in modes for v in variants}
            ratios = {(m, v): [] for m in modes for v in variants}
            cpu = {(m, v): [] for m in modes for v in variants}  # node CPU ms per message
            cpu_ratios = {(m, v): [] for m in modes for v in variants}  # plain's CPU / the variant's
            for run in range(args.runs):
                order = names[run % len(names):] + names[:run % len(names)]
                for mode, (reuse, resume) in modes.items():
                    # The variants take turns in chunks of PER_ALIAS messages,
                    # so that each meets the same load on the shared machine.
                    elapsed, used_s, resumed = ({v: 0.0 for v in names} for _ in range(3))
                    sessions = {v: {} for v in names}
                    for start in range(0, args.messages, PER_ALIAS):
                        chunk = min(PER_ALIAS, args.messages - start)
                        for v in order:
                            node_name, tls = variants[v]
                            n = nodes[node_name]
                            aliases = fresh_aliases(n, chunk)
                            before = node_cpu(n)
                            rate, r = send_all(n, chunk, args.clients, args.size, tls=tls, reuse=reuse,
                                               resume=resume, aliases=aliases, sessions=sessions[v],
                                               rate=args.rate)
                            used_s[v] += node_cpu(n) - before
                            elapsed[v] += chunk / rate
                            resumed[v] += r
                    row = {v: args.messages / elapsed[v] for v in names}
                    used = {v: used_s[v] * 1000 / args.messages for v in names}
                    resumed = {v: int(resumed[v]) for v in names}
                    for v in names:
                        rates[(mode, v)].append(row[v])
                        ratios[(mode, v)].append(row[v] / row["plain"])
                        cpu[(mode, v)].append(used[v])
                        cpu_ratios[(mode, v)].append(used["plain"] / used[v] if used[v] else float("nan"))
                    tls_note = " (TLS handshakes resumed: " + ", ".join(
                        f"{v} {resumed[v]}" for v in names if variants[v][1]) + ")" if not reuse else ""
                    print(f"run {run + 1}, {mode}: "
                          + ", ".join(f"{v} {row[v]:.1f} msg/s {used[v]:.2f} ms CPU/msg" for v in names)
                          + tls_note, flush=True)
                    print("    ratios to plain: " + ", ".join(
                        f"{v} x{ratios[(mode, v)][-1]:.2f} (CPU x{cpu_ratios[(mode, v)][-1]:.2f})"
                        for v in names[1:]), flush=True)
            print("\nthroughput: medians (msg/s, and the median of the per-run ratios to plain):")
            table(modes, names, rates, ratios, "{:.1f}")
            print("\nnode CPU per message: medians (ms, and the median of the per-run ratios"
                  " plain CPU / variant CPU, comparable with the throughput ratios):")
            table(modes, names, cpu, cpu_ratios, "{:.2f} ms")
        finally:
            for n in nodes.values():
                try:
                    n.stop()
                except Exception as e:  # noqa: BLE001 - report and go on cleaning up
                    print(f"stopping {n}: {e}", file=sys.stderr)
            stop_process(sink)
    return 0


def table(modes, names, values, ratios, fmt: str) -> None:
    print("| Connections | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for mode in modes:
        cells = [fmt.format(statistics.median(values[(mode, names[0])]))]
        cells += [f"{fmt.format(statistics.median(values[(mode, v)]))} (x{statistics.median(ratios[(mode, v)]):.2f})"
                  for v in names[1:]]
        print(f"| {mode} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
