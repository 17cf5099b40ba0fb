"""Upstream failures: a 250 only when the upstream took the message; uses kept otherwise."""

from __future__ import annotations

import smtplib
import socket
import time

import pytest

from harness import SENDER, TARGET, free_port, message, srs_of


def send_expecting_data_error(node, alias, subject):
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(SENDER, [alias["alias"]], message(subject, to=alias["alias"]))
        # The session is still usable afterwards.
        assert s.noop()[0] == 250
    return e.value.smtp_code, e.value.smtp_error


def test_upstream_down_gives_451_and_keeps_the_use_then_retry_succeeds(node_factory, sink_factory):
    port = free_port()  # nothing listens here (yet)
    # The circuit breaker would skip the smarthost for its cool-down after
    # these failures (test_relay_failover.py covers that); here it stays shut.
    node = node_factory(relay="smarthost", smarthosts=[f"smtp://127.0.0.1:{port}"],
                        config={"relay": {"breaker_failures": 100}})
    alias = node.create_alias(days=1, max_usage=1)

    code, text = send_expecting_data_error(node, alias, "upstream down")
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    view = node.get_alias(alias)
    assert view["remaining"] == 1 and view["state"] == "active", view

    # A second attempt while still down: same answer, still not consumed.
    code, text = send_expecting_data_error(node, alias, "upstream still down")
    assert code == 451, (code, text)
    assert node.remaining(alias) == 1

    # The sending MTA retries once the upstream is back: now it goes through.
    sink = sink_factory(port=port)
    assert node.send([alias["alias"]], message("retry after upstream is back", to=alias["alias"])) == {}
    (m,) = sink.wait_for(1)
    assert m.rcpt_to == [TARGET]
    assert srs_of(m.mail_from, SENDER), m.mail_from
    assert b"Subject: retry after upstream is back" in m.data
    assert node.remaining(alias) == 0
    assert 'tempalias_smtp_messages_total{result="tempfail"} 2' in node.metrics()


def test_upstream_temporary_refusal_gives_451_and_keeps_the_use(node_factory, sink_factory):
    # smtp-sink -r .: answer the end of data with "450 4.3.0".
    sink = sink_factory(options=["-r", "."])
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=1, max_usage=1)
    code, text = send_expecting_data_error(node, alias, "soft refusal")
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    assert node.remaining(alias) == 1


@pytest.mark.parametrize(
    "stage,reply",
    [
        (".", "554 5.7.1 test sink refuses this message"),
        ("RCPT", "550 5.1.1 test sink has no such user"),
    ],
)
def test_upstream_permanent_refusal_is_passed_on_and_keeps_the_use(node_factory, sink_factory, stage, reply):
    sink = sink_factory(options=["-f", stage, "-B", reply])
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=1, max_usage=1)

    code, text = send_expecting_data_error(node, alias, f"hard refusal at {stage}")
    want_code, want_enhanced, want_text = reply.split(" ", 2)
    # The sender gets the upstream's codes with a fixed text: an upstream's
    # own text may name the target, so it goes to the log only.
    assert code == int(want_code), (code, text)
    assert text == f"{want_enhanced} Upstream refused the message".encode(), text
    assert want_text in node.logs()
    view = node.get_alias(alias)
    assert view["remaining"] == 1 and view["state"] == "active", view
    assert 'tempalias_smtp_messages_total{result="permfail"} 1' in node.metrics()


def test_upstream_refusal_naming_the_target_does_not_reach_the_sender(node_factory, sink_factory):
    sink = sink_factory(options=["-f", "RCPT", "-B", f"550 5.1.1 <{TARGET}>: Recipient address rejected"])
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=1, max_usage=1)

    code, text = send_expecting_data_error(node, alias, "refusal naming the target")
    assert (code, text) == (550, b"5.1.1 Upstream refused the message")
    assert TARGET.encode() not in text
    assert TARGET in node.logs()


def test_failover_to_second_smarthost(node_factory, sink_factory):
    sink = sink_factory()
    dead = free_port()
    node = node_factory(relay="smarthost", smarthosts=[f"smtp://127.0.0.1:{dead}", sink.url])
    alias = node.create_alias(days=1, max_usage=1)
    assert node.send([alias["alias"]], message("failover", to=alias["alias"])) == {}
    (m,) = sink.wait_for(1)
    assert m.rcpt_to == [TARGET]
    assert node.remaining(alias) == 0


def test_upstream_that_never_answers_gives_451_within_the_relay_timeout(node_factory):
    # A listener that accepts connections (kernel backlog) but never greets: the
    # relay must give up after relay.timeout_secs and answer 451, not hang.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        port = silent.getsockname()[1]
        node = node_factory(relay="smarthost", smarthosts=[f"smtp://127.0.0.1:{port}"],
                            config={"relay": {"timeout_secs": 2}})
        alias = node.create_alias(days=1, max_usage=1)
        client_wait = 15
        started = time.monotonic()
        with node.smtp(timeout=client_wait) as s:
            s.ehlo()
            assert s.mail(SENDER)[0] == 250
            assert s.rcpt(alias["alias"])[0] == 250
            try:
                code, text = s.data(message("silent upstream", to=alias["alias"]))
            except (socket.timeout, smtplib.SMTPServerDisconnected):
                pytest.fail(f"no reply to the end of DATA within {client_wait}s although relay.timeout_secs = 2 "
                            "(the upstream attempt is not bounded by the relay timeout)")
        elapsed = time.monotonic() - started
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    assert elapsed < client_wait, f"took {elapsed:.1f}s with relay.timeout_secs = 2"
    assert node.remaining(alias) == 1
