"""Direct MX delivery (relay.mode = "mx") against nsd serving test zones on a
loopback port (relay.dns_servers points the resolver there) and smtp-sinks on
other loopback addresses: preference order with failover, the implicit MX,
the null MX, all hosts down (451), a permanent refusal (5xx passed on), and
8-bit mail past an MX host without 8BITMIME (smtp-sink -8)."""

from __future__ import annotations

import smtplib

import pytest

from harness import SENDER, free_port, message, srs_of
from peers import Nsd

ZONES = {
    # mx1 (preferred) has nothing listening; mx2 takes the mail.
    "target.test": ["@ IN MX 10 mx1", "@ IN MX 20 mx2", "mx1 IN A 127.0.0.2", "mx2 IN A 127.0.0.3"],
    "down.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.4"],
    "refuse.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.5"],
    # No MX: the domain's own address is its mail host (RFC 5321 5.1).
    "nomx.test": ["@ IN A 127.0.0.6"],
    "nullmx.test": ["@ IN MX 0 ."],
    # The preferred MX does not offer 8BITMIME, the second does.
    "eightbit.test": ["@ IN MX 10 mx1", "@ IN MX 20 mx2", "mx1 IN A 127.0.0.7", "mx2 IN A 127.0.0.8"],
    # The only MX does not offer 8BITMIME.
    "sevenbit.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.9"],
}


@pytest.fixture
def mx_lab(tmp_path, node_factory, sink_factory, request):
    nsd = Nsd(tmp_path, ZONES).start()
    request.addfinalizer(nsd.stop)
    port = free_port()
    sinks = {
        "target": sink_factory(host="127.0.0.3", port=port),
        "refuse": sink_factory(host="127.0.0.5", port=port, options=["-f", "RCPT", "-B", "550 5.1.1 no such user here"]),
        "nomx": sink_factory(host="127.0.0.6", port=port),
        "seven": sink_factory(host="127.0.0.7", port=port, options=["-8"]),
        "eight": sink_factory(host="127.0.0.8", port=port),
        "only_seven": sink_factory(host="127.0.0.9", port=port, options=["-8"]),
    }
    node = node_factory(config={"relay": {"mode": "mx", "dns_servers": [f"127.0.0.1:{nsd.port}"], "mx_port": port,
                                          "timeout_secs": 3, "max_attempts": 2}})
    return node, sinks


def refused(node, alias, subject):
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(SENDER, [alias["alias"]], message(subject, to=alias["alias"]))
    return e.value.smtp_code, e.value.smtp_error


def test_mx_in_preference_order_with_failover(mx_lab):
    node, sinks = mx_lab
    alias = node.create_alias(target="me@target.test", days=1, max_usage=2)
    assert node.send([alias["alias"]], message("to the MX", to=alias["alias"])) == {}
    (m,) = sinks["target"].wait_for(1)
    assert m.rcpt_to == ["me@target.test"] and srs_of(m.mail_from, SENDER)
    assert node.remaining(alias) == 1
    metrics = node.metrics()
    assert 'tempalias_relay_attempts_total{upstream="mx",result="failed"} 1' in metrics, metrics
    assert 'tempalias_relay_attempts_total{upstream="mx",result="accepted"} 1' in metrics


def test_implicit_mx_is_the_domain_itself(mx_lab):
    node, sinks = mx_lab
    alias = node.create_alias(target="me@nomx.test", days=1, max_usage=1)
    assert node.send([alias["alias"]], message("implicit mx", to=alias["alias"])) == {}
    (m,) = sinks["nomx"].wait_for(1)
    assert m.rcpt_to == ["me@nomx.test"]


def test_all_mx_down_gives_451_and_keeps_the_use(mx_lab):
    node, _ = mx_lab
    alias = node.create_alias(target="me@down.test", days=1, max_usage=1)
    code, text = refused(node, alias, "mx down")
    assert code == 451 and text.startswith(b"4."), (code, text)
    assert node.remaining(alias) == 1


def test_permanent_refusal_is_passed_on(mx_lab):
    node, _ = mx_lab
    alias = node.create_alias(target="me@refuse.test", days=1, max_usage=1)
    code, text = refused(node, alias, "mx refuses")
    assert code == 550 and text.startswith(b"5.1.1"), (code, text)
    assert node.remaining(alias) == 1
    assert "no such user here" in node.logs()


def test_null_mx_refuses_for_good(mx_lab):
    node, _ = mx_lab
    alias = node.create_alias(target="me@nullmx.test", days=1, max_usage=1)
    code, text = refused(node, alias, "null mx")
    assert code == 556, (code, text)


def send_8bit(node, alias, subject):
    msg = message(subject, body="Gr\u00fc\u00dfe \u2013 8-bit\r\n", to=alias["alias"])
    with node.smtp() as s:
        return s.sendmail(SENDER, [alias["alias"]], msg, mail_options=["BODY=8BITMIME"])


def test_8bit_mail_passes_an_mx_without_8bitmime(mx_lab):
    node, sinks = mx_lab
    alias = node.create_alias(target="me@eightbit.test", days=1, max_usage=2)
    assert send_8bit(node, alias, "eight bit via mx") == {}
    (m,) = sinks["eight"].wait_for(1)
    assert "Grüße".encode() in m.data
    assert sinks["seven"].messages() == []
    assert node.remaining(alias) == 1
    assert 'tempalias_relay_attempts_total{upstream="mx",result="unsupported"} 1' in node.metrics()


def test_8bit_mail_with_no_mx_offering_8bitmime_gets_554_5_6_3(mx_lab):
    node, sinks = mx_lab
    alias = node.create_alias(target="me@sevenbit.test", days=1, max_usage=1)
    with pytest.raises(smtplib.SMTPDataError) as e:
        send_8bit(node, alias, "nowhere via mx")
    assert (e.value.smtp_code, e.value.smtp_error[:6]) == (554, b"5.6.3 "), e.value
    assert sinks["only_seven"].messages() == []
    assert node.remaining(alias) == 1
