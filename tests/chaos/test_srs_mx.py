"""Issue 9: the SRS round trip with a real Postfix, every hop found by MX lookup.

The lab (lab.py) with `bouncing_target=True`: nsd serves tempalias.test (MX:
the three nodes), target.test (MX: an smtp-sink that refuses every message
after DATA with 550) and sender.test (MX: the lab's smtp-sink, the original
sender's mailbox). The nodes' smarthost is the lab's Postfix, which has no
transport table: it delivers everything by MX lookup through nsd.

    client -> Postfix -> (MX tempalias.test) node: alias, SRS sender
    node -> Postfix (smarthost) -> (MX target.test) refused after DATA
    Postfix bounce, from <>, to the SRS address -> (MX tempalias.test) node
    node reverses it, writes its own report (no target named in it)
        -> Postfix -> (MX sender.test) the sender's mailbox

Then bounces to forged SRS addresses, one of them the real address with a
character moved from the domain to the local part (the same bytes when the
fields are hashed back to back), are sent the same way and refused at RCPT.
"""

from __future__ import annotations

import copy
import os
import re
import smtplib
from dataclasses import dataclass

import pytest

from lab import (
    DOMAIN,
    NODE_CONFIG,
    NODE_IPS,
    POSTFIX_IP,
    SENDER,
    SENDER_DOMAIN,
    SINK_IP,
    TARGET_DOMAIN,
    TARGET_MX_IP,
    Lab,
    create_alias,
    new_uid,
    show_alias,
    submit,
    wait_until,
)

ACCEPTED_LOG = "SRS bounce accepted, returned to the original sender"
REFUSED_LOG = "SRS recipient refused"
MAX_USAGE = 3

# The lab's node settings with Postfix as the smarthost, so that the target's
# refusal becomes a bounce Postfix writes (to the SRS sender) instead of an
# answer to the node's own session.
SRS_NODE_CONFIG = copy.deepcopy(NODE_CONFIG)
SRS_NODE_CONFIG["relay"]["smarthosts"] = [f"smtp://{POSTFIX_IP}:25"]


@dataclass
class RoundTrip:
    uid: str
    alias: dict
    srs: str  # the envelope sender the node gave the forwarded message
    bounce_node: int  # the node Postfix returned the bounce to
    refused: int  # SRS refusals the nodes logged during the round trip


def node_counters(lab: Lab) -> dict[str, float]:
    """SMTP counters summed over the three nodes."""
    out = {"relay_denied": 0.0, "forwarded": 0.0}
    for nd in lab.cluster:
        out["relay_denied"] += nd.metric("tempalias_smtp_rcpt_total", {"result": "relay_denied"}, default=0.0)
        out["forwarded"] += nd.metric("tempalias_smtp_messages_total", {"result": "forwarded"}, default=0.0)
    return out


def log_count(lab: Lab, text: str) -> dict[int, int]:
    return {nd.id: nd.log_path.read_text(errors="replace").count(text) for nd in lab.cluster}


def maillog(lab: Lab) -> str:
    return lab.postfix.maillog.read_text(errors="replace") if lab.postfix.maillog.exists() else ""


def deliveries(lab: Lab, rcpt: str) -> list[tuple[str, str, str]]:
    """(relay, status, reason) of each of Postfix's delivery attempts to `rcpt`."""
    return re.findall(
        rf" to=<{re.escape(rcpt)}>,.* relay=(\S+),.* status=(\w+) \((.*)\)$", maillog(lab), re.MULTILINE | re.IGNORECASE
    )


@pytest.fixture(scope="module")
def srs_lab(binary):
    with Lab(binary, node_config=SRS_NODE_CONFIG, bouncing_target=True, name=f"tasrs{os.getpid()}") as the_lab:
        yield the_lab


@pytest.fixture
def lab(request, srs_lab):
    request.node._chaos_lab = srs_lab  # conftest prints its logs on failure
    srs_lab.heal_and_wait()
    return srs_lab


@pytest.fixture(scope="module")
def round_trip(srs_lab) -> RoundTrip:
    """One message to an alias whose target's server refuses it, followed
    until Postfix's queue is empty (the bounce delivered)."""
    lab = srs_lab
    lab.heal_and_wait()
    before_logs = log_count(lab, ACCEPTED_LOG)
    before_refused = sum(log_count(lab, REFUSED_LOG).values())
    status, alias = create_alias(lab.cluster.node(1), max_usage=MAX_USAGE)
    assert status == 201, alias
    assert alias["alias"].endswith(f"@{DOMAIN}"), alias
    uid = new_uid()
    ok, reply = submit(uid, alias["alias"])
    assert ok, reply

    def bounce_delivered():
        return any(status == "sent" for _r, status, _why in deliveries(lab, SENDER))

    wait_until(bounce_delivered, 120, "the bounce to reach the sender's MX")
    lab.postfix.wait_empty(60)

    log = maillog(lab)
    srs_senders = set(re.findall(rf" from=<(SRS0=[^>]+@{re.escape(DOMAIN)})>", log, re.IGNORECASE))
    assert len(srs_senders) == 1, f"one forwarded message, one SRS sender: {srs_senders}\n{log[-4000:]}"
    (srs,) = srs_senders
    to_srs = deliveries(lab, srs)
    assert len(to_srs) == 1 and to_srs[0][1] == "sent", to_srs
    m = re.fullmatch(rf"mx(\d)\.{re.escape(DOMAIN)}\[([\d.]+)\]:25", to_srs[0][0])
    assert m and NODE_IPS[int(m.group(1))] == m.group(2), f"the bounce went to a node found by MX: {to_srs}"
    node = int(m.group(1))
    after_logs = log_count(lab, ACCEPTED_LOG)
    assert after_logs[node] == before_logs[node] + 1, f"node {node} logs {ACCEPTED_LOG!r}: {before_logs} -> {after_logs}"
    refused = sum(log_count(lab, REFUSED_LOG).values()) - before_refused
    return RoundTrip(uid, alias, srs, node, refused)


