"""The failover lab (issue 6): a network namespace with only loopback, an
authoritative DNS server (nsd) for the alias domain, three tempalias nodes on
port 25 of 127.0.0.1-3, a real Postfix as the sending MTA delivering by MX
lookup, and Postfix's smtp-sink as the nodes' upstream smarthost. Faults are
injected with iptables inside the namespace and with signals.

Shared by the chaos suite (tests/chaos) and the failover benchmark
(tests/bench/failover_bench.py). Postfix, smtp-sink and nsd are started
and stopped by tests/integration/peerkit.py, as in the integration tests
and the forwarding benchmark. Python 3.9+ standard library only; needs root
(namespaces, iptables, Postfix, port 25) and the Debian packages iproute2,
iptables, nsd and postfix (scripts/test installs them).

How the pieces sit inside the namespace:

    127.0.0.1-3   tempalias nodes: SMTP :25 (the MX targets), HTTP and
                  cluster ports (the same numbers on every address)
    127.0.0.10    Postfix: smtpd :25 for submission, outbound SMTP bound here
    127.0.0.20    smtp-sink :25: the nodes' smarthost, and the MX of the
                  senders' domain (so bounces land here too and can be counted)
    127.0.0.30    smtp-sink :25 refusing every message after DATA (550):
                  the MX of target.test, only with Lab(bouncing_target=True)
    127.0.0.53    nsd :53: tempalias.test (3 equal MX) and sender.test
                  (and target.test with bouncing_target)

The test process itself enters the namespace (setns on its main thread before
it starts any thread), so every process and thread it starts afterwards (the
nodes through cluster/launch.py, load clients, probes) lives in the namespace
and no traffic can leave the machine. Postfix is started with
`ip netns exec`, which also gives it the namespace's resolv.conf
(/etc/netns/NAME/resolv.conf, pointing at nsd).

Nodes bind their outbound cluster connections to their own listen address, so
iptables rules on source and destination address tell the nodes apart; every
rule is restricted to the cluster port, so SMTP and HTTP keep reaching every
node and a node on the minority side is still asked by clients.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import re
import shutil
import smtplib
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

from launch import LocalCluster, LocalNode, free_ports, http_get, wait_until  # noqa: E402

# Postfix, smtp-sink and nsd as the integration tests start them (peerkit.py).
sys.path.insert(0, str(REPO / "tests" / "integration"))
from peerkit import NsdServer, PostfixInstance, dns_query, start_smtp_sink, stop_process, zone_text  # noqa: E402

DOMAIN = "tempalias.test"
SENDER_DOMAIN = "sender.test"
SENDER = f"sender@{SENDER_DOMAIN}"
TARGET_DOMAIN = "target.test"
NODE_IPS = {1: "127.0.0.1", 2: "127.0.0.2", 3: "127.0.0.3"}
POSTFIX_IP = "127.0.0.10"
SINK_IP = "127.0.0.20"
TARGET_MX_IP = "127.0.0.30"
DNS_IP = "127.0.0.53"
CHAIN = "TEMPALIAS-CHAOS"
CLONE_NEWNET = 0x40000000

# Node settings for the lab. Raft timings stay at their defaults (that is what
# is under test). The SMTP and relay timeouts are cut so that the reservation
# lease can be short: a use held by a killed node comes back after 30 s
# instead of 40 min, so Postfix's retries of a used-up alias settle within a
# test. (The lease must exceed session_timeout + the relay's delivery budget.)
NODE_CONFIG = {
    "smtp": {
        "failed_rcpt_delay_ms": 0,
        "max_failed_rcpts": 100,
        "max_connections_per_ip": 100,
        "idle_timeout_secs": 15,
        "transaction_timeout_secs": 15,
        "session_timeout_secs": 20,
    },
    "relay": {"mode": "smarthost", "smarthosts": [f"smtp://{SINK_IP}:25"], "timeout_secs": 5,
              "delivery_timeout_secs": 8, "reservation_lease_secs": 30},
    # The load creates many aliases from one address.
    "ratelimit": {"enabled": False},
    "log": {"level": "info,openraft=warn"},
}


class LabError(Exception):
    """The lab could not be set up (a missing tool, a daemon that did not start)."""


def run(cmd, check: bool = True, timeout: float = 30.0, **kw) -> subprocess.CompletedProcess:
    """Runs a command, capturing its output; raises LabError with the output on failure."""
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(map(str, cmd))}: exit {r.returncode}\n{r.stdout}{r.stderr}")
    return r


def tool(name: str) -> str:
    """Absolute path of a system tool (also looks in /usr/sbin and /sbin)."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if not found:
        raise LabError(f"{name} is not installed; run scripts/test (it installs nsd, iptables, iproute2 and postfix)")
    return found


