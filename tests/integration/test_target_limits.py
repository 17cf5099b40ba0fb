"""Per-target limits: confirmation by the target (`[limits] confirm_targets`)
and the cap on live aliases (`[limits] max_aliases_per_target`).

The confirmation mail is read from the capture directory (it goes through
the same relay as forwarded mail), its link is followed with a real HTTP
client, and smtplib shows the alias refusing mail before and forwarding
after."""

from __future__ import annotations

import email
import email.policy
import re
import smtplib
import urllib.parse

import pytest

from harness import SENDER, TARGET, http_request, message, srs_of, wait_until

LINK = re.compile(r"(https?://[^\s]+/v1/confirm/([0-9a-f]{64}))")


def confirmation_mails(node) -> list[dict]:
    return [m for m in node.captured() if m["meta"]["mail_from"] == ""]


def link_of(mail: dict) -> tuple[str, str]:
    msg = email.message_from_bytes(mail["eml"], policy=email.policy.default)
    body = msg.get_body(preferencelist=("plain",)).get_content()
    found = LINK.search(body)
    assert found, body
    return found.group(1), found.group(2)


def refused_rcpt(node, rcpt: str) -> tuple[int, bytes]:
    with node.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        reply = s.rcpt(rcpt)
        s.rset()
        return reply


