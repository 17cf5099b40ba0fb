"""Fixtures for the Ansible lab (issue 7): Debian hosts (three nodes and a spare) booted with
systemd-nspawn (lab.py), Postfix's smtp-sink on the machine as the smarthost
every node forwards to, and the binaries the playbooks install.

The tests share one lab and run in file order: lint, converge, serve,
rolling upgrade under load, a broken build, a reboot.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
ANSIBLE = REPO / "ansible"
sys.path.insert(0, str(HERE.parent / "cluster"))
sys.path.insert(0, str(HERE.parent / "integration"))
sys.path.insert(0, str(HERE.parent / "observability"))

from clusterkit import find_test_binary  # noqa: E402
from harness import SmtpSink  # noqa: E402
from lab import Lab  # noqa: E402

RECAP = re.compile(
    r"^(\S+)\s+: ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=\d+\s+rescued=(\d+)", re.MULTILINE
)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class Playbooks:
    """Runs the project's playbooks against the lab inventory."""

    def __init__(self, workdir: Path, inventory: Path):
        self.workdir = workdir
        self.inventory = inventory
        self.runs = 0

    def run(self, playbook: str, *extra: str, inventory: Path | None = None, timeout: float = 400) -> tuple[subprocess.CompletedProcess, dict]:
        self.runs += 1
        env = dict(os.environ, ANSIBLE_CONFIG=str(ANSIBLE / "ansible.cfg"), ANSIBLE_NOCOLOR="1", ANSIBLE_FORCE_COLOR="0")
        cmd = ["ansible-playbook", "-i", str(inventory or self.inventory), playbook, *extra]
        r = subprocess.run(cmd, cwd=ANSIBLE, capture_output=True, text=True, env=env, timeout=timeout)
        (self.workdir / f"run{self.runs}-{Path(playbook).stem}.log").write_text(r.stdout + r.stderr)
        recap = {m[0]: {"ok": int(m[1]), "changed": int(m[2]), "unreachable": int(m[3]), "failed": int(m[4]), "rescued": int(m[5])} for m in RECAP.findall(r.stdout)}
        return r, recap


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ansible-lab")


@pytest.fixture(scope="session")
def builds(workdir) -> dict:
    """The artefacts the playbooks install: `old` (the tested binary, stripped),
    `new` (the same code as a distinct artefact: a build note added, so its
    checksum differs) and `broken` (exits at once, as a bad build would)."""
    src = find_test_binary()
    assert src is not None and src.is_file(), "no tempalias binary; run cargo build (scripts/test does)"
    out = workdir / "builds"
    out.mkdir(exist_ok=True)
    old, new, broken = out / "tempalias-old", out / "tempalias-new", out / "tempalias-broken"
    subprocess.run(["strip", "-o", str(old), str(src)], check=True, timeout=120)
    note = out / "build-note"
    note.write_text("tempalias lab build 2\n")
    subprocess.run(["objcopy", "--add-section", f".note.tempalias-lab={note}", str(old), str(new)], check=True, timeout=120)
    broken.write_text("#!/bin/sh\necho 'tempalias: this build is broken' >&2\nexit 1\n")
    for p in (old, new, broken):
        os.chmod(p, 0o755)
    assert sha256(old) != sha256(new)
    return {"old": old, "new": new, "broken": broken}


@pytest.fixture(scope="session")
def sink(workdir):
    s = SmtpSink(workdir / "sink").start()
    yield s
    s.cleanup()


@pytest.fixture(scope="session")
def lab_secret() -> str:
    return "lab-" + secrets.token_hex(16)


@pytest.fixture(scope="session")
def lab(workdir):
    if os.geteuid() != 0:
        pytest.fail("the Ansible lab needs root (overlay mounts and systemd-nspawn)")
    for tool in ("mmdebstrap", "systemd-nspawn", "ansible-playbook", "ansible-lint", "ssh", "objcopy"):
        assert shutil.which(tool), f"{tool} is not installed; run scripts/test"
    lab = Lab(workdir / "lab", n=4, members=3)  # mx4: a spare for add-node.yml
    try:
        lab.up()
        yield lab
    finally:
        lab.down()


@pytest.fixture(scope="session")
def group_vars(builds, sink, lab_secret) -> dict:
    # The TLS files and the extra secret are only installed: no configuration
    # key reads them yet (SMTP TLS, SRS and DKIM are being built).
    return {
        "tempalias_domains": ["tempalias.test"],
        "tempalias_cluster_secret": lab_secret,
        "tempalias_tls_cert": "-----BEGIN CERTIFICATE-----\nlab-certificate\n-----END CERTIFICATE-----\n",
        "tempalias_tls_key": f"-----BEGIN PRIVATE KEY-----\n{lab_secret}-tls\n-----END PRIVATE KEY-----\n",
        "tempalias_secret_files": [{"name": "srs.key", "content": f"{lab_secret}-srs"}],
        "tempalias_binary_src": str(builds["old"]),
        "tempalias_ready_timeout": 60,
        "tempalias_config": {
            "relay": {"mode": "smarthost", "smarthosts": [sink.url], "timeout_secs": 20},
            "smtp": {"failed_rcpt_delay_ms": 0, "max_failed_rcpts": 100},
            "limits": {"max_usage": 100000},
            # The load generator creates hundreds of aliases from one address.
            "ratelimit": {"enabled": False},
        },
    }


@pytest.fixture(scope="session")
def playbooks(workdir, lab, group_vars) -> Playbooks:
    return Playbooks(workdir, lab.inventory(group_vars))


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and rep.when in ("setup", "call"):
        lab = item.funcargs.get("lab") if hasattr(item, "funcargs") else None
        if lab is not None:
            for h in lab.nodes:
                try:
                    r = h.ssh("journalctl -u tempalias --no-pager -n 40", timeout=20, check=False)
                    rep.sections.append((f"{h.name} journal", r.stdout[-4000:]))
                except Exception as e:  # noqa: BLE001
                    rep.sections.append((f"{h.name} journal", repr(e)))
