"""TLS on the SMTP listeners, with real TLS clients: swaks (--tls and
--tls-on-connect), openssl s_client -starttls smtp, and Python's ssl for the
STARTTLS injection case and certificate reload."""

from __future__ import annotations

import hashlib
import signal
import socket
import ssl
import subprocess

from harness import BIN, DOMAIN, HOSTNAME, SENDER, TARGET, clean_env, free_port, message, wait_until


def swaks(port: int, to: str, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["swaks", "--server", f"127.0.0.1:{port}", "--ehlo", "client.example.org",
         "--from", SENDER, "--to", to, "--header", "Subject: over TLS", "--timeout", "20", *flags],
        capture_output=True, text=True, timeout=60,
    )


def s_client(port: int, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"127.0.0.1:{port}",
         "-servername", HOSTNAME, "-brief", *flags],
        input="QUIT\n", capture_output=True, text=True, timeout=30,
    )


def no_verify() -> ssl.SSLContext:
    # Senders do not check an MX's certificate; neither do these tests.
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Lines:
    """Reads SMTP replies from a (possibly TLS) socket."""

    def __init__(self, sock):
        self.sock, self.buf = sock, b""

    def reply(self) -> tuple[int, str]:
        text = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(4096)
                assert chunk, f"closed by the node after {text!r}"
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text.append(line[4:].decode())
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(text)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()


def starttls(port: int, ctx: ssl.SSLContext | None = None,
             session: ssl.SSLSession | None = None) -> tuple[ssl.SSLSocket, Lines]:
    """EHLO and STARTTLS; with `session`, the client offers to resume it."""
    plain = socket.create_connection(("127.0.0.1", port), timeout=20)
    c = Lines(plain)
    assert c.reply()[0] == 220
    code, text = c.cmd("EHLO client.example.org")
    assert code == 250 and "STARTTLS" in text.split("\n"), text
    assert c.cmd("STARTTLS")[0] == 220
    tls = (ctx or no_verify()).wrap_socket(plain, server_hostname=HOSTNAME, session=session)
    return tls, Lines(tls)


def test_zero_config_node_offers_starttls_and_swaks_delivers_over_it(node):
    alias = node.create_alias(days=1, max_usage=2)
    r = swaks(node.smtp_port, alias["alias"], "--tls")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "TLS started" in r.stdout, r.stdout
    (m,) = wait_until(lambda: node.captured() or None, 10, "the captured message")
    assert m["meta"]["rcpt_to"] == [TARGET]
    head = m["eml"].split(b"\r\n\r\n", 1)[0].decode()
    assert f"by {HOSTNAME} (tempalias) with ESMTPS id" in head, head
    assert "(using TLSv1.3 with cipher TLS13_" in head, head
    assert node.remaining(alias) == 1
    # The self-signed certificate lives in the data directory.
    assert (node.data_dir / "tls" / "selfsigned-cert.pem").exists()


def test_openssl_s_client_negotiates_tls_1_3_and_tls_1_2(node):
    r = s_client(node.smtp_port)
    assert "Protocol version: TLSv1.3" in r.stderr, r.stdout + r.stderr
    r = s_client(node.smtp_port, "-tls1_2")
    assert "Protocol version: TLSv1.2" in r.stderr, r.stdout + r.stderr
    # Nothing older is offered.
    r = s_client(node.smtp_port, "-tls1_1")
    assert "Protocol version" not in r.stderr and r.returncode != 0, r.stdout + r.stderr
    metrics = node.metrics()
    for result in ("tls13", "tls12", "failed"):
        assert f'tempalias_smtp_tls_handshakes_total{{result="{result}"}} 1' in metrics, metrics


def tls_session(port: int, ctx: ssl.SSLContext, session=None) -> tuple[bool, ssl.SSLSession]:
    """One STARTTLS connection (EHLO, QUIT): whether it resumed `session`,
    and the session to offer next time (as a sender's session cache keeps
    the newest one). A TLS 1.3 ticket arrives after the handshake, so the
    session is taken after the EHLO reply."""
    tls, c = starttls(port, ctx, session)
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd("QUIT")[0] == 221
    reused, newest = tls.session_reused, tls.session
    tls.close()
    return reused, newest


