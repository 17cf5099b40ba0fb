"""Per-client rate limits: token buckets for creates, status reads and failed
lookups, the IETF RateLimit headers, 429 with Retry-After and a JSON error,
client address from the socket, forwarding headers only from trusted
proxies."""

from __future__ import annotations

import http.client
import json

from harness import TARGET

BODY = {"target": TARGET, "days": 1}


def req(node, method, path, body=None, headers=None, source="127.0.0.1"):
    """One request from `source` (a loopback address); (status, headers, json)."""
    conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10, source_address=(source, 0))
    hdrs = dict(headers or {})
    data = None
    if body is not None:
        data = json.dumps(body)
        hdrs["Content-Type"] = "application/json"
    try:
        conn.request(method, path, data, hdrs)
        r = conn.getresponse()
        raw = r.read()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, (json.loads(raw) if raw else None)
    finally:
        conn.close()


def limited(node_factory, **limits):
    return node_factory(config={"ratelimit": {"enabled": True, **limits}})


def test_create_limit_with_headers(node_factory):
    node = limited(node_factory, create_quota=3, create_window_secs=60)
    for left in (2, 1, 0):
        status, h, body = req(node, "POST", "/v1/aliases", BODY)
        assert status == 201, body
        assert h["ratelimit-policy"] == '"create";q=3;w=60'
        assert h["ratelimit"].startswith(f'"create";r={left};t=')
        assert h["ratelimit-limit"] == "3" and h["ratelimit-remaining"] == str(left)
        assert 0 < int(h["ratelimit-reset"]) <= 60
    status, h, body = req(node, "POST", "/aliases", BODY)
    assert status == 429
    assert body["error"] == "rate_limited"
    assert 1 <= int(h["retry-after"]) <= 20
    assert h["ratelimit-remaining"] == "0"
    # Another client address has its own bucket.
    status, _, _ = req(node, "POST", "/v1/aliases", BODY, source="127.0.0.2")
    assert status == 201


def test_the_page_form_draws_on_the_create_bucket_and_says_so_in_html(node_factory):
    node = limited(node_factory, create_quota=1, create_window_secs=600)
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    body = f"target={TARGET.replace('@', '%40')}&days=1&uses="

    def post():
        conn = http.client.HTTPConnection("127.0.0.1", node.http_port, timeout=10)
        try:
            conn.request("POST", "/create", body, form)
            r = conn.getresponse()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read().decode()
        finally:
            conn.close()

    status, h, page = post()
    assert status == 201, page
    assert h["ratelimit-policy"] == '"create";q=1;w=600'
    # The bucket is empty: neither the form nor the API creates any more.
    status, h, page = post()
    assert status == 429
    assert h["content-type"].startswith("text/html")
    assert "Too many new aliases from your address" in page
    assert int(h["retry-after"]) >= 1 and h["ratelimit-remaining"] == "0"
    status, _, answer = req(node, "POST", "/v1/aliases", BODY)
    assert status == 429 and answer["error"] == "rate_limited"


def test_failed_lookups_stop_guessing(node_factory):
    node = limited(node_factory, failed_quota=3, failed_window_secs=60)
    status, _, alias = req(node, "POST", "/v1/aliases", BODY)
    assert status == 201
    good = {"Authorization": f"Bearer {alias['token']}"}
    bad = {"Authorization": "Bearer " + "0" * 64}
    for left in (2, 1, 0):
        status, h, _ = req(node, "GET", f"/v1/aliases/{alias['id']}", headers=bad)
        assert status == 404
        assert h["ratelimit-policy"] == '"failed";q=3;w=60' and h["ratelimit-remaining"] == str(left)
    status, h, _ = req(node, "GET", "/v1/aliases/zzzzzzzzzzzz", headers=bad)
    assert status == 429 and h["ratelimit-policy"].startswith('"failed"')
    # Even the right token waits now: the guesser cannot tell a hit.
    status, _, body = req(node, "GET", f"/v1/aliases/{alias['id']}", headers=good)
    assert status == 429 and body["error"] == "rate_limited"
    status, h, body = req(node, "GET", f"/v1/aliases/{alias['id']}", headers=good, source="127.0.0.2")
    assert status == 200 and body["remaining"] == alias["remaining"]
    assert h["ratelimit-policy"].startswith('"status"')


def test_status_reads_are_limited(node_factory):
    node = limited(node_factory, status_quota=2, status_window_secs=60)
    _, _, alias = req(node, "POST", "/v1/aliases", BODY)
    auth = {"Authorization": f"Bearer {alias['token']}"}
    assert req(node, "GET", f"/v1/aliases/{alias['id']}", headers=auth)[0] == 200
    assert req(node, "GET", f"/v1/aliases/{alias['id']}", headers=auth)[0] == 200
    status, h, _ = req(node, "GET", f"/v1/aliases/{alias['id']}", headers=auth)
    assert status == 429 and h["ratelimit-policy"] == '"status";q=2;w=60'
    assert int(h["retry-after"]) == 30
    # Probes and the rest are not limited.
    for _ in range(5):
        assert req(node, "GET", "/healthz")[0] == 200


def test_forwarded_headers_only_from_trusted_proxies(node_factory):
    node = node_factory(config={
        "http": {"trusted_proxies": ["127.0.0.1/32"]},
        "ratelimit": {"enabled": True, "create_quota": 1, "create_window_secs": 600},
    })
    # Through the trusted proxy (127.0.0.1) each forwarded client has a bucket.
    assert req(node, "POST", "/v1/aliases", BODY, {"X-Forwarded-For": "203.0.113.1"})[0] == 201
    assert req(node, "POST", "/v1/aliases", BODY, {"X-Forwarded-For": "203.0.113.1"})[0] == 429
    assert req(node, "POST", "/v1/aliases", BODY, {"Forwarded": 'for="203.0.113.2:1234"'})[0] == 201
    # A spoofed first hop does not help: the rightmost untrusted hop counts.
    assert req(node, "POST", "/v1/aliases", BODY, {"X-Forwarded-For": "198.51.100.9, 203.0.113.1"})[0] == 429
    # From an untrusted peer the headers are ignored: 127.0.0.2 is the client.
    assert req(node, "POST", "/v1/aliases", BODY, {"X-Forwarded-For": "203.0.113.3"}, source="127.0.0.2")[0] == 201
    assert req(node, "POST", "/v1/aliases", BODY, {"X-Forwarded-For": "203.0.113.4"}, source="127.0.0.2")[0] == 429
