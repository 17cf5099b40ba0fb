"""RFC 1870 SIZE on the outbound side, against aiosmtpd peers that announce a
limit (`data_size_limit`, advertised as `SIZE n`): a message above one
smarthost's SIZE goes to the next (in plaintext, after STARTTLS, where the
limit comes from the EHLO after TLS, and over implicit TLS), a message above every smarthost's SIZE
gets `552 5.3.4` and keeps its use, `SIZE=` is sent on MAIL, an upstream's own
`552` after DATA is passed on as before, and the same rule holds across MX
hosts (nsd serving the zones)."""

from __future__ import annotations

import smtplib
import ssl
import threading
from dataclasses import dataclass, field

import pytest

from harness import SENDER, free_port, message, wait_until
from peers import Ca, Nsd

# Any message from `message()` is far below this; padded ones are above it.
SMALL_LIMIT = 4000
BIG = 10_000


@dataclass
class SizedPeer:
    """aiosmtpd on a loopback address with a SIZE limit of its own. Keeps the
    parameters of every MAIL it got (even one it refused) and each message it
    took; `refuse_data` answers the end of data with that reply instead."""

    limit: int
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    cert: tuple | None = None
    implicit_tls: bool = False
    refuse_data: str | None = None
    mails: list[list[str]] = field(default_factory=list)
    messages: list[tuple[str, list[str], bytes, bool]] = field(default_factory=list)

    @property
    def url(self) -> str:
        if self.implicit_tls:
            return f"smtps://localhost:{self.port}"
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> "SizedPeer":
        try:
            from aiosmtpd.controller import Controller
        except ImportError as e:  # pragma: no cover - scripts/test installs it
            raise AssertionError("Python package aiosmtpd is missing; run scripts/test") from e
        outer = self
        lock = threading.Lock()

        class Handler:
            async def handle_MAIL(self, server, session, envelope, address, mail_options):
                with lock:
                    outer.mails.append(list(mail_options))
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                if outer.refuse_data:
                    return outer.refuse_data
                with lock:
                    outer.messages.append((envelope.mail_from, list(envelope.rcpt_tos),
                                           envelope.original_content,
                                           session.ssl is not None or outer.implicit_tls))
                return "250 2.0.0 OK: queued by aiosmtpd"

        kwargs = dict(hostname=self.host, port=self.port, ready_timeout=15, data_size_limit=self.limit)
        if self.cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))
            if self.implicit_tls:
                kwargs["ssl_context"] = ctx
            else:
                kwargs.update(tls_context=ctx, require_starttls=False)
        self.controller = Controller(Handler(), **kwargs)
        self.controller.start()
        return self

    def stop(self):
        c = getattr(self, "controller", None)
        if c is not None:
            c.stop()
            self.controller = None

    def wait_for(self, n: int, timeout: float = 10):
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} message(s) at {self.url}")
        return self.messages


