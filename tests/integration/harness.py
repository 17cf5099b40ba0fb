"""Test harness: run real `tempalias` nodes and real SMTP sinks on loopback.

Everything here talks to 127.0.0.1 only. Every wait is a bounded poll on an
observable condition (a port answering, /readyz saying 200, a file appearing),
never a fixed sleep used for synchronisation.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

# Beside this file: whoever imports harness has this directory on sys.path.
from peerkit import start_smtp_sink, stop_process, tool

REPO = Path(__file__).resolve().parents[2]
TARGET_DIR = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
if not TARGET_DIR.is_absolute():
    TARGET_DIR = REPO / TARGET_DIR
BIN = Path(os.environ.get("TEMPALIAS_BIN") or TARGET_DIR / "debug" / "tempalias")
DOMAIN = "tempalias.test"
HOSTNAME = "mx1.tempalias.test"
TARGET = "me@example.net"
SENDER = "someone@example.org"

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 45.0


def free_port() -> int:
    """A port that was free a moment ago (bind to 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout: float, what: str, interval: float = 0.05):
    """Polls `pred` until it returns a truthy value; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc = None
    while True:
        try:
            value = pred()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - reported below
            last_exc = e
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc!r})")
        time.sleep(interval)


def srs_of(addr: str, sender: str, domain: str = DOMAIN) -> bool:
    """True when `addr` is the SRS0 rewriting of `sender` into `domain`
    (SRS0=HASH=TT=sender-domain=sender-local@domain)."""
    local, _, dom = sender.rpartition("@")
    pattern = rf"SRS0=[A-Za-z0-9+/]{{6}}=[A-Z2-7]{{2}}={re.escape(dom)}={re.escape(local)}@{re.escape(domain)}"
    return re.fullmatch(pattern, addr) is not None


def clean_env(extra: dict | None = None) -> dict:
    """The current environment without TEMPALIAS_* / RUST_LOG leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPALIAS_") and k != "RUST_LOG"}
    if extra:
        env.update(extra)
    return env


# --------------------------------------------------------------------------- TOML

# The launcher's config writer serves the single-node tests too.
sys.path.insert(0, str(REPO / "cluster"))
from launch import deep_merge, toml_dumps  # noqa: E402



# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpResponse:
    status: int
    headers: dict
    body: bytes

    def json(self):
        return json.loads(self.body)

    def header(self, name: str):
        return self.headers.get(name.lower())


def http_request(url: str, method: str = "GET", body=None, headers: dict | None = None, timeout: float = 15.0) -> HttpResponse:
    """One HTTP request; never raises for HTTP error statuses."""
    data = None
    hdrs = dict(headers or {})
    if body is not None:
        if isinstance(body, (dict, list)):
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        elif isinstance(body, str):
            data = body.encode()
        else:
            data = body
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return HttpResponse(resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read())
    except urllib.error.HTTPError as e:
        return HttpResponse(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read())


# --------------------------------------------------------------------------- SMTP