def test_sessions_resume_from_tickets_and_a_resumed_session_delivers_as_esmtps(node):
    ctx = no_verify()
    reused, session = tls_session(node.smtp_port, ctx)
    assert not reused and session.has_ticket
    tls, c = starttls(node.smtp_port, ctx, session)
    assert tls.session_reused, "the second handshake did not resume the first session"
    assert tls.version() == "TLSv1.3"
    alias = node.create_alias(days=1, max_usage=2)
    assert c.cmd("EHLO client.example.org")[0] == 250
    assert c.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert c.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    tls.sendall(message("over a resumed session", to=alias["alias"]) + b".\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    tls.close()
    (m,) = wait_until(lambda: node.captured() or None, 10, "the captured message")
    head = m["eml"].split(b"\r\n\r\n", 1)[0].decode()
    assert f"by {HOSTNAME} (tempalias) with ESMTPS id" in head, head
    assert "(using TLSv1.3 with cipher TLS13_" in head, head
    # Stateless tickets: the same ticket resumes again (a cached TLS 1.3
    # session would be used up by its first resumption).
    assert tls_session(node.smtp_port, ctx, session)[0]
    # TLS 1.2 resumes from a ticket too.
    ctx12 = no_verify()
    ctx12.maximum_version = ssl.TLSVersion.TLSv1_2
    reused, session12 = tls_session(node.smtp_port, ctx12)
    assert not reused and session12.has_ticket
    assert tls_session(node.smtp_port, ctx12, session12)[0]
    metrics = node.metrics()
    assert 'tempalias_smtp_tls_handshakes_total{result="tls13"} 3' in metrics, metrics
    assert 'tempalias_smtp_tls_handshakes_total{result="tls12"} 2' in metrics, metrics
    assert "tempalias_smtp_tls_resumed_total 3" in metrics, metrics


def test_without_session_tickets_sessions_resume_from_the_cache(node_factory):
    node = node_factory(config={"smtp": {"tls_session_tickets": False}})
    ctx = no_verify()
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2: a session id into the node's cache, no ticket.
    reused, session = tls_session(node.smtp_port, ctx)
    assert not reused and not session.has_ticket
    assert tls_session(node.smtp_port, ctx, session)[0]
    # TLS 1.3: a cached session resumes once (rustls takes it out of the
    # cache), then the client needs the newer one.
    ctx13 = no_verify()
    _, first = tls_session(node.smtp_port, ctx13)
    reused, newer = tls_session(node.smtp_port, ctx13, first)
    assert reused
    assert not tls_session(node.smtp_port, ctx13, first)[0]
    assert tls_session(node.smtp_port, ctx13, newer)[0]
    assert "tempalias_smtp_tls_resumed_total 3" in node.metrics()


def test_tls_min_version_and_cipher_suites(node_factory):
    node = node_factory(config={"smtp": {
        "tls_min_version": "1.3", "tls_cipher_suites": ["TLS13_CHACHA20_POLY1305_SHA256"]}})
    r = s_client(node.smtp_port)
    assert "Protocol version: TLSv1.3" in r.stderr, r.stderr
    assert "Ciphersuite: TLS_CHACHA20_POLY1305_SHA256" in r.stderr, r.stderr
    r = s_client(node.smtp_port, "-tls1_2")
    assert "Protocol version" not in r.stderr and r.returncode != 0, r.stdout + r.stderr


def test_starttls_discards_commands_pipelined_behind_it(node):
    plain = socket.create_connection(("127.0.0.1", node.smtp_port), timeout=20)
    c = Lines(plain)
    c.reply()
    c.cmd("EHLO client.example.org")
    # The injection: RSET arrives in plaintext in the same write as STARTTLS.
    plain.sendall(b"STARTTLS\r\nRSET\r\n")
    assert c.reply()[0] == 220
    assert c.buf == b"", "the node answered the injected command in plaintext"
    tls = no_verify().wrap_socket(plain, server_hostname=HOSTNAME)
    t = Lines(tls)
    # Had RSET run, its `250 2.0.0 Flushed` would be the first reply here.
    assert t.cmd("NOOP") == (250, "2.0.0 OK")
    # The session starts over: MAIL needs a new EHLO, which no longer offers STARTTLS.
    assert t.cmd(f"MAIL FROM:<{SENDER}>")[0] == 503
    code, text = t.cmd("EHLO client.example.org")
    assert code == 250 and "STARTTLS" not in text, text
    assert t.cmd("QUIT")[0] == 221
    tls.close()


def test_implicit_tls_listener_with_swaks_tls_on_connect(node_factory):
    port = free_port()
    node = node_factory(config={"smtp": {"tls_listen": f"127.0.0.1:{port}"}})
    alias = node.create_alias(days=1, max_usage=1)
    r = swaks(port, alias["alias"], "--tls-on-connect")
    assert r.returncode == 0, r.stdout + r.stderr
    (m,) = wait_until(lambda: node.captured() or None, 10, "the captured message")
    assert b"with ESMTPS id" in m["eml"]
    # A plaintext client gets no greeting there.
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"EHLO client.example.org\r\n")
        try:
            data = s.recv(100)
        except (ConnectionResetError, socket.timeout):
            data = b""
        assert not data.startswith(b"2"), data