# --------------------------------------------------------------------------- namespace


class Netns:
    """A network namespace with only `lo` up, entered by the calling thread.

    `enter()` must be called from the main thread before it starts any thread
    or child it wants inside; `close()` goes back to the original namespace
    and deletes this one (its processes must have been stopped first)."""

    def __init__(self, name: str | None = None):
        self.name = name or f"tachaos{os.getpid()}"
        self._libc = ctypes.CDLL("libc.so.6", use_errno=True)
        self._home_fd: int | None = None
        self.created = False
        self.etc_dir = Path("/etc/netns") / self.name

    def create(self) -> "Netns":
        run([tool("ip"), "netns", "add", self.name])
        self.created = True
        run([tool("ip"), "-n", self.name, "link", "set", "lo", "up"])
        return self

    def add_address(self, ip: str):
        """Puts `ip` on lo explicitly. All of 127/8 is local anyway, but
        Postfix's inet_interfaces accepts only addresses an interface lists.
        Only for addresses no node connects to: it makes the kernel choose
        that address as the source toward it."""
        run([tool("ip"), "-n", self.name, "addr", "add", f"{ip}/32", "dev", "lo"])

    def _setns(self, fd: int):
        if self._libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LabError(f"setns: {os.strerror(err)}")

    def enter(self):
        self._home_fd = os.open("/proc/self/ns/net", os.O_RDONLY)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            self._setns(fd)
        finally:
            os.close(fd)

    def leave(self):
        if self._home_fd is not None:
            self._setns(self._home_fd)
            os.close(self._home_fd)
            self._home_fd = None

    def write_resolv_conf(self, nameserver: str):
        """resolv.conf for processes started with `ip netns exec` (Postfix)."""
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "resolv.conf").write_text(f"nameserver {nameserver}\noptions timeout:1 attempts:2\n")

    def exec_cmd(self, *cmd) -> list[str]:
        return [tool("ip"), "netns", "exec", self.name, *map(str, cmd)]

    def pids(self) -> list[int]:
        r = run([tool("ip"), "netns", "pids", self.name], check=False)
        return [int(x) for x in r.stdout.split() if x.isdigit()]

    def close(self):
        """Leaves the namespace, kills what still runs in it (processes this
        lab started), deletes it and its /etc/netns directory. Never raises."""
        try:
            self.leave()
        except Exception:  # noqa: BLE001
            pass
        if self.created:
            for pid in self.pids():
                if pid == os.getpid():
                    continue  # never this process, even if leaving failed
                try:
                    os.kill(pid, 9)
                except OSError:
                    pass
            run([tool("ip"), "netns", "del", self.name], check=False)
            self.created = False
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        try:
            self.etc_dir.parent.rmdir()  # only if no other namespace uses it
        except OSError:
            pass


# --------------------------------------------------------------------------- firewall


