"""peerkit's promise to its callers (the relay tests, the chaos lab, the
forwarding benchmark): a Postfix start that fails halfway leaves no master
running, so a failed setup cannot leave Postfix behind on the machine."""

from __future__ import annotations

import os
import subprocess

import pytest

from harness import free_port
from peerkit import PostfixInstance, reachable_temp_dir, tool


@pytest.mark.skipif(os.geteuid() != 0, reason="Postfix's master must start as root")
def test_a_start_that_never_greets_stops_the_master_it_started():
    # smtpd listens on one port while the start waits for a greeting on
    # another: `postfix start` succeeds, the wait times out.
    listen, awaited = free_port(), free_port()
    pf = PostfixInstance(reachable_temp_dir(), {"myhostname": "kit.test"}, port=awaited, service=str(listen),
                         error=AssertionError, greet_timeout=2)
    try:
        with pytest.raises(AssertionError, match="timed out .* waiting for Postfix to greet"):
            pf.start()
        assert (pf.dir / "queue" / "pid" / "master.pid").exists(), "master never ran: the test proves nothing"
        status = subprocess.run([tool("postfix"), "-c", str(pf.dir), "status"], capture_output=True, text=True,
                                timeout=60)
        assert status.returncode != 0, f"master still runs after the failed start: {status.stderr}"
    finally:
        pf.cleanup()
    assert not pf.dir.exists()
