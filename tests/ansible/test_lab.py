"""The Ansible role and playbooks on three real systemd hosts (issue 7).

In file order on one lab: lint and syntax check; converge from nothing, then
a second run with changed=0; the cluster answers SMTP on 25 and HTTP on 80 as
an unprivileged user and Prometheus scrapes it; a rolling upgrade under load
loses nothing; a broken build stops the rollout at the first node; a reboot
of every host brings the service back.
"""

from __future__ import annotations

import http.client
import json
import re
import smtplib
import subprocess
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from conftest import ANSIBLE, sha256
from lab import wait_until

PLAYBOOKS = ["site.yml", "rolling-upgrade.yml", "add-node.yml", "remove-node.yml"]
SENDER = "someone@example.org"
MSGID = re.compile(rb"^Message-ID:\s*<([0-9a-f]{32})@lab\.example\.org>", re.IGNORECASE | re.MULTILINE)


# --------------------------------------------------------------------------- clients


def call(ip: str, method: str, path: str, body=None, headers=None, port: int = 80, timeout: float = 15):
    """(status, parsed JSON or raw body); status 0 when there was no answer."""
    conn = http.client.HTTPConnection(ip, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw)
        except ValueError:
            return r.status, raw
    except (OSError, http.client.HTTPException):
        return 0, None
    finally:
        conn.close()


def create_alias(ip: str, max_usage: int = 5):
    return call(ip, "POST", "/v1/aliases", {"target": "me@example.net", "days": 1, "max-usage": max_usage})


def show_alias(ip: str, alias: dict):
    return call(ip, "GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"})


def smtp_once(ip: str, rcpt: str, uid: str, timeout: float = 30) -> tuple[str, int | None]:
    """One attempt: ("ok"|"4xx"|"5xx"|"cut", code)."""
    msg = (
        f"From: {SENDER}\r\nTo: {rcpt}\r\nSubject: lab {uid}\r\nMessage-ID: <{uid}@lab.example.org>\r\n\r\nHello {uid}.\r\n"
    ).encode()
    s = smtplib.SMTP(timeout=timeout)
    try:
        code, _ = s.connect(ip, 25)
        if code != 220:
            return ("4xx" if 400 <= code < 500 else "5xx" if code >= 500 else "cut"), code
        s.ehlo("client.example.org")
        for step in (lambda: s.mail(SENDER), lambda: s.rcpt(rcpt)):
            code, _ = step()
            if code != 250:
                return ("4xx" if code < 500 else "5xx"), code
        try:
            code, _ = s.data(msg)
        except smtplib.SMTPDataError as e:
            code = e.smtp_code
        if code == 250:
            return "ok", code
        return ("4xx" if code < 500 else "5xx"), code
    except (smtplib.SMTPException, OSError):
        return "cut", None
    finally:
        try:
            s.quit()
        except (smtplib.SMTPException, OSError):
            s.close()


@dataclass
class LoadReport:
    delivered: list = field(default_factory=list)  # uids that got 250
    undelivered: list = field(default_factory=list)  # uids given up on (no 250 within the bound)
    smtp_5xx: list = field(default_factory=list)
    smtp_retries: Counter = field(default_factory=Counter)  # "4xx 451", "cut", ...
    created: list = field(default_factory=list)  # (end time, alias)
    http_5xx: list = field(default_factory=list)
    http_other: Counter = field(default_factory=Counter)