class Firewall:
    """iptables rules in the namespace's OUTPUT chain (every loopback packet
    passes it exactly once), kept in a chain of their own so that `heal()` is
    one flush. Every rule drops TCP packets from one node address to another
    node's cluster port: `cut(a, b)` means a can no longer reach b's cluster
    port (new connections time out, open ones stall), while b can still reach
    a's. SMTP and HTTP are never touched."""

    def __init__(self, netns: Netns, port: int):
        self.netns = netns
        self.port = port
        self.lock = threading.Lock()
        self.iptables = tool("iptables")
        self._ipt("-N", CHAIN)
        self._ipt("-I", "OUTPUT", "-j", CHAIN)

    def _ipt(self, *args):
        with self.lock:
            run(self.netns.exec_cmd(self.iptables, "-w", *args))

    def _rules(self, src: str, dst: str) -> list[list[str]]:
        """Rules so that `src` cannot reach `dst`'s cluster port: its packets to
        that port are dropped (new connections time out, open ones stall)."""
        return [["-s", src, "-d", dst, "-p", "tcp", "--dport", str(self.port), "-j", "DROP"]]

    def cut(self, src: str, dst: str):
        """One way: connections from src to dst's cluster port stop working."""
        for rule in self._rules(src, dst):
            self._ipt("-A", CHAIN, *rule)

    def cut_inbound(self, victim: str, others):
        """Fault (a): the others cannot reach the victim's port; it reaches theirs."""
        for o in others:
            self.cut(o, victim)

    def cut_link(self, a: str, b: str):
        """Both ways between a and b."""
        self.cut(a, b)
        self.cut(b, a)

    def isolate(self, victim: str, others):
        """Faults (b) and (c): no cluster traffic to or from the victim."""
        for o in others:
            self.cut_link(victim, o)

    def heal(self):
        self._ipt("-F", CHAIN)

    def rules(self) -> str:
        with self.lock:
            return run(self.netns.exec_cmd(self.iptables, "-w", "-S", CHAIN)).stdout

    def flap(self, a: str, b: str, period: float, duration: float, stop: threading.Event | None = None) -> int:
        """Fault (d): cuts and restores the a<->b link every `period` s for
        `duration` s (blocking); ends healed. Returns the number of cuts."""
        cuts = 0
        end = time.monotonic() + duration
        while time.monotonic() < end and not (stop and stop.is_set()):
            self.cut_link(a, b)
            cuts += 1
            time.sleep(period)  # the fault itself: a link that changes every `period`
            self.heal()
            time.sleep(period)
        self.heal()
        return cuts

    def close(self):
        try:
            self._ipt("-D", "OUTPUT", "-j", CHAIN)
            self._ipt("-F", CHAIN)
            self._ipt("-X", CHAIN)
        except Exception:  # noqa: BLE001 - the namespace goes away anyway
            pass


