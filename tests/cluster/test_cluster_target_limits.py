"""Per-target limits across nodes: a confirmation made through one node lets
mail through another, and racing creates through every node never exceed the
per-target cap (it is decided in the replicated state machine)."""

from __future__ import annotations

import email
import email.policy
import re
from concurrent.futures import ThreadPoolExecutor

from clusterkit import SENDER, TARGET, create_ok, rcpt_reply, request, send, show_ok, wait_until

LINK = re.compile(r"https?://[^\s]+/v1/confirm/([0-9a-f]{64})")


def confirmation_mails(node) -> list[bytes]:
    out = []
    if node.capture_dir.exists():
        for eml in sorted(node.capture_dir.glob("*.eml")):
            if b'"mail_from":""' in eml.with_suffix(".json").read_bytes():
                out.append(eml.read_bytes())
    return out


def test_confirmation_through_one_node_lets_mail_through_another(cluster_factory):
    cluster = cluster_factory(extra={"limits": {"confirm_targets": True}})
    taker, confirmer, sender = cluster.node(1), cluster.node(2), cluster.node(3)
    alias = create_ok(taker, days=3, max_usage=5)
    assert alias["state"] == "awaiting_confirmation", alias

    # The node that took the create mails the link (and only that node).
    mails = wait_until(lambda: confirmation_mails(taker), 15, "the confirmation mail")
    assert len(mails) == 1
    assert confirmation_mails(confirmer) == [] and confirmation_mails(sender) == []
    msg = email.message_from_bytes(mails[0], policy=email.policy.default)
    token = LINK.search(msg.get_body(preferencelist=("plain",)).get_content()).group(1)

    code, text = rcpt_reply(sender, alias["alias"])
    assert code == 550 and text.startswith("5.7.1"), (code, text)
    assert TARGET not in text

    # Following the link on another node: the GET page, then the button.
    page = request(confirmer, "GET", f"/v1/confirm/{token}")
    assert page.status == 200 and b'method="post"' in page.body, page
    done = request(confirmer, "POST", f"/v1/confirm/{token}")
    assert done.status == 200 and b"Address confirmed" in done.body, done

    # Every node sees it; the third forwards.
    for nd in cluster:
        assert show_ok(nd, alias)["state"] == "active", nd.name
    res = send(sender, alias["alias"])
    assert res.ok, str(res)
    # The sender is SRS-rewritten (SRS0=HASH=TT=domain=local@alias domain).
    local, _, dom = SENDER.rpartition("@")
    srs = re.compile(rf'"mail_from":"SRS0=[A-Za-z0-9+/]{{6}}=[A-Z2-7]{{2}}={re.escape(dom)}={re.escape(local)}@'.encode())
    forwarded = [p for p in sender.capture_dir.glob("*.json") if srs.search(p.read_bytes())]
    assert len(forwarded) == 1


def test_racing_creates_through_every_node_respect_the_cap(cluster_factory):
    cap = 3
    cluster = cluster_factory(extra={"limits": {"max_aliases_per_target": cap}})
    nodes = list(cluster)
    body = {"target": "racer@example.net", "days": 1}

    def one(i):
        return request(nodes[i % len(nodes)], "POST", "/v1/aliases", body).status

    with ThreadPoolExecutor(max_workers=9) as pool:
        statuses = list(pool.map(one, range(9)))
    assert sorted(statuses) == [201] * cap + [409] * (9 - cap), statuses
