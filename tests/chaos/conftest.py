"""Fixtures for the failover lab (issue 6). See lab.py for what the lab is.

The suite needs root (network namespaces, iptables, Postfix, port 25); run as
another user, every test is skipped with that reason. The binary is found as
in tests/cluster: $TEMPALIAS_BIN, else the newer of target/release and
target/debug. The figures each fault produced are printed at the end of the
run (also with -q).
"""

from __future__ import annotations

import os

import pytest

from lab import Lab
from launch import LaunchError, find_binary

# Lines printed in the terminal summary: one block per fault.
FIGURES: list[str] = []


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="the failover lab needs root (network namespace, iptables, Postfix on port 25)")
        for item in items:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
    if FIGURES:
        terminalreporter.section("failover lab figures (printed, not asserted)")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def figures() -> list[str]:
    """Where a test puts the lines it wants in the terminal summary."""
    return FIGURES


@pytest.fixture(scope="session")
def binary():
    try:
        found = find_binary()
    except LaunchError as e:
        pytest.fail(f"{e}")
    print(f"\nfailover lab uses {found}")
    return found


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    lab = getattr(item, "_chaos_lab", None)
    if rep.failed and rep.when in ("setup", "call") and lab is not None:
        rep.sections.append(("lab logs (tails)", lab.logs(6000)))


@pytest.fixture(scope="module")
def lab(binary):
    """The whole lab, once per module: namespace, nsd, smtp-sink, three nodes,
    Postfix. Torn down (namespace deleted) whatever the outcome."""
    with Lab(binary) as the_lab:
        yield the_lab


@pytest.fixture
def healthy_lab(request, lab):
    """The lab with every fault removed and every node up under one leader."""
    request.node._chaos_lab = lab
    lab.heal_and_wait()
    return lab
