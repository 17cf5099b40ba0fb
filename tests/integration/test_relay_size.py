"""RFC 1870 SIZE on the outbound side, against aiosmtpd peers that announce a
limit (`data_size_limit`, advertised as `SIZE n`): a message above one
smarthost's SIZE goes to the next (in plaintext, after STARTTLS, where the
limit comes from the EHLO after TLS, and over implicit TLS), a message above every smarthost's SIZE
gets `552 5.3.4` and keeps its use, `SIZE=` is sent on MAIL, an upstream's own
`552` after DATA is passed on as before while its `552` to RCPT is temporary
(RFC 5321 4.5.3.1.10), and the same rule holds across MX hosts (nsd serving
the zones)."""

from __future__ import annotations

import smtplib

import pytest

from harness import SENDER, free_port, message
from peers import Ca, Nsd

# Any message from `message()` is far below this; padded ones are above it.
SMALL_LIMIT = 4000
BIG = 10_000


def big_message(subject: str, to: str) -> bytes:
    """A message of about BIG bytes: above SMALL_LIMIT, below 1 MB."""
    return message(subject, body="x" * 70 + "\r\n", to=to).replace(
        b"\r\n\r\n", b"\r\n\r\n" + (b"y" * 70 + b"\r\n") * (BIG // 72), 1)


def data_error(node, alias, msg: bytes):
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(SENDER, [alias["alias"]], msg)
    return e.value.smtp_code, e.value.smtp_error


def size_option(options: list[str]) -> int | None:
    sizes = [int(o.split("=", 1)[1]) for o in options if o.upper().startswith("SIZE=")]
    assert len(sizes) <= 1, options
    return sizes[0] if sizes else None


@pytest.mark.parametrize("tls", ["plaintext", "starttls", "implicit"])
def test_a_message_over_the_first_smarthosts_size_goes_to_the_second(node_factory, aiosmtpd_factory, tmp_path, tls):
    # With STARTTLS the limit must come from the EHLO after TLS (RFC 3207);
    # with implicit TLS it is read below lettre, inside our TLS stream.
    ca = Ca.create(tmp_path / "ca")
    peer = {"plaintext": {}, "starttls": {"cert": ca.issue("starttls")},
            "implicit": {"cert": ca.issue("implicit"), "implicit_tls": True}}[tls]
    small = aiosmtpd_factory(size_limit=SMALL_LIMIT, **peer)
    large = aiosmtpd_factory(size_limit=10 * 1024 * 1024, **peer)
    node = node_factory(relay="smarthost", smarthosts=[small.url, large.url],
                        config={"relay": {"breaker_failures": 2, "ca_file": str(ca.pem_path)}})
    encrypted = tls != "plaintext"
    alias = node.create_alias(days=1, max_usage=10)

    big = big_message("big", to=alias["alias"])
    assert len(big) > SMALL_LIMIT
    assert node.send([alias["alias"]], big) == {}
    (m,) = large.wait_for(1)
    assert m.tls == encrypted
    # Nothing was sent to the small one: no MAIL, no message.
    assert small.mails == [] and small.messages == []
    # SIZE= on MAIL is the size of what was sent (our trace header and
    # signatures included), as aiosmtpd counts it.
    assert size_option(large.mails[0]) == len(m.data), (large.mails, len(m.data))

    # More messages than breaker_failures: the small one stays in use for
    # messages that fit it, and hears their size too.
    for i in range(3):
        assert node.send([alias["alias"]], big_message(f"big {i}", to=alias["alias"])) == {}
    assert node.send([alias["alias"]], message("small", to=alias["alias"])) == {}
    small.wait_for(1)
    assert size_option(small.mails[0]) == len(small.messages[0].data)
    assert small.messages[0].tls == encrypted
    assert len(large.wait_for(4)) == 4
    assert node.remaining(alias) == 10 - 5

    m = node.metrics()
    assert f'tempalias_relay_attempts_total{{upstream="{small.url}",result="too_large"}} 4' in m, m
    assert f'tempalias_relay_attempts_total{{upstream="{small.url}",result="accepted"}} 1' in m
    assert f'tempalias_relay_breaker_state{{upstream="{small.url}"}} 0' in m
    assert 'result="failed"' not in m


def test_a_message_over_every_smarthosts_size_is_552_and_keeps_the_use(node_factory, aiosmtpd_factory):
    a = aiosmtpd_factory(size_limit=SMALL_LIMIT)
    b = aiosmtpd_factory(size_limit=SMALL_LIMIT + 100)
    node = node_factory(relay="smarthost", smarthosts=[a.url, b.url])
    alias = node.create_alias(target="secret-target@example.net", days=1, max_usage=1)

    code, text = data_error(node, alias, big_message("too big everywhere", to=alias["alias"]))
    # A fixed text: neither the smarthost nor the target is named.
    assert (code, text) == (552, b"5.3.4 Message too big for the upstream"), (code, text)
    assert a.mails == [] and b.mails == []
    # The use was not consumed: the one use left takes a message that fits.
    assert node.remaining(alias) == 1
    assert node.send([alias["alias"]], message("fits", to=alias["alias"])) == {}
    a.wait_for(1)
    assert node.remaining(alias) == 0
    m = node.metrics()
    assert 'tempalias_smtp_messages_total{result="permfail"} 1' in m, m
    for peer in (a, b):
        assert f'tempalias_relay_attempts_total{{upstream="{peer.url}",result="too_large"}} 1' in m
    assert "takes messages up to" in node.logs()


def test_an_upstreams_own_552_after_data_is_passed_on_without_failover(node_factory, aiosmtpd_factory):
    # The first smarthost announces a limit the message is far below, then
    # refuses it after DATA anyway (a quota, say): a permanent refusal as
    # before this change, passed on with its codes and a fixed text; the
    # second smarthost is not asked.
    refusing = aiosmtpd_factory(size_limit=10 * 1024 * 1024,
                            refuse_data="552 5.3.4 <secret-target@example.net>: mailbox quota exceeded")
    second = aiosmtpd_factory(size_limit=10 * 1024 * 1024)
    node = node_factory(relay="smarthost", smarthosts=[refusing.url, second.url])
    alias = node.create_alias(target="secret-target@example.net", days=1, max_usage=1)
    code, text = data_error(node, alias, message("refused after data", to=alias["alias"]))
    assert (code, text) == (552, b"5.3.4 Message too big for the upstream"), (code, text)
    assert b"secret-target" not in text
    assert len(refusing.mails) == 1 and size_option(refusing.mails[0]) is not None
    assert second.mails == []
    assert node.remaining(alias) == 1
    m = node.metrics()
    assert f'tempalias_relay_attempts_total{{upstream="{refusing.url}",result="refused_permanent"}} 1' in m, m


def test_an_upstreams_552_to_rcpt_is_temporary(node_factory, aiosmtpd_factory):
    # RFC 5321 4.5.3.1.10: a 552 to RCPT ("too many recipients") is to be
    # taken as temporary. Nothing was sent, so the next smarthost is asked;
    # with none left the sender gets 451 and the use is kept.
    refusing = aiosmtpd_factory(refuse_rcpt="552 5.5.3 Too many recipients")
    second = aiosmtpd_factory()
    node = node_factory(relay="smarthost", smarthosts=[refusing.url, second.url])
    alias = node.create_alias(target="secret-target@example.net", days=1, max_usage=2)
    assert node.send([alias["alias"]], message("552 at rcpt, then the next", to=alias["alias"])) == {}
    (m,) = second.wait_for(1)
    assert m.rcpt_to == ["secret-target@example.net"]
    assert len(refusing.mails) == 1 and refusing.messages == []
    assert node.remaining(alias) == 1
    m = node.metrics()
    assert f'tempalias_relay_attempts_total{{upstream="{refusing.url}",result="refused_temporary"}} 1' in m, m
    assert f'tempalias_relay_breaker_state{{upstream="{refusing.url}"}} 0' in m

    alone = node_factory(relay="smarthost", smarthosts=[refusing.url],
                         config={"relay": {"max_attempts": 1}})
    alias = alone.create_alias(target="secret-target@example.net", days=1, max_usage=1)
    code, text = data_error(alone, alias, message("552 at rcpt, nobody else", to=alias["alias"]))
    assert (code, text) == (451, b"4.4.1 Upstream not available, try again later"), (code, text)
    assert alone.remaining(alias) == 1
    assert 'tempalias_smtp_messages_total{result="tempfail"} 1' in alone.metrics()
    assert "taken as temporary" in alone.logs()


ZONES = {
    # The preferred MX takes small messages only, the second large ones too.
    "big.test": ["@ IN MX 10 mx1", "@ IN MX 20 mx2", "mx1 IN A 127.0.0.21", "mx2 IN A 127.0.0.22"],
    # The only MX takes small messages only.
    "small.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.23"],
}


def test_mx_hosts_below_the_message_size_are_passed_over(tmp_path, node_factory, aiosmtpd_factory, request):
    nsd = Nsd(tmp_path, ZONES).start()
    request.addfinalizer(nsd.stop)
    port = free_port()
    mx1 = aiosmtpd_factory(size_limit=SMALL_LIMIT, host="127.0.0.21", port=port)
    mx2 = aiosmtpd_factory(size_limit=10 * 1024 * 1024, host="127.0.0.22", port=port)
    only = aiosmtpd_factory(size_limit=SMALL_LIMIT, host="127.0.0.23", port=port)
    node = node_factory(config={"relay": {"mode": "mx", "dns_servers": [f"127.0.0.1:{nsd.port}"], "mx_port": port,
                                          "timeout_secs": 3}})

    alias = node.create_alias(target="me@big.test", days=1, max_usage=2)
    assert node.send([alias["alias"]], big_message("big by mx", to=alias["alias"])) == {}
    (m,) = mx2.wait_for(1)
    assert m.rcpt_to == ["me@big.test"] and size_option(mx2.mails[0]) == len(m.data)
    assert mx1.mails == []
    assert node.remaining(alias) == 1

    alias = node.create_alias(target="me@small.test", days=1, max_usage=1)
    code, text = data_error(node, alias, big_message("too big for the only mx", to=alias["alias"]))
    assert (code, text) == (552, b"5.3.4 Message too big for the upstream"), (code, text)
    assert only.mails == []
    assert node.remaining(alias) == 1
    m = node.metrics()
    assert 'tempalias_relay_attempts_total{upstream="mx",result="too_large"} 2' in m, m