def tcp_reaches(src: str, dst: str, port: int, timeout: float = 0.5) -> bool:
    """True when a TCP connection from `src` (bound) to dst:port is accepted."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.bind((src, 0))
        try:
            s.connect((dst, port))
            return True
        except OSError:
            return False


def outbound_sources(port: int) -> set[tuple[str, str]]:
    """(local IP, remote IP) of established TCP connections to `port` in this
    namespace (/proc/net/tcp of the calling process)."""

    def ip(hexaddr: str) -> str:
        return socket.inet_ntoa(struct.pack("<I", int(hexaddr, 16)))

    out = set()
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        parts = line.split()
        local, remote, state = parts[1], parts[2], parts[3]
        rip, rport = remote.split(":")
        if state == "01" and int(rport, 16) == port:
            out.add((ip(local.split(":")[0]), ip(rip)))
    return out


# --------------------------------------------------------------------------- DNS


class Nsd(NsdServer):
    """nsd serving tempalias.test (three equal MX, A records of the nodes) and
    sender.test (MX to the sink), and target.test (MX to `target_mx`) when
    given, on DNS_IP:53, from its own directory, in the foreground."""

    def __init__(self, base: Path, node_ips: dict[int, str], target_mx: str | None = None):
        super().__init__(base / "nsd", DNS_IP, 53, {}, verbosity=1, error=LabError)
        self.node_ips = node_ips
        self.target_mx = target_mx

    def zone(self) -> str:
        records = [f"@ IN MX 10 mx{i}.{DOMAIN}." for i in sorted(self.node_ips)]
        records += [f"mx{i} IN A {ip}" for i, ip in sorted(self.node_ips.items())]
        return zone_text(DOMAIN, records, DNS_IP, serial=int(time.time()))

    def sender_zone(self) -> str:
        return zone_text(SENDER_DOMAIN, [f"@ IN MX 10 sink.{SENDER_DOMAIN}.", f"sink IN A {SINK_IP}",
                                         f"mta IN A {POSTFIX_IP}"], DNS_IP)

    def target_zone(self) -> str:
        return zone_text(TARGET_DOMAIN, [f"@ IN MX 10 mx.{TARGET_DOMAIN}.", f"mx IN A {self.target_mx}"], DNS_IP)

    def start(self) -> "Nsd":
        self.zones = {DOMAIN: self.zone(), SENDER_DOMAIN: self.sender_zone()}
        if self.target_mx:
            self.zones[TARGET_DOMAIN] = self.target_zone()

        def serving():
            return dns_query(DNS_IP, DOMAIN, 15) == (0, len(self.node_ips)) and (
                not self.target_mx or dns_query(DNS_IP, TARGET_DOMAIN, 15) == (0, 1)
            )

        return super().start(serving, "nsd to serve the MX records")


# --------------------------------------------------------------------------- smtp-sink


MSGID = re.compile(rb"^Message-ID:\s*<([0-9a-f]{32})@chaos\.test>", re.IGNORECASE | re.MULTILINE)


@dataclass
class SinkCounts:
    """What the sink received: forwarded copies per test Message-ID, and
    bounces (mail to the sender) per Message-ID of the bounced message."""

    delivered: Counter = field(default_factory=Counter)
    bounced: Counter = field(default_factory=Counter)
    other: int = 0


class Sink:
    """Postfix's smtp-sink on `ip`:25 (SINK_IP), one file per transaction;
    `options` go before the address (e.g. `-f . -B "550 ..."` to refuse every
    message after DATA)."""

    def __init__(self, base: Path, ip: str = SINK_IP, name: str = "sink", options: tuple[str, ...] = ()):
        self.ip = ip
        self.options = list(options)
        self.dir = base / name
        self.dump = self.dir / "dump"
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Sink":
        self.dump.mkdir(parents=True, exist_ok=True)
        # smtp-sink drops to `nobody` after binding port 25; it writes here.
        os.chmod(self.dump, 0o777)
        self.proc = start_smtp_sink(self.ip, 25, self.dir / "smtp-sink.log", options=self.options,
                                    dump_prefix=f"{self.dump}/msg.", backlog=256, error=LabError)
        return self

    def counts(self) -> SinkCounts:
        """Parses every complete dump: a message to the sender is a bounce."""
        out = SinkCounts()
        for p in self.dump.glob("msg.*"):
            raw = p.read_bytes()
            if not raw.endswith(b"\n\n"):
                continue  # still being written
            rcpts = re.findall(rb"^X-Rcpt-Args: <?([^>\s]*)", raw, re.MULTILINE)
            m = MSGID.search(raw)
            if not m:
                out.other += 1
            elif SENDER.encode() in rcpts:
                out.bounced[m.group(1).decode()] += 1
            else:
                out.delivered[m.group(1).decode()] += 1
        return out

    def messages(self) -> list[SinkMessage]:
        """Every completely written dump, oldest first."""
        out = []
        for p in sorted(self.dump.glob("msg.*"), key=lambda p: p.stat().st_mtime_ns):
            raw = p.read_bytes()
            if not raw.endswith(b"\n\n"):
                continue  # still being written
            mail = re.search(rb"^X-Mail-Args: (\S*)", raw, re.MULTILINE)
            rcpts = re.findall(rb"^X-Rcpt-Args: (\S*)", raw, re.MULTILINE)
            mail_from = mail.group(1).decode().strip("<>") if mail else None
            out.append(SinkMessage(mail_from, [r.decode().strip("<>") for r in rcpts], raw))
        return out

    def stop(self):
        stop_process(self.proc)


@dataclass
class SinkMessage:
    """One transaction smtp-sink dumped: envelope and the whole dump."""

    mail_from: str | None  # "" for the null sender
    rcpt_to: list[str]
    raw: bytes


# --------------------------------------------------------------------------- Postfix


class Postfix(PostfixInstance):
    """A Postfix instance of its own (config, queue and data directories) as
    the sending MTA: accepts mail on POSTFIX_IP:25 from 127.0.0.0/8 and
    delivers it by MX lookup (DNS, through nsd) with retry timers of seconds.
    `postfix` runs inside the namespace (`ip netns exec`, which also gives it
    the namespace's resolv.conf) and is stopped with `postfix abort`: the
    lab deletes the namespace and whatever still runs in it next."""

    def __init__(self, base: Path, netns: Netns):
        settings = {
            "myhostname": f"mta.{SENDER_DOMAIN}",
            "mydomain": SENDER_DOMAIN,
            "myorigin": "$myhostname",
            "local_transport": "error:no local delivery in the lab",
            "smtpd_relay_restrictions": "permit_mynetworks, reject_unauth_destination",
            "smtp_bind_address": POSTFIX_IP,
            "smtp_host_lookup": "dns",
            "smtp_dns_support_level": "enabled",
            # Retry timers cut to seconds so the queue drains within a test.
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "queue_run_delay": "1s",
            "smtp_connect_timeout": "2s",
            "smtp_helo_timeout": "10s",
            "smtp_mail_timeout": "10s",
            "smtp_rcpt_timeout": "15s",
            "smtp_data_init_timeout": "10s",
            "smtp_data_xfer_timeout": "10s",
            "smtp_data_done_timeout": "20s",
            "smtp_quit_timeout": "5s",
            "smtp_mx_session_limit": "3",
            # A refused connection (a node down) must not mark the whole
            # alias domain dead for long: keep trying the other MX hosts.
            "default_destination_concurrency_failed_cohort_limit": "100",
            "delay_warning_time": "0h",
            "maximal_queue_lifetime": "1h",
            "bounce_queue_lifetime": "1h",
        }
        super().__init__(base / "postfix", settings, host=POSTFIX_IP, port=25, service="smtp",
                         command_prefix=netns.exec_cmd(), graceful_stop=False, error=LabError)
        self.netns = netns

    def queue(self) -> list[dict]:
        """`postqueue -j`: one dict per queued message (active, deferred, ...)."""
        r = run([tool("postqueue"), "-c", self.dir, "-j"], timeout=30)
        return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]

    def wait_empty(self, timeout: float) -> float:
        """Seconds until the queue is empty (no queue file and postqueue shows
        none); raises TimeoutError with the queue after `timeout`."""
        t0 = time.monotonic()
        try:
            wait_until(lambda: self.queue_files() == 0 and not self.queue(), timeout, "Postfix's queue to empty", interval=0.1)
        except TimeoutError as e:
            raise TimeoutError(f"{e}\nqueue: {json.dumps(self.queue())[:3000]}") from None
        return time.monotonic() - t0

    def statuses(self) -> dict[str, Counter]:
        """Per test Message-ID: how often the maillog says sent/deferred/bounced."""
        if not self.maillog.exists():
            return {}
        text = self.maillog.read_text(errors="replace")
        qid_uid = dict(re.findall(r" ([0-9A-F]{6,}): message-id=<([0-9a-f]{32})@chaos\.test>", text))
        out: dict[str, Counter] = {}
        for qid, status in re.findall(r" ([0-9A-F]{6,}): to=<[^>]*>,.* status=(\w+)", text):
            uid = qid_uid.get(qid)
            if uid:
                out.setdefault(uid, Counter())[status] += 1
        return out

    def bounce_lines(self, uids) -> list[str]:
        if not self.maillog.exists():
            return []
        text = self.maillog.read_text(errors="replace")
        qids = {q for q, u in re.findall(r" ([0-9A-F]{6,}): message-id=<([0-9a-f]{32})@chaos\.test>", text) if u in uids}
        return [ln for ln in text.splitlines() if "status=bounced" in ln and any(f" {q}:" in ln for q in qids)]


# --------------------------------------------------------------------------- cluster


class ChaosCluster(LocalCluster):
    """cluster/launch.py's LocalCluster with SMTP on port 25 of 127.0.0.1-3.

    Nodes run inside the namespace because the process that starts them is in
    it (see Netns); nothing else differs from launch.py's nodes."""

    def __init__(self, directory, binary, config: dict):
        http, cluster = free_ports(list(NODE_IPS.values()), 2)
        super().__init__(
            directory,
            n=3,
            binary=binary,
            ports={"http": http, "smtp": 25, "cluster": cluster},
            extra_config=config,
            die_with_parent=True,
        )

    def binds_outbound(self) -> bool:
        """True when nodes open cluster connections from their own listen
        address (so iptables can tell them apart). Needs traffic from
        followers: call after writes went through every node."""
        conns = outbound_sources(self.ports["cluster"])
        return any(src != "127.0.0.1" and src in NODE_IPS.values() for src, _dst in conns)


# --------------------------------------------------------------------------- clients


def http_json(node: LocalNode, method: str, path: str, body=None, headers=None, timeout: float = 15.0) -> tuple[int, dict | None]:
    """(status, parsed JSON or None); status 0 when the node did not answer."""
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs["Content-Type"] = "application/json"
    conn = http.client.HTTPConnection(node.ip, node.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw) if raw else None
        except ValueError:
            return r.status, None
    except OSError:
        return 0, None
    finally:
        conn.close()


def create_alias(node: LocalNode, max_usage: int = 100, timeout: float = 15.0) -> tuple[int, dict | None]:
    return http_json(node, "POST", "/v1/aliases", {"target": f"t@{TARGET_DOMAIN}", "days": 1, "max-usage": max_usage}, timeout=timeout)


def show_alias(node: LocalNode, alias: dict, timeout: float = 15.0) -> tuple[int, dict | None]:
    return http_json(node, "GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"}, timeout=timeout)