@pytest.fixture
def peer_factory():
    made = []

    def make(**kwargs) -> SizedPeer:
        p = SizedPeer(**kwargs).start()
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


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
def test_a_message_over_the_first_smarthosts_size_goes_to_the_second(node_factory, peer_factory, tmp_path, tls):
    # With STARTTLS the limit must come from the EHLO after TLS (RFC 3207);
    # with implicit TLS it is read below lettre, inside our TLS stream.
    ca = Ca.create(tmp_path / "ca")
    peer = {"plaintext": {}, "starttls": {"cert": ca.issue("starttls")},
            "implicit": {"cert": ca.issue("implicit"), "implicit_tls": True}}[tls]
    small = peer_factory(limit=SMALL_LIMIT, **peer)
    large = peer_factory(limit=10 * 1024 * 1024, **peer)
    node = node_factory(relay="smarthost", smarthosts=[small.url, large.url],
                        config={"relay": {"breaker_failures": 2, "ca_file": str(ca.pem_path)}})
    encrypted = tls != "plaintext"
    alias = node.create_alias(days=1, max_usage=10)

    big = big_message("big", to=alias["alias"])
    assert len(big) > SMALL_LIMIT
    assert node.send([alias["alias"]], big) == {}
    ((mail_from, rcpt, data, tls_used),) = large.wait_for(1)
    assert tls_used == encrypted
    # Nothing was sent to the small one: no MAIL, no message.
    assert small.mails == [] and small.messages == []
    # SIZE= on MAIL is the size of what was sent (our trace header and
    # signatures included), as aiosmtpd counts it.
    assert size_option(large.mails[0]) == len(data), (large.mails, len(data))

    # More messages than breaker_failures: the small one stays in use for
    # messages that fit it, and hears their size too.
    for i in range(3):
        assert node.send([alias["alias"]], big_message(f"big {i}", to=alias["alias"])) == {}
    assert node.send([alias["alias"]], message("small", to=alias["alias"])) == {}
    small.wait_for(1)
    assert size_option(small.mails[0]) == len(small.messages[0][2])
    assert small.messages[0][3] == encrypted
    assert len(large.wait_for(4)) == 4
    assert node.remaining(alias) == 10 - 5

    m = node.metrics()
    assert f'tempalias_relay_attempts_total{{upstream="{small.url}",result="too_large"}} 4' in m, m
    assert f'tempalias_relay_attempts_total{{upstream="{small.url}",result="accepted"}} 1' in m
    assert f'tempalias_relay_breaker_state{{upstream="{small.url}"}} 0' in m
    assert 'result="failed"' not in m


def test_a_message_over_every_smarthosts_size_is_552_and_keeps_the_use(node_factory, peer_factory):
    a = peer_factory(limit=SMALL_LIMIT)
    b = peer_factory(limit=SMALL_LIMIT + 100)
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


def test_an_upstreams_own_552_after_data_is_passed_on_without_failover(node_factory, peer_factory):
    # The first smarthost announces a limit the message is far below, then
    # refuses it after DATA anyway (a quota, say): a permanent refusal as
    # before this change, passed on with its codes and a fixed text; the
    # second smarthost is not asked.
    refusing = peer_factory(limit=10 * 1024 * 1024,
                            refuse_data="552 5.3.4 <secret-target@example.net>: mailbox quota exceeded")
    second = peer_factory(limit=10 * 1024 * 1024)
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


ZONES = {
    # The preferred MX takes small messages only, the second large ones too.
    "big.test": ["@ IN MX 10 mx1", "@ IN MX 20 mx2", "mx1 IN A 127.0.0.21", "mx2 IN A 127.0.0.22"],
    # The only MX takes small messages only.
    "small.test": ["@ IN MX 10 mx", "mx IN A 127.0.0.23"],
}


def test_mx_hosts_below_the_message_size_are_passed_over(tmp_path, node_factory, peer_factory, request):
    nsd = Nsd(tmp_path, ZONES).start()
    request.addfinalizer(nsd.stop)
    port = free_port()
    mx1 = peer_factory(limit=SMALL_LIMIT, host="127.0.0.21", port=port)
    mx2 = peer_factory(limit=10 * 1024 * 1024, host="127.0.0.22", port=port)
    only = peer_factory(limit=SMALL_LIMIT, host="127.0.0.23", port=port)
    node = node_factory(config={"relay": {"mode": "mx", "dns_servers": [f"127.0.0.1:{nsd.port}"], "mx_port": port,
                                          "timeout_secs": 3}})

    alias = node.create_alias(target="me@big.test", days=1, max_usage=2)
    assert node.send([alias["alias"]], big_message("big by mx", to=alias["alias"])) == {}
    ((_, rcpt, data, _),) = mx2.wait_for(1)
    assert rcpt == ["me@big.test"] and size_option(mx2.mails[0]) == len(data)
    assert mx1.mails == []
    assert node.remaining(alias) == 1

    alias = node.create_alias(target="me@small.test", days=1, max_usage=1)
    code, text = data_error(node, alias, big_message("too big for the only mx", to=alias["alias"]))
    assert (code, text) == (552, b"5.3.4 Message too big for the upstream"), (code, text)
    assert only.mails == []
    assert node.remaining(alias) == 1
    m = node.metrics()
    assert 'tempalias_relay_attempts_total{upstream="mx",result="too_large"} 2' in m, m
