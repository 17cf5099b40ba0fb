"""/metrics: valid for `promtool check metrics`, and the counters follow traffic."""

from __future__ import annotations

import re
import shutil
import subprocess

from harness import SENDER, message


def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool (Debian package prometheus) is not installed; run scripts/test"
    return path


def sample(text: str, name: str, labels: dict | None = None) -> float | None:
    """The value of one sample, or None when the series is absent."""
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        m = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)(\s+\S+)?", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m.group(3) or ""))
        if got == {k: str(v) for k, v in (labels or {}).items()}:
            return float(m.group(4))
    return None


def traffic(node):
    alias = node.create_alias(days=1, max_usage=1)
    assert node.send([alias["alias"]], message("metrics", to=alias["alias"])) == {}
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 550  # used up
        assert s.rcpt("x@example.com")[0] == 550  # relay denied
    node.http("POST", "/v1/aliases", {"target": "nope", "days": 1})
    return alias


def test_metrics_pass_promtool_check(node):
    traffic(node)
    text = node.metrics()
    r = subprocess.run([promtool(), "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    problems = (r.stdout + r.stderr).strip()
    assert r.returncode == 0 and not problems, f"promtool check metrics reported:\n{problems}"


def test_metric_names_and_counters_move_after_traffic(node):
    before = node.metrics()
    assert sample(before, "tempalias_smtp_sessions_total") == 0
    assert sample(before, "tempalias_aliases_created_total") == 0
    assert sample(before, "tempalias_raft_is_leader") == 1
    assert sample(before, "tempalias_raft_term") >= 1
    commit_before = sample(before, "tempalias_raft_commit_index")
    assert commit_before >= 1

    traffic(node)
    after = node.metrics()
    assert sample(after, "tempalias_smtp_sessions_total") == 2
    assert sample(after, "tempalias_smtp_messages_total", {"result": "forwarded"}) == 1
    assert sample(after, "tempalias_smtp_rcpt_total", {"result": "accepted"}) == 1
    assert sample(after, "tempalias_smtp_rcpt_total", {"result": "used_up"}) == 1
    assert sample(after, "tempalias_smtp_rcpt_total", {"result": "relay_denied"}) == 1
    assert sample(after, "tempalias_aliases_created_total") == 1
    assert sample(after, "tempalias_forward_duration_seconds_count") == 1
    assert sample(after, "tempalias_forward_duration_seconds_bucket", {"le": "+Inf"}) == 1
    assert sample(after, "tempalias_http_requests_total", {"route": "/v1/aliases", "status": "201"}) == 1
    assert sample(after, "tempalias_http_requests_total", {"route": "/v1/aliases", "status": "400"}) == 1
    # create + reserve + commit at least
    assert sample(after, "tempalias_raft_commit_index") >= commit_before + 3


def test_unmatched_routes_do_not_create_a_series_per_path(node):
    for i in range(5):
        node.http("GET", f"/random/path/{i}")
    text = node.metrics()
    assert "/random/path" not in text
    assert sample(text, "tempalias_http_requests_total", {"route": "unmatched", "status": "404"}) == 5