def readyz(node: LocalNode, timeout: float = 5.0) -> int:
    try:
        return http_get(node.api + "/readyz", timeout)[0]
    except OSError:
        return 0


def rcpt_probe(node: LocalNode, rcpt: str, timeout: float = 20.0) -> tuple[int | None, str]:
    """One RCPT on a fresh session (then RSET, which releases a reservation):
    (code, text); (None, error) when there was no reply."""
    try:
        with smtplib.SMTP(node.ip, node.smtp_port, local_hostname="probe.chaos.test", timeout=timeout) as s:
            s.ehlo()
            s.mail(SENDER)
            code, text = s.rcpt(rcpt)
            s.rset()
            return code, text.decode(errors="replace")
    except (smtplib.SMTPException, OSError) as e:
        return None, repr(e)


def new_uid() -> str:
    return uuid.uuid4().hex


def submit(uid: str, rcpt: str, timeout: float = 30.0) -> tuple[bool, str]:
    """Submits one message to the lab's Postfix; (accepted, reply)."""
    msg = (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: chaos {uid}\r\n"
        f"Message-ID: <{uid}@chaos.test>\r\n\r\nHello {uid}.\r\n"
    ).encode()
    try:
        with smtplib.SMTP(POSTFIX_IP, 25, local_hostname="client.chaos.test", timeout=timeout) as s:
            s.sendmail(SENDER, [rcpt], msg)
            return True, "250"
    except (smtplib.SMTPException, OSError) as e:
        return False, repr(e)


