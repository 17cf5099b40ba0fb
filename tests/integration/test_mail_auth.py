"""SRS, DKIM and ARC of forwarded mail, checked by independent tools.

nsd (on an ephemeral loopback port) serves the alias domains' DKIM keys, made
by `tempalias dkim keygen`, and a sender domain with SPF, DKIM and DMARC; the
node evaluates incoming mail against it for ARC. dkimpy verifies the captured
messages (DKIM signatures and the ARC chain), querying the same nsd. Nothing
leaves the machine.
"""

from __future__ import annotations

import base64
import os
import re
import smtplib
import stat
import subprocess
import time
from email.utils import formatdate

import pytest

import peers
from harness import BIN, DOMAIN, SENDER, TARGET, srs_of

dkim = pytest.importorskip("dkim", reason="dkimpy is not installed; run scripts/test")
import dns.resolver  # noqa: E402  (dnspython comes with dkimpy)

ED_DOMAIN = "ed.test"
# Two keys, RSA and Ed25519, made by `dkim keygen --algorithm both`.
DUAL_DOMAIN = "dual.test"
SENDER_DOMAIN = "sender.test"
SIGNED_SENDER = f"alice@{SENDER_DOMAIN}"


def keygen(tmp, domain: str, selector: str, algorithm: str):
    """Runs `tempalias dkim keygen`; returns (key file, TXT value, stdout)."""
    out = tmp / f"{selector}.{domain}.key"
    r = subprocess.run(
        [str(BIN), "dkim", "keygen", "--domain", domain, "--selector", selector, "--algorithm", algorithm, "--out", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    m = re.search(r'IN TXT \( (.*) \)', r.stdout)
    assert m, r.stdout
    txt = "".join(re.findall(r'"([^"]*)"', m.group(1)))
    return out, txt, r.stdout


class Nsd(peers.Nsd):
    """peers.py's nsd on 127.0.0.1:<port>, one zone file per domain, started
    at once, with a resolver for dkimpy's lookups."""

    def __init__(self, base, zones: dict[str, list[str]]):
        super().__init__(base, zones)
        self.resolver = dns.resolver.Resolver(configure=False)
        self.resolver.nameservers = ["127.0.0.1"]
        self.resolver.port = self.port
        self.resolver.lifetime = 2
        self.start()

    def txt(self, name, timeout=5):
        """dkimpy's DNS hook: the TXT record of `name` from this server."""
        if isinstance(name, bytes):
            name = name.decode()
        try:
            answer = self.resolver.resolve(name, "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return None
        return b"".join(answer[0].strings)


def keygen_both(tmp, domain: str, stem: str):
    """Runs `tempalias dkim keygen --algorithm both`; returns the stdout and
    {selector: (key file, TXT value)} in the order printed."""
    r = subprocess.run(
        [str(BIN), "dkim", "keygen", "--domain", domain, "--selector", stem, "--algorithm", "both", "--out-dir", str(tmp)],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    keys = {}
    for sel, strings in re.findall(r'^(\S+)\._domainkey\.\S+ IN TXT \( (.*) \)$', r.stdout, re.M):
        keys[sel] = (tmp / f"{sel}.{domain}.key", "".join(re.findall(r'"([^"]*)"', strings)))
    return r.stdout, keys


def txt_record(name: str, value: str) -> str:
    parts = " ".join(f'"{value[i:i + 255]}"' for i in range(0, len(value), 255))
    return f"{name} IN TXT ( {parts} )"


@pytest.fixture
def world(tmp_path, node_factory):
    """An RSA key for tempalias.test, an Ed25519 key for ed.test, both for
    dual.test, a signing sender domain, nsd serving all of it, and a node
    that signs and seals."""
    rsa_key, rsa_txt, _ = keygen(tmp_path, DOMAIN, "s1", "rsa")
    ed_key, ed_txt, _ = keygen(tmp_path, ED_DOMAIN, "e1", "ed25519")
    sender_key, sender_txt, _ = keygen(tmp_path, SENDER_DOMAIN, "mail", "rsa")
    _, dual = keygen_both(tmp_path, DUAL_DOMAIN, "d1")
    spf = 'IN TXT "v=spf1 ip4:127.0.0.1 -all"'
    nsd = Nsd(tmp_path, {
        DOMAIN: [txt_record("s1._domainkey", rsa_txt), f"@ {spf}", '_dmarc IN TXT "v=DMARC1; p=reject"'],
        ED_DOMAIN: [txt_record("e1._domainkey", ed_txt), f"@ {spf}"],
        DUAL_DOMAIN: [*(txt_record(f"{sel}._domainkey", txt) for sel, (_, txt) in dual.items()), f"@ {spf}"],
        SENDER_DOMAIN: [txt_record("mail._domainkey", sender_txt), f"@ {spf}", '_dmarc IN TXT "v=DMARC1; p=reject"'],
        # DMARC's tree walk (RFC 9989) asks _dmarc.test too: answer it (NXDOMAIN).
        "test": [],
    })
    node = node_factory(config={
        "domains": [DOMAIN, ED_DOMAIN, DUAL_DOMAIN],
        "dkim": {"keys": [
            {"domain": DOMAIN, "selector": "s1", "key_file": str(rsa_key), "algorithm": "rsa"},
            {"domain": ED_DOMAIN, "selector": "e1", "key_file": str(ed_key), "algorithm": "ed25519"},
            # Listed Ed25519 first and without `algorithm`: read from the
            # files, and RSA still signs first.
            {"domain": DUAL_DOMAIN, "selector": "d1-ed25519", "key_file": str(dual["d1-ed25519"][0])},
            {"domain": DUAL_DOMAIN, "selector": "d1-rsa", "key_file": str(dual["d1-rsa"][0])},
        ]},
        "arc": {"dns_servers": [f"127.0.0.1:{nsd.port}"]},
    })
    yield node, nsd, sender_key
    nsd.stop()


def signed_message(sender_key, subject: str, to: str) -> bytes:
    """A message signed by the sender domain, as its own MTA would."""
    msg = (
        f"From: Alice <{SIGNED_SENDER}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
        f"Date: {formatdate()}\r\nMessage-ID: <{time.time_ns()}@{SENDER_DOMAIN}>\r\n"
        "MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
        "Hello,\r\n\r\nthis body must arrive exactly as it was signed.\r\n.leading dot\r\n"
    ).encode()
    sig = dkim.sign(msg, b"mail", SENDER_DOMAIN.encode(), sender_key.read_bytes(),
                    include_headers=[b"from", b"to", b"subject", b"date", b"message-id"])
    return sig + msg


def signatures(eml: bytes) -> list[bytes]:
    """The d= of each DKIM-Signature, top first."""
    return re.findall(rb"^DKIM-Signature:.*?\bd=([^;\s]+)", eml, re.M | re.S)


def verify_all(eml: bytes, nsd: Nsd) -> list[bool]:
    d = dkim.DKIM(eml)
    return [d.verify(idx=i, dnsfunc=nsd.txt) for i in range(len(signatures(eml)))]


def test_forwarded_mail_is_signed_sealed_and_the_sender_signature_survives(world):
    node, nsd, sender_key = world
    alias = node.create_alias(days=3, max_usage=5)
    msg = signed_message(sender_key, "signed by the sender", alias["alias"])
    assert dkim.verify(msg, dnsfunc=nsd.txt), "the test's own pre-signed message must verify"
    assert node.send([alias["alias"]], msg, sender=SIGNED_SENDER) == {}
    (cap,) = node.captured()
    eml = cap["eml"]
    assert srs_of(cap["meta"]["mail_from"], SIGNED_SENDER), cap["meta"]
    # Only headers were added in front: the original follows byte for byte.
    assert eml.endswith(msg)
    # Ours first (alias domain), then the sender's; both verify.
    assert signatures(eml) == [DOMAIN.encode(), SENDER_DOMAIN.encode()]
    assert verify_all(eml, nsd) == [True, True]
    ours = re.search(rb"^DKIM-Signature:(.*?)\r\n(?! )(?!\t)", eml, re.M | re.S).group(1)
    assert b"c=relaxed/relaxed" in ours and b"a=rsa-sha256" in ours, ours
    h = re.sub(rb"\s", b"", re.search(rb"\bh=([^;]+)", ours).group(1)).lower().split(b":")
    for field in (b"from", b"to", b"subject", b"date", b"message-id", b"dkim-signature"):
        assert field in h, (field, h)
    # The ARC set carries our evaluation of the incoming message.
    cv, results, comment = dkim.arc_verify(eml, dnsfunc=nsd.txt)
    assert cv == dkim.CV_Pass, (cv, results, comment)
    aar = re.search(rb"^ARC-Authentication-Results:(.*?)\r\n(?=\S)", eml, re.M | re.S).group(1)
    for result in (b"spf=pass", b"dkim=pass", b"dmarc=pass"):
        assert result in aar, aar
    assert b"i=1" in aar and b"mx1.tempalias.test" in aar
    metrics = node.metrics()
    assert 'tempalias_forward_auth_total{result="signed"} 1' in metrics, metrics
    assert 'tempalias_forward_auth_total{result="sealed"} 1' in metrics, metrics


def test_ed25519_domain_is_signed_but_not_sealed(world):
    """ARC is defined for rsa-sha256 only (RFC 8617): an Ed25519 domain signs."""
    node, nsd, sender_key = world
    alias = node.create_alias(days=3, max_usage=5)
    to = f"{alias['id']}@{ED_DOMAIN}"
    msg = signed_message(sender_key, "ed25519", to)
    assert node.send([to], msg, sender=SIGNED_SENDER) == {}
    (cap,) = node.captured()
    eml = cap["eml"]
    assert srs_of(cap["meta"]["mail_from"], SIGNED_SENDER, domain=ED_DOMAIN), cap["meta"]
    assert b"a=ed25519-sha256" in eml and b"ARC-Seal" not in eml
    assert eml.endswith(msg)
    assert signatures(eml) == [ED_DOMAIN.encode(), SENDER_DOMAIN.encode()]
    assert verify_all(eml, nsd) == [True, True]
    assert "not ARC-sealed: ARC (RFC 8617) needs an RSA key" in node.logs()


def fields_named(eml: bytes, name: bytes) -> list[bytes]:
    """The unfolded values of the header fields `name`, top first."""
    head = eml.split(b"\r\n\r\n", 1)[0]
    unfolded = re.sub(rb"\r\n[ \t]+", b" ", head)
    return [line.split(b":", 1)[1] for line in unfolded.split(b"\r\n")
            if line.lower().startswith(name.lower() + b":")]


def tag(value: bytes, t: bytes) -> bytes:
    m = re.search(rb"(?:^|;)\s*" + t + rb"=([^;]*)", value)
    return re.sub(rb"\s", b"", m.group(1)) if m else b""


def test_two_keys_sign_twice_and_each_signature_verifies_on_its_own(world):
    """dual.test has an RSA and an Ed25519 key: every message gets two
    signatures, RSA on top, each verifiable without the other; ARC seals with
    the RSA key, and the sender's signature below still verifies."""
    node, nsd, sender_key = world
    alias = node.create_alias(days=3, max_usage=5)
    to = f"{alias['id']}@{DUAL_DOMAIN}"
    msg = signed_message(sender_key, "two keys", to)
    assert node.send([to], msg, sender=SIGNED_SENDER) == {}
    (cap,) = node.captured()
    eml = cap["eml"]
    assert eml.endswith(msg)
    assert signatures(eml) == [DUAL_DOMAIN.encode(), DUAL_DOMAIN.encode(), SENDER_DOMAIN.encode()]
    ours = fields_named(eml, b"DKIM-Signature")[:2]
    assert [(tag(v, b"s"), tag(v, b"a")) for v in ours] == [
        (b"d1-rsa", b"rsa-sha256"), (b"d1-ed25519", b"ed25519-sha256")], ours
    # h= names DKIM-Signature once, for the sender's signature: verifiers
    # take instances from the bottom (RFC 6376 5.4.2), so neither of ours
    # covers the other.
    for v in ours:
        assert tag(v, b"h").lower().split(b":").count(b"dkim-signature") == 1, v
    # Both of ours and the sender's verify (dkimpy, keys from nsd).
    assert verify_all(eml, nsd) == [True, True, True]
    # A receiver that has only the RSA record (or knows no Ed25519) still
    # passes the RSA signature; the Ed25519 one fails there alone.
    only_rsa = lambda name, timeout=5: nsd.txt(name) if b"d1-ed25519" not in (  # noqa: E731
        name if isinstance(name, bytes) else name.encode()) else None
    d = dkim.DKIM(eml)
    assert [d.verify(idx=i, dnsfunc=only_rsa) for i in range(3)] == [True, False, True]
    # Each of ours verifies with the other one removed: none depends on the
    # other's bytes (an intermediary may drop a signature it cannot check).
    for drop, keep in ((0, 1), (1, 0)):
        stripped = drop_field(eml, b"DKIM-Signature", drop)
        assert signatures(stripped) == [DUAL_DOMAIN.encode(), SENDER_DOMAIN.encode()]
        assert verify_all(stripped, nsd) == [True, True], (drop, keep)
        assert tag(fields_named(stripped, b"DKIM-Signature")[0], b"s") == tag(ours[keep], b"s")
    # ARC: one set, sealed with the RSA key; the chain verifies.
    assert eml.count(b"ARC-Seal:") == 1
    for name in (b"ARC-Seal", b"ARC-Message-Signature"):
        (v,) = fields_named(eml, name)
        assert (tag(v, b"s"), tag(v, b"a"), tag(v, b"d")) == (b"d1-rsa", b"rsa-sha256", DUAL_DOMAIN.encode()), v
    cv, results, comment = dkim.arc_verify(eml, dnsfunc=nsd.txt)
    assert cv == dkim.CV_Pass, (cv, results, comment)
    # Forwarded once more through another alias of the domain: our two
    # earlier signatures are now signatures "already present" and covered
    # by the new ones; all five and the two-instance ARC chain verify.
    second = node.create_alias(days=3, max_usage=5)
    to2 = f"{second['id']}@{DUAL_DOMAIN}"
    assert node.send([to2], eml, sender=cap["meta"]["mail_from"]) == {}
    again = node.captured()[1]["eml"]
    assert again.endswith(eml)
    assert [tag(v, b"s") for v in fields_named(again, b"DKIM-Signature")] == [
        b"d1-rsa", b"d1-ed25519", b"d1-rsa", b"d1-ed25519", b"mail"]
    for v in fields_named(again, b"DKIM-Signature")[:2]:
        assert tag(v, b"h").lower().split(b":").count(b"dkim-signature") == 3, v
    assert verify_all(again, nsd) == [True] * 5
    cv, results, comment = dkim.arc_verify(again, dnsfunc=nsd.txt)
    assert cv == dkim.CV_Pass, (cv, results, comment)
    assert [r["instance"] for r in results] == [2, 1], results
    # The report on a bounce, our own mail, gets both signatures too.
    srs = cap["meta"]["mail_from"]
    assert srs.endswith("@" + DUAL_DOMAIN), srs
    assert node.send([srs], target_bounce(eml, srs), sender="") == {}
    report = node.captured()[2]["eml"]
    assert signatures(report) == [DUAL_DOMAIN.encode(), DUAL_DOMAIN.encode()]
    assert [tag(v, b"s") for v in fields_named(report, b"DKIM-Signature")] == [b"d1-rsa", b"d1-ed25519"]
    assert verify_all(report, nsd) == [True, True]
    metrics = node.metrics()
    assert 'tempalias_forward_auth_total{result="signed"} 3' in metrics, metrics
    assert "dual.test (d1-rsa rsa, d1-ed25519 ed25519)" in node.logs()


def test_unsigned_mail_is_sealed_so_that_arc_verifies(world):
    """A message without DKIM signature: the seal must not sign the absent
    DKIM-Signature field, or verifiers take our own signatures (added below
    the ARC set) for it and fail the seal."""
    node, nsd, _ = world
    for domain, ours in ((DOMAIN, 1), (DUAL_DOMAIN, 2)):
        alias = node.create_alias(days=3, max_usage=5)
        to = f"{alias['id']}@{domain}"
        msg = (f"From: Alice <{SIGNED_SENDER}>\r\nTo: <{to}>\r\nSubject: unsigned\r\n"
               f"Date: {formatdate()}\r\nMessage-ID: <{time.time_ns()}@{SENDER_DOMAIN}>\r\n\r\nbody\r\n").encode()
        assert node.send([to], msg, sender=SIGNED_SENDER) == {}
        eml = node.captured()[-1]["eml"]
        assert eml.endswith(msg)
        (ams,) = fields_named(eml, b"ARC-Message-Signature")
        assert b"dkim-signature" not in tag(ams, b"h").lower(), ams
        for v in fields_named(eml, b"DKIM-Signature"):
            assert b"dkim-signature" not in tag(v, b"h").lower(), v
        assert verify_all(eml, nsd) == [True] * ours
        cv, results, comment = dkim.arc_verify(eml, dnsfunc=nsd.txt)
        assert cv == dkim.CV_Pass, (domain, cv, results, comment)


def drop_field(eml: bytes, name: bytes, index: int) -> bytes:
    """`eml` without the `index`-th (from the top) header field `name`."""
    head, body = eml.split(b"\r\n\r\n", 1)
    fields: list[list[bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            fields[-1].append(line)
        else:
            fields.append([line])
    seen, out = 0, []
    for f in fields:
        if f[0].lower().startswith(name.lower() + b":"):
            seen += 1
            if seen - 1 == index:
                continue
        out.extend(f)
    return b"\r\n".join(out) + b"\r\n\r\n" + body


def test_a_second_forwarding_extends_the_arc_chain(world):
    node, nsd, sender_key = world
    first = node.create_alias(days=3, max_usage=5)
    msg = signed_message(sender_key, "two hops", first["alias"])
    assert node.send([first["alias"]], msg, sender=SIGNED_SENDER) == {}
    cap = node.captured()[0]
    # Forwarded again, as a second forwarder would, from the SRS sender.
    second = node.create_alias(days=3, max_usage=5)
    assert node.send([second["alias"]], cap["eml"], sender=cap["meta"]["mail_from"]) == {}
    eml = node.captured()[1]["eml"]
    assert eml.endswith(cap["eml"])
    assert b"ARC-Seal: i=2" in eml and b"cv=pass" in eml
    cv, results, comment = dkim.arc_verify(eml, dnsfunc=nsd.txt)
    assert cv == dkim.CV_Pass, (cv, results, comment)
    assert [r["instance"] for r in results] == [2, 1], results
    assert verify_all(eml, nsd) == [True, True, True]
    # Our own SRS sender is kept: a bounce goes straight to the original sender.
    assert node.captured()[1]["meta"]["mail_from"] == cap["meta"]["mail_from"]


def test_the_report_on_a_bounce_is_signed_by_the_alias_domain(world):
    node, nsd, sender_key = world
    alias = node.create_alias(days=3, max_usage=5)
    msg = signed_message(sender_key, "will bounce", alias["alias"])
    assert node.send([alias["alias"]], msg, sender=SIGNED_SENDER) == {}
    cap = node.captured()[0]
    srs = cap["meta"]["mail_from"]
    # The returned copy carries our ARC set and signature: none of it goes back.
    assert node.send([srs], target_bounce(cap["eml"], srs), sender="") == {}
    back = node.captured()[1]
    assert back["meta"]["rcpt_to"] == [SIGNED_SENDER] and back["meta"]["mail_from"] == ""
    eml = back["eml"]
    assert_our_report(eml, "5.2.2", subject="will bounce")
    assert b"ARC-" not in eml
    assert signatures(eml) == [DOMAIN.encode()]
    assert verify_all(eml, nsd) == [True]


def target_bounce(returned: bytes, srs: str, target: str = TARGET) -> bytes:
    """A bounce as Postfix at the target writes it: it names the target in
    its report, its text and the trace headers of the returned copy."""
    return (
        f"From: MAILER-DAEMON@mx.example.net (Mail Delivery System)\r\nTo: {srs}\r\n"
        "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\n"
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"B1\"\r\n\r\n"
        f"--B1\r\nContent-Type: text/plain\r\n\r\n<{target}>: mailbox full\r\n\r\n"
        "--B1\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx.example.net\r\n\r\n"
        f"Final-Recipient: rfc822; {target}\r\nOriginal-Recipient: rfc822;{target}\r\nAction: failed\r\n"
        f"Status: 5.2.2\r\nDiagnostic-Code: smtp; 552 5.2.2 <{target}>: mailbox full\r\n\r\n"
        "--B1\r\nContent-Type: message/rfc822\r\n\r\n"
        f"Received: from mx1.tempalias.test by mx.example.net for <{target}>; {formatdate()}\r\n"
        f"Delivered-To: {target}\r\n"
    ).encode() + returned + b"\r\n--B1--\r\n"


def assert_our_report(eml: bytes, status: str, *, target: str = TARGET, subject: str | None = None):
    """The node's own DSN, not the target's bounce: it names no target."""
    import email
    import email.policy

    assert target.lower().encode() not in eml.lower(), eml.decode(errors="replace")
    msg = email.message_from_bytes(eml, policy=email.policy.default)
    assert msg.get_content_type() == "multipart/report", msg["Content-Type"]
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == f"Mail Delivery System <MAILER-DAEMON@{DOMAIN}>"
    text, report, headers = msg.get_payload()
    assert text.get_content_type() == "text/plain"
    assert f"receiving server: {status}" in text.get_content(), text.get_content()
    assert report.get_content_type() == "message/delivery-status"
    fields = report.get_payload()[1]
    assert fields["Final-Recipient"] == f"rfc822; postmaster@{DOMAIN}", str(fields)
    assert fields["Status"] == (status if status != "unknown" else "5.0.0")
    assert "Diagnostic-Code" not in fields
    assert headers.get_content_type() == "text/rfc822-headers"
    returned = headers.get_payload()
    assert b"Received:" not in returned.encode() and b"DKIM" not in returned.encode(), returned
    if subject is not None:
        assert f"Subject: {subject}" in returned, returned


def test_srs_bounce_is_reversed_to_the_original_sender_and_costs_no_use(node_factory):
    node = node_factory()
    alias = node.create_alias(days=3, max_usage=3)
    assert node.send([alias["alias"]], b"Subject: first\r\nMessage-ID: <m1@example.org>\r\n\r\nbody\r\n") == {}
    (cap,) = node.captured()
    srs = cap["meta"]["mail_from"]
    assert srs_of(srs, SENDER), srs
    assert node.remaining(alias) == 2

    bounce = target_bounce(cap["eml"], srs)
    # Any case, as some MTAs lower-case addresses.
    for rcpt in (srs, srs.lower()):
        assert node.send([rcpt], bounce, sender="") == {}
    caps = node.captured()[1:]
    assert len(caps) == 2
    for c in caps:
        assert c["meta"]["mail_from"] == "", "a bounce stays a bounce"
        assert c["meta"]["rcpt_to"] in ([SENDER], [SENDER.lower()])
        # Not the target's bounce: the node's own report, without the target.
        assert_our_report(c["eml"], "5.2.2", subject="first")
        assert b"Message-ID: <m1@example.org>" in c["eml"]
    assert node.remaining(alias) == 2, "a reversed bounce uses nothing"


def test_a_bounce_that_is_no_report_gets_a_report_with_an_unknown_status(node_factory):
    node = node_factory()
    alias = node.create_alias(days=3, max_usage=3)
    assert node.send([alias["alias"]], b"Subject: first\r\n\r\nbody\r\n") == {}
    srs = node.captured()[0]["meta"]["mail_from"]
    bounce = f"From: MAILER-DAEMON@example.net\r\nSubject: failed\r\n\r\n<{TARGET}> bounced\r\n".encode()
    assert node.send([srs], bounce, sender="") == {}
    assert_our_report(node.captured()[1]["eml"], "unknown")


def rcpt(node, address: str, sender: str = "") -> tuple[int, bytes]:
    with node.smtp() as s:
        s.ehlo()
        assert s.mail(sender)[0] == 250
        return s.rcpt(address)


def test_srs_is_no_open_relay(node_factory):
    """Without the key, no SRS address can make the node send anywhere."""
    node = node_factory()
    alias = node.create_alias(days=3, max_usage=3)
    assert node.send([alias["alias"]], b"Subject: x\r\n\r\nbody\r\n") == {}
    srs = node.captured()[0]["meta"]["mail_from"]
    local = srs.split("@")[0]
    _, hash_, stamp, dom, user = local.split("=", 4)
    crafted = [
        f"SRS0=AAAAAA={stamp}=victim.example=bob@{DOMAIN}",               # made-up hash
        f"SRS0={hash_}={stamp}=victim.example={user}@{DOMAIN}",            # other domain, same hash
        f"SRS0={hash_}={stamp}={dom}=bob@{DOMAIN}",                        # other user, same hash
        f"SRS1=AAAAAA=victim.example==AAAA=AA=victim.example=bob@{DOMAIN}",  # SRS1 to any forwarder
        f"SRS0={hash_}@{DOMAIN}",                                          # truncated
    ]
    for address in crafted:
        code, text = rcpt(node, address)
        assert (code, text[:5]) == (550, b"5.7.1"), (address, code, text)
    # A valid one, but not from a bounce: SRS addresses are return paths only.
    code, text = rcpt(node, srs, sender="mallory@example.org")
    assert (code, text[:5]) == (550, b"5.7.1"), (code, text)
    # The failed RCPTs count against the session (and close it at the limit).
    with node.smtp() as s:
        s.ehlo()
        s.mail("")
        codes = []
        for _ in range(40):
            try:
                codes.append(s.rcpt(f"SRS0=AAAAAA={stamp}=victim.example=bob@{DOMAIN}")[0])
            except smtplib.SMTPServerDisconnected:
                break
        assert codes and set(codes[:-1]) == {550} and codes[-1] in (421, 550), codes
        assert len(codes) < 40, "the session must end after too many failed recipients"
    assert len(node.captured()) == 1, "nothing was relayed"
    assert 'tempalias_smtp_rcpt_total{result="relay_denied"}' in node.metrics()


def test_srs_addresses_expire(node_factory):
    node = node_factory(config={"srs": {"max_age_days": 2}})
    alias = node.create_alias(days=30, max_usage=3)
    assert node.send([alias["alias"]], b"Subject: x\r\n\r\nbody\r\n") == {}
    srs = node.captured()[0]["meta"]["mail_from"]
    node.set_clock(2 * 86400)
    assert rcpt(node, srs)[0] == 250
    node.set_clock(3 * 86400)
    code, text = rcpt(node, srs)
    assert (code, text[:5]) == (550, b"5.7.1"), (code, text)


def test_zero_config_node_keeps_its_srs_key_across_restarts(node_factory):
    node = node_factory()
    alias = node.create_alias(days=3, max_usage=3)
    assert node.send([alias["alias"]], b"Subject: x\r\n\r\nbody\r\n") == {}
    srs = node.captured()[0]["meta"]["mail_from"]
    node.restart()
    assert node.send([srs], b"Subject: bounce\r\n\r\nx\r\n", sender="") == {}
    assert node.captured()[1]["meta"]["rcpt_to"] == [SENDER]
    assert "forwarded mail of these domains is not signed" in node.logs()
    # Counted since the restart: the bounce.
    assert 'tempalias_forward_auth_total{result="unsigned"} 1' in node.metrics()


def test_dkim_keygen_writes_a_private_key_and_never_overwrites(tmp_path):
    out, txt, stdout = keygen(tmp_path, "tempalias.example", "s2026", "rsa")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_text().startswith("-----BEGIN RSA PRIVATE KEY-----")
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]{300,}", txt), txt
    assert "s2026._domainkey.tempalias.example. IN TXT" in stdout
    assert '[[dkim.keys]]' in stdout and 'domain = "tempalias.example"' in stdout
    before = out.read_bytes()
    r = subprocess.run([str(BIN), "dkim", "keygen", "--domain", "tempalias.example", "--selector", "s2026", "--out", str(out)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "File exists" in r.stderr, r.stderr
    assert out.read_bytes() == before
    # The key signs, and dkimpy verifies it against the printed record.
    msg = b"From: a@tempalias.example\r\nSubject: k\r\n\r\nbody\r\n"
    sig = dkim.sign(msg, b"s2026", b"tempalias.example", out.read_bytes())
    assert dkim.verify(sig + msg, dnsfunc=lambda name, timeout=5: txt.encode())


def test_dkim_keygen_both_makes_an_rsa_and_an_ed25519_key(tmp_path):
    stdout, keys = keygen_both(tmp_path, "tempalias.example", "k2026")
    assert list(keys) == ["k2026-rsa", "k2026-ed25519"], stdout
    (rsa_file, rsa_txt), (ed_file, ed_txt) = keys.values()
    assert re.fullmatch(r"v=DKIM1; k=rsa; p=[A-Za-z0-9+/=]{300,}", rsa_txt), rsa_txt
    assert re.fullmatch(r"v=DKIM1; k=ed25519; p=[A-Za-z0-9+/=]{44}", ed_txt), ed_txt
    for f in (rsa_file, ed_file):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert stdout.count("[[dkim.keys]]") == 2 and 'algorithm = "ed25519"' in stdout, stdout
    # Each key signs and verifies against its own printed record.
    msg = b"From: a@tempalias.example\r\nSubject: k\r\n\r\nbody\r\n"
    for sel, (f, txt) in keys.items():
        if "ed25519" in sel:
            # dkimpy takes an Ed25519 key as its base64 seed: the 32 bytes
            # after the PKCS#8 prefix (RFC 8410).
            der = base64.b64decode("".join(f.read_text().splitlines()[1:-1]))
            assert der[2:16] == bytes.fromhex("020101300506032b657004220420"), der[:16].hex()
            key, alg = base64.b64encode(der[16:48]), b"ed25519-sha256"
        else:
            key, alg = f.read_bytes(), b"rsa-sha256"
        sig = dkim.sign(msg, sel.encode(), b"tempalias.example", key, signature_algorithm=alg)
        assert dkim.verify(sig + msg, dnsfunc=lambda name, timeout=5, txt=txt: txt.encode()), sel
    # One of the two files in the way: neither is written, nothing replaced.
    other = tmp_path / "again"
    other.mkdir()
    (other / "k2026-ed25519.tempalias.example.key").write_text("keep")
    r = subprocess.run([str(BIN), "dkim", "keygen", "--domain", "tempalias.example", "--selector", "k2026",
                        "--algorithm", "both", "--out-dir", str(other)], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "File exists" in r.stderr, r.stderr
    assert sorted(p.name for p in other.iterdir()) == ["k2026-ed25519.tempalias.example.key"]
    assert (other / "k2026-ed25519.tempalias.example.key").read_text() == "keep"
    r = subprocess.run([str(BIN), "dkim", "keygen", "--domain", "tempalias.example", "--selector", "k2026",
                        "--algorithm", "both", "--out", str(other / "x.key")], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and "--out-dir" in r.stderr, r.stderr


def test_check_config_reports_each_key_without_its_material(tmp_path):
    _, keys = keygen_both(tmp_path, DOMAIN, "c1")
    (rsa_file, _), (ed_file, _) = keys.values()
    ed_file.chmod(0o644)
    secret_lines = [line for f in (rsa_file, ed_file) for line in f.read_text().splitlines() if "-----" not in line]
    # The test run's own TEMPALIAS_* variables are no part of this config.
    env = {k: v for k, v in os.environ.items() if not k.startswith("TEMPALIAS_")}
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'domains = ["{DOMAIN}"]\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "c1-rsa"\nkey_file = "{rsa_file}"\nalgorithm = "ed25519"\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "c1-ed25519"\nkey_file = "{ed_file}"\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "c1-ed25519"\nkey_file = "{tmp_path / "missing.key"}"\n'
    )
    r = subprocess.run([str(BIN), "check-config", str(cfg)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    err = r.stderr
    assert f"{DOMAIN} c1-rsa: {rsa_file}: not a usable ed25519 key: the file holds an rsa key" in err, err
    assert f"{DOMAIN} c1-ed25519: {ed_file}: mode 0644 lets other users read or change the private key" in err, err
    assert f"cannot read {tmp_path / 'missing.key'}" in err, err
    assert 'has selector "c1-ed25519" twice' in err, err
    for line in secret_lines:
        assert line not in r.stdout + r.stderr
    # Fixed, the same two keys pass.
    ed_file.chmod(0o600)
    cfg.write_text(
        f'domains = ["{DOMAIN}"]\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "c1-rsa"\nkey_file = "{rsa_file}"\n'
        f'[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "c1-ed25519"\nkey_file = "{ed_file}"\n'
    )
    r = subprocess.run([str(BIN), "check-config", str(cfg)], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_check_config_reports_an_unusable_dkim_key(tmp_path):
    key, _, _ = keygen(tmp_path, DOMAIN, "e1", "ed25519")
    cfg = tmp_path / "c.toml"
    cfg.write_text(
        f'domains = ["{DOMAIN}"]\n[[dkim.keys]]\ndomain = "{DOMAIN}"\nselector = "e1"\n'
        f'key_file = "{key}"\nalgorithm = "rsa"\n'
        '[[dkim.keys]]\ndomain = "other.test"\nselector = "x"\nkey_file = "/nonexistent"\n'
        '[srs]\nmax_age_days = 0\n'
    )
    r = subprocess.run([str(BIN), "check-config", str(cfg)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "not a usable rsa key" in r.stderr, r.stderr
    assert '"other.test" is not one of the alias domains' in r.stderr, r.stderr
    assert "srs.max_age_days" in r.stderr, r.stderr


def test_long_srs_addresses_go_through_a_real_smtp_server(node_factory, sink_factory):
    """SRS local parts are often over 64 characters; the relay must send them."""
    sink = sink_factory()
    node = node_factory(relay="smarthost", smarthosts=[sink.url])
    alias = node.create_alias(days=3, max_usage=3)
    sender = "newsletter-bounces+a1b2c3d4e5f6@lists.mailing.example.org"
    assert node.send([alias["alias"]], b"Subject: long\r\n\r\nbody\r\n", sender=sender) == {}
    (m,) = sink.wait_for(1)
    assert srs_of(m.mail_from, sender) and len(m.mail_from.split("@")[0]) > 64, m.mail_from
    assert node.send([m.mail_from], b"Subject: bounce\r\n\r\nx\r\n", sender="") == {}
    bounce = sink.wait_for(2)[1]
    assert (bounce.mail_from, bounce.rcpt_to) == ("", [sender]), bounce
