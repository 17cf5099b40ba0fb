"""The real peers the tests and benchmarks run as processes of their own:
a Postfix instance (config, queue and data directories under one directory,
started and stopped with `postfix -c DIR`, so nothing of the system's
Postfix configuration is read or touched), Postfix's `smtp-sink`, and nsd
serving test zones; with the bounded waits that tell each is ready (an SMTP
greeting, an answer from the zone) and the stops that leave nothing running,
also when a start fails halfway.

Shared by tests/integration (harness.py: the smtp-sinks; peers.py: a
smarthost that requires STARTTLS, nsd on a loopback port;
test_srs_postfix.py: a relay with a transport table), tests/chaos/lab.py
(the sending MTA inside the lab's network namespace, delivering by MX
lookup; the lab's sinks and nsd on port 53) and tests/bench/forward_bench.py
(the virtual-alias relay measured beside tempalias; its sink). Each caller
passes only what differs: its main.cf settings or zones, where the daemon
listens, how `postfix` is run (lab.py: inside the namespace, through
`ip netns exec`), how it is stopped, and the exception its suite reports
failures with.

Python 3.9+ standard library only, so every suite can import it by putting
this directory on sys.path. Postfix needs root: master starts as root and
drops to the `postfix` user, so the instance's directory and every directory
above it must be reachable by that user (see `reachable_temp_dir`).
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from pathlib import Path

# --------------------------------------------------------------------------- tools


def tool(name: str, error: type[Exception] = RuntimeError) -> str:
    """Absolute path of a system tool (also looks in /usr/sbin and /sbin,
    which are not on every user's PATH); raises `error` when it is missing."""
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/sbin/{name}") if os.access(p, os.X_OK)), None)
    if not found:
        raise error(f"{name} is not installed (Debian package postfix, nsd, iproute2 or iptables); run scripts/test")
    return found


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0):
    """SIGTERM, then SIGKILL if `proc` has not exited within `timeout` s.
    Does nothing for a process that already exited (or None)."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


def wait_for(ready, timeout: float, what: str, *, proc: subprocess.Popen | None = None, log=None,
             error: type[Exception] = RuntimeError, interval: float = 0.05):
    """Polls `ready()` until it returns a truthy value, which is returned; an
    OSError from it (nothing listening yet) counts as "not yet". Raises
    `error` at once when `proc` (the server's process, if the caller owns it)
    exits, or after `timeout` s; either message ends with `log()` (the
    server's log, if given), which is where the reason is."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        if proc is not None and proc.poll() is not None:
            raise error(f"while waiting for {what}: the process exited with {proc.returncode}\n{log() if log else ''}")
        try:
            value = ready()
            if value:
                return value
            last = value
        except OSError as e:
            last = e
        if time.monotonic() >= deadline:
            tail = f"\n{log()[-2000:]}" if log else ""
            raise error(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r}){tail}")
        time.sleep(interval)


def greets(host: str, port: int) -> bool:
    """Whether a connection to host:port is greeted with `220` (OSError when
    nothing listens)."""
    with socket.create_connection((host, port), timeout=2) as s:
        return s.recv(100).startswith(b"220")


def wait_for_greeting(host: str, port: int, timeout: float, what: str, **kw):
    """`wait_for` an SMTP server's `220` on host:port."""
    wait_for(lambda: greets(host, port), timeout, f"{what} to greet on {host}:{port}", **kw)


def read_log(path: Path) -> str:
    """The text of a log file, or "" when nothing was written yet."""
    return path.read_text(errors="replace") if path.exists() else ""


# --------------------------------------------------------------------------- smtp-sink


def start_smtp_sink(host: str, port: int, log_path: Path, *, options=(), dump_prefix: str | Path | None = None,
                    backlog: int = 64, error: type[Exception] = RuntimeError, timeout: float = 15.0) -> subprocess.Popen:
    """Postfix's smtp-sink on host:port (an IPv4 or IPv6 address) with its
    output appended to `log_path`; returns the process once it greets. `dump_prefix` makes it
    write one file per transaction (`-d`); `options` go before the address
    (e.g. `["-f", ".", "-B", "550 5.2.2 mailbox full"]` to refuse every
    message after DATA). As root it drops to `nobody` after binding, so a dump
    directory must be writable by nobody. A sink that does not greet within
    `timeout` s is stopped before the error is raised: nothing outlives a
    failed start."""
    cmd = [tool("smtp-sink", error)]
    if os.geteuid() == 0:
        cmd += ["-u", "nobody"]
    if dump_prefix is not None:
        cmd += ["-d", str(dump_prefix)]
    # An IPv6 address goes in brackets, as Postfix writes it ([::1]:port).
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    cmd += [*options, address, str(backlog)]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL)
    try:
        wait_for_greeting(host, port, timeout, "smtp-sink", proc=proc, log=lambda: read_log(log_path), error=error)
    except BaseException:
        stop_process(proc)
        raise
    return proc