@dataclass
class Write:
    """One create as the HTTP load saw it."""

    node: int
    start: float
    end: float
    status: int
    alias: dict | None = None


class CreateLoad:
    """Alias creation over HTTP: `per_node` threads per node, each creating
    aliases through its node in a loop (round-robin over the nodes as a
    whole). A node that is slow or down slows only its own threads.
    Every answer is recorded."""

    def __init__(self, cluster: LocalCluster, per_node: int = 1, pause: float = 0.02, max_usage: int = 100):
        self.cluster = cluster
        self.pause = pause
        self.max_usage = max_usage
        self.writes: list[Write] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(nd,), daemon=True, name=f"create-node{nd.id}") for nd in cluster for _ in range(per_node)]

    def _run(self, nd: LocalNode):
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            status, body = create_alias(nd, self.max_usage, timeout=15)
            t1 = time.monotonic()
            with self.lock:
                self.writes.append(Write(nd.id, t0, t1, status, body if status == 201 else None))
            # A short pause keeps the debug build's CPU share for the nodes;
            # a failed write backs off a little more (bounded by stop()).
            self.stop_event.wait(self.pause if status == 201 else 0.05)

    def start(self) -> "CreateLoad":
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(30)
        alive = [t.name for t in self.threads if t.is_alive()]
        if alive:
            raise AssertionError(f"create load threads did not stop: {alive}")

    def snapshot(self) -> list[Write]:
        with self.lock:
            return list(self.writes)

    def committed(self) -> list[Write]:
        return [w for w in self.snapshot() if w.status == 201]

    def first_commit_after(self, t: float, node: int | None = None) -> float | None:
        """End time of the first 201 to a create sent at or after `t`."""
        ends = [w.end for w in self.snapshot() if w.status == 201 and w.start >= t and (node is None or w.node == node)]
        return min(ends) if ends else None

    def longest_gap(self, t0: float, t1: float) -> float:
        """Longest stretch in [t0, t1] without a committed create."""
        ends = sorted([t0, t1] + [w.end for w in self.snapshot() if w.status == 201 and t0 <= w.end <= t1])
        return max(b - a for a, b in zip(ends, ends[1:]))


