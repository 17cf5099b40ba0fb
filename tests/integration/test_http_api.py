"""The HTTP API: create, show, revoke, and every error with its status and JSON body."""

from __future__ import annotations

import re
import socket
from datetime import datetime, timedelta, timezone

import pytest

from harness import DOMAIN, SENDER, TARGET, http_request


def assert_error(r, status: int, code: str, mentions: str | None = None):
    assert r.status == status, (r.status, r.body)
    assert r.header("content-type", ).startswith("application/json"), r.headers
    body = r.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    if mentions:
        assert mentions in body["message"], body
    return body


def test_create_returns_201_with_all_fields(node):
    before = datetime.now(timezone.utc).replace(microsecond=0)
    r = node.http("POST", "/v1/aliases", {"target": TARGET, "days": 3, "max-usage": 2})
    assert r.status == 201, r.body
    assert r.header("content-type").startswith("application/json")
    a = r.json()
    assert re.fullmatch(r"[a-z0-9]{10,}", a["id"]), a["id"]
    assert a["alias"] == f"{a['id']}@{DOMAIN}"
    assert a["target"] == TARGET
    assert a["max_usage"] == 2 and a["remaining"] == 2
    assert a["state"] == "active"
    assert re.fullmatch(r"[0-9a-f]{64}", a["token"]), "token: 256 random bits, hex"
    assert r.header("location") == f"/v1/aliases/{a['id']}"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", a["valid_until"]), a["valid_until"]
    valid_until = datetime.fromisoformat(a["valid_until"].replace("Z", "+00:00"))
    assert before + timedelta(days=3) - timedelta(seconds=5) <= valid_until <= datetime.now(timezone.utc) + timedelta(days=3, seconds=5)


def test_classic_post_aliases_works_and_ids_differ(node):
    ids = set()
    for _ in range(5):
        a = node.create_alias(days=1, max_usage=1, path="/aliases")
        assert a["alias"].endswith("@" + DOMAIN)
        ids.add(a["id"])
    assert len(ids) == 5


def test_missing_limit_defaults_to_the_cap(node):
    a = node.create_alias(days=2)
    assert a["max_usage"] == 100 and a["remaining"] == 100
    b = node.create_alias(max_usage=4)
    created = datetime.fromisoformat(b["created_at"].replace("Z", "+00:00"))
    valid_until = datetime.fromisoformat(b["valid_until"].replace("Z", "+00:00"))
    assert valid_until - created == timedelta(days=60)


JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    "body,headers,status,code,mentions",
    [
        (b'{"target": "me@example.net", "days": 3', JSON, 400, "invalid_json", None),
        (b"not json at all", JSON, 400, "invalid_json", None),
        (b"", JSON, 400, "invalid_json", None),
        (b'{"target": "me@example.net", "days": 1, "colour": "red"}', JSON, 400, "invalid_request", "colour"),
        (b'{"target": "me@example.net", "days": "3"}', JSON, 400, "invalid_request", None),
        (b'{"target": "me@example.net", "max_usage": 3, "max-usage": 3}', JSON, 400, "invalid_request", "max_usage"),
        (b'[]', JSON, 400, "invalid_request", "JSON object"),
        (b'{"target": "me@example.net"}', JSON, 400, "invalid_request", None),
        (b'{"days": 3}', JSON, 400, "invalid_request", "target"),
        (b'["me@example.net", 3]', JSON, 400, "invalid_request", None),
        (b'{"target": "not-an-address", "days": 1}', JSON, 400, "invalid_target", None),
        (b'{"target": "a@localhost", "days": 1}', JSON, 400, "invalid_target", None),
        (b'{"target": "me@example.net\\r\\nBcc: x@example.com", "days": 1}', JSON, 400, "invalid_target", None),
        (f'{{"target": "abcdefghijkl@{DOMAIN}", "days": 1}}'.encode(), JSON, 400, "invalid_target", None),
        (b'{"target": "me@example.net", "days": 0}', JSON, 400, "invalid_limit", "days"),
        (b'{"target": "me@example.net", "days": -1}', JSON, 400, "invalid_limit", "days"),
        (b'{"target": "me@example.net", "max-usage": 0}', JSON, 400, "invalid_limit", "max-usage"),
        (b'{"target": "me@example.net", "days": 61}', JSON, 400, "limit_exceeded", "60"),
        (b'{"target": "me@example.net", "max-usage": 101}', JSON, 400, "limit_exceeded", "100"),
        (b'{"target": "me@example.net", "days": 1}', {"Content-Type": "text/plain"}, 415, "unsupported_media_type", None),
        (b'{"target": "me@example.net", "days": 1}', {}, 415, "unsupported_media_type", None),
        (b'{"target": "me@example.net", "days": 1, "x": "' + b"y" * 5000 + b'"}', JSON, 413, "body_too_large", None),
    ],
)
@pytest.mark.parametrize("path", ["/v1/aliases", "/aliases"])
def test_create_errors(node, path, body, headers, status, code, mentions):
    r = node.http("POST", path, body, headers=headers)
    assert_error(r, status, code, mentions)


def test_errors_speak_the_api_words_not_internal_type_names(node):
    for body in (b"[]", b'"x"', b'{"target": "me@example.net", "days": "3"}', b'{"target": 1, "days": 1}'):
        r = node.http("POST", "/v1/aliases", body, headers=JSON)
        assert r.status == 400, (body, r.status, r.body)
        message = r.json()["message"]
        for internal in ("struct", "CreateRequest", "i64", "sequence", "u32"):
            assert internal not in message, (body, message)


