"""Fixtures for the observability tests (issue 7): one real three-node cluster
(cluster/launch.py, as in tests/cluster), Postfix's smtp-sink as a smarthost
that defers every message, Alertmanager when installed, and a real Prometheus
scraping the nodes every second with the rules from cluster/prometheus/.

The whole module shares one cluster: the tests run in file order and each
later one takes nodes down (forward failures, then a node killed, then the
quorum lost).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE.parent / "integration"))

from clusterkit import LocalCluster, find_test_binary, free_ports  # noqa: E402
from harness import SmtpSink, free_port  # noqa: E402
from promkit import Alertmanager, Prometheus, find_tool  # noqa: E402

BASE_CONFIG = {
    "smtp": {"failed_rcpt_delay_ms": 0, "max_failed_rcpts": 100, "idle_timeout_secs": 60},
    "limits": {"max_usage": 10000},
    "ratelimit": {"enabled": False},
    "log": {"level": "info,openraft=warn"},
}


@pytest.fixture(scope="module")
def binary():
    found = find_test_binary()
    assert found is not None and found.is_file(), "no tempalias binary; run cargo build (scripts/test does)"
    return found


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("observability")


@pytest.fixture(scope="module")
def deferring_sink(workdir):
    """smtp-sink answering the end of every message with 450 (-r .): a
    smarthost that refuses everything, temporarily."""
    sink = SmtpSink(workdir / "sink", options=["-r", "."]).start()
    yield sink
    sink.stop()


@pytest.fixture(scope="module")
def cluster(workdir, binary, deferring_sink):
    """Nodes 1 and 2 capture forwarded mail; node 3 forwards to the deferring
    smarthost, so the test chooses when forwarding fails by where it sends.
    Node 2 alone has a rate limit on failed lookups."""
    ips = [f"127.0.0.{i}" for i in (1, 2, 3)]
    http, smtp, cl = free_ports(ips, 3)
    c = LocalCluster(
        workdir / "cluster",
        n=3,
        binary=binary,
        ports={"http": http, "smtp": smtp, "cluster": cl},
        extra_config=BASE_CONFIG,
        die_with_parent=True,
    )
    c.node(3).extra_config = {"relay": {"mode": "smarthost", "smarthosts": [deferring_sink.url], "timeout_secs": 10}}
    # Node 2 limits failed lookups (only those), so the test can make a 429
    # for the dashboard's rate-limit panel.
    c.node(2).extra_config = {"ratelimit": {"enabled": True, "failed_quota": 2, "create_quota": 1_000_000,
                                            "status_quota": 1_000_000}}
    try:
        c.start(wait=True, timeout=60)
        yield c
    finally:
        c.cleanup()


@pytest.fixture(scope="module")
def alertmanager(workdir):
    """Alertmanager if Debian's prometheus-alertmanager is installed (scripts/test installs it)."""
    find_tool("prometheus-alertmanager")
    am = Alertmanager(workdir, free_port()).start()
    yield am
    am.stop()


@pytest.fixture(scope="module")
def prometheus(workdir, cluster, alertmanager):
    targets = [nd.http_addr for nd in cluster]
    prom = Prometheus(workdir, free_port(), targets, alertmanager=f"127.0.0.1:{alertmanager.port}").start()
    yield prom
    prom.stop()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        prom = item.funcargs.get("prometheus") if hasattr(item, "funcargs") else None
        if prom is not None:
            rep.sections.append(("prometheus log", prom.log_tail()))
        c = item.funcargs.get("cluster") if hasattr(item, "funcargs") else None
        if c is not None:
            rep.sections.append(("node logs", c.logs(6000)))