class MailLoad:
    """Messages submitted to Postfix, one thread, round-robin over `aliases`
    (addresses), each with a unique Message-ID. Records what Postfix accepted."""

    def __init__(self, aliases: list[str], pause: float = 0.1):
        self.aliases = list(aliases)
        self.pause = pause
        self.accepted: dict[str, str] = {}  # uid -> alias address
        self.refused: list[str] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True, name="mail-load")

    def _run(self):
        n = 0
        while not self.stop_event.is_set():
            rcpt = self.aliases[n % len(self.aliases)]
            n += 1
            self.send(rcpt)
            self.stop_event.wait(self.pause)

    def send(self, rcpt: str) -> bool:
        uid = new_uid()
        ok, reply = submit(uid, rcpt)
        with self.lock:
            if ok:
                self.accepted[uid] = rcpt
            else:
                self.refused.append(f"{rcpt}: {reply}")
        return ok

    def start(self) -> "MailLoad":
        self.thread.start()
        return self

    def stop(self):
        self.stop_event.set()
        self.thread.join(60)
        if self.thread.is_alive():
            raise AssertionError("mail load thread did not stop")


@dataclass
class Probe:
    kind: str  # "readyz", "create", "rcpt"
    start: float
    end: float
    code: int | None
    text: str = ""


class MinorityProbe:
    """Asks one node over and over, one thread per kind of question:
    /readyz, an alias create, and an RCPT to a live alias. Records answers."""

    def __init__(self, node: LocalNode, live_alias: str):
        self.node = node
        self.live_alias = live_alias
        self.probes: list[Probe] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._loop, args=(k,), daemon=True, name=f"probe-{k}") for k in ("readyz", "create", "rcpt")]

    def _ask(self, kind: str) -> tuple[int | None, str]:
        if kind == "readyz":
            return readyz(self.node), ""
        if kind == "create":
            status, body = create_alias(self.node, timeout=20)
            return status, json.dumps(body) if body else ""
        return rcpt_probe(self.node, self.live_alias)

    def _loop(self, kind: str):
        while not self.stop_event.is_set():
            t0 = time.monotonic()
            code, text = self._ask(kind)
            with self.lock:
                self.probes.append(Probe(kind, t0, time.monotonic(), code, text))
            self.stop_event.wait(0.1)

    def start(self) -> "MinorityProbe":
        for t in self.threads:
            t.start()
        return self

    def stop(self):
        self.stop_event.set()
        for t in self.threads:
            t.join(40)

    def snapshot(self) -> list[Probe]:
        with self.lock:
            return list(self.probes)


def minority_answer(p: Probe) -> bool:
    """The answer a node without a quorum must give."""
    if p.kind == "rcpt":
        return p.code == 451 and "4.3.0" in p.text
    return p.code == 503


def settled_after(probes: list[Probe], kind: str, t0: float, t1: float) -> float | None:
    """Seconds from t0 until `kind` answers became minority answers and stayed
    so until t1 (by the end time of the first such answer); None if never."""
    ps = sorted((p for p in probes if p.kind == kind and p.start >= t0 and p.end <= t1), key=lambda p: p.end)
    first = None
    for p in ps:
        if minority_answer(p):
            first = p.end if first is None else first
        else:
            first = None
    return None if first is None else first - t0


