"""SMTP dialogue: capabilities, VRFY, PIPELINING, RSET, limits and graceful shutdown."""

from __future__ import annotations

import time

from harness import DOMAIN, HOSTNAME, SENDER, TARGET, message, wait_until


def greet(node, timeout: float = 30.0):
    c = node.raw(timeout=timeout)
    code, text = c.reply()
    assert code == 220 and text.startswith(HOSTNAME), (code, text)
    return c


def test_ehlo_capabilities(node):
    with node.smtp() as s:
        code, _ = s.ehlo("client.example.org")
        assert code == 250
        assert s.has_extn("pipelining")
        assert s.has_extn("8bitmime")
        assert s.has_extn("enhancedstatuscodes")
        assert s.esmtp_features["size"] == "26214400"
    with greet(node) as c:
        code, text = c.cmd("HELO client.example.org")
        assert code == 250 and HOSTNAME in text


def test_vrfy_252_reveals_nothing(node):
    alias = node.create_alias(days=1, max_usage=1)
    with node.smtp() as s:
        s.ehlo()
        known = s.verify(alias["alias"])
        unknown = s.verify(f"zzzzzzzzzzzz@{DOMAIN}")
        foreign = s.verify("x@example.com")
    assert known[0] == unknown[0] == foreign[0] == 252
    assert known[1] == unknown[1] == foreign[1]
    assert alias["id"].encode() not in known[1]


def test_commands_out_of_order_get_503(node):
    with greet(node) as c:
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 503  # before EHLO
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd("RCPT TO:<x@example.com>")[0] == 503  # before MAIL
        assert c.cmd("DATA")[0] == 503
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 503  # nested
        assert c.cmd("DATA")[0] == 554  # no valid recipients
        assert c.cmd("QUIT")[0] == 221


