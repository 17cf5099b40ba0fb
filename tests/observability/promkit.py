"""A real Prometheus (and, when installed, Alertmanager) for the tests: Debian's
`prometheus` binary with its own data directory on an ephemeral loopback port,
fed a configuration generated from cluster/prometheus/.

Everything listens on 127.0.0.1 only; every wait is a bounded poll.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
PROM_DIR = REPO / "cluster" / "prometheus"
DASHBOARD = REPO / "cluster" / "grafana" / "tempalias-dashboard.json"

# The test's copy of the rules waits this long instead of each rule's `for:`
# (minutes in production), so an alert fires within seconds of its condition.
TEST_FOR = "3s"


def find_tool(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/sbin/{name}") if Path(p).exists()), None)
    if not found:
        raise AssertionError(f"{name} is not installed; run scripts/test")
    return found


def http_json(url: str, timeout: float = 5.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return json.loads(r.read())


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except (OSError, ValueError, KeyError) as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def shortened_rules(rules_text: str) -> tuple[str, dict]:
    """The production rules with every `for:` shortened to TEST_FOR.
    Returns (YAML text, {alert name: original for}) so a test can say what it changed."""
    doc = yaml.safe_load(rules_text)
    changed = {}
    for group in doc["groups"]:
        group["interval"] = "1s"
        for rule in group["rules"]:
            if "alert" in rule and "for" in rule:
                changed[rule["alert"]] = rule["for"]
                rule["for"] = TEST_FOR
    return yaml.safe_dump(doc, sort_keys=False), changed


class Alertmanager:
    """Debian's Alertmanager (prometheus-alertmanager) with a receiver that
    sends nowhere: the test reads what it received through its API."""

    def __init__(self, base: Path, port: int):
        self.dir = base / "alertmanager"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "Alertmanager":
        config = {
            "route": {"receiver": "null", "group_wait": "1s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "null"}],
        }
        (self.dir / "alertmanager.yml").write_text(yaml.safe_dump(config))
        cmd = [
            find_tool("prometheus-alertmanager"),
            f"--config.file={self.dir / 'alertmanager.yml'}",
            f"--storage.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--cluster.listen-address=",  # no gossip port: a single instance
        ]
        self.log = open(self.dir / "alertmanager.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"alertmanager exited: {(self.dir / 'alertmanager.log').read_text()[-2000:]}")
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200

        wait_until(ready, 30, "alertmanager /-/ready")
        return self

    def alerts(self) -> list[dict]:
        return http_json(self.url + "/api/v2/alerts")

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self.log.close()


class Prometheus:
    """Debian's Prometheus scraping `targets` (host:port of each node's HTTP
    listener) every second with the project's rules (for: shortened)."""

    def __init__(self, base: Path, port: int, targets: list[str], alertmanager: str | None = None):
        self.dir = base / "prometheus"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port
        self.targets = targets
        self.alertmanager = alertmanager
        self.proc: subprocess.Popen | None = None
        self.changed_for: dict = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        """cluster/prometheus/prometheus.yml with the test's targets, a 1 s
        scrape and evaluation interval and the alert rules beside it."""
        config = yaml.safe_load((PROM_DIR / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = "1s"
        config["global"]["scrape_timeout"] = "1s"
        config["global"]["evaluation_interval"] = "1s"
        (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tempalias"]
        job["static_configs"] = [{"targets": self.targets}]
        rules, self.changed_for = shortened_rules((PROM_DIR / "alerts.yml").read_text())
        rule_files = []
        for name in config["rule_files"]:
            assert name == "alerts.yml", f"unexpected rule file {name} in prometheus.yml"
            (self.dir / name).write_text(rules)
            rule_files.append(name)
        config["rule_files"] = rule_files
        if self.alertmanager:
            config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [self.alertmanager]}]}]}
        path = self.dir / "prometheus.yml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        r = subprocess.run([find_tool("promtool"), "check", "config", str(path)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"promtool check config: {r.stdout}{r.stderr}"
        return path

    def start(self) -> "Prometheus":
        path = self.write_config()
        cmd = [
            find_tool("prometheus"),
            f"--config.file={path}",
            f"--storage.tsdb.path={self.dir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
        ]
        self.log = open(self.dir / "prometheus.log", "ab")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=self.log, stdin=subprocess.DEVNULL)

        def ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {self.log_tail()}")
            with urllib.request.urlopen(self.url + "/-/ready", timeout=2) as r:
                return r.status == 200

        wait_until(ready, 60, "prometheus /-/ready")
        return self

    def log_tail(self, n: int = 4000) -> str:
        try:
            return (self.dir / "prometheus.log").read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def query(self, expr: str) -> list[dict]:
        body = http_json(self.url + "/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert body["status"] == "success", f"{expr}: {body}"
        return body["data"]["result"]

    def targets_health(self) -> dict[str, str]:
        body = http_json(self.url + "/api/v1/targets?state=active")
        return {t["labels"]["instance"]: t["health"] for t in body["data"]["activeTargets"]}

    def alerts(self) -> list[dict]:
        return http_json(self.url + "/api/v1/alerts")["data"]["alerts"]

    def firing(self, name: str, **labels) -> list[dict]:
        return [
            a
            for a in self.alerts()
            if a["labels"].get("alertname") == name
            and a["state"] == "firing"
            and all(a["labels"].get(k) == v for k, v in labels.items())
        ]

    def rule_names(self) -> list[str]:
        body = http_json(self.url + "/api/v1/rules")
        return [r["name"] for g in body["data"]["groups"] for r in g["rules"] if r["type"] == "alerting"]

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self.log.close()


METRIC = re.compile(r"\b(tempalias_[a-z0-9_]+|up)\b")


def metric_names(expr: str) -> set[str]:
    """The metric names an expression selects (tempalias_* and up)."""
    return set(METRIC.findall(expr))


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) for every target of every panel, rows included."""
    doc = json.loads(DASHBOARD.read_text())
    out = []

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                if t.get("expr"):
                    out.append((p.get("title", "?"), t["expr"]))
            walk(p.get("panels", []))

    walk(doc["panels"])
    return out


def alert_rules() -> list[dict]:
    doc = yaml.safe_load((PROM_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"] if "alert" in r]
