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

import pytest

from harness import DOMAIN, TARGET, free_port, srs_of, toml_dumps
from peerkit import PostfixInstance, reachable_temp_dir

ORIGINAL_SENDER = "alice@sender.test"


def relay_postfix(transports: dict[str, int]) -> PostfixInstance:
    """Postfix from its own directories, listening on 127.0.0.1:<port>,
    relaying each domain of `transports` to that port on 127.0.0.1."""
    transport = ", ".join(f"{d}=smtp:[127.0.0.1]:{p}" for d, p in transports.items())
    settings = {
        "myhostname": "relay.tempalias.test",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "transport_maps": f"inline:{{ {transport} }}",
        "smtp_dns_support_level": "disabled",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "queue_run_delay": "1s",
        "delay_warning_time": "0h",
    }
    return PostfixInstance(reachable_temp_dir(), settings, port=free_port(), tlsmgr=True, error=AssertionError)


@pytest.mark.skipif(os.geteuid() != 0, reason="starting Postfix needs root")
def test_bounce_from_the_target_returns_to_the_original_sender(node_factory, sink_factory):
    target_mx = sink_factory(options=["-f", ".", "-B", "550 5.2.2 mailbox full"])
    sender_mx = sink_factory()
    # The node's ports are chosen before Postfix's transport table names it.
    node = node_factory(start=False, relay="smarthost", smarthosts=["smtp://127.0.0.1:9"])
    postfix = relay_postfix({"example.net": target_mx.port, "sender.test": sender_mx.port, DOMAIN: node.smtp_port})
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
        postfix.cleanup()
