#!/usr/bin/env python3
"""Run a local N-node tempalias cluster on loopback addresses.

Command line (see `python3 cluster/launch.py --help`):

    python3 cluster/launch.py start            # 3 nodes on 127.0.0.1-3, waits until ready
    python3 cluster/launch.py status           # processes, readiness, Raft role/term/applied
    python3 cluster/launch.py kill 1           # kill -9 node 1
    python3 cluster/launch.py restart 1        # start it again (it catches up)
    python3 cluster/launch.py stop             # SIGTERM every node (data is kept)

Library (used by tests/cluster and tests/bench):

    from launch import LocalCluster
    c = LocalCluster(dir, n=3, ports=free_ports(...), extra_config={...})
    c.start(); c.wait_ready()
    c.node(2).api                # "http://127.0.0.2:PORT"
    c.kill(c.leader_id())        # SIGKILL by default
    c.restart(1); c.stop()

Python 3.8+ standard library only. Everything binds to 127.0.0.0/8. Every wait
is a poll of an observable condition with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STATE_FILE = "cluster.json"
SECRET_FILE = "cluster.secret"
DEFAULT_DIR = "tempalias-cluster"
DEFAULT_PORTS = {"http": 8080, "smtp": 2525, "cluster": 7001}
DOMAIN = "tempalias.test"
READY_TIMEOUT = 60.0
# The role `tempalias cluster status` reports for a leader no quorum has
# acknowledged lately (it answers /readyz with 503).
LEADER_WITHOUT_QUORUM = "leader without quorum"
STOP_TIMEOUT = 45.0


class LaunchError(Exception):
    """Something the user can fix; the CLI prints it without a traceback."""


# --------------------------------------------------------------------------- helpers


def find_binary(explicit: str | os.PathLike | None = None) -> Path:
    """The tempalias binary: `explicit`, else $TEMPALIAS_BIN, else
    target/release/tempalias, else target/debug/tempalias (in this repository).
    When both builds exist and the debug one is newer, the debug one is used, so
    a stale release build never hides a fresh debug build."""
    if explicit or os.environ.get("TEMPALIAS_BIN"):
        candidates = [Path(explicit or os.environ["TEMPALIAS_BIN"])]
    else:
        release = REPO / "target" / "release" / "tempalias"
        debug = REPO / "target" / "debug" / "tempalias"
        candidates = [release, debug]
        if release.is_file() and debug.is_file() and debug.stat().st_mtime > release.stat().st_mtime:
            candidates = [debug, release]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c.resolve()
    raise LaunchError(
        "no tempalias binary found (looked at "
        + ", ".join(str(c) for c in candidates)
        + "); build it with `cargo build --release` or pass --binary"
    )


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Polls `pred` until it returns a truthy value; raises TimeoutError after
    `timeout` s. Exceptions from `pred` count as "not yet", except LaunchError,
    which is passed on at once."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except LaunchError:
            raise  # fatal (a node exited): no point in waiting further
        except Exception as e:  # noqa: BLE001 - reported below
            last_exc = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


def node_ip(node_id: int, one_address: bool = False) -> str:
    """127.0.0.N for node N (all of 127.0.0.0/8 routes to lo on Linux)."""
    if one_address:
        return "127.0.0.1"
    if not 1 <= node_id <= 254:
        raise LaunchError(f"node id {node_id} does not map to a 127.0.0.x address")
    return f"127.0.0.{node_id}"


def port_is_free(ip: str, port: int) -> bool:
    """True when a node could listen on ip:port now. The probe binds as the
    node does (tokio sets SO_REUSEADDR on listeners), so connections of a node
    that just stopped, still in TIME_WAIT, do not count as "in use"; only a
    socket that is really bound there does."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
            return True
        except OSError:
            return False


