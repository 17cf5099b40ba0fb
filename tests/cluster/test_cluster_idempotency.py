"""Idempotent creates across nodes: the key is claimed through Raft together
with the create, so concurrent and later replays to any node return the same
alias and token."""

from __future__ import annotations

import threading
import uuid

from clusterkit import request, show_ok

BODY = {"target": "me@example.net", "days": 1, "max-usage": 2}


def test_replays_to_every_node_return_one_alias(cluster):
    key = str(uuid.uuid4())
    results = []
    lock = threading.Lock()

    def one(nd):
        r = request(nd, "POST", "/v1/aliases", BODY, headers={"Idempotency-Key": key})
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one, args=(nd,)) for nd in cluster for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 12
    assert {r.status for r in results} == {201}, [(r.status, r.body) for r in results]
    bodies = {(r.json()["id"], r.json()["token"]) for r in results}
    assert len(bodies) == 1, bodies
    alias = results[0].json()
    # Later replays, on each node, and the token works everywhere.
    for nd in cluster:
        r = request(nd, "POST", "/aliases", BODY, headers={"Idempotency-Key": key})
        assert r.status == 201 and r.json() == alias
        assert show_ok(nd, alias)["remaining"] == 2
    other = request(cluster.node(2), "POST", "/v1/aliases", {**BODY, "days": 2}, headers={"Idempotency-Key": key})
    assert other.status == 422
