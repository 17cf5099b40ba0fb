"""Smarthost TLS and AUTH against real peers: Postfix requiring STARTTLS,
aiosmtpd with bad certificates, implicit TLS and AUTH, smtp-sink without
STARTTLS. A required-TLS smarthost that cannot be verified gets a 451 and
never a plaintext copy of the message."""

from __future__ import annotations

import os
import smtplib

import pytest

from harness import SENDER, TARGET, message, srs_of
from peers import PostfixSmarthost, self_signed


def data_error(node, alias, subject):
    with node.smtp() as s:
        with pytest.raises(smtplib.SMTPDataError) as e:
            s.sendmail(SENDER, [alias["alias"]], message(subject, to=alias["alias"]))
    return e.value.smtp_code, e.value.smtp_error


@pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master must start as root")
def test_postfix_smarthost_requiring_tls_receives_forwarded_mail(node_factory, sink_factory, ca, request):
    final = sink_factory()
    postfix = PostfixSmarthost(ca.issue("smarthost"), relayhost=f"[127.0.0.1]:{final.port}")
    request.addfinalizer(postfix.cleanup)
    postfix.start()

    # The peer really insists on TLS: plaintext MAIL is refused.
    with smtplib.SMTP("127.0.0.1", postfix.port, timeout=10) as s:
        s.ehlo("probe.test")
        code, text = s.mail(SENDER)
        assert code == 530 and b"STARTTLS" in text, (code, text)

    node = node_factory(relay="smarthost", smarthosts=[f"smtp+starttls://localhost:{postfix.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path)}})
    alias = node.create_alias(days=1, max_usage=2)
    assert node.send([alias["alias"]], message("through postfix", to=alias["alias"])) == {}
    (m,) = final.wait_for(1, timeout=30)
    assert m.rcpt_to == [TARGET] and srs_of(m.mail_from, SENDER)
    assert b"Subject: through postfix" in m.data
    # Postfix's own Received: header records the TLS session we opened.
    assert b"using TLS" in m.data, m.data[:800]
    assert node.remaining(alias) == 1
    assert 'tempalias_relay_attempts_total{upstream="smtp+starttls://localhost:%d",result="accepted"} 1' % postfix.port \
        in node.metrics()


@pytest.mark.parametrize("problem", ["expired", "wrong_name", "unknown_ca"])
def test_unverifiable_certificate_with_required_starttls_gives_451_never_plaintext(
        node_factory, aiosmtpd_factory, ca, tmp_path, problem):
    if problem == "expired":
        cert = ca.issue("expired", expired=True)
    elif problem == "wrong_name":
        cert = ca.issue("other", hosts=("other.example",))
    else:
        cert = self_signed(tmp_path, "stranger")
    # This peer would also take the message in plaintext: a fallback would show.
    peer = aiosmtpd_factory(cert=cert)
    node = node_factory(relay="smarthost", smarthosts=[f"smtp+starttls://localhost:{peer.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path), "max_attempts": 2}})
    alias = node.create_alias(days=1, max_usage=1)
    code, text = data_error(node, alias, f"bad certificate {problem}")
    assert code == 451 and text.startswith(b"4.4.1"), (code, text)
    assert peer.messages == []
    assert node.remaining(alias) == 1
    assert "STARTTLS" in node.logs()


def test_required_starttls_not_offered_gives_451(node_factory, sink_factory, ca):
    sink = sink_factory()  # smtp-sink offers no STARTTLS
    node = node_factory(relay="smarthost", smarthosts=[f"smtp+starttls://127.0.0.1:{sink.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path), "max_attempts": 1}})
    alias = node.create_alias(days=1, max_usage=1)
    code, _ = data_error(node, alias, "no starttls")
    assert code == 451
    assert sink.messages() == []
    assert node.remaining(alias) == 1
    assert "STARTTLS is required but not offered" in node.logs()


def test_opportunistic_smtp_uses_starttls_without_verifying(node_factory, aiosmtpd_factory, tmp_path):
    peer = aiosmtpd_factory(cert=self_signed(tmp_path, "opportunistic"))
    node = node_factory(relay="smarthost", smarthosts=[f"smtp://127.0.0.1:{peer.port}"])
    alias = node.create_alias(days=1, max_usage=1)
    assert node.send([alias["alias"]], message("opportunistic", to=alias["alias"])) == {}
    (m,) = peer.messages
    assert m.tls and m.rcpt_to == [TARGET]


# What the smarthost offers, and the mechanism we must then use: PLAIN when
# offered (lettre's first choice), LOGIN when it is all there is.
MECHANISMS = pytest.mark.parametrize("offered,used", [(("PLAIN", "LOGIN"), "PLAIN"), (("LOGIN",), "LOGIN")],
                                     ids=["plain", "login-only"])


@MECHANISMS
@pytest.mark.parametrize("scheme", ["smtps", "smtp+starttls"])
def test_auth_with_password_file(node_factory, aiosmtpd_factory, ca, tmp_path, scheme, offered, used):
    password = "correct horse battery staple"
    peer = aiosmtpd_factory(cert=ca.issue(f"auth-{scheme}"), implicit_tls=scheme == "smtps",
                            auth=("forwarder", password), auth_mechanisms=offered)
    pw_file = tmp_path / "relay.password"
    pw_file.write_text(password + "\n")
    node = node_factory(relay="smarthost", smarthosts=[f"{scheme}://forwarder@localhost:{peer.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path), "password_file": str(pw_file)}})
    alias = node.create_alias(days=1, max_usage=2)
    assert node.send([alias["alias"]], message(f"auth over {scheme}", to=alias["alias"])) == {}
    (m,) = peer.messages
    assert m.tls and m.auth_user == "forwarder" and m.rcpt_to == [TARGET]
    assert b"Subject: auth over " + scheme.encode() in m.data
    # One login, with that mechanism, and the authenticator found the right
    # user and password in it.
    assert peer.auth_attempts == [(used, True)], peer.auth_attempts
    assert node.remaining(alias) == 1
    assert password not in node.logs()


@MECHANISMS
def test_wrong_password_gives_451_and_is_never_logged(node_factory, aiosmtpd_factory, ca, tmp_path, offered, used):
    peer = aiosmtpd_factory(cert=ca.issue("auth-wrong"), implicit_tls=True, auth=("forwarder", "right"),
                            auth_mechanisms=offered)
    node = node_factory(relay="smarthost", smarthosts=[f"smtps://forwarder@localhost:{peer.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path), "max_attempts": 1}}, start=False)
    # The password from the environment this time.
    base_env = node.env
    node.env = lambda: {**base_env(), "TEMPALIAS_RELAY_PASSWORD": "wrong-password-xyz"}
    node.start()
    alias = node.create_alias(days=1, max_usage=1)
    code, _ = data_error(node, alias, "wrong password")
    assert code == 451
    assert peer.messages == [] and peer.auth_attempts == [(used, False)], peer.auth_attempts
    assert node.remaining(alias) == 1
    assert "wrong-password-xyz" not in node.logs()


def test_each_smarthost_authenticates_with_its_own_password(node_factory, aiosmtpd_factory, ca, tmp_path):
    """Two providers, two accounts: the first smarthost uses the relay-wide
    password_file, the second a password_file of its own (and a user name
    with @, as many providers' are). Failing over to the second logs in there
    with the second's credentials."""
    first_pw, second_pw = "first-provider-secret", "second-provider-secret"
    first = aiosmtpd_factory(cert=ca.issue("first"), implicit_tls=True, auth=("forwarder", first_pw))
    second = aiosmtpd_factory(cert=ca.issue("second"), auth=("fwd@relay2.example", second_pw))
    default_file, second_file = tmp_path / "default.password", tmp_path / "second.password"
    default_file.write_text(first_pw + "\n")
    second_file.write_text(second_pw + "\n")
    second_url = f"smtp+starttls://localhost:{second.port}"
    node = node_factory(relay="smarthost",
                        smarthosts=[f"smtps://forwarder@localhost:{first.port}",
                                    {"url": second_url, "user": "fwd@relay2.example",
                                     "password_file": str(second_file)}],
                        config={"relay": {"ca_file": str(ca.pem_path), "password_file": str(default_file)}})
    alias = node.create_alias(days=1, max_usage=3)

    assert node.send([alias["alias"]], message("to the first", to=alias["alias"])) == {}
    (m,) = first.messages
    assert m.auth_user == "forwarder" and m.tls and m.rcpt_to == [TARGET]
    assert second.messages == [] and second.auth_attempts == []

    # The first provider goes away: the next message fails over and logs in
    # at the second with the second's user and password.
    first.stop()
    assert node.send([alias["alias"]], message("to the second", to=alias["alias"])) == {}
    (m,) = second.messages
    assert m.auth_user == "fwd@relay2.example" and m.tls and m.rcpt_to == [TARGET]
    assert b"Subject: to the second" in m.data
    assert second.auth_attempts and all(ok for _, ok in second.auth_attempts), second.auth_attempts
    assert all(ok for _, ok in first.auth_attempts), first.auth_attempts
    assert node.remaining(alias) == 1
    metrics = node.metrics()
    assert f'tempalias_relay_attempts_total{{upstream="smtps://localhost:{first.port}",result="failed"}} 1' in metrics
    assert f'tempalias_relay_attempts_total{{upstream="{second_url}",result="accepted"}} 1' in metrics
    logs = node.logs()
    assert first_pw not in logs and second_pw not in logs
    # The start-up summary names each smarthost with its user, never a password.
    assert "fwd@relay2.example@localhost" in logs


def test_a_smarthost_with_the_wrong_password_of_its_own_fails_over_to_the_next(
        node_factory, aiosmtpd_factory, ca, tmp_path):
    """Per-smarthost passwords really are per smarthost: the first entry's own
    file holds a wrong password (the default, used by a third entry for the
    same account, holds the right one and must not be used instead), so its
    AUTH fails and the second one delivers."""
    first = aiosmtpd_factory(cert=ca.issue("first-wrong"), implicit_tls=True, auth=("forwarder", "right-one"))
    second = aiosmtpd_factory(cert=ca.issue("second-right"), implicit_tls=True, auth=("other", "second-one"))
    (tmp_path / "default.pw").write_text("right-one\n")
    (tmp_path / "first.pw").write_text("stale-first-password\n")
    (tmp_path / "second.pw").write_text("second-one\n")
    node = node_factory(relay="smarthost",
                        smarthosts=[{"url": f"smtps://forwarder@localhost:{first.port}",
                                     "password_file": str(tmp_path / "first.pw")},
                                    {"url": f"smtps://other@localhost:{second.port}",
                                     "password_file": str(tmp_path / "second.pw")},
                                    f"smtps://forwarder@localhost:{first.port}"],
                        config={"relay": {"ca_file": str(ca.pem_path), "max_attempts": 2,
                                          "password_file": str(tmp_path / "default.pw")}})
    alias = node.create_alias(days=1, max_usage=2)
    assert node.send([alias["alias"]], message("wrong first password", to=alias["alias"])) == {}
    assert first.messages == [] and first.auth_attempts and not any(ok for _, ok in first.auth_attempts)
    (m,) = second.messages
    assert m.auth_user == "other"
    assert node.remaining(alias) == 1
    assert "stale-first-password" not in node.logs()
