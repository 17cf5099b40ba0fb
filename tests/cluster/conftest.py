"""Fixtures for the multi-node tests (issue 3): real `tempalias` processes on
127.0.0.1, 127.0.0.2, ... started through cluster/launch.py.

How the binary is found (cluster/launch.py's find_binary):
  1. $TEMPALIAS_BIN, if set (used as is);
  2. else target/release/tempalias, unless target/debug/tempalias exists and
     is newer (so a stale release build never hides a fresh debug build);
  3. else target/debug/tempalias;
  4. if neither exists, `cargo build` (debug) is run once.
The path is printed at the start of the run (with -s).

Every test gets its own cluster directory under pytest's tmp_path and ports
that were free on every node address a moment before. Nodes are SIGKILLed by
the fixture finalizer whatever the outcome (and, on Linux, die with the test
process if it is killed). When a test fails, the node logs are attached to its
report.
"""

from __future__ import annotations

import subprocess

import pytest

from clusterkit import REPO, LocalCluster, find_test_binary, free_ports

# Settings every test cluster shares; tests add their own on top.
BASE_CONFIG = {
    "smtp": {"failed_rcpt_delay_ms": 0, "max_failed_rcpts": 100, "idle_timeout_secs": 60},
    "limits": {"max_usage": 10000},
    # Every test client is on 127.0.0.0/8: the per-client limits would throttle the load.
    "ratelimit": {"enabled": False},
    "log": {"level": "info,openraft=warn"},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@pytest.fixture(scope="session")
def binary():
    found = find_test_binary()
    if found is None:
        subprocess.run(["cargo", "build", "--quiet"], cwd=REPO, check=True)
        found = find_test_binary()
    assert found is not None and found.is_file(), f"no tempalias binary ({found}); build with cargo build --release"
    print(f"\ncluster tests use {found}")
    return found


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for c in getattr(item, "_tempalias_clusters", []):
            for nd in c:
                text = nd.log_tail(15000)
                if text:
                    rep.sections.append((f"log of {c.dir.name}/{nd.name}", text))


@pytest.fixture
def cluster_factory(request, tmp_path, binary):
    """make(n=3, extra=None, spare=1, start=True) -> a started, ready LocalCluster.

    `spare` reserves addresses for nodes added later (ports are checked free
    on 127.0.0.1 .. 127.0.0.(n+spare))."""
    made: list[LocalCluster] = []

    def make(n: int = 3, extra: dict | None = None, spare: int = 1, start: bool = True) -> LocalCluster:
        ips = [f"127.0.0.{i}" for i in range(1, n + spare + 1)]
        http, smtp, cluster = free_ports(ips, 3)
        c = LocalCluster(
            tmp_path / f"cluster{len(made) + 1}",
            n=n,
            binary=binary,
            ports={"http": http, "smtp": smtp, "cluster": cluster},
            extra_config=_merge(BASE_CONFIG, extra or {}),
            die_with_parent=True,
        )
        made.append(c)
        request.node._tempalias_clusters = made
        if start:
            c.start(wait=True, timeout=60)
        return c

    yield make
    for c in made:
        c.cleanup()


@pytest.fixture
def cluster(cluster_factory) -> LocalCluster:
    """A formed, ready three-node cluster."""
    return cluster_factory()
