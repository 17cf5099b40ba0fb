"""Smarthost failover, the circuit breaker and the delivery budget, against
smtp-sink: a dead smarthost costs one failed attempt, then is skipped until
its cool-down ends; a probe after it closes the breaker again."""

from __future__ import annotations

import re
import smtplib
import time

import pytest

from harness import SENDER, TARGET, free_port, message, wait_until


def metric(text: str, name: str, **labels) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(want)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def test_breaker_opens_skips_and_closes_after_a_successful_probe(node_factory, sink_factory):
    dead_port = free_port()
    second = sink_factory()
    dead = f"smtp://127.0.0.1:{dead_port}"
    node = node_factory(relay="smarthost", smarthosts=[dead, second.url],
                        config={"relay": {"breaker_failures": 2, "breaker_cooldown_secs": 2}})
    alias = node.create_alias(days=1, max_usage=50)

    def send(subject):
        assert node.send([alias["alias"]], message(subject, to=alias["alias"])) == {}

    # Two messages: each fails over from the dead smarthost to the second one.
    send("first")
    send("second")
    second.wait_for(2)
    m = node.metrics()
    assert metric(m, "tempalias_relay_attempts_total", upstream=dead, result="failed") == 2
    assert metric(m, "tempalias_relay_breaker_state", upstream=dead) == 1, m
    assert metric(m, "tempalias_relay_breaker_opened_total", upstream=dead) == 1
    assert metric(m, "tempalias_relay_breaker_state", upstream=second.url) == 0

    # Open: the next message skips the dead smarthost without an attempt.
    started = time.monotonic()
    send("third")
    assert time.monotonic() - started < 2
    second.wait_for(3)
    m = node.metrics()
    assert metric(m, "tempalias_relay_attempts_total", upstream=dead, result="failed") == 2
    assert metric(m, "tempalias_relay_skipped_total", upstream=dead) == 1

    # The first smarthost comes back; after the cool-down one message probes it
    # (half-open), succeeds there and closes the breaker.
    first = sink_factory(port=dead_port)
    sent = [0]

    def probed():
        sent[0] += 1
        send(f"after recovery {sent[0]}")
        return first.messages()

    wait_until(probed, 15, "a probe to reach the recovered smarthost", interval=0.2)
    m = node.metrics()
    assert metric(m, "tempalias_relay_attempts_total", upstream=dead, result="accepted") == 1
    assert metric(m, "tempalias_relay_breaker_state", upstream=dead) == 0, m
    # Closed again: the next message goes to the first smarthost directly.
    send("closed again")
    first.wait_for(2)
    assert all(msg.rcpt_to == [TARGET] for msg in first.messages())
    assert node.remaining(alias) == 50 - 4 - sent[0]


def test_all_smarthosts_down_gives_451_in_time_and_keeps_the_use(node_factory):
    dead = [f"smtp://127.0.0.1:{free_port()}" for _ in range(2)]
    node = node_factory(relay="smarthost", smarthosts=dead,
                        config={"relay": {"max_attempts": 6, "backoff_base_ms": 100, "backoff_max_ms": 400}})
    alias = node.create_alias(days=1, max_usage=1)
    started = time.monotonic()
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(SENDER, [alias["alias"]], message("all down", to=alias["alias"]))
    assert e.value.smtp_code == 451
    # Six attempts with at most 100 + 200 ms of backoff between the rounds.
    assert time.monotonic() - started < 5
    assert node.remaining(alias) == 1
    m = node.metrics()
    assert sum(metric(m, "tempalias_relay_attempts_total", upstream=u, result="failed") or 0 for u in dead) >= 2


def test_delivery_budget_bounds_retries_against_a_silent_smarthost(node_factory):
    import socket

    # Accepts connections but never greets; many attempts allowed, but the
    # budget (delivery_timeout_secs) ends them.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        url = f"smtp://127.0.0.1:{silent.getsockname()[1]}"
        node = node_factory(relay="smarthost", smarthosts=[url],
                            config={"relay": {"timeout_secs": 2, "delivery_timeout_secs": 3, "max_attempts": 10,
                                              "breaker_failures": 100}})
        alias = node.create_alias(days=1, max_usage=1)
        started = time.monotonic()
        with node.smtp(timeout=20) as s:
            with pytest.raises(smtplib.SMTPDataError) as e:
                s.sendmail(SENDER, [alias["alias"]], message("budget", to=alias["alias"]))
        elapsed = time.monotonic() - started
    assert e.value.smtp_code == 451
    assert elapsed < 6, f"the 3 s budget took {elapsed:.1f}s"
    assert node.remaining(alias) == 1


