"""SRS round trip with a real Postfix (needs root to start Postfix).

The node relays through a Postfix instance of its own; the target's server
(smtp-sink) refuses the message after DATA, so Postfix bounces it to the SRS
envelope sender. The bounce reaches the node, which reverses the address and
sends a report of its own (it never passes the bounce on: that names the
target), again through Postfix, to the original sender's server
(another smtp-sink). Postfix routes the three domains with a transport table
to loopback ports (no MX lookup: nsd on port 53 needs a network namespace;
tests/chaos/test_srs_mx.py makes the same round trip with every hop found by
MX lookup).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

from harness import DOMAIN, TARGET, free_port, srs_of, toml_dumps, wait_until
from peers import MASTER_CF
from peers import _tool as tool

ORIGINAL_SENDER = "alice@sender.test"

class Postfix:
    """Postfix from its own directories, listening on 127.0.0.1:<port>."""

    def __init__(self, transports: dict[str, int]):
        # Postfix's daemons run as the postfix user: the directory must be
        # reachable for it (pytest's tmp_path is private to root).
        self.dir = Path(tempfile.mkdtemp(prefix="tempalias-postfix-"))
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.maillog = self.dir / "maillog"
        transport = ", ".join(f"{d}=smtp:[127.0.0.1]:{p}" for d, p in transports.items())
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": self.dir / "queue",
            "data_directory": self.dir / "data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "myhostname": "relay.tempalias.test",
            "mydestination": "",
            "local_transport": "error:no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtpd_relay_restrictions": "permit_mynetworks, reject",
            "transport_maps": f"inline:{{ {transport} }}",
            "smtp_dns_support_level": "disabled",
            "smtputf8_enable": "no",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "queue_run_delay": "1s",
            "delay_warning_time": "0h",
            "maillog_file": self.maillog,
            "maillog_file_prefixes": str(self.dir.parent),
            "biff": "no",
        }
        (self.dir / "main.cf").write_text("".join(f"{k} = {v}\n" for k, v in settings.items()))
        (self.dir / "master.cf").write_text(MASTER_CF.format(port=self.port))
        (self.dir / "queue").mkdir()

    def postfix(self, *args):
        r = subprocess.run([tool("postfix"), "-c", str(self.dir), *args], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"postfix {args}: {r.stdout}{r.stderr}\n{self.log()[-2000:]}"

    def start(self) -> "Postfix":
        self.postfix("check")
        self.postfix("start")

        def greets():
            with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
                return s.recv(100).startswith(b"220")

        wait_until(greets, 30, "Postfix to greet")
        return self

    def log(self) -> str:
        return self.maillog.read_text(errors="replace") if self.maillog.exists() else ""

    def stop(self):
        subprocess.run([tool("postfix"), "-c", str(self.dir), "stop"], capture_output=True, timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting Postfix needs root")
def test_bounce_from_the_target_returns_to_the_original_sender(node_factory, sink_factory):
    target_mx = sink_factory(options=["-f", ".", "-B", "550 5.2.2 mailbox full"])
    sender_mx = sink_factory()
    # The node's ports are chosen before Postfix's transport table names it.
    node = node_factory(start=False, relay="smarthost", smarthosts=["smtp://127.0.0.1:9"])
    postfix = Postfix({"example.net": target_mx.port, "sender.test": sender_mx.port, DOMAIN: node.smtp_port})
    try:
        postfix.start()
        node._smarthosts = [f"smtp://127.0.0.1:{postfix.port}"]
        node.config["relay"]["smarthosts"] = node._smarthosts
        node.config_path.write_text(toml_dumps(node.config))
        node.start()
        alias = node.create_alias(days=3, max_usage=3)
        msg = (f"From: <{ORIGINAL_SENDER}>\r\nTo: <{alias['alias']}>\r\nSubject: will bounce\r\n"
               "Message-ID: <srs-round-trip@sender.test>\r\n\r\nbody\r\n").encode()
        assert node.send([alias["alias"]], msg, sender=ORIGINAL_SENDER) == {}

        # The target's server refused it: Postfix bounced it to the SRS
        # address, the node reversed it, and Postfix delivered the bounce.
        (bounce,) = sender_mx.wait_for(1, timeout=60)
        assert bounce.rcpt_to == [ORIGINAL_SENDER], bounce
        assert bounce.mail_from == "", "a bounce has the null sender"
        # The node's own report, not Postfix's bounce: the original headers
        # and the status, but never the target address.
        assert b"srs-round-trip@sender.test" in bounce.data, "the report carries the original headers"
        assert TARGET.lower().encode() not in bounce.data.lower(), bounce.data
        assert b"mailbox full" not in bounce.data, "the receiving server's text is not passed on"
        assert re.search(rb"^Content-Type: multipart/report;", bounce.data, re.M | re.I), "a DSN"
        assert re.search(rb"^Status: 5\.2\.2\r?$", bounce.data, re.M), bounce.data
        assert re.search(rb"^Action: failed\r?$", bounce.data, re.M), bounce.data
        assert f"MAILER-DAEMON@{DOMAIN}".encode() in bounce.data
        log = postfix.log()
        srs = [a for a in re.findall(r"from=<([^>]*)>", log) if a.startswith("SRS0=")]
        assert srs and srs_of(srs[0], ORIGINAL_SENDER), log[-3000:]
        assert f"to=<{TARGET}>" in log and "status=bounced" in log
        assert node.remaining(alias) == 2, "the bounce used nothing"
    finally:
        postfix.stop()