def test_require_tls_refuses_plaintext_mail(node_factory):
    node = node_factory(config={"smtp": {"require_tls": True}})
    alias = node.create_alias(days=1, max_usage=1)
    r = swaks(node.smtp_port, alias["alias"])
    assert r.returncode != 0 and "530 5.7.0" in r.stdout, r.stdout
    r = swaks(node.smtp_port, alias["alias"], "--tls")
    assert r.returncode == 0, r.stdout + r.stderr


def test_without_self_signed_or_certificate_no_starttls(node_factory):
    node = node_factory(config={"smtp": {"tls_self_signed": False}})
    with node.smtp() as s:
        s.ehlo("client.example.org")
        assert not s.has_extn("starttls")
        assert s.docmd("STARTTLS")[0] == 502


def test_sighup_reloads_the_certificate_and_keeps_open_sessions(node_factory, tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"

    def make():
        subprocess.run([str(BIN), "tls", "selfsigned", HOSTNAME, "--cert", str(cert), "--key", str(key)],
                       check=True, capture_output=True, timeout=30)
        return hashlib.sha256(ssl.PEM_cert_to_DER_cert(cert.read_text())).hexdigest()

    first = make()
    node = node_factory(config={"smtp": {"tls_cert_file": str(cert), "tls_key_file": str(key)}})
    alias = node.create_alias(days=1, max_usage=2)

    def served() -> str:
        tls, c = starttls(node.smtp_port)
        fp = hashlib.sha256(tls.getpeercert(binary_form=True)).hexdigest()
        c.cmd("QUIT")
        tls.close()
        return fp

    assert served() == first
    # A session in TLS before the reload, in the middle of a transaction.
    tls, old = starttls(node.smtp_port)
    assert old.cmd("EHLO client.example.org")[0] == 250
    assert old.cmd(f"MAIL FROM:<{SENDER}>")[0] == 250
    assert old.cmd(f"RCPT TO:<{alias['alias']}>")[0] == 250

    second = make()
    assert second != first
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: served() == second, 10, "the new certificate being served")
    assert "TLS certificate reloaded" in node.logs()

    # The old session goes on with its certificate and delivers.
    assert old.cmd("DATA")[0] == 354
    tls.sendall(message("after reload", to=alias["alias"]) + b".\r\n")
    assert old.reply()[0] == 250
    assert old.cmd("QUIT")[0] == 221
    tls.close()

    # A broken certificate file on reload keeps the current one.
    cert.write_text("not a certificate\n")
    node.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "TLS certificate reload failed" in node.logs(), 10, "the failed reload in the log")
    assert served() == second
    assert node.proc.poll() is None


def test_postmaster_is_accepted_and_forwarded_to_the_configured_address(node_factory):
    node = node_factory(config={"smtp": {"postmaster": "hostmaster@example.net"}})
    for rcpt in ("postmaster", f"Postmaster@{DOMAIN}"):
        with node.smtp() as s:
            s.ehlo("client.example.org")
            assert s.mail("")[0] == 250
            assert s.docmd(f"RCPT TO:<{rcpt}>")[0] == 250
            code, _ = s.data(message("abuse report", to=rcpt))
            assert code == 250
    msgs = wait_until(lambda: len(node.captured()) == 2 and node.captured(), 10, "two captured messages")
    assert [m["meta"]["rcpt_to"] for m in msgs] == [["hostmaster@example.net"]] * 2
    # Postmaster elsewhere is still relaying.
    assert node.rcpt_reply("postmaster@example.com")[0] == 550


def test_check_config_reads_the_certificate_files(tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    other = tmp_path / "other-key.pem"
    for c, k in ((cert, key), (tmp_path / "other-cert.pem", other)):
        subprocess.run([str(BIN), "tls", "selfsigned", HOSTNAME, "--cert", str(c), "--key", str(k)],
                       check=True, capture_output=True, timeout=30)
    conf = tmp_path / "tempalias.toml"

    def check(key_file) -> subprocess.CompletedProcess:
        conf.write_text(f'[smtp]\ntls_cert_file = "{cert}"\ntls_key_file = "{key_file}"\n')
        return subprocess.run([str(BIN), "check-config", str(conf)], capture_output=True, text=True, timeout=30,
                              env=clean_env())

    assert check(key).returncode == 0
    r = check(other)
    assert r.returncode != 0 and "smtp.tls_cert_file" in r.stderr and "do not fit" in r.stderr, r.stderr
    r = check(tmp_path / "missing.pem")
    assert r.returncode != 0 and "missing.pem" in r.stderr, r.stderr