def test_max_usage_is_accepted_as_an_alias_of_max_hyphen_usage(node):
    """The response says `max_usage`; sending that spelling back works."""
    r = node.http("POST", "/v1/aliases", {"target": TARGET, "days": 1, "max_usage": 3})
    assert r.status == 201, (r.status, r.body)
    assert r.json()["max_usage"] == 3 and r.json()["remaining"] == 3


def test_numbers_too_large_for_any_integer_type_are_400_not_500(node):
    r = node.http("POST", "/v1/aliases", b'{"target": "me@example.net", "days": 99999999999999999999999}', headers=JSON)
    assert r.status == 400, (r.status, r.body)
    assert r.json()["error"] in ("invalid_request", "invalid_limit", "limit_exceeded")


def test_no_alias_was_created_by_failed_requests(node):
    node.http("POST", "/v1/aliases", {"target": TARGET, "days": 61})
    node.http("POST", "/v1/aliases", {"target": "nope", "days": 1})
    assert "tempalias_aliases_created_total 0" in node.metrics()


def test_show_with_token_and_etag(node):
    a = node.create_alias(days=2, max_usage=3)
    auth = {"Authorization": f"Bearer {a['token']}"}
    r = node.http("GET", f"/v1/aliases/{a['id']}", headers=auth)
    assert r.status == 200
    v = r.json()
    for key in ("alias", "id", "target", "valid_until", "max_usage", "remaining"):
        assert v[key] == a[key], key
    assert "token" not in v
    etag = r.header("etag")
    assert etag and etag.startswith('"')

    r = node.http("GET", f"/v1/aliases/{a['id']}", headers={**auth, "If-None-Match": etag})
    assert r.status == 304 and r.body == b""

    # A use changes the representation, so the old ETag no longer matches.
    with node.smtp() as s:
        s.sendmail(SENDER, [a["alias"]], b"Subject: x\r\n\r\nx\r\n")
    r = node.http("GET", f"/v1/aliases/{a['id']}", headers={**auth, "If-None-Match": etag})
    assert r.status == 200 and r.json()["remaining"] == 2
    assert r.header("etag") != etag


def test_401_without_token_and_404_identical_for_wrong_token_and_unknown_id(node):
    a = node.create_alias(days=1, max_usage=1)
    r = node.http("GET", f"/v1/aliases/{a['id']}")
    assert_error(r, 401, "unauthorized")
    r = node.http("GET", f"/v1/aliases/{a['id']}", headers={"Authorization": f"Basic {a['token']}"})
    assert r.status == 401

    wrong_token = node.http("GET", f"/v1/aliases/{a['id']}", headers={"Authorization": "Bearer " + "0" * 64})
    unknown_id = node.http("GET", "/v1/aliases/zzzzzzzzzzzz", headers={"Authorization": f"Bearer {a['token']}"})
    bad_shape = node.http("GET", "/v1/aliases/NOT-AN-ID", headers={"Authorization": f"Bearer {a['token']}"})
    for r in (wrong_token, unknown_id, bad_shape):
        assert_error(r, 404, "not_found")
    assert wrong_token.body == unknown_id.body == bad_shape.body
    strip = lambda h: {k: v for k, v in h.items() if k != "date"}  # noqa: E731
    assert strip(wrong_token.headers) == strip(unknown_id.headers)

    # The same for DELETE: nothing is revoked without the right token.
    r = node.http("DELETE", f"/v1/aliases/{a['id']}", headers={"Authorization": "Bearer " + "0" * 64})
    assert_error(r, 404, "not_found")
    r = node.http("DELETE", f"/v1/aliases/{a['id']}")
    assert_error(r, 401, "unauthorized")
    assert node.get_alias(a)["state"] == "active"


def test_delete_revokes(node):
    a = node.create_alias(days=1, max_usage=5)
    auth = {"Authorization": f"Bearer {a['token']}"}
    code, _ = node.rcpt_reply(a["alias"])
    assert code == 250
    r = node.http("DELETE", f"/v1/aliases/{a['id']}", headers=auth)
    assert r.status == 204 and r.body == b""
    code, text = node.rcpt_reply(a["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert node.get_alias(a)["state"] == "revoked"


def test_unknown_route_and_method(node):
    r = node.http("GET", "/v1/nothing-here")
    assert r.status == 404
    assert r.json()["error"] == "no_route"
    r = node.http("PUT", "/v1/aliases", {"target": TARGET, "days": 1})
    assert_error(r, 405, "method_not_allowed")


def test_health_and_readiness(node):
    r = node.http("GET", "/healthz")
    assert r.status == 200
    r = node.http("GET", "/readyz")
    assert r.status == 200
    assert r.json()["ready"] is True


def test_request_with_bogus_content_length_is_not_a_500(node):
    """A body that claims 5000 bytes is refused before it is read."""
    with socket.create_connection(("127.0.0.1", node.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/aliases HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 5000\r\nConnection: close\r\n\r\n{")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1])
    assert status in (400, 413), data[:300]


def test_create_through_urllib_without_json_helper(node):
    r = http_request(node.api + "/aliases", "POST", b'{"target":"me@example.net","days":3,"max-usage":2}',
                     headers={"Content-Type": "application/json; charset=utf-8"})
    assert r.status == 201, r.body
