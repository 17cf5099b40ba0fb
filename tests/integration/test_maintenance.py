"""Maintenance and drain of one node (`tempalias maintenance on|off|status`):
SMTP 421 4.3.2 for new connections while open sessions finish, HTTP 503 page
(HTML or JSON, Retry-After) except to allowed networks, /readyz 503, /healthz
200, and the state survives a restart until turned off."""

from __future__ import annotations

import http.client
import json
import subprocess

from harness import BIN, SENDER, clean_env, http_request, message, wait_until


def maintenance(node, *args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), "maintenance", "--config", str(node.config_path), *args],
        capture_output=True, text=True, timeout=30, env=clean_env(),
    )


def status(node) -> dict:
    r = maintenance(node, "status", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def get_from(ip: str, port: int, path: str, headers=None) -> tuple[int, dict, bytes]:
    """A GET whose source address is `ip` (a loopback alias such as 127.0.0.2)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(ip, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_drain_refuses_new_work_and_lets_open_sessions_finish(node_factory):
    node = node_factory(config={"maintenance": {"allow": ["127.0.0.2/32"], "retry_after_secs": 77}})
    alias = node.create_alias(days=1, max_usage=5)
    assert status(node)["draining"] is False

    # A session opened before the drain, already past RCPT.
    open_session = node.smtp()
    open_session.ehlo()
    assert open_session.mail(SENDER)[0] == 250
    assert open_session.rcpt(alias["alias"])[0] == 250

    r = maintenance(node, "on")
    assert r.returncode == 0, r.stderr
    assert "draining" in r.stdout
    st = status(node)
    assert st["node"] is True and st["draining"] is True and st["cluster"] is False

    # New SMTP connections are turned away so the sender tries the next MX.
    with node.raw() as raw:
        code, text = raw.reply()
        assert code == 421 and text.startswith("4.3.2"), (code, text)
        assert raw.closed_by_peer()

    # The session that was open finishes its message.
    code, _ = open_session.data(message("during drain", to=alias["alias"]))
    assert code == 250
    open_session.quit()
    assert len(node.captured()) == 1

    # HTTP: JSON for API clients, HTML for browsers, both 503 + Retry-After.
    r = node.http("POST", "/v1/aliases", {"target": "me@example.net", "days": 1})
    assert r.status == 503 and r.header("retry-after") == "77", r
    assert r.json()["error"] == "maintenance"
    r = node.http("GET", f"/v1/aliases/{alias['id']}", headers={"Authorization": f"Bearer {alias['token']}"})
    assert r.status == 503
    r = node.http("GET", "/", headers={"Accept": "text/html,application/xhtml+xml"})
    assert r.status == 503 and r.header("retry-after") == "77"
    assert r.header("content-type").startswith("text/html")
    page = r.body.decode()
    assert "maintenance" in page and "<script" not in page and "http" not in page.split("<body>")[1]

    # Probes: the balancer takes the node out, the process is still healthy.
    assert node.http("GET", "/readyz").status == 503
    assert node.http("GET", "/healthz").status == 200
    wait_until(lambda: "\ntempalias_maintenance 1\n" in node.metrics(), 5, "maintenance gauge")
    assert "tempalias_smtp_drained_total 1" in node.metrics()

    # An allowed network still reaches the API.
    code, _, body = get_from("127.0.0.2", node.http_port, f"/v1/aliases/{alias['id']}",
                             {"Authorization": f"Bearer {alias['token']}"})
    assert code == 200, body
    assert json.loads(body)["remaining"] == 4
    code, _, _ = get_from("127.0.0.3", node.http_port, f"/v1/aliases/{alias['id']}",
                          {"Authorization": f"Bearer {alias['token']}"})
    assert code == 503

    # The drain survives a restart until turned off.
    assert node.stop() == 0
    node.start(wait=False)
    wait_until(lambda: node.http("GET", "/healthz").status == 200, 30, "healthz after restart")
    assert node.http("GET", "/readyz").status == 503
    assert status(node)["node"] is True
    with node.raw() as raw:
        assert raw.reply()[0] == 421

    r = maintenance(node, "off")
    assert r.returncode == 0, r.stderr
    assert status(node)["draining"] is False
    node.wait_ready()
    assert node.remaining(alias) == 4
    with node.smtp() as s:
        assert s.sendmail(SENDER, [alias["alias"]], message("after drain", to=alias["alias"])) == {}
    assert node.remaining(alias) == 3
    # Turning it off again is harmless.
    assert maintenance(node, "off").returncode == 0


def test_maintenance_needs_the_cluster_secret(node, tmp_path):
    cfg = tmp_path / "wrong.toml"
    cfg.write_text(node.config_path.read_text().replace("[cluster]", '[cluster]\nsecret = "not-the-right-secret-at-all"', 1))
    r = subprocess.run([str(BIN), "maintenance", "--config", str(cfg), "on"],
                       capture_output=True, text=True, timeout=30, env=clean_env())
    assert r.returncode != 0
    assert "secret" in r.stderr.lower(), r.stderr
    assert status(node)["draining"] is False
    assert http_request(node.api + "/readyz").status == 200
