"""Fixtures for the browser tests: a real node and Debian's Chromium, headless,
driven by Playwright (the system browser; Playwright never downloads one).

Screenshots of the main states are written to the artefact directory:
$TEMPALIAS_ARTIFACTS/browser if that is set, else target/test-artifacts/browser.
The path is printed at the end of the run.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

from harness import BIN, TARGET_DIR, Node  # noqa: E402

CHROMIUM = os.environ.get("TEMPALIAS_CHROMIUM", "/usr/bin/chromium")
# No network beyond loopback, no background services, a fresh profile each time.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(os.environ["TEMPALIAS_ARTIFACTS"]) / "browser" if os.environ.get("TEMPALIAS_ARTIFACTS") else TARGET_DIR / "test-artifacts" / "browser"


def pytest_terminal_summary(terminalreporter):
    if ARTIFACTS.exists():
        terminalreporter.write_line(f"browser screenshots: {ARTIFACTS}")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def playwright():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's chromium package (scripts/test does)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p


@pytest.fixture
def node(tmp_path):
    """A started single node in capture mode."""
    assert BIN.exists(), f"{BIN} missing: run cargo build"
    n = Node(tmp_path, "node")
    try:
        n.start()
        yield n
    finally:
        n.cleanup()


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    n = getattr(item, "funcargs", {}).get("node")
    if rep.failed and rep.when in ("setup", "call") and n is not None:
        rep.sections.append(("logs of the node", n.logs()))


@pytest.fixture
def browser(playwright, tmp_path):
    """open(**context_options) -> a new page in a fresh Chromium profile."""
    contexts = []

    def open_page(**options):
        profile = tmp_path / f"profile{len(contexts)}"
        ctx = playwright.chromium.launch_persistent_context(
            str(profile),
            executable_path=CHROMIUM,
            headless=True,
            args=CHROMIUM_FLAGS,
            **options,
        )
        contexts.append(ctx)
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        page.set_default_timeout(15_000)
        page.console_errors = []
        page.on("console", lambda m: m.type == "error" and page.console_errors.append(m.text))
        page.on("pageerror", lambda e: page.console_errors.append(str(e)))
        return page

    yield open_page
    for ctx in contexts:
        ctx.close()
