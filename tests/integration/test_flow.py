"""The whole flow: HTTP create -> SMTP receive -> forward upstream -> use counted."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from harness import BIN, DOMAIN, HOSTNAME, SENDER, TARGET, message, srs_of, wait_until


def tempalias_received_count(data: bytes) -> int:
    """`Received:` fields added by tempalias in a message's header section."""
    header = data.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0]
    unfolded = re.sub(rb"\n[ \t]+", b" ", header)
    return sum(1 for l in unfolded.split(b"\n") if l.lower().startswith(b"received:") and b"(tempalias)" in l)


def test_whole_flow_max_usage_two_through_smtp_sink(node_factory, sink_factory):
    sink = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=3, max_usage=2)
    assert alias["alias"] == f"{alias['id']}@{DOMAIN}"
    assert alias["remaining"] == 2 and alias["max_usage"] == 2 and alias["target"] == TARGET

    # First message with swaks, a real SMTP client of its own.
    swaks = shutil.which("swaks")
    assert swaks, "swaks is not installed; run scripts/test"
    r = subprocess.run(
        [swaks, "--server", f"127.0.0.1:{node.smtp_port}", "--to", alias["alias"], "--from", SENDER,
         "--helo", "client.example.org", "--header", "Subject: first via swaks", "--body", "first body",
         "--timeout", "30"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert re.search(r"<-\s+250 2\.0\.0 OK: forwarded", r.stdout), r.stdout

    # Second with smtplib.
    second = message("second via smtplib", to=alias["alias"])
    refused = node.send([alias["alias"]], second)
    assert refused == {}

    msgs = sink.wait_for(2)
    assert len(msgs) == 2
    for m in msgs:
        assert m.rcpt_to == [TARGET], "envelope recipient must be the alias target"
        assert srs_of(m.mail_from, SENDER), f"envelope sender must be the SRS form: {m.mail_from}"
        assert m.helo == HOSTNAME
        assert m.data.startswith(b"Received: from client.example.org (127.0.0.1)"), m.data[:200]
        assert tempalias_received_count(m.data) == 1
        assert alias["alias"].encode() in m.data.split(b"\n\n", 1)[0]  # the `for <alias>` clause
    assert b"first body" in msgs[0].data
    # The message itself is relayed unchanged after the one added header
    # (smtp-sink stores lines with LF endings).
    assert msgs[1].data.endswith(b"\n" + second.replace(b"\r\n", b"\n"))

    # Third: the alias is used up.
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.rcpt(alias["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)

    view = node.get_alias(alias)
    assert view["remaining"] == 0
    assert view["state"] == "used_up"
    assert len(sink.messages()) == 2


def test_whole_flow_in_capture_mode_writes_exact_bytes_and_envelope(node):
    alias = node.create_alias(days=3, max_usage=2)
    body = message("captured", body="line one\r\n.a line smtplib dot-stuffs\r\n..two dots\r\nlast\r\n", to=alias["alias"])
    assert node.send([alias["alias"]], body) == {}
    caps = node.captured()
    assert len(caps) == 1
    cap = caps[0]
    assert srs_of(cap["meta"]["mail_from"], SENDER), cap["meta"]
    assert cap["meta"]["rcpt_to"] == [TARGET]
    assert cap["meta"]["size"] == len(cap["eml"])
    eml = cap["eml"]
    assert eml.startswith(b"Received: from client.example.org (127.0.0.1)\r\n\tby mx1.tempalias.test (tempalias)")
    assert tempalias_received_count(eml) == 1
    # smtplib dot-stuffs lines starting with "."; the relayed bytes have it undone.
    assert eml.endswith(b"\r\n" + body), eml
    assert node.remaining(alias) == 1


def test_several_aliases_in_one_transaction_each_use_counted(node):
    a = node.create_alias(days=1, max_usage=1)
    b = node.create_alias(target="other@example.net", days=1, max_usage=2)
    assert node.send([a["alias"], b["alias"]], message("two aliases")) == {}
    caps = node.captured()
    assert len(caps) == 1
    assert sorted(caps[0]["meta"]["rcpt_to"]) == ["me@example.net", "other@example.net"]
    assert node.remaining(a) == 0
    assert node.remaining(b) == 1


@pytest.mark.parametrize("relay", ["capture", "smarthost"])
def test_empty_message_body_is_forwarded(node_factory, sink_factory, relay):
    sink = sink_factory() if relay == "smarthost" else None
    node = node_factory(relay=relay, smarthosts=[sink.url] if sink else ())
    alias = node.create_alias(days=1, max_usage=1)
    with node.raw() as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        code, text = c.cmd(".")  # DATA then immediately the terminator: an empty message
        assert code == 250, text
        assert c.cmd("QUIT")[0] == 221
    assert node.remaining(alias) == 0
    if sink:
        (m,) = sink.wait_for(1)
        assert m.rcpt_to == [TARGET]
        assert m.data.startswith(b"Received: ")
        assert tempalias_received_count(m.data) == 1
    else:
        (cap,) = node.captured()
        # Nothing but the one Received header tempalias adds.
        assert cap["eml"].startswith(b"Received: ")
        assert tempalias_received_count(cap["eml"]) == 1
        assert cap["eml"].endswith(b"\r\n")
        assert cap["eml"].count(b"Received:") == 1
        assert len(re.findall(rb"\r\n(?![ \t])", cap["eml"])) == 1, cap["eml"]


def test_expiry_by_days_with_the_test_clock(node):
    one_day = node.create_alias(days=1, max_usage=5)
    two_days = node.create_alias(days=2, max_usage=5)
    created = datetime.fromisoformat(one_day["created_at"].replace("Z", "+00:00"))
    valid_until = datetime.fromisoformat(one_day["valid_until"].replace("Z", "+00:00"))
    assert one_day["valid_until"].endswith("Z")
    assert valid_until - created == timedelta(days=1)
    assert abs((created - datetime.now(timezone.utc)).total_seconds()) < 120

    code, text = node.rcpt_reply(one_day["alias"])
    assert code == 250, text

    node.set_clock(86400 + 120)  # a day and two minutes later
    code, text = node.rcpt_reply(one_day["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert node.get_alias(one_day)["state"] == "expired"

    # The two-day alias is still alive a day later.
    code, text = node.rcpt_reply(two_days["alias"])
    assert code == 250, text
    assert node.get_alias(two_days)["state"] == "active"

    node.set_clock(2 * 86400 + 120)
    code, text = node.rcpt_reply(two_days["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    # Nothing was forwarded, nothing was spent.
    assert node.captured() == []
    assert node.remaining(two_days) == 5


FOREIGN = [
    "someone@example.com",
    f"someone@{DOMAIN}.evil.example",
    f"someone@evil{DOMAIN}",
    "someone@[127.0.0.1]",
    "someone@[IPv6:::1]",
    "postmaster@localhost",
]


@pytest.mark.parametrize("rcpt", FOREIGN)
def test_foreign_domain_is_refused_with_5_7_1(node, rcpt):
    with node.smtp() as s:
        s.ehlo()
        assert s.mail(SENDER)[0] == 250
        code, text = s.rcpt(rcpt)
        assert code == 550 and text.startswith(b"5.7.1"), (rcpt, code, text)
        # No recipient was accepted, so there is nothing to relay.
        code, _ = s.docmd("DATA")
        assert code in (503, 554), code
    assert node.captured() == []


def test_never_an_open_relay_with_tricky_recipients(node):
    alias = node.create_alias(days=1, max_usage=5)
    tricky = [
        f"<@{DOMAIN}:victim@evil.example>",  # source route through us
        f"victim%evil.example@{DOMAIN}",  # percent hack
        f"victim@evil.example@{DOMAIN}",
        f'"victim@evil.example"@{DOMAIN}',
        f"{alias['id']}@{DOMAIN}.evil.example",
    ]
    with node.raw() as c:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for rcpt in tricky:
            line = f"RCPT TO:{rcpt}" if rcpt.startswith("<") else f"RCPT TO:<{rcpt}>"
            code, text = c.cmd(line)
            assert 500 <= code < 600, (rcpt, code, text)
        assert c.cmd("DATA")[0] in (503, 554)
    assert node.captured() == []
    assert node.remaining(alias) == 5


def test_alias_domain_is_case_insensitive(node):
    alias = node.create_alias(days=1, max_usage=1)
    upper = alias["alias"].upper()
    assert node.send([upper], message("upper case")) == {}
    (cap,) = node.captured()
    assert cap["meta"]["rcpt_to"] == [TARGET]


def test_alias_cli_create_show_revoke_round_trip(node):
    env = {"PATH": "/usr/bin:/bin"}
    api = ["--api", node.api, "--json"]
    r = subprocess.run([str(BIN), "alias", "create", TARGET, "--days", "2", "--max-usage", "3", *api],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    created = json.loads(r.stdout)
    assert created["target"] == TARGET and created["max_usage"] == 3 and created["remaining"] == 3
    assert created["alias"] == f"{created['id']}@{DOMAIN}"
    token = created["token"]

    r = subprocess.run([str(BIN), "alias", "show", created["id"], "--token", token, *api],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    for key in ("alias", "id", "target", "valid_until", "max_usage", "remaining"):
        assert shown[key] == created[key], key
    assert "token" not in shown

    # The alias it made works over SMTP, and show sees the use.
    assert node.send([created["alias"]], message("via cli alias")) == {}
    r = subprocess.run([str(BIN), "alias", "show", created["id"], "--token", token, *api],
                       capture_output=True, text=True, timeout=30, env=env)
    assert json.loads(r.stdout)["remaining"] == 2

    r = subprocess.run([str(BIN), "alias", "show", created["id"], "--token", "0" * 64, *api],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0 and "404" in r.stderr, r.stderr

    r = subprocess.run([str(BIN), "alias", "revoke", created["id"], "--token", token, *api],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    assert node.get_alias(created)["state"] == "revoked"

    r = subprocess.run([str(BIN), "alias", "create", TARGET, *api], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode != 0, "create without --days or --max-usage must fail"


def test_8bit_message_is_relayed_byte_for_byte(node_factory, sink_factory):
    sink = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=1, max_usage=1)
    body = "Grüße aus Köln – ½ € ✓\r\n".encode()
    msg = b"Subject: 8bit\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + body
    with node.smtp() as s:
        s.ehlo()
        assert s.has_extn("8bitmime")
        assert s.sendmail(SENDER, [alias["alias"]], msg, mail_options=["BODY=8BITMIME"]) == {}
    (m,) = sink.wait_for(1)
    # smtp-sink writes lines with LF endings.
    assert m.data.endswith(msg.replace(b"\r\n", b"\n")), m.data
    assert m.rcpt_to == [TARGET]


def test_reply_before_commit_counts_every_use_after_the_250_and_at_shutdown(node_factory, sink_factory):
    # smtp.reply_before_commit: the 250 comes once the upstream accepted, the
    # Commit after it. Every use is still counted (the alias ends used up,
    # not one message over), and a graceful stop right after a 250 waits for
    # its Commit: after the restart the use is there.
    sink = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[sink.url], config={"smtp": {"reply_before_commit": True}})
    alias = node.create_alias(days=1, max_usage=3)
    for i in range(2):
        assert node.send([alias["alias"]], message(f"early reply {i}", to=alias["alias"])) == {}
    wait_until(lambda: node.remaining(alias) == 1, 10, "both commits to be applied")
    assert node.send([alias["alias"]], message("last one", to=alias["alias"])) == {}
    assert node.stop() == 0
    node.start()
    view = node.get_alias(alias)
    assert (view["remaining"], view["state"]) == (0, "used_up"), view
    assert node.rcpt_reply(alias["alias"])[0] == 550
    assert len(sink.wait_for(3)) == 3