EIGHT_BIT_BODY = "Grüße aus Köln – ½ € ✓\r\n".encode()


def eight_bit(subject: str, to: str) -> bytes:
    return (f"From: {SENDER}\r\nTo: {to}\r\nSubject: {subject}\r\nMessage-ID: <{subject.replace(' ', '.')}@example.org>\r\n"
            "Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\n").encode() + EIGHT_BIT_BODY


def send_8bit(node, alias, subject):
    with node.smtp() as s:
        s.ehlo()
        assert s.has_extn("8bitmime")
        return s.sendmail(SENDER, [alias["alias"]], eight_bit(subject, alias["alias"]), mail_options=["BODY=8BITMIME"])


def test_8bit_mail_skips_a_smarthost_without_8bitmime_and_its_breaker_stays_closed(node_factory, sink_factory):
    # smtp-sink -8: a working smarthost that does not announce 8BITMIME.
    seven = sink_factory(options=["-8"])
    eight = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[seven.url, eight.url],
                        config={"relay": {"breaker_failures": 2, "breaker_cooldown_secs": 60}})
    alias = node.create_alias(days=1, max_usage=5)
    # More 8-bit messages than breaker_failures: a breaker counting them would open.
    for i in range(3):
        assert send_8bit(node, alias, f"eight bit {i}") == {}
    got = eight.wait_for(3)
    for m in got:
        assert m.rcpt_to == [TARGET]
        assert m.data.endswith(EIGHT_BIT_BODY.replace(b"\r\n", b"\n")), m.data
        # Handed on as 8-bit, announced as such, not converted.
        assert b"BODY=8BITMIME" in m.path.read_bytes()
    assert seven.messages() == []
    m = node.metrics()
    assert metric(m, "tempalias_relay_attempts_total", upstream=seven.url, result="unsupported") == 3, m
    assert metric(m, "tempalias_relay_attempts_total", upstream=seven.url, result="failed") is None
    assert metric(m, "tempalias_relay_breaker_state", upstream=seven.url) == 0
    assert metric(m, "tempalias_relay_breaker_opened_total", upstream=seven.url) in (None, 0)
    assert metric(m, "tempalias_relay_attempts_total", upstream=eight.url, result="accepted") == 3
    # ASCII mail still goes to the first smarthost: it was never taken for down.
    assert node.send([alias["alias"]], message("seven bit", to=alias["alias"])) == {}
    (m7,) = seven.wait_for(1)
    assert b"Subject: seven bit" in m7.data
    assert len(eight.messages()) == 3
    assert node.remaining(alias) == 1


@pytest.mark.parametrize("smarthosts", [1, 2])
def test_8bit_mail_with_no_smarthost_offering_8bitmime_gets_554_5_6_3_and_keeps_the_use(
        node_factory, sink_factory, smarthosts):
    sinks = [sink_factory(options=["-8"]) for _ in range(smarthosts)]
    seven = sinks[0]
    node = node_factory(relay="smarthost", smarthosts=[s.url for s in sinks])
    alias = node.create_alias(days=1, max_usage=1)
    started = time.monotonic()
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_8bit(node, alias, "nowhere to go")
    assert e.value.smtp_code == 554, e.value
    assert e.value.smtp_error.startswith(b"5.6.3 "), e.value.smtp_error
    # Permanent at once: no backoff rounds over hosts that cannot change.
    assert time.monotonic() - started < 3
    assert all(s.messages() == [] for s in sinks)
    assert node.remaining(alias) == 1
    m = node.metrics()
    for s in sinks:
        assert metric(m, "tempalias_relay_attempts_total", upstream=s.url, result="unsupported") == 1, m
    assert 'tempalias_smtp_messages_total{result="permfail"} 1' in m
    assert "does not offer 8BITMIME" in node.logs()
    # The use is still there: the same alias forwards an ASCII message.
    assert node.send([alias["alias"]], message("ascii after refusal", to=alias["alias"])) == {}
    seven.wait_for(1)
    assert node.remaining(alias) == 0