def free_ports(ips, count: int = 3, attempts: int = 200) -> list[int]:
    """`count` distinct ports each free on every address in `ips` a moment ago
    (bind port 0 on the first address, check the others, close)."""
    ips = list(ips)
    found: list[int] = []
    for _ in range(attempts):
        if len(found) == count:
            break
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ips[0], 0))
            port = s.getsockname()[1]
        if port not in found and all(port_is_free(ip, port) for ip in ips):
            found.append(port)
    if len(found) < count:
        raise LaunchError(f"could not find {count} ports free on {ips}")
    return found


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (str, Path)):
        return json.dumps(str(v))
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {toml_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {v!r} as TOML")


def toml_dumps(config: dict) -> str:
    """A two-level config: top-level keys, then one [section] per dict value."""
    lines = [f"{k} = {toml_value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for section, table in config.items():
        if isinstance(table, dict):
            lines += ["", f"[{section}]"] + [f"{k} = {toml_value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def deep_merge(base: dict, over: dict) -> dict:
    """`over` applied on `base`; inline tables such as initial_members are replaced."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "initial_members":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set(items) -> dict:
    """["smtp.failed_rcpt_delay_ms=0", ...] -> {"smtp": {"failed_rcpt_delay_ms": 0}}.
    Values are JSON when they parse as JSON (numbers, true, arrays), else strings."""
    out: dict = {}
    for item in items or ():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise LaunchError(f"--set {item!r}: expected SECTION.KEY=VALUE")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        parts = key.split(".")
        if len(parts) > 2:
            raise LaunchError(f"--set {item!r}: keys are KEY or SECTION.KEY")
        if len(parts) == 1:
            out[parts[0]] = value
        else:
            out.setdefault(parts[0], {})[parts[1]] = value
    return out


def child_env() -> dict:
    """The environment for nodes and CLI calls: no TEMPALIAS_* variable leaks in
    (the node would read it as a config override, and refuse unknown ones)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TEMPALIAS_")}


def _load_prctl():
    """libc's prctl, loaded in the parent: the child must not import anything
    between fork and exec (another thread may hold the import lock)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None


_PRCTL = _load_prctl()


def _die_with_parent():  # pragma: no cover - runs in the child
    """Linux: the node gets SIGKILL when the thread that started it exits, so a
    crashed test run does not leave nodes behind."""
    if _PRCTL is not None:
        _PRCTL(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        try:
            # A zombie (state Z) has exited; its parent has not reaped it yet.
            return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except (OSError, IndexError):
            return True
    return True


def pid_is_node(pid: int | None, config_path: Path) -> bool:
    """True when `pid` is alive and (where /proc tells) runs with `config_path`,
    so a recycled pid is never signalled."""
    if not pid_alive(pid):
        return False
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return str(config_path) in cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            return False
    return True


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


# --------------------------------------------------------------------------- nodes


class LocalNode:
    """One node of a LocalCluster: its addresses, files and process."""

    def __init__(self, cluster: "LocalCluster", node_id: int, ip: str, ports: dict, extra_config: dict | None = None):
        self.cluster = cluster
        self.id = node_id
        self.ip = ip
        self.http_port = ports["http"]
        self.smtp_port = ports["smtp"]
        self.cluster_port = ports["cluster"]
        self.extra_config = dict(extra_config or {})
        self.dir = cluster.dir / f"node{node_id}"
        self.data_dir = self.dir / "data"
        self.config_path = self.dir / "config.toml"
        self.log_path = self.dir / "node.log"
        self.proc: subprocess.Popen | None = None
        self.pid: int | None = None
        self.removed = False

    # ---- addresses

    @property
    def http_addr(self) -> str:
        return f"{self.ip}:{self.http_port}"

    @property
    def api(self) -> str:
        return f"http://{self.http_addr}"

    @property
    def smtp_addr(self) -> tuple[str, int]:
        return (self.ip, self.smtp_port)

    @property
    def cluster_addr(self) -> str:
        return f"{self.ip}:{self.cluster_port}"

    @property
    def capture_dir(self) -> Path:
        return self.dir / "outbox"

    @property
    def name(self) -> str:
        return f"node{self.id}"

    def __repr__(self):
        return f"<LocalNode {self.id} http={self.http_addr} smtp={self.ip}:{self.smtp_port} cluster={self.cluster_addr}>"

    # ---- config

    def config(self, members: dict) -> dict:
        base = {
            "node_id": self.id,
            "data_dir": str(self.data_dir),
            "domains": [DOMAIN],
            "http": {"listen": self.http_addr},
            "smtp": {"listen": f"{self.ip}:{self.smtp_port}", "hostname": f"mx{self.id}.{DOMAIN}"},
            "relay": {"mode": "capture", "capture_dir": str(self.capture_dir)},
            "cluster": {
                "listen": self.cluster_addr,
                "initial_members": {str(k): v for k, v in sorted(members.items())},
                "secret_file": str(self.cluster.secret_path),
            },
        }
        return deep_merge(deep_merge(base, self.cluster.extra_config), self.extra_config)

    def write_config(self, members: dict):
        self.dir.mkdir(parents=True, exist_ok=True)
        text = "# Written by cluster/launch.py; rewritten on every start.\n" + toml_dumps(self.config(members))
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.config_path)

    # ---- process

    def running(self) -> bool:
        if self.proc is not None:
            return self.proc.poll() is None
        return pid_is_node(self.pid, self.config_path)

    def start(self):
        """Starts the process (config must have been written); does not wait."""
        if self.running():
            raise LaunchError(f"{self.name} is already running (pid {self.pid})")
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        try:
            log.write(f"\n===== launch.py: starting {self.name} at {time.strftime('%Y-%m-%d %H:%M:%S')} =====\n".encode())
            log.flush()
            env = child_env()
            # Test hook: a node directory holding `test-clock-offset` (seconds)
            # runs that node with its clock shifted by that much.
            offset_file = self.dir / "test-clock-offset"
            if offset_file.exists():
                env["TEMPALIAS_TEST_CLOCK_OFFSET_FILE"] = str(offset_file)
            self.proc = subprocess.Popen(
                [str(self.cluster.binary), "serve", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
                cwd=str(self.dir),
                start_new_session=True,
                preexec_fn=_die_with_parent if (self.cluster.die_with_parent and _PRCTL is not None) else None,
            )
        finally:
            log.close()
        self.pid = self.proc.pid

    def signal(self, sig: int = signal.SIGKILL):
        if not self.running():
            raise LaunchError(f"{self.name} is not running")
        os.kill(self.pid, sig)

    def wait_exit(self, timeout: float) -> int | None:
        """Waits for the process to exit; returns its exit code when known."""
        if self.proc is not None:
            try:
                return self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{self.name} still running {timeout:.0f}s after the signal")
        wait_until(lambda: not pid_alive(self.pid), timeout, f"{self.name} (pid {self.pid}) to exit")
        return None

    def returncode(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    # ---- probes

    def readyz(self, timeout: float = 2.0) -> int:
        """HTTP status of /readyz (0 when the node does not answer)."""
        try:
            return http_get(self.api + "/readyz", timeout)[0]
        except OSError:
            return 0

    def metrics(self, timeout: float = 5.0) -> str:
        status, body = http_get(self.api + "/metrics", timeout)
        if status != 200:
            raise RuntimeError(f"{self.name} /metrics answered {status}")
        return body.decode()

    def metric(self, name: str, labels: dict | None = None, default: float | None = None) -> float | None:
        """One sample from /metrics (first whose labels include `labels`)."""
        for line in self.metrics().splitlines():
            if not line.startswith(name) or line.startswith("#"):
                continue
            head, _, value = line.rpartition(" ")
            metric, _, lbl = head.partition("{")
            if metric != name:
                continue
            got = {}
            for part in lbl.rstrip("}").split(","):
                if "=" in part:
                    k, v = part.split("=", 1)
                    got[k.strip()] = v.strip().strip('"')
            if all(got.get(k) == str(v) for k, v in (labels or {}).items()):
                return float(value)
        return default

    def log_tail(self, max_chars: int = 20000) -> str:
        if not self.log_path.exists():
            return ""
        text = self.log_path.read_text(errors="replace")
        return text if len(text) <= max_chars else "...\n" + text[-max_chars:]

    def to_state(self) -> dict:
        return {
            "id": self.id,
            "ip": self.ip,
            "ports": {"http": self.http_port, "smtp": self.smtp_port, "cluster": self.cluster_port},
            "pid": self.pid if self.running() else None,
            "removed": self.removed,
            "extra_config": self.extra_config,
        }


# --------------------------------------------------------------------------- cluster


class LocalCluster:
    """N tempalias nodes on 127.0.0.1..N (or one address with consecutive ports).

    `ports` is {"http": P, "smtp": P, "cluster": P}: with one address per node
    every node uses the same ports; with `one_address=True` node N uses P+N-1.
    `extra_config` is merged into every node's config (nested dicts, e.g.
    {"cluster": {"snapshot_after_entries": 20}, "smtp": {"failed_rcpt_delay_ms": 0}}).
    `die_with_parent` (Linux) kills a node when the thread that started it
    exits (PR_SET_PDEATHSIG), so start nodes from the main thread; the CLI
    turns it off so nodes outlive `launch.py start`.
    """

    def __init__(
        self,
        directory,
        n: int = 3,
        binary=None,
        ports: dict | None = None,
        one_address: bool = False,
        extra_config: dict | None = None,
        die_with_parent: bool = True,
    ):
        if n < 1:
            raise LaunchError("a cluster needs at least one node")
        self.dir = Path(directory).resolve()
        self.binary = find_binary(binary)
        self.ports = dict(DEFAULT_PORTS, **(ports or {}))
        self.one_address = one_address
        self.extra_config = dict(extra_config or {})
        self.die_with_parent = die_with_parent
        self.nodes: dict[int, LocalNode] = {}
        self.members: dict[int, str] = {}
        for i in range(1, n + 1):
            self._new_node(i)
        self.members = {i: nd.cluster_addr for i, nd in self.nodes.items()}

    # ---- construction and persistence

    def _new_node(self, node_id: int, extra_config: dict | None = None) -> LocalNode:
        offset = node_id - 1 if self.one_address else 0
        ports = {k: v + offset for k, v in self.ports.items()}
        node = LocalNode(self, node_id, node_ip(node_id, self.one_address), ports, extra_config)
        self.nodes[node_id] = node
        return node

    @property
    def secret_path(self) -> Path:
        return self.dir / SECRET_FILE

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def save_state(self):
        state = {
            "binary": str(self.binary),
            "ports": self.ports,
            "one_address": self.one_address,
            "extra_config": self.extra_config,
            "members": {str(k): v for k, v in self.members.items()},
            "nodes": [nd.to_state() for nd in self.nodes.values()],
        }
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        os.replace(tmp, self.state_path)

    @classmethod
    def load(cls, directory, binary=None, die_with_parent: bool = False) -> "LocalCluster":
        """Reopens a cluster directory written by an earlier start."""
        directory = Path(directory)
        path = directory / STATE_FILE
        if not path.exists():
            raise LaunchError(f"no cluster in {directory} (no {STATE_FILE}); run `launch.py start` first")
        state = json.loads(path.read_text())
        self = cls.__new__(cls)
        self.dir = directory.resolve()
        if binary:
            self.binary = find_binary(binary)
        elif Path(state["binary"]).is_file():
            self.binary = Path(state["binary"])
        else:
            self.binary = find_binary()
        self.ports = state["ports"]
        self.one_address = state["one_address"]
        self.extra_config = state.get("extra_config", {})
        self.die_with_parent = die_with_parent
        self.nodes = {}
        for s in state["nodes"]:
            node = LocalNode(self, s["id"], s["ip"], s["ports"], s.get("extra_config"))
            node.pid = s.get("pid")
            node.removed = s.get("removed", False)
            self.nodes[node.id] = node
        self.members = {int(k): v for k, v in state["members"].items()}
        return self

    def ensure_secret(self):
        if self.secret_path.exists():
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.secret_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(24) + "\n")

    # ---- access

    def node(self, node_id: int) -> LocalNode:
        return self.nodes[node_id]

    def __iter__(self):
        return iter(self.nodes.values())

    def running_nodes(self) -> list[LocalNode]:
        return [nd for nd in self.nodes.values() if nd.running()]

    # ---- lifecycle

    def start(self, wait: bool = True, timeout: float = READY_TIMEOUT):
        """Writes configs and the secret, starts every node that is not running
        (and not removed), and by default waits until all are ready."""
        self.ensure_secret()
        started = []
        for nd in self.nodes.values():
            if nd.removed or nd.running():
                continue
            nd.write_config(self._members_for(nd))
            nd.start()
            started.append(nd)
        self.save_state()
        if wait:
            self.wait_ready(timeout=timeout)
        return started

    def _members_for(self, nd: LocalNode) -> dict:
        members = dict(self.members)
        members.setdefault(nd.id, nd.cluster_addr)
        return members

    def start_node(self, node_id: int, wait: bool = True, timeout: float = READY_TIMEOUT):
        nd = self.nodes[node_id]
        nd.write_config(self._members_for(nd))
        nd.start()
        self.save_state()
        if wait:
            self.wait_node_ready(node_id, timeout=timeout)
        return nd

    def stop_node(self, node_id: int, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM (graceful: drain, hand over leadership) and wait for the exit."""
        nd = self.nodes[node_id]
        if not nd.running():
            return nd.returncode()
        nd.signal(signal.SIGTERM)
        try:
            rc = nd.wait_exit(timeout)
        except TimeoutError:
            nd.signal(signal.SIGKILL)
            nd.wait_exit(10)
            self.save_state()
            raise
        self.save_state()
        return rc

    def kill(self, node_id: int, sig: int = signal.SIGKILL, wait: bool = True, timeout: float = STOP_TIMEOUT):
        """Sends `sig` (default SIGKILL) to a node; waits for it to exit unless told not to."""
        nd = self.nodes[node_id]
        nd.signal(sig)
        rc = nd.wait_exit(timeout) if wait else None
        self.save_state()
        return rc

    def restart(self, node_id: int, wait: bool = True, timeout: float = READY_TIMEOUT):
        """Stops the node gracefully if it runs, then starts it again."""
        if self.nodes[node_id].running():
            self.stop_node(node_id)
        return self.start_node(node_id, wait=wait, timeout=timeout)

    def stop(self, timeout: float = STOP_TIMEOUT) -> dict:
        """SIGTERM to every running node at once, then waits; returns exit codes."""
        running = self.running_nodes()
        for nd in running:
            try:
                nd.signal(signal.SIGTERM)
            except (LaunchError, ProcessLookupError):
                pass
        codes = {}
        deadline = time.monotonic() + timeout
        for nd in running:
            try:
                codes[nd.id] = nd.wait_exit(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                nd.signal(signal.SIGKILL)
                nd.wait_exit(10)
                codes[nd.id] = "killed after timeout"
        self.save_state()
        return codes

    def cleanup(self):
        """SIGKILL whatever still runs (for test finalizers); never raises."""
        for nd in self.nodes.values():
            try:
                if nd.running():
                    os.kill(nd.pid, signal.SIGKILL)
                    nd.wait_exit(10)
            except Exception:  # noqa: BLE001
                pass
        try:
            self.save_state()
        except OSError:
            pass

    # ---- readiness

    def wait_node_ready(self, node_id: int, timeout: float = READY_TIMEOUT):
        nd = self.nodes[node_id]

        def ready():
            if not nd.running():
                raise LaunchError(f"{nd.name} exited with {nd.returncode()}; see {nd.log_path}:\n{nd.log_tail(4000)}")
            return nd.readyz() == 200

        try:
            wait_until(ready, timeout, f"{nd.name} /readyz")
        except TimeoutError as e:
            raise TimeoutError(f"{e}\n--- {nd.log_path} ---\n{nd.log_tail(4000)}") from None
        return nd

    def wait_ready(self, timeout: float = READY_TIMEOUT, nodes=None):
        """Waits until every running (or given) node answers /readyz 200 and
        all of them name the same leader."""
        deadline = time.monotonic() + timeout
        targets = [self.nodes[i] for i in nodes] if nodes is not None else self.running_nodes()
        for nd in targets:
            self.wait_node_ready(nd.id, timeout=max(0.1, deadline - time.monotonic()))

        def agreed():
            leaders = {nd.metric("tempalias_raft_leader_id") for nd in targets}
            return len(leaders) == 1 and leaders != {0.0} and leaders != {None}

        wait_until(agreed, max(0.1, deadline - time.monotonic()), "all nodes to agree on a leader")
        return self.leader_id(nodes=[nd.id for nd in targets])

    def leader_id(self, nodes=None) -> int | None:
        """The leader as seen by the first node that reports one in /metrics."""
        targets = [self.nodes[i] for i in nodes] if nodes is not None else self.running_nodes()
        for nd in targets:
            try:
                if nd.metric("tempalias_raft_is_leader") == 1.0:
                    return nd.id
            except OSError:
                continue
        for nd in targets:
            try:
                lid = nd.metric("tempalias_raft_leader_id")
                if lid:
                    return int(lid)
            except OSError:
                continue
        return None

    def wait_leader(self, among=None, exclude=(), timeout: float = 30.0) -> int:
        """Waits until a node of `among` (default: running ones) other than
        `exclude` leads and reports a recent quorum ack (/readyz 200)."""

        def found():
            candidates = [self.nodes[i] for i in among] if among is not None else self.running_nodes()
            for nd in candidates:
                if nd.id in exclude:
                    continue
                try:
                    if nd.metric("tempalias_raft_is_leader") == 1.0 and nd.readyz() == 200:
                        return nd.id
                except OSError:
                    continue
            return None

        return wait_until(found, timeout, "a leader")

    # ---- the cluster CLI

    def cli(self, *args, via: int | None = None, config: Path | None = None, timeout: float = 120.0) -> subprocess.CompletedProcess:
        """Runs `tempalias cluster --config NODE_CONFIG --node NODE_ADDR ARGS...`
        against node `via` (default: the first running node)."""
        if via is None:
            running = self.running_nodes()
            if not running:
                raise LaunchError("no node is running")
            via = running[0].id
        nd = self.nodes[via]
        cmd = [str(self.binary), "cluster", "--config", str(config or nd.config_path), "--node", nd.cluster_addr, *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=timeout)

    def status(self, via: int | None = None) -> list[dict]:
        """`tempalias cluster status --json` as parsed JSON (one entry per member)."""
        r = self.cli("status", "--json", via=via, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"cluster status failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def add_node(self, node_id: int | None = None, promote: bool = True, timeout: float = 120.0, extra_config: dict | None = None) -> LocalNode:
        """Starts a new node (its initial_members: the current members plus
        itself, so it never initialises a cluster of its own), adds it as a
        learner (returns once it caught up) and, by default, promotes it."""
        node_id = node_id or max(self.nodes) + 1
        if node_id in self.nodes and not self.nodes[node_id].removed:
            raise LaunchError(f"node {node_id} already exists")
        via = next((nd.id for nd in self.running_nodes()), None)
        if via is None:
            raise LaunchError("no node is running to add the new one through")
        nd = self._new_node(node_id, extra_config)
        self.ensure_secret()
        nd.write_config(self._members_for(nd))
        nd.start()
        self.save_state()
        wait_until(lambda: nd.running() and http_get(nd.api + "/healthz")[0] == 200, 30, f"{nd.name} /healthz")
        r = self.cli("add-learner", node_id, nd.cluster_addr, via=via, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"add-learner {node_id} failed: {r.stdout}{r.stderr}")
        if promote:
            r = self.cli("promote", node_id, via=via, timeout=timeout)
            if r.returncode != 0:
                raise RuntimeError(f"promote {node_id} failed: {r.stdout}{r.stderr}")
        self.members[node_id] = nd.cluster_addr
        self.save_state()
        return nd

    def remove_node(self, node_id: int, stop: bool = True, via: int | None = None, timeout: float = 120.0):
        """`tempalias cluster remove ID` through another node, then (by default)
        stops the removed node."""
        if via is None:
            via = next((nd.id for nd in self.running_nodes() if nd.id != node_id), None)
        if via is None:
            raise LaunchError("no other node is running to remove it through")
        r = self.cli("remove", node_id, via=via, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"remove {node_id} failed: {r.stdout}{r.stderr}")
        self.members.pop(node_id, None)
        self.nodes[node_id].removed = True
        self.save_state()
        if stop and self.nodes[node_id].running():
            self.stop_node(node_id)
        return r

    def captured(self) -> list[Path]:
        """Every forwarded message (.eml) in every node's capture directory."""
        out = []
        for nd in self.nodes.values():
            if nd.capture_dir.exists():
                out += sorted(nd.capture_dir.glob("*.eml"))
        return out

    def logs(self, max_chars: int = 20000) -> str:
        return "\n".join(f"----- {nd.name} ({nd.log_path}) -----\n{nd.log_tail(max_chars)}" for nd in self.nodes.values())


# --------------------------------------------------------------------------- CLI


def _describe(c: LocalCluster) -> str:
    lines = [f"{'node':>4}  {'pid':>7}  {'HTTP API':<24} {'SMTP':<18} {'cluster':<18} log"]
    for nd in c:
        pid = str(nd.pid) if nd.running() else "-"
        lines.append(
            f"{nd.id:>4}  {pid:>7}  {nd.api:<24} {nd.ip + ':' + str(nd.smtp_port):<18} {nd.cluster_addr:<18} {nd.log_path}"
        )
    return "\n".join(lines)


def cmd_start(args) -> int:
    directory = Path(args.dir)
    if args.fresh and (directory / STATE_FILE).exists():
        c = LocalCluster.load(directory, args.binary)
        if c.running_nodes():
            raise LaunchError(f"nodes in {directory} are running; `launch.py stop --dir {directory}` first")
        shutil.rmtree(directory)
    if (directory / STATE_FILE).exists():
        c = LocalCluster.load(directory, args.binary)
        if args.binary:
            c.binary = find_binary(args.binary)
        print(f"resuming the cluster in {c.dir} (use --fresh to start over)")
    else:
        if directory.exists() and any(directory.iterdir()):
            raise LaunchError(f"{directory} exists and is not a launch.py cluster directory")
        ports = {"http": args.http_port, "smtp": args.smtp_port, "cluster": args.cluster_port}
        c = LocalCluster(
            directory,
            n=args.nodes,
            binary=args.binary,
            ports=ports,
            one_address=args.one_address,
            extra_config=parse_set(args.set),
            die_with_parent=False,
        )
        busy = [f"{nd.ip}:{p}" for nd in c for p in (nd.http_port, nd.smtp_port, nd.cluster_port) if not port_is_free(nd.ip, p)]
        if busy:
            raise LaunchError("address(es) in use: " + ", ".join(busy) + " (another cluster running? pick other ports with --http-port/--smtp-port/--cluster-port)")
    c.die_with_parent = False
    print(f"binary {c.binary}")
    c.start(wait=False)
    try:
        leader = c.wait_ready(timeout=args.timeout)
    except (TimeoutError, LaunchError) as e:
        print(_describe(c))
        raise LaunchError(f"{e}\nnodes left running; `launch.py stop --dir {c.dir}` stops them")
    print(_describe(c))
    print(f"\nready: {len(c.running_nodes())} node(s), leader node {leader}")
    print(f"forwarded mail is captured in {c.dir}/node*/outbox")
    first = c.running_nodes()[0]
    print(
        "\ntry:\n"
        f"  curl -s -H 'Content-Type: application/json' --data '{{\"target\":\"me@example.net\",\"days\":3,\"max-usage\":2}}' {first.api}/v1/aliases\n"
        f"  python3 {sys.argv[0]} status --dir {args.dir}"
    )
    return 0


def cmd_stop(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    if args.node:
        for i in args.node:
            rc = c.stop_node(i)
            print(f"node {i} stopped" + (f" (exit {rc})" if rc is not None else ""))
        return 0
    if not c.running_nodes():
        print("no node is running")
        return 0
    codes = c.stop(timeout=args.timeout)
    for i, rc in codes.items():
        print(f"node {i} stopped" + (f" (exit {rc})" if rc is not None else ""))
    print(f"data kept in {c.dir}; `launch.py start --dir {args.dir}` resumes, or delete the directory")
    return 0


def cmd_status(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    raft = None
    if c.running_nodes():
        for nd in c.running_nodes():
            try:
                raft = c.status(via=nd.id)
                break
            except Exception:  # noqa: BLE001
                continue
    by_id = {r["id"]: r for r in raft or []}
    if args.json:
        out = []
        for nd in c:
            out.append(
                {
                    "id": nd.id,
                    "pid": nd.pid if nd.running() else None,
                    "running": nd.running(),
                    "removed": nd.removed,
                    "ready": nd.readyz() == 200 if nd.running() else False,
                    "http": nd.api,
                    "smtp": f"{nd.ip}:{nd.smtp_port}",
                    "cluster": nd.cluster_addr,
                    "log": str(nd.log_path),
                    "raft": by_id.get(nd.id),
                }
            )
        print(json.dumps(out, indent=2))
        return 0
    print(f"cluster in {c.dir}  (binary {c.binary})")
    print(f"{'node':>4}  {'process':<14} {'ready':<6} {'role':<21} {'term':>5} {'applied':>8}  {'HTTP API':<24} {'SMTP':<18} cluster")
    for nd in c:
        proc = f"pid {nd.pid}" if nd.running() else ("removed" if nd.removed else "stopped")
        ready = ("yes" if nd.readyz() == 200 else "no") if nd.running() else "-"
        entry = by_id.get(nd.id, {})
        r = entry.get("status") or {}
        role = entry.get("role") or r.get("state", "-")
        term = r.get("term", "-")
        applied = r.get("last_applied", "-")
        print(f"{nd.id:>4}  {proc:<14} {ready:<6} {role:<21} {term!s:>5} {applied!s:>8}  {nd.api:<24} {nd.ip + ':' + str(nd.smtp_port):<18} {nd.cluster_addr}")
    if raft:
        # One truth with the nodes' own /readyz: a leader that no quorum has
        # acknowledged lately cannot commit anything and is not "the leader".
        leading = [r["id"] for r in raft if r.get("role", (r.get("status") or {}).get("state")) == "Leader"]
        stranded = [r["id"] for r in raft if r.get("role") == LEADER_WITHOUT_QUORUM]
        believed = sorted({r["status"]["leader"] for r in raft if r.get("status") and r["status"].get("leader")})
        if leading:
            print(f"leader: node {', '.join(map(str, leading))}")
        elif stranded:
            print(
                f"leader: none with a quorum; node {', '.join(map(str, stranded))} is a {LEADER_WITHOUT_QUORUM} "
                "(it cannot commit: writes get 503 and RCPTs 451 until a majority runs again)"
            )
        else:
            print("leader: none right now (election under way?)" + (f"; nodes last heard from node {', '.join(map(str, believed))}" if believed else ""))
    elif c.running_nodes():
        print("leader: unknown (no node answered `tempalias cluster status`)")
    return 0


def cmd_kill(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    name = args.signal.upper()
    sig = getattr(signal, name if name.startswith("SIG") else "SIG" + name, None)
    if sig is None:
        raise LaunchError(f"unknown signal {args.signal}")
    for i in args.node:
        if i not in c.nodes:
            raise LaunchError(f"no node {i}")
        c.kill(i, sig, wait=sig in (signal.SIGKILL, signal.SIGTERM))
        print(f"node {i}: sent {sig.name}")
    return 0


def cmd_restart(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    for i in args.node:
        if i not in c.nodes:
            raise LaunchError(f"no node {i}")
        c.restart(i, wait=True, timeout=args.timeout)
        print(f"node {i} running again (pid {c.node(i).pid}) and ready")
    return 0


def cmd_add(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    nd = c.add_node(args.id, promote=not args.learner)
    print(f"node {nd.id} added as {'learner' if args.learner else 'voter'}: {nd.api}, smtp {nd.ip}:{nd.smtp_port}, cluster {nd.cluster_addr}")
    return 0


def cmd_remove(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    c.remove_node(args.node, stop=not args.keep_running)
    print(f"node {args.node} removed from the cluster" + ("" if args.keep_running else " and stopped"))
    return 0


def cmd_ctl(args) -> int:
    c = LocalCluster.load(args.dir, args.binary)
    rest = list(args.args)
    if rest[:1] == ["--"]:
        rest = rest[1:]
    if not rest:
        raise LaunchError("give the `tempalias cluster` arguments, e.g. `ctl status`")
    r = c.cli(*rest, via=args.via)
    sys.stdout.write(r.stdout)
    sys.stderr.write(r.stderr)
    return r.returncode


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="launch.py",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a local tempalias cluster: N nodes on loopback addresses 127.0.0.1..N,\n"
        "each with the same ports (HTTP 8080, SMTP 2525, cluster RPC 7001 by default).",
        epilog="""\
files (in --dir, default ./tempalias-cluster):
  cluster.json          state: binary, ports, members, pids (so later commands find the nodes)
  cluster.secret        the generated shared cluster secret (mode 0600)
  nodeN/config.toml     node N's configuration (rewritten on every start)
  nodeN/data/           node N's database (Raft log, state machine, snapshots)
  nodeN/node.log        node N's output (stdout and stderr)
  nodeN/outbox/         mail node N forwarded (capture relay: NAME.eml + NAME.json)

examples:
  python3 cluster/launch.py start                   # 3 nodes, waits until ready
  python3 cluster/launch.py status
  python3 cluster/launch.py kill 1                  # kill -9 node 1; the others elect a leader
  python3 cluster/launch.py restart 1               # node 1 comes back and catches up
  python3 cluster/launch.py add                     # node 4: add-learner, then promote
  python3 cluster/launch.py remove 4                # take it out again and stop it
  python3 cluster/launch.py ctl status              # `tempalias cluster status` with the secret
  python3 cluster/launch.py stop                    # graceful stop of every node (data kept)

Linux routes all of 127.0.0.0/8 to lo, so 127.0.0.2 and up need no setup. On
systems where they are not configured (macOS), use --one-address: every node on
127.0.0.1, node N on ports base+N-1.

The binary is --binary, else $TEMPALIAS_BIN, else target/release/tempalias
(build it with `cargo build --release`), else target/debug/tempalias; when both
builds exist, the newer one.
""",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def common(sp):
        sp.add_argument("--dir", default=DEFAULT_DIR, help="cluster directory (default: %(default)s)")
        sp.add_argument("--binary", help="tempalias binary (default: $TEMPALIAS_BIN, target/release, target/debug)")

    s = sub.add_parser("start", help="create and start a cluster (or start the stopped nodes of an existing one) and wait until ready",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    common(s)
    s.add_argument("-n", "--nodes", type=int, default=3, help="number of nodes (for a new cluster)")
    s.add_argument("--http-port", type=int, default=DEFAULT_PORTS["http"], help="HTTP API port")
    s.add_argument("--smtp-port", type=int, default=DEFAULT_PORTS["smtp"], help="SMTP port")
    s.add_argument("--cluster-port", type=int, default=DEFAULT_PORTS["cluster"], help="cluster RPC (gRPC) port")
    s.add_argument("--one-address", action="store_true", help="all nodes on 127.0.0.1, node N on port+N-1")
    s.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                   help="extra config for every node, e.g. --set smtp.failed_rcpt_delay_ms=0 --set cluster.snapshot_after_entries=100 (repeatable)")
    s.add_argument("--fresh", action="store_true", help="delete an existing (stopped) cluster directory first")
    s.add_argument("--timeout", type=float, default=READY_TIMEOUT, help="seconds to wait for readiness")
    s.set_defaults(func=cmd_start)

    s = sub.add_parser("stop", help="stop nodes gracefully with SIGTERM (all, or the given ones); data is kept")
    common(s)
    s.add_argument("node", type=int, nargs="*", help="node ids (default: all)")
    s.add_argument("--timeout", type=float, default=STOP_TIMEOUT, help="seconds before SIGKILL (default: %(default)s)")
    s.set_defaults(func=cmd_stop)

    s = sub.add_parser("status", help="show each node: process, readiness, Raft role, term, applied index, addresses")
    common(s)
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("kill", help="send a signal to nodes (default SIGKILL: a crash)")
    common(s)
    s.add_argument("node", type=int, nargs="+")
    s.add_argument("-s", "--signal", default="KILL", help="signal name (default: %(default)s; TERM = graceful stop)")
    s.set_defaults(func=cmd_kill)

    s = sub.add_parser("restart", help="start nodes again (stopping them gracefully first if running) and wait until ready")
    common(s)
    s.add_argument("node", type=int, nargs="+")
    s.add_argument("--timeout", type=float, default=READY_TIMEOUT)
    s.set_defaults(func=cmd_restart)

    s = sub.add_parser("add", help="start a new node and add it to the cluster (add-learner, then promote)")
    common(s)
    s.add_argument("--id", type=int, help="node id (default: highest + 1)")
    s.add_argument("--learner", action="store_true", help="leave it a learner (no promote)")
    s.set_defaults(func=cmd_add)

    s = sub.add_parser("remove", help="remove a node from the cluster (`tempalias cluster remove`) and stop it")
    common(s)
    s.add_argument("node", type=int)
    s.add_argument("--keep-running", action="store_true", help="do not stop the removed node")
    s.set_defaults(func=cmd_remove)

    s = sub.add_parser("ctl", help="run `tempalias cluster ARGS` against a node, with the cluster's config and secret")
    common(s)
    s.add_argument("--via", type=int, help="node to ask (default: first running)")
    s.add_argument("args", nargs=argparse.REMAINDER, help="e.g. status | status --json | add-learner ID ADDR | promote ID | remove ID")
    s.set_defaults(func=cmd_ctl)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (LaunchError, TimeoutError, RuntimeError) as e:
        print(f"launch.py: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
