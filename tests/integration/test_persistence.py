"""Restarts: SIGTERM and kill -9 lose no alias, no spent use and no held use."""

from __future__ import annotations

import pytest

from harness import SENDER, message


def use(node, alias, n: int = 1):
    for i in range(n):
        assert node.send([alias["alias"]], message(f"use {i} of {alias['id']}", to=alias["alias"])) == {}


@pytest.mark.parametrize("how", ["sigterm", "kill9"])
def test_aliases_and_remaining_counts_survive_restart(node, how):
    a = node.create_alias(days=3, max_usage=3)
    b = node.create_alias(days=3, max_usage=3)
    c = node.create_alias(days=3, max_usage=3)
    use(node, a, 2)
    use(node, b, 1)
    revoked = node.create_alias(days=3, max_usage=3)
    assert node.http("DELETE", f"/v1/aliases/{revoked['id']}",
                     headers={"Authorization": f"Bearer {revoked['token']}"}).status == 204
    # Acknowledged right before the crash: must survive it too.
    last = node.create_alias(days=3, max_usage=1)
    use(node, last, 1)

    node.restart(kill=(how == "kill9"))

    assert [node.remaining(x) for x in (a, b, c, last)] == [1, 2, 3, 0]
    assert node.get_alias(revoked)["state"] == "revoked"
    assert node.get_alias(last)["state"] == "used_up"
    code, text = node.rcpt_reply(revoked["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    code, text = node.rcpt_reply(last["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)

    # The restarted node keeps counting from where it was, across a second restart.
    use(node, a, 1)
    node.restart(kill=(how == "kill9"))
    assert node.remaining(a) == 0
    code, text = node.rcpt_reply(a["alias"])
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert node.remaining(b) == 2
    use(node, b, 2)
    assert node.remaining(b) == 0
    assert len(node.captured()) == 2 + 1 + 1 + 1 + 2


def test_sigterm_exits_zero(node):
    node.create_alias(days=1, max_usage=1)
    assert node.stop() == 0


def test_reservation_of_a_killed_node_returns_after_the_lease(node_factory):
    lease = 120  # > smtp.session_timeout_secs (60) + relay.delivery_timeout_secs (20)
    node = node_factory(config={"relay": {"reservation_lease_secs": lease}})
    alias = node.create_alias(days=1, max_usage=2)
    use(node, alias, 1)

    # A transaction holds the last use (RCPT accepted) when the node dies.
    c = node.raw()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: in flight\r\n\r\nhalf a message")
    node.kill9()
    c.close()
    node.start()

    # The reservation was durable: within its lease the use is still held
    # (a temporary refusal: the hold may yet end without spending it) ...
    code, text = node.rcpt_reply(alias["alias"])
    assert 400 <= code < 500, (code, text)
    view = node.get_alias(alias)
    assert view["remaining"] == 1, "a held use is not a spent use"

    # ... and once the lease has lapsed it is back: the crash did not burn it.
    node.set_clock(lease + 30)
    assert node.send([alias["alias"]], message("after the lease", to=alias["alias"])) == {}
    assert node.remaining(alias) == 0
    subjects = [cap["eml"] for cap in node.captured()]
    assert len(subjects) == 2
    assert b"Subject: after the lease" in subjects[-1]
    assert not any(b"in flight" in s for s in subjects)


def test_reservation_is_released_when_the_client_disconnects(node):
    alias = node.create_alias(days=1, max_usage=1)
    c = node.raw()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
    c.close()  # vanish mid-transaction, no QUIT

    # The node notices the disconnect and gives the use back (no lease wait).
    from harness import wait_until

    wait_until(lambda: node.rcpt_reply(alias["alias"])[0] == 250, 10, "the reservation to be released")
    assert node.remaining(alias) == 1


def test_sigterm_refuses_new_clients_at_once_and_finishes_the_message_in_flight(node):
    """A stopping node closes its SMTP socket at once (new senders are refused
    and move to the next MX instead of waiting in the backlog), while a
    message already being received is finished, forwarded and counted."""
    import signal
    import socket

    from harness import wait_until

    alias = node.create_alias(days=1, max_usage=2)
    c = node.raw()
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: in flight at shutdown\r\n\r\nfirst half\r\n")
    node.proc.send_signal(signal.SIGTERM)

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", node.smtp_port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_until(refused, 5, "the SMTP port to refuse new connections")
    assert node.running(), "the node waits for the session in progress"
    c.send(b"second half\r\n.\r\n")
    code, text = c.reply()
    assert code == 250, (code, text)
    c.close()
    assert node.proc.wait(timeout=30) == 0
    assert any(b"in flight at shutdown" in cap["eml"] for cap in node.captured())
    node.start()
    assert node.remaining(alias) == 1, "the message was counted before the node stopped"
