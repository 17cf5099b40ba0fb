"""Fixtures for the integration suite: the built binary, nodes and smtp-sinks.

Nodes and sinks made through the factories are stopped after each test; when a
test fails, their logs are attached to its report.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import BIN, REPO, Node, SmtpSink
from peers import AioSmtpd, Ca


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes more than a few seconds")


@pytest.fixture(scope="session", autouse=True)
def built_binary():
    """Builds the binary once (a no-op when scripts/test has just built it)."""
    if os.environ.get("TEMPALIAS_BIN") is None:
        subprocess.run(["cargo", "build", "--quiet"], cwd=REPO, check=True)
    assert BIN.exists(), f"{BIN} missing after cargo build"
    return BIN


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        for thing in getattr(item, "_tempalias_things", []):
            text = thing.logs()
            if text:
                rep.sections.append((f"logs of {getattr(thing, 'name', 'smtp-sink')}", text))


def _track(request, thing):
    things = getattr(request.node, "_tempalias_things", None)
    if things is None:
        things = request.node._tempalias_things = []
    things.append(thing)


@pytest.fixture
def node_factory(request, tmp_path):
    """make(name=..., relay=..., smarthosts=..., config=..., start=True) -> Node."""
    made: list[Node] = []

    def make(name: str | None = None, start: bool = True, **kwargs) -> Node:
        n = Node(tmp_path, name or f"node{len(made) + 1}", **kwargs)
        made.append(n)
        _track(request, n)
        if start:
            n.start()
        return n

    yield make
    for n in made:
        n.cleanup()


@pytest.fixture
def node(node_factory) -> Node:
    """A started single node in capture mode."""
    return node_factory()


@pytest.fixture
def sink_factory(request, tmp_path):
    """make(port=None, options=(), start=True, host="127.0.0.1") -> SmtpSink."""
    made: list[SmtpSink] = []

    def make(port: int | None = None, options=(), start: bool = True, host: str = "127.0.0.1") -> SmtpSink:
        s = SmtpSink(tmp_path / "sinks", port=port, options=options, host=host)
        made.append(s)
        _track(request, s)
        if start:
            s.start()
        return s

    yield make
    for s in made:
        s.cleanup()


@pytest.fixture
def ca(tmp_path):
    """A private certificate authority for peers that speak TLS."""
    return Ca.create(tmp_path / "ca")


@pytest.fixture
def aiosmtpd_factory():
    """make(**kwargs) -> a started AioSmtpd peer, stopped after the test."""
    made: list[AioSmtpd] = []

    def make(**kwargs) -> AioSmtpd:
        s = AioSmtpd(**kwargs).start()
        made.append(s)
        return s

    yield make
    for s in made:
        s.stop()