class RawSMTP:
    """A byte-level SMTP client for what smtplib cannot do (pipelining, huge lines)."""

    def __init__(self, port: int, timeout: float = 30.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes | str):
        if isinstance(data, str):
            data = data.encode()
        self.sock.sendall(data)

    def _line(self) -> bytes:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"connection closed by server (buffered: {self.buf!r})")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return line.rstrip(b"\r")

    def reply(self) -> tuple[int, str]:
        """Reads one (possibly multi-line) reply: (code, text with lines joined by \\n)."""
        lines = []
        while True:
            line = self._line().decode("utf-8", "replace")
            lines.append(line)
            if len(line) < 4 or line[3] != "-":
                return int(line[:3]), "\n".join(l[4:] for l in lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.send(line + "\r\n")
        return self.reply()

    def closed_by_peer(self) -> bool:
        """True when the server has closed the connection (EOF after buffered data)."""
        try:
            chunk = self.sock.recv(1)
        except (ConnectionResetError, socket.timeout):
            return False
        return chunk == b""

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def message(subject: str, body: str = "Hello.\r\n", to: str = "alias", sender: str = SENDER) -> bytes:
    return (
        f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
        f"Message-ID: <{subject.replace(' ', '.')}@example.org>\r\n\r\n{body}"
    ).encode()


# --------------------------------------------------------------------------- Node


class Node:
    """One `tempalias serve` process with its own directory and ports."""

    def __init__(self, base: Path, name: str = "node", relay: str = "capture", smarthosts=(), config: dict | None = None):
        self.name = name
        self.dir = Path(base) / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_dir = self.dir / "data"
        self.capture_dir = self.dir / "outbox"
        self.clock_file = self.dir / "clock-offset"
        self.clock_file.write_text("0")
        self.stdout_path = self.dir / "stdout.log"
        self.stderr_path = self.dir / "stderr.log"
        self.config_path = self.dir / "tempalias.toml"
        self._relay, self._smarthosts, self._overrides = relay, smarthosts, config
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.ever_ready = False
        self._assign_ports()

    def _assign_ports(self):
        """Picks free ports and writes the configuration. A port found free
        can be taken by another socket before the node binds it, so a first
        start that fails with "Address already in use" picks again."""
        relay, smarthosts, config = self._relay, self._smarthosts, self._overrides
        self.http_port = free_port()
        self.smtp_port = free_port()
        self.cluster_port = free_port()
        cluster_addr = f"127.0.0.1:{self.cluster_port}"
        base_config = {
            "node_id": 1,
            "data_dir": str(self.data_dir),
            "domains": [DOMAIN],
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
            "smtp": {
                "listen": f"127.0.0.1:{self.smtp_port}",
                "hostname": HOSTNAME,
                "failed_rcpt_delay_ms": 0,
                "idle_timeout_secs": 30,
                "session_timeout_secs": 60,
            },
            "relay": {
                "mode": relay,
                "capture_dir": str(self.capture_dir),
                "smarthosts": list(smarthosts) or ["smtp://127.0.0.1:9"],
                "timeout_secs": 5,
                "delivery_timeout_secs": 20,
                # Must exceed the longest transaction: the session timeout
                # plus the relay's budget for one message.
                "reservation_lease_secs": 120,
            },
            "cluster": {"listen": cluster_addr, "initial_members": {"1": cluster_addr}},
            # Every test client is 127.0.0.1; test_ratelimit.py turns it on.
            "ratelimit": {"enabled": False},
            "log": {"level": "info,openraft=warn"},
        }
        self.config = deep_merge(base_config, config or {})
        self.config_path.write_text(toml_dumps(self.config))

    # ---- lifecycle

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def env(self) -> dict:
        return clean_env({"TEMPALIAS_TEST_CLOCK_OFFSET_FILE": str(self.clock_file), "NO_COLOR": "1"})

    def start(self, wait: bool = True) -> "Node":
        for attempt in range(3):
            self._spawn()
            if not wait:
                return self
            try:
                self.wait_ready()
            except AssertionError:
                lost_a_port = "Address already in use" in self.stderr_path.read_text(errors="replace").split("===== start #")[-1]
                if self.ever_ready or not lost_a_port or attempt == 2:
                    raise
                self._assign_ports()
                continue
            self.ever_ready = True
            return self
        return self

    def _spawn(self):
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.stdout_path, "ab") as out, open(self.stderr_path, "ab") as err:
            marker = f"\n===== start #{self.starts} =====\n".encode()
            out.write(marker)
            err.write(marker)
            out.flush()
            err.flush()
            self.proc = subprocess.Popen(
                [str(BIN), "serve", "--config", str(self.config_path)],
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=self.env(),
                cwd=self.dir,
            )

    def wait_ready(self, timeout: float = READY_TIMEOUT):
        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode} before it was ready:\n{self.logs()}")
            return http_request(self.api + "/readyz", timeout=2).status == 200

        deadline = time.monotonic() + timeout
        while True:
            try:
                if ready():
                    return
            except AssertionError:
                raise
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise AssertionError(f"{self.name} not ready within {timeout}s:\n{self.logs()}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = STOP_TIMEOUT) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise AssertionError(f"{self.name} did not stop within {timeout}s of SIGTERM")

    def kill9(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(timeout=10)

    def restart(self, kill: bool = False):
        if kill:
            self.kill9()
        else:
            rc = self.stop()
            assert rc == 0, f"{self.name} exited with {rc} after SIGTERM"
        self.start()

    def cleanup(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    def logs(self) -> str:
        parts = []
        for p in (self.stdout_path, self.stderr_path):
            if p.exists():
                text = p.read_text(errors="replace")
                if len(text) > 20000:
                    text = "...\n" + text[-20000:]
                parts.append(f"----- {self.name} {p.name} -----\n{text}")
        return "\n".join(parts)

    # ---- clock

    def set_clock(self, offset_secs: float):
        """Moves the node's test clock to `offset_secs` after the real time."""
        tmp = self.clock_file.with_suffix(".tmp")
        tmp.write_text(str(offset_secs))
        os.replace(tmp, self.clock_file)

    # ---- HTTP

    def http(self, method: str, path: str, body=None, headers=None) -> HttpResponse:
        return http_request(self.api + path, method=method, body=body, headers=headers)

    def create_alias(self, target: str = TARGET, days=None, max_usage=None, path: str = "/v1/aliases") -> dict:
        body = {"target": target}
        if days is not None:
            body["days"] = days
        if max_usage is not None:
            body["max-usage"] = max_usage
        r = self.http("POST", path, body)
        assert r.status == 201, f"create: {r.status} {r.body!r}"
        return r.json()

    def get_alias(self, alias: dict) -> dict:
        r = self.http("GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"})
        assert r.status == 200, f"show: {r.status} {r.body!r}"
        return r.json()

    def remaining(self, alias: dict) -> int:
        return self.get_alias(alias)["remaining"]

    def metrics(self) -> str:
        r = self.http("GET", "/metrics")
        assert r.status == 200, r
        return r.body.decode()

    # ---- SMTP

    def smtp(self, timeout: float = 30.0) -> smtplib.SMTP:
        s = smtplib.SMTP("127.0.0.1", self.smtp_port, local_hostname="client.example.org", timeout=timeout)
        return s

    def raw(self, timeout: float = 30.0) -> RawSMTP:
        return RawSMTP(self.smtp_port, timeout=timeout)

    def send(self, rcpts, msg: bytes, sender: str = SENDER):
        """Sends one message with smtplib; returns sendmail's refused dict."""
        with self.smtp() as s:
            return s.sendmail(sender, rcpts, msg)

    def rcpt_reply(self, rcpt: str, sender: str = SENDER) -> tuple[int, bytes]:
        """Opens a session, tries one RCPT, resets (releasing any reservation), quits."""
        with self.smtp() as s:
            s.ehlo()
            code, _ = s.mail(sender)
            assert code == 250
            reply = s.rcpt(rcpt)
            s.rset()
            return reply

    # ---- capture and /proc

    def captured(self) -> list[dict]:
        """Messages in the capture directory, oldest first: {'meta', 'eml', 'name'}."""
        out = []
        if not self.capture_dir.exists():
            return out
        for eml in sorted(self.capture_dir.glob("*.eml")):
            meta = json.loads(eml.with_suffix(".json").read_text())
            out.append({"name": eml.stem, "meta": meta, "eml": eml.read_bytes()})
        return out

    def proc_status(self, key: str) -> int:
        """A kB value from /proc/PID/status (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise KeyError(key)


# --------------------------------------------------------------------------- smtp-sink


def smtp_sink_path() -> str:
    return tool("smtp-sink", AssertionError)


@dataclass
class SinkMessage:
    mail_from: str
    rcpt_to: list[str]
    helo: str
    data: bytes
    path: Path = field(repr=False, default=None)


class SmtpSink:
    """Postfix's smtp-sink on 127.0.0.1 (or `host`, another loopback address),
    dumping each transaction to a file.

    `options` are extra smtp-sink flags, e.g. ["-f", ".", "-B", "554 5.7.1 no"]
    to refuse every message after its data with a hard error.
    """

    def __init__(self, base: Path, port: int | None = None, options=(), host: str = "127.0.0.1"):
        self.host = host
        self.port = port or free_port()
        self.options = list(options)
        self.log_dir = Path(base)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # smtp-sink drops privileges to nobody when run as root, so it dumps into
        # a world-writable directory of its own (pytest's tmp dirs are 0700).
        self.dump_dir = Path(tempfile.mkdtemp(prefix="tempalias-sink-"))
        os.chmod(self.dump_dir, 0o777)
        self.proc: subprocess.Popen | None = None
        self.stderr_path = self.log_dir / f"smtp-sink-{host}-{self.port}.log"

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"smtp://{host}:{self.port}"

    def start(self) -> "SmtpSink":
        self.proc = start_smtp_sink(self.host, self.port, self.stderr_path, options=self.options,
                                    dump_prefix=f"{self.dump_dir}/msg.", backlog=64, error=AssertionError)
        return self

    def stop(self):
        stop_process(self.proc)

    def cleanup(self):
        self.stop()
        shutil.rmtree(self.dump_dir, ignore_errors=True)

    def messages(self) -> list[SinkMessage]:
        out = []
        for p in sorted(self.dump_dir.glob("msg.*"), key=lambda p: p.stat().st_mtime_ns):
            out.append(parse_sink_dump(p))
        return out

    def wait_for(self, count: int, timeout: float = 15) -> list[SinkMessage]:
        """Waits until `count` complete messages are dumped."""

        def done():
            msgs = self.messages()
            return msgs if len(msgs) >= count and all(m.data is not None for m in msgs) else None

        return wait_until(done, timeout, f"{count} message(s) in smtp-sink")

    def logs(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""


def parse_sink_dump(path: Path) -> SinkMessage:
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    mail_from, rcpts, helo = None, [], ""
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(b"X-Mail-Args: "):
            mail_from = line[len(b"X-Mail-Args: "):].decode().split()[0].strip("<>")
        elif line.startswith(b"X-Rcpt-Args: "):
            rcpts.append(line[len(b"X-Rcpt-Args: "):].decode().split()[0].strip("<>"))
        elif line.startswith(b"X-Helo-Args: "):
            helo = line[len(b"X-Helo-Args: "):].decode()
        elif line.startswith(b"Received: ") and b"(smtp-sink)" in b"\n".join(lines[i:i + 3]):
            # smtp-sink's own three-line Received header ends its preamble.
            i += 1
            while i < len(lines) and lines[i][:1] in (b"\t", b" "):
                i += 1
            body = b"\n".join(lines[i:])
            # smtp-sink ends each dump with one newline more than the
            # message (whose own last line ends in one): a dump without it
            # is still being written.
            if not body.endswith(b"\n\n"):
                return SinkMessage(mail_from, rcpts, helo, None, path)
            return SinkMessage(mail_from, rcpts, helo, body[:-1], path)
        i += 1
    return SinkMessage(mail_from, rcpts, helo, None, path)