class Load:
    """Mail to one alias round-robin over the hosts, retrying 4xx and lost
    connections at the next host as an MTA would (bounded per message), and
    alias creation round-robin, moving to the next host when one does not answer
    or is drained for maintenance."""

    def __init__(self, ips: list[str], alias: dict, mailers: int = 2, creators: int = 1, give_up_after: float = 120):
        self.ips = ips
        self.alias = alias
        self.give_up_after = give_up_after
        self.report = LoadReport()
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.threads = [threading.Thread(target=self._mailer, args=(i,), daemon=True) for i in range(mailers)]
        self.threads += [threading.Thread(target=self._creator, args=(i,), daemon=True) for i in range(creators)]

    def _mailer(self, no: int):
        n = no
        while not self.stop_event.is_set():
            uid = uuid.uuid4().hex
            first = time.monotonic()
            while True:
                ip = self.ips[n % len(self.ips)]
                n += 1
                outcome, code = smtp_once(ip, self.alias["alias"], uid)
                with self.lock:
                    if outcome == "ok":
                        self.report.delivered.append(uid)
                    elif outcome == "5xx":
                        self.report.smtp_5xx.append((ip, code, uid))
                    else:
                        self.report.smtp_retries[f"{outcome} {code or ''}".strip()] += 1
                if outcome in ("ok", "5xx"):
                    break
                if time.monotonic() - first > self.give_up_after:
                    with self.lock:
                        self.report.undelivered.append(uid)
                    break
                time.sleep(0.2)  # an MTA would wait longer; bounded by give_up_after

    def _creator(self, no: int):
        n = no
        while not self.stop_event.is_set():
            ip = self.ips[n % len(self.ips)]
            n += 1
            status, body = create_alias(ip)
            with self.lock:
                if status == 201:
                    self.report.created.append((time.monotonic(), body))
                elif status == 503 and isinstance(body, dict) and body.get("error") == "maintenance":
                    # A drained node sends API clients elsewhere, as a load
                    # balancer would (it also answers /readyz 503): move on.
                    self.report.http_other["503 maintenance"] += 1
                elif status >= 500:
                    self.report.http_5xx.append((ip, status, body))
                else:
                    self.report.http_other[status] += 1
            self.stop_event.wait(0.05 if status == 201 else 0.2)

    def start(self):
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 150) -> LoadReport:
        self.stop_event.set()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            t.join(max(0.1, deadline - time.monotonic()))
        assert not [t for t in self.threads if t.is_alive()], "load threads did not stop"
        return self.report


def sink_uids(sink) -> Counter:
    seen = Counter()
    for p in sink.dump_dir.glob("msg.*"):
        m = MSGID.search(p.read_bytes())
        if m:
            seen[m.group(1).decode()] += 1
    return seen


def wait_ready(lab, timeout: float = 120):
    for h in lab.nodes:
        wait_until(lambda h=h: call(h.ip, "GET", "/readyz", timeout=5)[0] == 200, timeout, f"{h.name} /readyz")


def installed_sha(host) -> str:
    return host.ssh("sha256sum /usr/local/bin/tempalias").stdout.split()[0]


# --------------------------------------------------------------------------- tests


