"""schemathesis, run against a live node with the OpenAPI document the node
serves (`/openapi.yaml`): no server error, and every answer's status, content
type, headers and body as the document says.

Two bounded runs (a fixed seed, a few dozen examples per operation):
unauthenticated, which covers creates, the page routes and the 401/404
answers; then with one real alias's id and token, which covers the 200, 304
and 204 answers of GET and DELETE /v1/aliases/{id}.
"""

from __future__ import annotations

import os
import quopri
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from harness import BIN, Node, http_request

CHECKS = ",".join(
    [
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
    ]
)
MAX_EXAMPLES = 25
RUN_TIMEOUT = 90


def schemathesis_command() -> list[str]:
    exe = shutil.which("schemathesis") or shutil.which("st")
    if exe:
        return [exe]
    return [sys.executable, "-m", "schemathesis.cli"]


@pytest.fixture
def node(tmp_path):
    assert BIN.exists(), f"{BIN} missing: run cargo build"
    # Per-target rules on, so their answers (409, awaiting_confirmation, the
    # confirmation pages) are checked against the document too.
    n = Node(tmp_path, "node", config={"limits": {"confirm_targets": True, "max_aliases_per_target": 2}})
    try:
        n.start()
        yield n
    finally:
        n.cleanup()


def run_schemathesis(node: Node, tmp_path: Path, config: str, name: str) -> str:
    config_file = tmp_path / f"{name}.toml"
    config_file.write_text(config)
    cmd = schemathesis_command() + [
        "--config-file", str(config_file),
        "run", f"{node.api}/openapi.yaml",
        "--url", node.api,
        "--checks", CHECKS,
        "--max-examples", str(MAX_EXAMPLES),
        "--seed", "20261129",
        "--workers", "2",
        "--request-timeout", "20",
        "--no-shrink",
    ]
    env = dict(os.environ, NO_COLOR="1", SCHEMATHESIS_TELEMETRY="false")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT, env=env, cwd=tmp_path)
    text = out.stdout + out.stderr
    (tmp_path / f"{name}.out").write_text(text)
    assert out.returncode == 0, f"schemathesis ({name}) found problems:\n{text[-8000:]}\n{node.logs()[-4000:]}"
    m = re.search(r"(\d+) generated, (\d+) passed", text)
    assert m and m.group(1) == m.group(2) and int(m.group(1)) > 0, text[-3000:]
    return text


def test_api_matches_its_openapi_document(node, tmp_path):
    run_schemathesis(node, tmp_path, "", "anonymous")

    # A target of its own: the anonymous run used the examples' up to the cap.
    alias = node.create_alias(target="contract@example.net", days=2, max_usage=3)
    config = (
        f'headers = {{ Authorization = "Bearer {alias["token"]}" }}\n'
        f'[parameters]\n"path.id" = "{alias["id"]}"\n'
    )
    run_schemathesis(node, tmp_path, config, "authenticated")
    # The confirmation routes with a real pending token (the first create's).
    mails = [m for m in node.captured() if m["meta"]["mail_from"] == ""]
    assert mails, "no confirmation mail was captured"
    token = re.search(rb"/v1/confirm/([0-9a-f]{64})", quopri.decodestring(mails[0]["eml"])).group(1).decode()
    run_schemathesis(node, tmp_path, f'[parameters]\n"path.token" = "{token}"\n', "confirmation")
    # The authenticated run really used the alias: at least its DELETE went through.
    r = http_request(f"{node.api}/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"})
    assert r.status == 200 and r.json()["state"] == "revoked", r.body