# --------------------------------------------------------------------------- Postfix

# master.cf after the smtpd line: the daemons a relay needs, no local delivery.
DAEMONS = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
"""
TLSMGR = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"
POSTLOG = "postlog   unix-dgram n  -       n       -       1       postlogd\n"


def master_cf(service: str, tlsmgr: bool = False) -> str:
    """master.cf with smtpd on `service` (a port on inet_interfaces,
    `host:port`, or `smtp` for port 25); `tlsmgr` adds the TLS session cache
    manager that smtpd's TLS settings use."""
    head = "# service type  private unpriv  chroot  wakeup  maxproc command\n"
    smtpd = f"{service:<9} inet  n       -       n       -       -       smtpd\n"
    return head + smtpd + DAEMONS + (TLSMGR if tlsmgr else "") + POSTLOG


def reachable_temp_dir(prefix: str = "tempalias-postfix-") -> Path:
    """A fresh temporary directory the `postfix` user can reach (pytest's tmp
    directories are 0700)."""
    d = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(d, 0o755)
    return d


class PostfixInstance:
    """A Postfix instance of its own under `dir`: main.cf is the settings
    every caller shares (no local delivery, loopback only, own queue, data
    directory and maillog) updated with `settings`; smtpd listens on
    `service` (default: `port` on `host`, which is inet_interfaces) and is
    ready when host:port greets.

    `command_prefix` runs `postfix` through another command (the chaos lab:
    `ip netns exec NAME`); `graceful_stop=False` stops with `postfix abort`
    instead of trying `postfix stop` first; failures raise `error` with the
    tail of the maillog (Postfix writes its errors there, to stderr only on a
    terminal). Needs root."""

    def __init__(self, dir: Path, settings: dict, *, host: str = "127.0.0.1", port: int = 25,
                 service: str | None = None, tlsmgr: bool = False, command_prefix=(), graceful_stop: bool = True,
                 error: type[Exception] = RuntimeError, greet_timeout: float = 30.0):
        self.dir = Path(dir)
        self.settings = settings
        self.host = host
        self.port = port
        self.service = service or str(port)
        self.tlsmgr = tlsmgr
        self.command_prefix = [str(c) for c in command_prefix]
        self.graceful_stop = graceful_stop
        self.error = error
        self.greet_timeout = greet_timeout
        self.maillog = self.dir / "maillog"

    def main_cf(self) -> str:
        d = self.dir
        settings = {
            "compatibility_level": "3.6",
            "queue_directory": d / "queue",
            "data_directory": d / "data",
            "mail_owner": "postfix",
            "setgid_group": "postdrop",
            "mydestination": "",
            "local_transport": "error:no local delivery",
            "alias_maps": "",
            "alias_database": "",
            "inet_interfaces": self.host,
            "inet_protocols": "ipv4",
            "mynetworks": "127.0.0.0/8",
            "smtputf8_enable": "no",
            "maillog_file": self.maillog,
            # maillog_file must lie below one of these prefixes.
            "maillog_file_prefixes": str(d.parent),
            "biff": "no",
        }
        settings.update(self.settings)
        return "".join(f"{k} = {v}\n" for k, v in settings.items())

    def postfix(self, *args, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """`postfix -c DIR ARGS`; with `check`, a failure raises `error` with
        its output and the maillog's tail."""
        cmd = [*self.command_prefix, tool("postfix", self.error), "-c", str(self.dir), *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise self.error(f"postfix {' '.join(map(str, args))}: exit {r.returncode}\n{r.stdout}{r.stderr}\n"
                             f"maillog:\n{self.log()[-2000:]}")
        return r

    def start(self):
        """Writes main.cf and master.cf, checks them, starts master and waits
        (bounded) for smtpd's greeting. A start that fails once `postfix
        start` has run stops what it started before raising, so no master
        outlives it (the caller still owns the directory)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "main.cf").write_text(self.main_cf())
        (self.dir / "master.cf").write_text(master_cf(self.service, self.tlsmgr))
        # The queue directory must exist; `postfix check` creates what is
        # inside it with the right owners.
        (self.dir / "queue").mkdir(exist_ok=True)
        self.postfix("check")
        try:
            self.postfix("start")
            wait_for_greeting(self.host, self.port, self.greet_timeout, "Postfix", log=self.log, error=self.error)
        except BaseException:
            try:
                self.stop()
            except Exception:  # noqa: BLE001 - the start's error is the one to see
                pass
            raise
        return self

    def stop(self):
        """`postfix stop` (it waits for master to exit), or `postfix abort`
        when that fails or `graceful_stop` is off. Never raises for a
        non-zero exit: a master that is not running is already stopped."""
        if self.graceful_stop and self.postfix("stop", check=False).returncode == 0:
            return
        self.postfix("abort", check=False, timeout=30)

    def cleanup(self):
        """Stops the instance and removes its directory."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        return read_log(self.maillog)

    def master_pid(self) -> int:
        return int((self.dir / "queue" / "pid" / "master.pid").read_text().split()[0])

    def queue_files(self) -> int:
        """Queue files in maildrop/incoming/active/deferred/hold (cheap: no
        postqueue run)."""
        n = 0
        for sub in ("maildrop", "incoming", "active", "deferred", "hold"):
            p = self.dir / "queue" / sub
            if p.exists():
                n += sum(len(files) for _, _, files in os.walk(p))
        return n


# --------------------------------------------------------------------------- nsd


def dns_query(server: str, name: str, qtype: int, port: int = 53, timeout: float = 1.0,
              recursion_desired: bool = False) -> tuple[int, int]:
    """One UDP query: (RCODE, number of answers). Enough to see nsd serve a
    zone; OSError when nothing answers in `timeout` s."""
    qid = int.from_bytes(os.urandom(2), "big")
    q = struct.pack(">HHHHHH", qid, 0x0100 if recursion_desired else 0x0000, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    q += struct.pack(">HH", qtype, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout)
        s.sendto(q, (server, port))
        data, _ = s.recvfrom(4096)
    rid, flags, _qd, an, _ns, _ar = struct.unpack(">HHHHHH", data[:12])
    if rid != qid:
        raise OSError("answer to another query")
    return flags & 0xF, an


def zone_text(zone: str, records: list[str], ns_ip: str = "127.0.0.1", serial: int = 1) -> str:
    """A zone file for `zone`: SOA, NS `ns.ZONE` at `ns_ip`, then `records`
    (relative to the zone, e.g. `@ IN MX 10 mx1`)."""
    head = [f"$ORIGIN {zone}.", "$TTL 60", f"@ IN SOA ns.{zone}. hostmaster.{zone}. ({serial} 3600 600 86400 60)",
            f"@ IN NS ns.{zone}.", f"ns IN A {ns_ip}"]
    return "\n".join(head + records) + "\n"


class NsdServer:
    """nsd (Debian package nsd) in the foreground (`-d`, so the caller owns
    the process) from `dir`, serving `zones` (name -> zone file text) on
    ip:port, UDP and TCP. `ready()` is the caller's check that the zones are
    served (a query and its expected answer), polled for up to 20 s."""

    def __init__(self, dir: Path, ip: str, port: int, zones: dict[str, str], *, verbosity: int | None = None,
                 error: type[Exception] = RuntimeError):
        self.dir = Path(dir)
        self.ip = ip
        self.port = port
        self.zones = zones
        self.verbosity = verbosity
        self.error = error
        self.proc: subprocess.Popen | None = None

    def conf(self) -> str:
        d = self.dir
        lines = [
            "server:",
            f"    ip-address: {self.ip}",
            f"    port: {self.port}",
            "    do-ip6: no",
            "    server-count: 1",
            '    username: ""',
            '    chroot: ""',
            f'    zonesdir: "{d}"',
            '    database: ""',
            f'    pidfile: "{d}/nsd.pid"',
            f'    xfrdfile: "{d}/xfrd.state"',
            f'    xfrdir: "{d}"',
            f'    zonelistfile: "{d}/zone.list"',
            f'    logfile: "{d}/nsd.log"',
        ]
        if self.verbosity is not None:
            lines.append(f"    verbosity: {self.verbosity}")
        lines += ["remote-control:", "    control-enable: no"]
        for zone in self.zones:
            lines += ["zone:", f"    name: {zone}", f'    zonefile: "{zone}.zone"']
        return "\n".join(lines) + "\n"

    def start(self, ready, what: str = "nsd to serve the test zones"):
        """Writes the zones and nsd.conf, checks it, starts nsd and waits
        until `ready()`; a start that fails stops nsd before raising."""
        d = self.dir
        d.mkdir(parents=True, exist_ok=True)
        for zone, text in self.zones.items():
            (d / f"{zone}.zone").write_text(text)
        (d / "nsd.conf").write_text(self.conf())
        r = subprocess.run([tool("nsd-checkconf", self.error), str(d / "nsd.conf")], capture_output=True, text=True,
                           timeout=30)
        if r.returncode != 0:
            raise self.error(f"nsd-checkconf: exit {r.returncode}\n{r.stdout}{r.stderr}")
        with open(d / "nsd.out", "ab") as out:
            self.proc = subprocess.Popen([tool("nsd", self.error), "-d", "-c", str(d / "nsd.conf")], stdout=out,
                                         stderr=out, stdin=subprocess.DEVNULL)
        try:
            wait_for(ready, 20, what, proc=self.proc, error=self.error,
                     log=lambda: read_log(d / "nsd.out") + self.log())
        except BaseException:
            self.stop()
            raise
        return self

    def log(self) -> str:
        return read_log(self.dir / "nsd.log")

    def stop(self):
        stop_process(self.proc)
