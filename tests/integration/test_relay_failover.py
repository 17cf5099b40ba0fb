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
