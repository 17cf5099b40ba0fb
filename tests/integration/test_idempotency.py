"""Idempotent creates (`Idempotency-Key` on POST /v1/aliases and /aliases):
a replay returns the first 201 (same alias, same token), concurrent requests
with one key create one alias, another body with the key gets 422, and the
key is free again after 24 h of replicated time."""

from __future__ import annotations

import threading
import uuid

from harness import TARGET

BODY = {"target": TARGET, "days": 2, "max-usage": 3}


def keyed(node, key, body=BODY, path="/v1/aliases"):
    return node.http("POST", path, body, headers={"Idempotency-Key": key})


def created_total(node) -> float:
    for line in node.metrics().splitlines():
        if line.startswith("tempalias_aliases_created_total "):
            return float(line.split()[1])
    return 0.0


def test_replay_returns_the_first_answer(node):
    key = str(uuid.uuid4())
    first = keyed(node, key)
    assert first.status == 201, first
    assert first.header("idempotent-replayed") is None
    a = first.json()
    # The token works like any other.
    assert node.get_alias(a)["remaining"] == 3

    again = keyed(node, key, path="/aliases")
    assert again.status == 201, again
    assert again.header("idempotent-replayed") == "true"
    assert again.json() == a
    assert again.header("location") == f"/v1/aliases/{a['id']}"
    # Quoted form of the same key (structured-field string) is the same key.
    assert keyed(node, f'"{key}"').json() == a

    # A replay after the alias changed still gives the first answer.
    assert node.http("DELETE", f"/v1/aliases/{a['id']}", headers={"Authorization": f"Bearer {a['token']}"}).status == 204
    assert keyed(node, key).json() == a
    assert node.get_alias(a)["state"] == "revoked"

    # Equivalent body (the defaults spelt out differently) is the same request.
    other = keyed(node, key, body={"target": TARGET, "max-usage": 3, "days": 2})
    assert other.status == 201 and other.json() == a


def test_same_key_other_body_is_refused(node):
    key = str(uuid.uuid4())
    assert keyed(node, key).status == 201
    r = keyed(node, key, body={"target": TARGET, "days": 1})
    assert r.status == 422, r
    assert r.json()["error"] == "idempotency_key_reused"
    r = keyed(node, key, body={"target": "other@example.net", "days": 2, "max-usage": 3})
    assert r.status == 422
    # Without the key, creates behave as before: a new alias each time.
    x = node.http("POST", "/v1/aliases", BODY).json()
    y = node.http("POST", "/v1/aliases", BODY).json()
    assert x["id"] != y["id"] and x["token"] != y["token"]


def test_bad_keys_are_refused(node):
    for bad in ["short", "x" * 256, "has a space in the middle of it"]:
        r = keyed(node, bad)
        assert r.status == 400, (bad, r)
        assert r.json()["error"] == "invalid_idempotency_key"


def test_concurrent_requests_with_one_key_create_one_alias(node):
    key = str(uuid.uuid4())
    before = created_total(node)
    results = []
    lock = threading.Lock()

    def one():
        r = keyed(node, key)
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(results) == 16
    assert {r.status for r in results} == {201}
    bodies = {(r.json()["id"], r.json()["token"]) for r in results}
    assert len(bodies) == 1, bodies
    assert sum(1 for r in results if r.header("idempotent-replayed") is None) == 1
    assert created_total(node) == before + 1


def test_key_expires_after_a_day_of_replicated_time(node):
    key = str(uuid.uuid4())
    a = keyed(node, key).json()
    node.set_clock(23 * 3600)
    assert keyed(node, key).json() == a
    assert keyed(node, key, body={"target": TARGET, "days": 1}).status == 422
    node.set_clock(24 * 3600 + 60)
    r = keyed(node, key, body={"target": TARGET, "days": 1})
    assert r.status == 201, r
    b = r.json()
    assert b["id"] != a["id"] and b["token"] != a["token"]
    # The old alias keeps its own token.
    assert node.get_alias(a)["id"] == a["id"]