def test_bounce_from_the_target_returns_by_mx_to_the_original_sender(lab, round_trip):
    rt = round_trip
    local, _, domain = SENDER.rpartition("@")
    assert re.fullmatch(
        rf"SRS0=[A-Za-z0-9+/]{{6}}=[A-Z2-7]{{2}}={re.escape(domain)}={re.escape(local)}@{re.escape(DOMAIN)}", rt.srs
    ), rt.srs

    # Postfix found every hop by MX lookup: the node for the alias, the
    # target's refusing server, the node again for the bounce, the sender's
    # mailbox for the reversed bounce.
    node_mx = rf"mx(\d)\.{re.escape(DOMAIN)}\[127\.0\.0\.\1\]:25"
    to_alias = deliveries(lab, rt.alias["alias"])
    assert len(to_alias) == 1 and to_alias[0][1] == "sent", to_alias
    assert re.fullmatch(node_mx, to_alias[0][0]), to_alias
    to_target = deliveries(lab, f"t@{TARGET_DOMAIN}")
    assert len(to_target) == 1, to_target
    relay, status, why = to_target[0]
    assert relay == f"mx.{TARGET_DOMAIN}[{TARGET_MX_IP}]:25" and status == "bounced", to_target
    assert "550 5.2.2 mailbox full (in reply to end of DATA command)" in why, why
    to_sender = deliveries(lab, SENDER)
    assert [(r, s) for r, s, _ in to_sender] == [(f"sink.{SENDER_DOMAIN}[{SINK_IP}]:25", "sent")], to_sender

    # The sender's mailbox got exactly one report: from the null sender, to
    # the original sender (not the SRS address), about the refused message.
    msgs = lab.sink.messages()
    assert len(msgs) == 1, [(m.mail_from, m.rcpt_to) for m in msgs]
    bounce = msgs[0]
    assert bounce.mail_from == "", f"a bounce comes from the null sender, not {bounce.mail_from!r}"
    assert bounce.rcpt_to == [SENDER], bounce.rcpt_to
    assert f"<{rt.uid}@chaos.test>".encode() in bounce.raw, "the bounce names the refused message"
    assert re.search(rb"^Content-Type: multipart/report;", bounce.raw, re.MULTILINE | re.IGNORECASE), "a DSN"
    # It is the node's own report, not the target's bounce: the status, but
    # neither the target address nor the target server's words.
    assert f"MAILER-DAEMON@{DOMAIN}".encode() in bounce.raw
    assert re.search(rb"^Status: 5\.2\.2\r?$", bounce.raw, re.MULTILINE), bounce.raw
    assert f"t@{TARGET_DOMAIN}".lower().encode() not in bounce.raw.lower(), bounce.raw
    assert b"mailbox full" not in bounce.raw

    # The bounce passed a node, which reversed the SRS address: it says so
    # in its log, and it used nothing of the alias.
    assert log_count(lab, ACCEPTED_LOG)[rt.bounce_node] == 1
    assert rt.refused == 0, "no SRS address was refused on the way"
    status, shown = show_alias(lab.cluster.node(1), rt.alias)
    assert status == 200 and shown["remaining"] == MAX_USAGE - 1, shown


def test_forged_srs_addresses_sent_by_mx_are_refused(lab, round_trip):
    rt = round_trip
    local = rt.srs.rpartition("@")[0]
    srs_hash, stamp, domain, user = local[5:].split("=", 3)
    # The fields of the real address shifted by one character: the same bytes
    # when they are hashed back to back.
    shifted = f"SRS0={srs_hash}={stamp}={domain[:-1]}={domain[-1]}{user}@{DOMAIN}"
    crafted = f"SRS0=AAAAAA={stamp}=victim.test=bob@{DOMAIN}"
    before = node_counters(lab)
    before_refused = sum(log_count(lab, REFUSED_LOG).values())
    before_mailbox = len(lab.sink.messages())
    for forged in (shifted, crafted):
        msg = f"From: <>\r\nTo: <{forged}>\r\nSubject: forged bounce\r\nMessage-ID: <{new_uid()}@chaos.test>\r\n\r\nx\r\n"
        with smtplib.SMTP(POSTFIX_IP, 25, local_hostname="client.chaos.test", timeout=30) as s:
            s.sendmail("", [forged], msg.encode())

    def refused_by_mx():
        got = {f: deliveries(lab, f) for f in (shifted, crafted)}
        return got if all(got.values()) else None

    got = wait_until(refused_by_mx, 60, "Postfix to try the forged addresses")
    for forged, attempts in got.items():
        assert len(attempts) == 1, attempts
        relay, status, why = attempts[0]
        assert re.fullmatch(rf"mx(\d)\.{re.escape(DOMAIN)}\[127\.0\.0\.\1\]:25", relay), relay
        assert status == "bounced", attempts
        assert "550 5.7.1 Invalid or expired SRS address" in why and "RCPT TO" in why, why
    after = node_counters(lab)
    assert after["relay_denied"] - before["relay_denied"] == 2, (before, after)
    assert after["forwarded"] == before["forwarded"], "nothing relayed"
    assert sum(log_count(lab, REFUSED_LOG).values()) - before_refused == 2
    lab.postfix.wait_empty(60)
    assert len(lab.sink.messages()) == before_mailbox, "nothing reached the sender's mailbox"