def test_lint_and_syntax_check():
    started = time.monotonic()
    r = subprocess.run(["ansible-lint", "--offline", "--profile", "production", "--nocolor"], cwd=ANSIBLE,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"ansible-lint:\n{r.stdout}\n{r.stderr}"
    for pb in PLAYBOOKS:
        r = subprocess.run(["ansible-playbook", "--syntax-check", pb], cwd=ANSIBLE, capture_output=True, text=True, timeout=120,
                           env={**__import__("os").environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg")})
        assert r.returncode == 0, f"--syntax-check {pb}:\n{r.stdout}\n{r.stderr}"
    print(f"\nansible-lint (production, offline) and --syntax-check clean in {time.monotonic() - started:.1f}s")


def test_converge_from_nothing_then_idempotent(lab, playbooks, lab_secret, builds):
    r, recap = playbooks.run("site.yml")
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]
    assert set(recap) == {h.name for h in lab.nodes}
    assert all(v["changed"] > 0 and v["failed"] == 0 for v in recap.values()), recap
    assert lab_secret not in r.stdout + r.stderr, "a secret appeared in the playbook output"

    r, recap = playbooks.run("site.yml")
    assert r.returncode == 0, r.stdout[-6000:]
    assert {h: v["changed"] for h, v in recap.items()} == {h.name: 0 for h in lab.nodes}, recap

    h = lab.nodes[0]
    out = h.ssh("systemd-analyze security tempalias --no-pager | tail -1").stdout
    score = float(re.search(r"exposure level for tempalias\.service: ([0-9.]+)", out).group(1))
    print(f"\nsystemd-analyze security tempalias.service: {out.strip()}")
    assert score <= 2.0, out
    assert installed_sha(h) == sha256(builds["old"])
    paths = ["/etc/tempalias", "/etc/tempalias/cluster.secret", "/etc/tempalias/tempalias.toml", "/var/lib/tempalias",
             "/etc/tempalias/secrets/srs.key", "/etc/tempalias/tls/cert.pem", "/etc/tempalias/tls/key.pem"]
    modes = h.ssh("stat -c '%n %U %a' " + " ".join(paths)).stdout
    assert modes.split("\n")[:7] == [
        "/etc/tempalias root 750",
        "/etc/tempalias/cluster.secret tempalias 600",
        "/etc/tempalias/tempalias.toml root 640",
        "/var/lib/tempalias tempalias 750",
        "/etc/tempalias/secrets/srs.key tempalias 600",
        "/etc/tempalias/tls/cert.pem root 640",
        "/etc/tempalias/tls/key.pem tempalias 600",
    ], modes
    assert h.ssh("cat /etc/tempalias/secrets/srs.key").stdout == f"{lab_secret}-srs"


def test_cluster_serves_on_25_and_80_as_unprivileged_user_and_is_scraped(lab, playbooks, sink, workdir):
    from promkit import Prometheus
    from harness import free_port

    for h in lab.nodes:
        user = h.ssh("ps -o user= -C tempalias").stdout.split()
        assert user == ["tempalias"], (h.name, user)
        caps = h.ssh("grep CapEff /proc/$(pidof tempalias)/status").stdout.split()[1]
        assert int(caps, 16) == 1 << 10, f"{h.name}: effective capabilities {caps} (want only CAP_NET_BIND_SERVICE)"
    status, alias = create_alias(lab.nodes[1].ip)
    assert status == 201, (status, alias)
    uid = uuid.uuid4().hex
    assert smtp_once(lab.nodes[2].ip, alias["alias"], uid) == ("ok", 250)
    wait_until(lambda: sink_uids(sink)[uid] == 1, 30, "the message in smtp-sink")
    status, shown = show_alias(lab.nodes[0].ip, alias)
    assert status == 200 and shown["remaining"] == alias["max_usage"] - 1, shown

    prom = Prometheus(workdir, free_port(), [f"{h.ip}:80" for h in lab.nodes]).start()
    try:
        want = {f"{h.ip}:80": "up" for h in lab.nodes}
        wait_until(lambda: prom.targets_health() == want, 60, "Prometheus to scrape every lab node")
        leaders = wait_until(lambda: prom.query("sum(tempalias_raft_is_leader)"), 30, "leader series")
        assert leaders[0]["value"][1] == "1"
    finally:
        prom.stop()


def test_rolling_upgrade_under_load_loses_nothing(lab, playbooks, sink, builds):
    ips = [h.ip for h in lab.nodes]
    status, alias = create_alias(ips[0], max_usage=100000)
    assert status == 201
    load = Load(ips, alias).start()
    try:
        wait_until(lambda: len(load.report.delivered) >= 5 and len(load.report.created) >= 5, 60, "load to run")
        started = time.monotonic()
        r, recap = playbooks.run("rolling-upgrade.yml", "-e", f"tempalias_binary_src={builds['new']}")
        took = time.monotonic() - started
        # Keep the load running a moment on the upgraded cluster.
        mark = len(load.report.delivered)
        wait_until(lambda: len(load.report.delivered) >= mark + 5, 60, "mail after the upgrade")
    finally:
        rep = load.stop()
    assert r.returncode == 0, r.stdout[-8000:]
    assert all(v["failed"] == 0 for v in recap.values()), recap
    for h in lab.nodes:
        assert installed_sha(h) == sha256(builds["new"]), h.name

    times = sorted(t for t, _ in rep.created)
    gaps = [b - a for a, b in zip(times, times[1:])]
    longest = max(gaps) if gaps else float("nan")
    print(
        f"\nrolling upgrade: {took:.1f}s; mail: {len(rep.delivered)} delivered, retries {dict(rep.smtp_retries)}; "
        f"aliases: {len(rep.created)} created, other answers {dict(rep.http_other)}; "
        f"longest gap between successful creates: {longest:.2f}s"
    )
    assert not rep.smtp_5xx, rep.smtp_5xx[:5]
    assert not rep.http_5xx, rep.http_5xx[:5]
    assert not rep.undelivered, f"{len(rep.undelivered)} messages never accepted"
    # Every 250'd message reached the sink exactly once.
    want = Counter(rep.delivered)
    assert len(want) == len(rep.delivered)

    def all_arrived():
        seen = sink_uids(sink)
        return all(seen[u] >= 1 for u in want) and seen

    seen = wait_until(all_arrived, 60, "every accepted message in smtp-sink")
    dup = {u: seen[u] for u in want if seen[u] != 1}
    assert not dup, f"delivered more than once: {dup}"
    # Every alias that got 201 is on every node.
    checks = [(h, a) for _, a in rep.created for h in lab.nodes]
    with ThreadPoolExecutor(8) as pool:
        statuses = list(pool.map(lambda c: (c[0].name, c[1]["id"], show_alias(c[0].ip, c[1])[0]), checks))
    missing = [s for s in statuses if s[2] != 200]
    assert not missing, f"{len(missing)} of {len(checks)} lookups failed: {missing[:5]}"


def test_broken_build_stops_rollout_at_first_node(lab, playbooks, builds):
    good = {h.name: installed_sha(h) for h in lab.nodes}
    r, recap = playbooks.run("rolling-upgrade.yml", "-e", f"tempalias_binary_src={builds['broken']}", "-e", "tempalias_ready_timeout=20")
    assert r.returncode != 0, "the rollout of a broken build succeeded"
    first, rest = lab.nodes[0], lab.nodes[1:]
    assert recap[first.name]["failed"] == 1 and recap[first.name]["rescued"] == 1, recap
    assert all(h.name not in recap or recap[h.name]["changed"] == 0 for h in rest), recap
    assert installed_sha(first) == sha256(builds["broken"])
    assert first.ssh("ls /usr/local/bin/tempalias.previous").returncode == 0
    for h in rest:
        assert installed_sha(h) == good[h.name], f"{h.name} was touched"
    # The other two keep serving: writes, reads and mail.
    status, alias = create_alias(rest[0].ip)
    assert status == 201, (status, alias)
    assert show_alias(rest[1].ip, alias)[0] == 200
    assert smtp_once(rest[1].ip, alias["alias"], uuid.uuid4().hex) == ("ok", 250)
    assert call(first.ip, "GET", "/readyz", timeout=3)[0] == 0  # nothing listens on the broken node

    # The way back: the rollout again with a good build upgrades the failed
    # node (the health check asks the other members) and skips the others.
    r, recap = playbooks.run("rolling-upgrade.yml", "-e", f"tempalias_binary_src={builds['new']}")
    assert r.returncode == 0, r.stdout[-6000:]
    assert recap[first.name]["changed"] > 0 and all(recap[h.name]["changed"] == 0 for h in rest), recap
    assert installed_sha(first) == sha256(builds["new"])
    wait_ready(lab)
    assert show_alias(first.ip, alias)[0] == 200


def test_reboot_brings_the_service_back(lab):
    status, alias = create_alias(lab.nodes[0].ip)
    assert status == 201
    started = time.monotonic()
    lab.reboot()
    wait_ready(lab)
    print(f"\nreboot of all three hosts: ready again after {time.monotonic() - started:.1f}s")
    for h in lab.nodes:
        assert show_alias(h.ip, alias)[0] == 200, h.name
    status, _ = create_alias(lab.nodes[2].ip)
    assert status == 201


def cluster_status(host) -> list[dict]:
    return json.loads(host.ssh("tempalias cluster --config /etc/tempalias/tempalias.toml status --json").stdout)


def test_add_node_then_remove_it(lab, playbooks, group_vars, builds):
    new = lab.hosts[3]
    grown = lab.inventory(group_vars, hosts=lab.hosts, name="inventory-grown.yml")
    status, alias = create_alias(lab.nodes[0].ip)
    assert status == 201
    r, recap = playbooks.run("add-node.yml", "-e", f"tempalias_new_node={new.name}", "-e", f"tempalias_binary_src={builds['new']}",
                             inventory=grown)
    assert r.returncode == 0, r.stdout[-6000:]
    assert set(recap) == {new.name}, recap
    first = cluster_status(lab.nodes[0])[0]["status"]
    assert sorted(first["voters"]) == [1, 2, 3, 4] and first["learners"] == [], first
    assert show_alias(new.ip, alias)[0] == 200
    uid = uuid.uuid4().hex
    assert smtp_once(new.ip, alias["alias"], uid) == ("ok", 250)

    r, recap = playbooks.run("remove-node.yml", "-e", f"tempalias_remove_node={new.name}", inventory=grown)
    assert r.returncode == 0, r.stdout[-6000:]
    first = cluster_status(lab.nodes[0])[0]["status"]
    assert sorted(first["voters"]) == [1, 2, 3] and first["learners"] == [], first
    assert new.ssh("systemctl is-active tempalias", check=False).stdout.strip() == "inactive"
    assert new.ssh("systemctl is-enabled tempalias", check=False).stdout.strip() == "disabled"
    status, _ = create_alias(lab.nodes[1].ip)
    assert status == 201
