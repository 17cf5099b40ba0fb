"""Helpers for the multi-node tests: binary lookup, HTTP and SMTP clients that
record what they saw, a background load generator, and capture-dir counting.

Everything talks to 127.0.0.0/8 only. Every wait is a bounded poll.
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import smtplib
import sys
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "cluster"))

from launch import LaunchError, LocalCluster, LocalNode, find_binary, free_ports, wait_until  # noqa: E402,F401

TARGET = "me@example.net"
SENDER = "someone@example.org"
DOMAIN = "tempalias.test"


def find_test_binary() -> Path | None:
    """The binary the tests use (see conftest.py): launch.find_binary(), i.e.
    $TEMPALIAS_BIN, else the newer of target/release and target/debug; None
    when there is none."""
    try:
        return find_binary()
    except LaunchError:
        return None


# --------------------------------------------------------------------------- HTTP


@dataclass
class HttpResult:
    status: int  # 0: no HTTP answer (connection refused/reset, timeout)
    headers: dict
    body: bytes
    error: str = ""

    def json(self):
        return json.loads(self.body)


def request(node: LocalNode, method: str, path: str, body=None, headers=None, timeout: float = 20.0) -> HttpResult:
    """One request on a fresh connection; never raises."""
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection(node.ip, node.http_port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        return HttpResult(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    except (OSError, http.client.HTTPException) as e:
        return HttpResult(0, {}, b"", repr(e))
    finally:
        conn.close()


def create(node: LocalNode, days: int = 3, max_usage: int | None = 5, timeout: float = 20.0) -> HttpResult:
    body = {"target": TARGET, "days": days}
    if max_usage is not None:
        body["max-usage"] = max_usage
    return request(node, "POST", "/v1/aliases", body, timeout=timeout)


def create_ok(node: LocalNode, **kw) -> dict:
    r = create(node, **kw)
    assert r.status == 201, f"create via node {node.id}: {r.status} {r.body!r} {r.error}"
    return r.json()


def show(node: LocalNode, alias: dict, timeout: float = 20.0) -> HttpResult:
    return request(node, "GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"}, timeout=timeout)


def show_ok(node: LocalNode, alias: dict) -> dict:
    r = show(node, alias)
    assert r.status == 200, f"show {alias['id']} via node {node.id}: {r.status} {r.body!r} {r.error}"
    return r.json()


# --------------------------------------------------------------------------- SMTP


def new_uid() -> str:
    return uuid.uuid4().hex


def message(uid: str, to: str) -> bytes:
    return (
        f"From: {SENDER}\r\nTo: {to}\r\nSubject: cluster test {uid}\r\n"
        f"Message-ID: <{uid}@test.example.org>\r\n\r\nHello {uid}.\r\n"
    ).encode()


@dataclass
class SmtpResult:
    """Where a transaction ended: stage is "rcpt", "data" (a reply after the
    message) or "cut" (no reply: connection lost or timed out)."""

    stage: str
    code: int | None
    text: str
    uid: str
    node: int
    start: float = 0.0
    end: float = 0.0

    @property
    def ok(self) -> bool:
        return self.stage == "data" and self.code == 250

    def __str__(self):
        return f"node{self.node} {self.stage} {self.code} {self.text!r} uid={self.uid}"


def send(node: LocalNode, rcpt: str, uid: str | None = None, timeout: float = 30.0) -> SmtpResult:
    """One message with smtplib: EHLO, MAIL, RCPT, DATA. Records the reply that
    ended the transaction; never raises for SMTP or socket errors."""
    uid = uid or new_uid()
    start = time.monotonic()

    def done(stage, code, text):
        if isinstance(text, bytes):
            text = text.decode(errors="replace")
        return SmtpResult(stage, code, text, uid, node.id, start, time.monotonic())

    s = smtplib.SMTP(timeout=timeout)
    try:
        try:
            code, text = s.connect(node.ip, node.smtp_port)
            if code != 220:
                return done("connect", code, text)
            s.ehlo("client.example.org")
            code, text = s.mail(SENDER)
            if code != 250:
                return done("mail", code, text)
            code, text = s.rcpt(rcpt)
            if code != 250:
                return done("rcpt", code, text)
            try:
                code, text = s.data(message(uid, rcpt))
            except smtplib.SMTPDataError as e:
                return done("data-cmd", e.smtp_code, e.smtp_error)
            return done("data", code, text)
        except (smtplib.SMTPException, OSError) as e:
            return done("cut", None, repr(e))
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()


def rcpt_reply(node: LocalNode, rcpt: str, timeout: float = 30.0) -> tuple[int, str]:
    """Opens a session, tries one RCPT, then RSET and QUIT: (code, text)."""
    with smtplib.SMTP(node.ip, node.smtp_port, local_hostname="client.example.org", timeout=timeout) as s:
        s.ehlo()
        code, _ = s.mail(SENDER)
        assert code == 250
        code, text = s.rcpt(rcpt)
        s.rset()
        return code, text.decode(errors="replace")


MSGID = re.compile(rb"^Message-ID:\s*<([0-9a-f]{32})@test\.example\.org>", re.IGNORECASE | re.MULTILINE)


def captured_uids(cluster: LocalCluster) -> Counter:
    """How often each test message (by Message-ID) sits in any capture dir."""
    seen: Counter = Counter()
    for eml in cluster.captured():
        m = MSGID.search(eml.read_bytes())
        if m:
            seen[m.group(1).decode()] += 1
    return seen


# --------------------------------------------------------------------------- load


@dataclass
class Op:
    kind: str  # "create" or "mail"
    node: int
    start: float
    end: float
    ok: bool
    outcome: str  # "201", "503", "rcpt 451", "data 250", ...
    alias: dict | None = None
    smtp: SmtpResult | None = None


class Load:
    """Background clients: `creators` threads POST aliases, `mailers` threads
    send mail to their own alias. Each thread cycles over its node list
    (a callable, so a test can change it while the load runs).

    Every operation is recorded; `stop()` joins the threads (bounded)."""

    def __init__(self, cluster: LocalCluster, nodes, creators: int = 2, mailers: int = 2, mail_aliases: dict | None = None):
        self.cluster = cluster
        self.nodes = nodes if callable(nodes) else (lambda ids=list(nodes): ids)
        self.ops: list[Op] = []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads: list[threading.Thread] = []
        for i in range(creators):
            self.threads.append(threading.Thread(target=self._creator, args=(i,), daemon=True, name=f"creator{i}"))
        self.mail_aliases = mail_aliases or {}
        for i in range(mailers):
            self.threads.append(threading.Thread(target=self._mailer, args=(i,), daemon=True, name=f"mailer{i}"))

    def _pick(self, thread_no: int, n: int) -> LocalNode:
        ids = list(self.nodes())
        return self.cluster.node(ids[(thread_no + n) % len(ids)])

    def _record(self, op: Op):
        with self.lock:
            self.ops.append(op)

    def _creator(self, no: int):
        n = 0
        while not self.stop_event.is_set():
            node = self._pick(no, n)
            n += 1
            start = time.monotonic()
            r = create(node, max_usage=3)
            end = time.monotonic()
            alias = r.json() if r.status == 201 else None
            outcome = str(r.status) if r.status else f"no answer {r.error}"
            self._record(Op("create", node.id, start, end, r.status == 201, outcome, alias=alias))
            if r.status != 201:
                # Back off on failure so a dead cluster is not hammered; bounded by stop().
                self.stop_event.wait(0.05)

    def _mailer(self, no: int):
        alias = self.mail_aliases[no]
        n = 0
        while not self.stop_event.is_set():
            node = self._pick(no, n)
            n += 1
            res = send(node, alias["alias"], timeout=30)
            outcome = f"{res.stage} {res.code}"
            self._record(Op("mail", node.id, res.start, res.end, res.ok, outcome, alias=alias, smtp=res))
            if not res.ok:
                self.stop_event.wait(0.05)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0):
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"load threads did not stop within {timeout}s: {alive}"

    def snapshot(self) -> list[Op]:
        with self.lock:
            return list(self.ops)

    def successes_since(self, t: float, kind: str | None = None) -> int:
        return sum(1 for op in self.snapshot() if op.ok and op.start >= t and (kind is None or op.kind == kind))

    def summary(self) -> str:
        c = Counter((op.kind, op.outcome) for op in self.snapshot())
        return ", ".join(f"{k} {o}: {n}" for (k, o), n in sorted(c.items()))


def first_success_after(ops: list[Op], t: float) -> Op | None:
    """The earliest-finishing successful operation started at or after `t`."""
    ok = [op for op in ops if op.ok and op.start >= t]
    return min(ok, key=lambda op: op.end) if ok else None


def raft_status(cluster: LocalCluster, via: int) -> dict[int, dict]:
    """{node id: status dict} from `tempalias cluster status --json` (members that answered)."""
    return {e["id"]: e["status"] for e in cluster.status(via=via) if e.get("status")}


@contextmanager
def paused(node: LocalNode):
    """The node's process stopped (SIGSTOP) for the block and continued
    (SIGCONT) after it, whatever happens in the block: a node that is alive
    but answers nothing (the kernel still queues connections and data for
    it). Its monotonic clock keeps running meanwhile, as on a stalled host."""
    node.signal(signal.SIGSTOP)
    try:
        yield node
    finally:
        if node.running():
            node.signal(signal.SIGCONT)