def test_pipelining_one_write_many_replies(node):
    a = node.create_alias(days=1, max_usage=1)
    b = node.create_alias(target="other@example.net", days=1, max_usage=1)
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        c.send(
            f"MAIL FROM:<{SENDER}>\r\n"
            f"RCPT TO:<{a['alias']}>\r\n"
            "RCPT TO:<someone@example.com>\r\n"
            f"RCPT TO:<{b['alias']}>\r\n"
            "DATA\r\n"
        )
        replies = [c.reply() for _ in range(5)]
        assert [r[0] for r in replies] == [250, 250, 550, 250, 354], replies
        assert replies[2][1].startswith("5.7.1")
        c.send(b"Subject: pipelined\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
        assert c.reply()[0] == 250
        assert c.reply()[0] == 250
        assert c.reply()[0] == 221
    (cap,) = node.captured()
    assert sorted(cap["meta"]["rcpt_to"]) == sorted([TARGET, "other@example.net"])
    assert node.remaining(a) == 0 and node.remaining(b) == 0


def test_rset_releases_the_reservation(node):
    alias = node.create_alias(days=1, max_usage=1)
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 250
        # The single use is held now: another session cannot take it, and is
        # told to come back later (the hold may end without spending the use).
        code, text = node.rcpt_reply(alias["alias"])
        assert 400 <= code < 500, (code, text)
        assert s.rset()[0] == 250
        # Released: a new transaction in the same session gets it.
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 250
        code, _ = s.data(message("after rset", to=alias["alias"]))
        assert code == 250
    assert node.remaining(alias) == 0
    assert len(node.captured()) == 1


def test_ehlo_again_releases_the_reservation(node):
    alias = node.create_alias(days=1, max_usage=1)
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 250
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 250
    assert node.remaining(alias) == 1


def test_too_many_failed_rcpts_closes_with_421(node_factory):
    node = node_factory(config={"smtp": {"max_failed_rcpts": 3}})
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for i in range(2):
            assert c.cmd(f"RCPT TO:<zzzzzzzzzz{i:02d}@{DOMAIN}>")[0] == 550
        code, text = c.cmd(f"RCPT TO:<zzzzzzzzzz99@{DOMAIN}>")
        assert code == 550
        code, text = c.reply()
        assert code == 421, (code, text)
        assert c.closed_by_peer()


def test_failed_rcpts_are_tarpitted(node_factory):
    delay_ms = 300
    node = node_factory(config={"smtp": {"failed_rcpt_delay_ms": delay_ms}})
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        took = []
        for i in range(3):
            started = time.monotonic()
            assert c.cmd(f"RCPT TO:<zzzzzzzzzz{i:02d}@{DOMAIN}>")[0] == 550
            took.append(time.monotonic() - started)
    # failure n waits delay * (n - 1)
    assert took[1] >= 0.9 * delay_ms / 1000, took
    assert took[2] >= 0.9 * 2 * delay_ms / 1000, took


def test_sigterm_with_an_idle_session_sends_421_and_exits_zero(node):
    with greet(node, timeout=40) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        node.proc.send_signal(__import__("signal").SIGTERM)
        code, text = c.reply()
        assert code == 421 and text.startswith("4.3.0"), (code, text)
        assert c.closed_by_peer()
    assert node.proc.wait(timeout=40) == 0


def test_quit_during_shutdown_gets_221(node):
    """A client that says QUIT while the node shuts down (say, right after its
    message was accepted) gets 221, as from Postfix, not a 421."""
    with greet(node, timeout=40) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        node.proc.send_signal(__import__("signal").SIGTERM)
        wait_until(lambda: "shutting down" in node.stderr_path.read_text(errors="replace"), 20, "shutdown to begin")
        code, text = c.cmd("QUIT")
        assert code == 221 and text.startswith("2.0.0"), (code, text)
        assert c.closed_by_peer()
    assert node.proc.wait(timeout=40) == 0


def test_sigterm_with_a_transaction_open_releases_its_reservation(node):
    alias = node.create_alias(days=1, max_usage=1)
    with greet(node, timeout=40) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
        node.proc.send_signal(__import__("signal").SIGTERM)
        assert c.reply()[0] == 421
    assert node.proc.wait(timeout=40) == 0
    node.start()
    # Released at shutdown, not merely left to its lease.
    code, text = node.rcpt_reply(alias["alias"])
    assert code == 250, (code, text)


def test_unknown_and_unsupported_commands(node):
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd("FROBNICATE")[0] == 500
        assert c.cmd("EXPN staff")[0] == 502
        assert c.cmd("AUTH PLAIN AGZvbwBiYXI=")[0] == 502
        assert c.cmd("NOOP")[0] == 250
        assert c.cmd("QUIT")[0] == 221


def test_null_sender_is_accepted_and_kept(node):
    alias = node.create_alias(days=1, max_usage=1)
    with node.smtp() as s:
        s.ehlo()
        assert s.mail("<>")[0] == 250
        assert s.rcpt(alias["alias"])[0] == 250
        assert s.data(message("bounce", sender="MAILER-DAEMON@example.org"))[0] == 250
    (cap,) = node.captured()
    assert cap["meta"]["mail_from"] == ""
    assert cap["meta"]["rcpt_to"] == [TARGET]


def test_mail_loop_is_refused_by_hop_count(node_factory):
    node = node_factory(config={"smtp": {"max_hops": 5}})
    alias = node.create_alias(days=1, max_usage=1)
    hops = "".join(f"Received: from hop{i}.example by hop{i + 1}.example; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                   for i in range(5))
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        assert s.rcpt(alias["alias"])[0] == 250
        code, text = s.data((hops + "Subject: loop\r\n\r\nx\r\n").encode())
        assert code == 554 and text.startswith(b"5.4.6"), (code, text)
    assert node.captured() == []
    assert node.remaining(alias) == 1


def test_idle_session_times_out_with_421(node_factory):
    node = node_factory(config={"smtp": {"idle_timeout_secs": 1}})
    with greet(node, timeout=20) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        started = time.monotonic()
        code, text = c.reply()  # say nothing and wait
        assert code == 421 and text.startswith("4.4.2"), (code, text)
        assert time.monotonic() - started < 15
    wait_until(lambda: "tempalias_smtp_sessions_active 0" in node.metrics(), 10, "the session to end")


def test_concurrent_sessions_never_exceed_max_usage(node):
    import concurrent.futures

    alias = node.create_alias(days=1, max_usage=3)
    sessions = [greet(node) for _ in range(10)]
    try:
        for c in sessions:
            assert c.cmd("EHLO client.example.org")[0] == 250
            assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250

        def rcpt(c):
            return c.cmd(f"RCPT TO:<{alias['alias']}>")[0]

        with concurrent.futures.ThreadPoolExecutor(len(sessions)) as pool:
            codes = list(pool.map(rcpt, sessions))
        assert codes.count(250) == 3, codes
        # The others find every use held by a message in flight: try later.
        assert all(400 <= code < 500 for code in codes if code != 250), codes
        for c, code in zip(sessions, codes):
            if code == 250:
                assert c.cmd("DATA")[0] == 354
                assert c.cmd("Subject: race\r\n\r\nx\r\n.")[0] == 250
    finally:
        for c in sessions:
            c.close()
    assert node.remaining(alias) == 0
    assert len(node.captured()) == 3


def start_data(c, alias):
    """EHLO, MAIL, RCPT to `alias` and DATA, each accepted."""
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
    assert c.cmd("DATA")[0] == 354


def test_bare_lf_dot_does_not_end_the_message(node):
    """No SMTP smuggling: only <CRLF>.<CRLF> ends DATA."""
    alias = node.create_alias(days=1, max_usage=5)
    victim = node.create_alias(target="victim@example.net", days=1, max_usage=5)
    smuggled = (
        f"Subject: outer\r\n\r\nouter body\n.\nMAIL FROM:<{SENDER}>\r\nRCPT TO:<{victim['alias']}>\r\n"
        f"DATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    with greet(node) as c:
        start_data(c, alias)
        c.send(smuggled)
        assert c.reply()[0] == 250
        assert c.cmd("NOOP")[0] == 250
    caps = node.captured()
    assert len(caps) == 1, [x["meta"] for x in caps]
    assert caps[0]["meta"]["rcpt_to"] == [TARGET]
    assert b"Subject: smuggled" in caps[0]["eml"]
    assert node.remaining(victim) == 5
    # Line ends are normalised: nothing but CRLF goes upstream.
    eml = caps[0]["eml"]
    assert b"\n" not in eml.replace(b"\r\n", b""), eml
    assert b"\r" not in eml.replace(b"\r\n", b""), eml


def test_no_smuggling_into_the_upstream_session(node_factory, sink_factory):
    """A dot line after a bare LF does not end our DATA; it must not end the
    upstream's either. After normalisation the upstream sees one message whose
    body contains the would-be commands as text."""
    sink = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=1, max_usage=5)
    smuggled = (
        "Subject: outer\r\n\r\nouter body\n..\r\nMAIL FROM:<x@bank.example>\r\n"
        "RCPT TO:<victim@example.net>\r\nDATA\r\nSubject: smuggled\r\n\r\nsmuggled\r\n.\r\n"
    )
    with greet(node) as c:
        start_data(c, alias)
        c.send(smuggled)
        assert c.reply()[0] == 250
    (m,) = sink.wait_for(1)
    assert m.rcpt_to == [TARGET]
    assert b"MAIL FROM:<x@bank.example>" in m.data
    assert b"Subject: smuggled" in m.data
    # Give a smuggled second transaction every chance to show up.
    with greet(node) as c:
        assert c.cmd("NOOP")[0] == 250
    assert len(sink.messages()) == 1, [x.rcpt_to for x in sink.messages()]


def test_connection_cap_holds_excess_clients_in_the_backlog(node_factory):
    import socket

    node = node_factory(config={"smtp": {"max_connections": 2}})
    first, second = greet(node), greet(node)
    try:
        third = node.raw(timeout=1.5)
        try:
            # No greeting while both permits are taken ...
            try:
                data = third.sock.recv(100)
            except socket.timeout:
                data = None
            assert data is None, data
            # ... and it gets one as soon as a session ends.
            assert first.cmd("QUIT")[0] == 221
            third.sock.settimeout(30)
            assert third.reply()[0] == 220
        finally:
            third.close()
    finally:
        first.close()
        second.close()


def test_failed_rcpts_are_limited_per_client_address_across_sessions(node_factory):
    node = node_factory(config={"smtp": {"max_failed_rcpts_per_ip": 3, "max_failed_rcpts": 10}})
    alias = node.create_alias(days=1, max_usage=1)
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        for i in range(3):
            assert c.cmd(f"RCPT TO:<zzzzzzzzzz{i:02d}@{DOMAIN}>")[0] == 550
    # A new session from the same address: refused for now, even for a real
    # alias, with a temporary code (the window ends).
    with node.smtp() as s:
        s.ehlo()
        s.mail(SENDER)
        code, text = s.rcpt(alias["alias"])
        assert code == 450 and text.startswith(b"4.7.1"), (code, text)
        code, _ = s.rcpt(f"zzzzzzzzzz77@{DOMAIN}")
        assert code == 450
    assert node.remaining(alias) == 1


def test_connections_are_capped_per_client_address(node_factory):
    node = node_factory(config={"smtp": {"max_connections_per_ip": 2}})
    first, second = greet(node), greet(node)
    try:
        with node.raw(timeout=10) as third:
            code, text = third.reply()
            assert (code, text[:5]) == (421, "4.7.0"), (code, text)
        # The two admitted sessions are unaffected.
        assert first.cmd("NOOP")[0] == 250
        assert second.cmd("QUIT")[0] == 221
        # A slot freed is a slot available again (once the session has ended,
        # which is just after its 221).
        def admitted():
            with node.raw(timeout=10) as c:
                return c.reply()[0] == 220

        wait_until(admitted, 10, "a connection slot to be returned")
    finally:
        first.close()
        second.close()


def test_a_transaction_cannot_hold_a_use_forever(node_factory):
    """A client that reserves the only use and then idles is cut off after
    smtp.transaction_timeout_secs, and the use returns."""
    node = node_factory(config={"smtp": {"transaction_timeout_secs": 1}})
    alias = node.create_alias(days=1, max_usage=1)
    with greet(node) as c:
        assert c.cmd("EHLO client.example.org")[0] == 250
        assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
        assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
        c.sock.settimeout(30)
        code, text = c.reply()  # unsolicited: the server gives up on us
        assert (code, text[:5]) == (421, "4.4.2"), (code, text)
    assert node.rcpt_reply(alias["alias"])[0] == 250
