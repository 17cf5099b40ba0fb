"""Real outbound peers for the relay tests: a test CA (Python cryptography),
Postfix as a TLS-requiring smarthost (its own config and queue directories),
aiosmtpd with STARTTLS / implicit TLS and AUTH, and nsd serving test zones on
a loopback port (the processes started and stopped by peerkit.py). Everything
listens on 127.0.0.0/8; nothing leaves the machine.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import ssl
import threading
from dataclasses import dataclass, field
from pathlib import Path

import peerkit
from harness import free_port, wait_until
from peerkit import NsdServer, PostfixInstance, reachable_temp_dir, zone_text

# --------------------------------------------------------------------------- certificates


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError as e:  # pragma: no cover - scripts/test installs it
        raise AssertionError("Python package cryptography is missing; run scripts/test") from e
    return x509, hashes, serialization, ec, NameOID


@dataclass
class Ca:
    """A throw-away certificate authority."""

    dir: Path
    key: object
    cert: object

    @property
    def pem_path(self) -> Path:
        return self.dir / "ca.pem"

    @classmethod
    def create(cls, dir: Path, name: str = "tempalias test CA") -> "Ca":
        x509, hashes, serialization, ec, NameOID = _crypto()
        dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                              key_encipherment=False, data_encipherment=False, key_agreement=False,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        ca = cls(dir, key, cert)
        ca.pem_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return ca

    def issue(self, name: str, hosts=("localhost", "127.0.0.1"), expired: bool = False) -> tuple[Path, Path]:
        """A server certificate for `hosts`; (cert PEM path, key PEM path)."""
        x509, hashes, serialization, ec, NameOID = _crypto()
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.timezone.utc)
        if expired:
            start, end = now - datetime.timedelta(days=30), now - datetime.timedelta(days=1)
        else:
            start, end = now - datetime.timedelta(days=1), now + datetime.timedelta(days=30)
        sans = []
        for h in hosts:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(h)))
            except ValueError:
                sans.append(x509.DNSName(h))
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        cert_path, key_path = self.dir / f"{name}.pem", self.dir / f"{name}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        os.chmod(key_path, 0o600)
        return cert_path, key_path


def self_signed(dir: Path, name: str) -> tuple[Path, Path]:
    """A certificate signed by a CA nobody trusts."""
    return Ca.create(dir / f"{name}-ca", f"untrusted {name}").issue(name)


# --------------------------------------------------------------------------- aiosmtpd


@dataclass
class Received:
    mail_from: str
    rcpt_to: list[str]
    data: bytes
    tls: bool
    auth_user: str | None
    # The client's (address, port): one per connection, so messages that
    # share one show the same.
    peer: tuple | None = None


# aiosmtpd's built-in AUTH mechanisms.
AIOSMTPD_AUTH = ("PLAIN", "LOGIN")


@dataclass
class AioSmtpd:
    """aiosmtpd on a loopback address in a thread of the test process: a
    second real SMTP implementation with STARTTLS, implicit TLS and AUTH
    PLAIN/LOGIN (`auth_mechanisms` narrows what it offers and accepts, e.g.
    `("LOGIN",)`). `size_limit` is its SIZE (aiosmtpd's `data_size_limit`,
    announced in EHLO; `None` for aiosmtpd's default). `refuse_rcpt` /
    `refuse_data` answer every RCPT / the end of data with that reply instead
    of accepting. `mails` keeps the parameters of every MAIL it got (even one
    it refused), `messages` each message it took."""

    cert: tuple[Path, Path] | None = None
    implicit_tls: bool = False
    auth: tuple[str, str] | None = None
    auth_mechanisms: tuple[str, ...] = AIOSMTPD_AUTH
    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    size_limit: int | None = None
    refuse_rcpt: str | None = None
    refuse_data: str | None = None
    mails: list[list[str]] = field(default_factory=list)
    messages: list[Received] = field(default_factory=list)
    auth_attempts: list[tuple[str, bool]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """A smarthost URL without AUTH: `smtps://localhost` with implicit TLS
        (the name a test certificate is for), else `smtp://` (STARTTLS when a
        certificate is given, unverified)."""
        if self.implicit_tls:
            return f"smtps://localhost:{self.port}"
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> "AioSmtpd":
        try:
            from aiosmtpd.controller import Controller
            from aiosmtpd.smtp import AuthResult, LoginPassword
        except ImportError as e:  # pragma: no cover - scripts/test installs it
            raise AssertionError("Python package aiosmtpd is missing; run scripts/test") from e
        outer = self
        lock = threading.Lock()
        ctx = None
        if self.cert:
            ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ctx.load_cert_chain(str(self.cert[0]), str(self.cert[1]))

        class Handler:
            async def handle_MAIL(self, server, session, envelope, address, mail_options):
                with lock:
                    outer.mails.append(list(mail_options))
                envelope.mail_from = address
                envelope.mail_options.extend(mail_options)
                return "250 OK"

            async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
                if outer.refuse_rcpt:
                    return outer.refuse_rcpt
                envelope.rcpt_tos.append(address)
                envelope.rcpt_options.extend(rcpt_options)
                return "250 OK"

            async def handle_DATA(self, server, session, envelope):
                if outer.refuse_data:
                    return outer.refuse_data
                user = None
                if session.auth_data is not None and isinstance(session.auth_data, LoginPassword):
                    user = session.auth_data.login.decode()
                with lock:
                    outer.messages.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                                   envelope.original_content,
                                                   # implicit TLS: the listener speaks nothing else
                                                   session.ssl is not None or outer.implicit_tls, user,
                                                   tuple(session.peer)))
                return "250 2.0.0 OK: queued by aiosmtpd"

        def authenticator(server, session, envelope, mechanism, auth_data):
            ok = (isinstance(auth_data, LoginPassword) and outer.auth is not None
                  and (auth_data.login.decode(), auth_data.password.decode()) == outer.auth)
            outer.auth_attempts.append((mechanism, ok))
            return AuthResult(success=ok, auth_data=auth_data if ok else None)

        kwargs = dict(hostname=self.host, port=self.port, ready_timeout=15)
        if self.size_limit is not None:
            kwargs["data_size_limit"] = self.size_limit
        if self.implicit_tls:
            kwargs["ssl_context"] = ctx
        elif ctx is not None:
            kwargs["tls_context"] = ctx
            kwargs["require_starttls"] = False  # a plaintext fallback would be seen
        if self.auth:
            unknown = set(self.auth_mechanisms) - set(AIOSMTPD_AUTH)
            assert not unknown, f"aiosmtpd's built-in mechanisms are {AIOSMTPD_AUTH}, not {sorted(unknown)}"
            # aiosmtpd counts only STARTTLS as TLS for auth_require_tls; with
            # implicit TLS the whole session is encrypted anyway.
            kwargs.update(authenticator=authenticator, auth_required=True, auth_require_tls=not self.implicit_tls,
                          # A built-in left out is neither announced nor accepted.
                          auth_exclude_mechanism=[m for m in AIOSMTPD_AUTH if m not in self.auth_mechanisms])
        self.controller = Controller(Handler(), **kwargs)
        self.controller.start()
        return self

    def stop(self):
        c = getattr(self, "controller", None)
        if c is not None:
            c.stop()
            self.controller = None

    def wait_for(self, n: int, timeout: float = 10) -> list[Received]:
        wait_until(lambda: len(self.messages) >= n, timeout, f"{n} message(s) at {self.url}")
        return self.messages


# --------------------------------------------------------------------------- Postfix


class PostfixSmarthost(PostfixInstance):
    """A Postfix instance of its own on 127.0.0.1:port that insists on
    STARTTLS (smtpd_tls_security_level = encrypt) and relays what it accepts
    from 127.0.0.0/8 to `relayhost` (an smtp-sink). Needs root (Postfix's
    master runs as root and drops to the postfix user)."""

    def __init__(self, cert: tuple[Path, Path], relayhost: str):
        d = reachable_temp_dir()
        settings = {
            "myhostname": "smarthost.test",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "relayhost": relayhost,
            "smtpd_tls_security_level": "encrypt",
            "smtpd_tls_cert_file": d / "cert.pem",
            "smtpd_tls_key_file": d / "key.pem",
            "smtpd_tls_received_header": "yes",
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
        }
        super().__init__(d, settings, port=free_port(), tlsmgr=True, error=AssertionError)
        self.cert = cert
        self.relayhost = relayhost

    def start(self) -> "PostfixSmarthost":
        shutil.copy(self.cert[0], self.dir / "cert.pem")
        shutil.copy(self.cert[1], self.dir / "key.pem")
        return super().start()

    def logs(self) -> str:
        return self.log()


# --------------------------------------------------------------------------- nsd


def dns_query(port: int, name: str, qtype: int) -> tuple[int, int]:
    """One UDP query to 127.0.0.1:port: (RCODE, number of answers)."""
    return peerkit.dns_query("127.0.0.1", name, qtype, port=port, recursion_desired=True)


class Nsd(NsdServer):
    """nsd (Debian package nsd) serving the given zones (name -> records
    below the SOA and NS) on 127.0.0.1:port (UDP and TCP), in the
    foreground, from a directory of its own."""

    def __init__(self, base: Path, zones: dict[str, list[str]]):
        super().__init__(base / "nsd", "127.0.0.1", free_port(),
                         {zone: zone_text(zone, records) for zone, records in zones.items()}, error=AssertionError)

    def start(self) -> "Nsd":
        first = next(iter(self.zones))
        return super().start(lambda: dns_query(self.port, first, 6) == (0, 1))  # its SOA