def test_an_alias_forwards_only_after_its_target_confirmed(node_factory):
    node = node_factory(config={"limits": {"confirm_targets": True}})
    first = node.create_alias(days=3, max_usage=5)
    assert first["state"] == "awaiting_confirmation", first
    second = node.create_alias(days=3, max_usage=5)
    assert second["state"] == "awaiting_confirmation", second
    assert node.get_alias(first)["state"] == "awaiting_confirmation"
    # The no-JavaScript form says so on its result page.
    form = node.http(
        "POST", "/create", "target=me%40example.net&days=1&uses=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 201 and b'id="r-notice"' in form.body, form

    # One mail to the target, from the null sender, whatever the number of aliases.
    mails = wait_until(lambda: confirmation_mails(node), 10, "the confirmation mail")
    assert [m["meta"]["rcpt_to"] for m in mails] == [[TARGET]]
    msg = email.message_from_bytes(mails[0]["eml"], policy=email.policy.default)
    assert msg["To"] == TARGET and msg["Auto-Submitted"] == "auto-generated", msg
    url, token = link_of(mails[0])
    # The link is the node's own (no public_url configured), with nothing else in it.
    assert urllib.parse.urlsplit(url).netloc == f"127.0.0.1:{node.http_port}"
    assert first["id"] not in url and TARGET not in url

    # Before confirming: refused with a fixed text that does not name the target.
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPRecipientsRefused) as e:
            s.sendmail(SENDER, [first["alias"]], message("too early", to=first["alias"]))
    code, text = e.value.recipients[first["alias"]]
    assert code == 550 and text.startswith(b"5.7.1 "), (code, text)
    assert TARGET.encode() not in text and b"example.net" not in text

    # A wrong token is a 404 page (and a failed lookup for the rate limiter).
    wrong = http_request(url.replace(token, "0" * 64))
    assert wrong.status == 404 and b"not valid" in wrong.body

    # Following the link shows a page with a button; the GET confirms nothing.
    page = http_request(url)
    assert page.status == 200, page
    assert page.header("cache-control") == "no-store"
    assert page.header("referrer-policy") == "no-referrer"
    assert re.search(rb'<form method="post" action="/v1/confirm/' + token.encode() + rb'">', page.body), page.body
    assert node.get_alias(first)["state"] == "awaiting_confirmation"
    assert refused_rcpt(node, first["alias"])[0] == 550

    # Pressing the button: the form's POST.
    done = http_request(url, method="POST", body=b"", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert done.status == 200 and b"Address confirmed" in done.body, done
    for a in (first, second):
        assert node.get_alias(a)["state"] == "active"
    # The link still says confirmed (a second press changes nothing).
    again = http_request(url, method="POST", body=b"", headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert again.status == 200 and b"Address confirmed" in again.body
    assert http_request(url).status == 200

    # Now mail goes through, to both aliases.
    refused = node.send([first["alias"], second["alias"]], message("after confirming", to=first["alias"]))
    assert refused == {}
    forwarded = wait_until(
        lambda: [m for m in node.captured() if srs_of(m["meta"]["mail_from"], SENDER)], 10, "the forwarded mail"
    )
    assert forwarded[0]["meta"]["rcpt_to"] == [TARGET]
    assert node.get_alias(first)["remaining"] == 4

    # New aliases for a confirmed target forward at once; no further mail.
    third = node.create_alias(days=1, max_usage=1)
    assert third["state"] == "active", third
    assert len(confirmation_mails(node)) == 1

    metrics = node.metrics()
    assert re.search(r'^tempalias_confirmations_total\{event="mail_sent"\} 1$', metrics, re.M), metrics
    assert re.search(r'^tempalias_confirmations_total\{event="confirmed"\} 1$', metrics, re.M), metrics
    assert re.search(r'^tempalias_smtp_rcpt_total\{result="unconfirmed"\} 2$', metrics, re.M), metrics


def test_wrong_tokens_are_failed_lookups(node_factory):
    node = node_factory(config={"ratelimit": {"enabled": True, "failed_quota": 2, "failed_window_secs": 600}})
    writes = metric(node, "tempalias_raft_write_duration_seconds_count")
    for path in ("/v1/confirm/" + "b" * 64, "/v1/confirm/" + "c" * 64):
        r = node.http("POST", path, b"", headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 404, r
        assert r.header("ratelimit-policy") == '"failed";q=2;w=600', r.headers
    # A guessed token costs no Raft write (it is refused from the replica).
    assert metric(node, "tempalias_raft_write_duration_seconds_count") == writes
    # Out of failed lookups: refused before looking, links and alias status alike.
    r = node.http("GET", "/v1/confirm/" + "d" * 64)
    assert r.status == 429 and r.header("retry-after"), r
    assert node.http("GET", "/v1/aliases/abcdefghijkl", headers={"Authorization": "Bearer x"}).status == 429


def test_targets_are_not_asked_without_confirm_targets(node):
    a = node.create_alias(days=1, max_usage=1)
    assert a["state"] == "active"
    assert node.send([a["alias"]], message("plain", to=a["alias"])) == {}
    # The confirm route answers 404 for any token: nothing is pending.
    assert node.http("GET", "/v1/confirm/" + "a" * 64).status == 404
    assert node.http("GET", "/v1/confirm/short").status == 404


def test_a_public_url_makes_the_link(node_factory):
    node = node_factory(config={"limits": {"confirm_targets": True}, "http": {"public_url": "https://aliases.example/"}})
    node.create_alias(days=1, max_usage=1)
    mails = wait_until(lambda: confirmation_mails(node), 10, "the confirmation mail")
    url, token = link_of(mails[0])
    assert url == f"https://aliases.example/v1/confirm/{token}"


def test_the_cap_on_live_aliases_per_target(node_factory):
    node = node_factory(config={"limits": {"max_aliases_per_target": 2}})
    a = node.create_alias(days=1, max_usage=1)
    node.create_alias(target=TARGET.upper().replace("EXAMPLE", "example"), days=1, max_usage=1)
    r = node.http("POST", "/v1/aliases", {"target": TARGET, "days": 1})
    assert r.status == 409, r
    body = r.json()
    assert body["error"] == "target_limit_reached" and "2 live aliases" in body["message"], body
    # Another target is not affected.
    node.create_alias(target="other@example.net", days=1)
    # Revoking one frees its place.
    d = node.http("DELETE", f"/v1/aliases/{a['id']}", headers={"Authorization": f"Bearer {a['token']}"})
    assert d.status == 204
    node.create_alias(days=1)
    assert node.http("POST", "/v1/aliases", {"target": TARGET, "days": 1}).status == 409
    # An alias used up frees its place too.
    used = node.create_alias(target="third@example.net", max_usage=1)
    node.create_alias(target="third@example.net", max_usage=1)
    assert node.http("POST", "/v1/aliases", {"target": "third@example.net", "days": 1}).status == 409
    assert node.send([used["alias"]], message("use it up", to=used["alias"])) == {}
    node.create_alias(target="third@example.net", days=1)
    # The no-JavaScript form says so next to the target.
    form = node.http(
        "POST",
        "/create",
        "target=third%40example.net&days=1&uses=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert form.status == 409, form
    assert b"live aliases" in form.body


def metric(node, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} (\S+)$", node.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_a_confirmation_mail_the_upstream_refuses_is_withdrawn(node_factory, sink_factory):
    # The smarthost refuses every recipient for good: the request is
    # withdrawn at once, so the next create asks again (instead of the target
    # waiting for the link to lapse).
    sink = sink_factory(options=["-f", "RCPT", "-B", "550 5.1.1 no such user"])
    node = node_factory(relay="smarthost", smarthosts=[sink.url], config={"limits": {"confirm_targets": True}})
    failed = 'tempalias_confirmations_total{event="mail_failed"}'
    a = node.create_alias(days=1, max_usage=1)
    assert a["state"] == "awaiting_confirmation"
    wait_until(lambda: metric(node, failed) == 1, 15, "the first mail to fail")
    node.create_alias(days=1, max_usage=1)
    wait_until(lambda: metric(node, failed) == 2, 15, "the second create to ask again")
    assert metric(node, 'tempalias_confirmations_total{event="mail_sent"}') == 0
    assert "confirmation mail refused code=550" in node.logs()