# --------------------------------------------------------------------------- the lab


class Lab:
    """Everything above, started in order and torn down in reverse (also on
    failure). Use as a context manager or call start()/close().

    `mail=False` leaves out nsd, smtp-sink and Postfix (the benchmark needs
    only the nodes and the firewall); `node_config` replaces NODE_CONFIG as
    the nodes' settings (launch.py's defaults, capture relay, when {});
    `bouncing_target=True` adds target.test to DNS with an MX (TARGET_MX_IP)
    that refuses every message after DATA (`self.target`)."""

    def __init__(self, binary, node_config: dict | None = None, mail: bool = True, keep: bool = False,
                 bouncing_target: bool = False, name: str | None = None):
        self.binary = binary
        self.node_config = NODE_CONFIG if node_config is None else node_config
        self.mail = mail
        self.keep = keep
        self.bouncing_target = bouncing_target
        self.base = Path(tempfile.mkdtemp(prefix="tempalias-chaos-"))
        # Postfix's daemons (user postfix) must reach their queue below this.
        os.chmod(self.base, 0o755)
        self.netns = Netns(name)
        self.nsd: Nsd | None = None
        self.sink: Sink | None = None
        self.target: Sink | None = None
        self.postfix: Postfix | None = None
        self.cluster: ChaosCluster | None = None
        self.fw: Firewall | None = None

    def start(self) -> "Lab":
        try:
            self.netns.create()
            self.netns.enter()
            if self.mail:
                self.netns.add_address(POSTFIX_IP)
                self.netns.write_resolv_conf(DNS_IP)
                self.nsd = Nsd(self.base, NODE_IPS, TARGET_MX_IP if self.bouncing_target else None).start()
                self.sink = Sink(self.base).start()
                if self.bouncing_target:
                    refuse = ("-f", ".", "-B", "550 5.2.2 mailbox full")
                    self.target = Sink(self.base, TARGET_MX_IP, "target", refuse).start()
            self.cluster = ChaosCluster(self.base / "cluster", self.binary, self.node_config)
            self.cluster.start(wait=True, timeout=90)
            self.fw = Firewall(self.netns, self.cluster.ports["cluster"])
            if self.mail:
                self.postfix = Postfix(self.base, self.netns).start()
        except BaseException:
            self.close()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.close()

    @property
    def node_ips(self) -> dict[int, str]:
        return dict(NODE_IPS)

    def ip(self, node_id: int) -> str:
        return NODE_IPS[node_id]

    def others(self, node_id: int) -> list[str]:
        return [ip for i, ip in NODE_IPS.items() if i != node_id]

    def heal_and_wait(self, timeout: float = 90.0) -> int:
        """Removes every fault, starts any stopped node, waits until all are
        ready under one leader; returns the leader."""
        self.fw.heal()
        for nd in self.cluster:
            if not nd.running():
                self.cluster.start_node(nd.id, wait=False)
        return self.cluster.wait_ready(timeout=timeout)

    def logs(self, max_chars: int = 8000) -> str:
        parts = []
        if self.cluster is not None:
            parts.append(self.cluster.logs(max_chars))
        if self.postfix is not None and self.postfix.maillog.exists():
            parts.append("----- postfix maillog -----\n" + self.postfix.maillog.read_text(errors="replace")[-max_chars:])
        return "\n".join(parts)

    def close(self):
        """Stops everything this lab started and removes the namespace. Never raises."""
        steps = [
            lambda: self.postfix and self.postfix.stop(),
            lambda: self.cluster and self.cluster.cleanup(),
            lambda: self.sink and self.sink.stop(),
            lambda: self.target and self.target.stop(),
            lambda: self.nsd and self.nsd.stop(),
            lambda: self.fw and self.fw.close(),
        ]
        for step in steps:
            try:
                step()
            except Exception:  # noqa: BLE001 - best effort; the namespace goes next
                pass
        self.netns.close()
        if not self.keep:
            shutil.rmtree(self.base, ignore_errors=True)
