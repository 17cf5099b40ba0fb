"""A lab of real Debian hosts for the Ansible role (issue 7): systemd-nspawn
containers booted with full systemd from one Debian rootfs made by mmdebstrap,
with an overlay per host, each host's sshd on its own loopback address
(127.0.0.11, .12, ...), so Ansible connects over ssh as in production.

The hosts share the machine's network: every listener in them binds its own
address. The rootfs is cached under TEMPALIAS_LAB_CACHE (default
/var/cache/tempalias-lab, outside the repository) and reused while its
package list is unchanged. Needs root (overlay mounts, nspawn).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

CACHE = Path(os.environ.get("TEMPALIAS_LAB_CACHE", "/var/cache/tempalias-lab"))
SUITE = "bookworm"
# What a minimal Debian server has, plus python3 for Ansible.
PACKAGES = ["systemd", "systemd-sysv", "dbus", "openssh-server", "python3", "iptables", "iproute2", "ca-certificates", "procps"]
APT_SOURCES = Path("/etc/apt/sources.list.d/debian.sources")
CGROUP_ROOTS = [Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified")]
REBOOT_EXIT = 133  # systemd-nspawn's exit status when the container rebooted


def wait_until(pred, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = pred()
            if v:
                return v
        except OSError as e:
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last!r})")


def apt_sources() -> Path:
    """The machine's own apt sources (so no mirror name is written anywhere)."""
    if APT_SOURCES.exists():
        return APT_SOURCES
    legacy = Path("/etc/apt/sources.list")
    if legacy.exists():
        return legacy
    raise RuntimeError("no apt sources file found for mmdebstrap")


def ensure_rootfs() -> Path:
    """The cached rootfs for the current package list, built once (~20-35 s)."""
    key = hashlib.sha256(" ".join([SUITE, *PACKAGES]).encode()).hexdigest()[:12]
    root = CACHE / f"rootfs-{SUITE}-{key}"
    if (root / ".complete").exists():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = CACHE / f"{root.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = ["mmdebstrap", "--variant=apt", "--include=" + ",".join(PACKAGES), SUITE, str(tmp), str(apt_sources())]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if r.returncode != 0:
        raise RuntimeError(f"mmdebstrap failed ({r.returncode}):\n{r.stderr[-4000:]}")
    (tmp / ".complete").write_text(" ".join(cmd) + "\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)
    return root


def port_open(ip: str, port: int, banner: bytes = b"") -> bool:
    try:
        with socket.create_connection((ip, port), timeout=2) as s:
            if banner:
                s.settimeout(3)
                return s.recv(64).startswith(banner)
            return True
    except OSError:
        return False


class Host:
    """One container: overlay on the shared rootfs, booted by systemd-nspawn
    in a cgroup of its own; restarted by its supervisor thread when it reboots."""

    def __init__(self, lab: "Lab", n: int):
        self.lab = lab
        self.n = n
        self.name = f"mx{n}"
        self.ip = f"127.0.0.{10 + n}"
        self.dir = lab.dir / self.name
        self.merged = self.dir / "merged"
        self.cgroup = f"tempalias-lab-{self.name}"
        self.proc: subprocess.Popen | None = None
        self.boots = 0
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.console = self.dir / "console.log"

    # ---- preparation

    def prepare(self, rootfs: Path, pubkey: str):
        for d in ("upper", "work", "merged"):
            (self.dir / d).mkdir(parents=True, exist_ok=True)
        opts = f"lowerdir={rootfs},upperdir={self.dir / 'upper'},workdir={self.dir / 'work'}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.merged)], check=True, timeout=30)
        m = self.merged
        (m / "etc/hostname").write_text(self.name + "\n")
        (m / "etc/hosts").write_text(f"127.0.0.1 localhost\n{self.ip} {self.name}\n")
        (m / "etc/ssh/sshd_config.d/lab.conf").write_text(
            f"ListenAddress {self.ip}\nPermitRootLogin prohibit-password\nPasswordAuthentication no\nUseDNS no\n"
        )
        ssh = m / "root/.ssh"
        ssh.mkdir(mode=0o700, exist_ok=True)
        (ssh / "authorized_keys").write_text(pubkey)
        os.chmod(ssh / "authorized_keys", 0o600)
        # Nothing in a lab host should touch the shared network configuration.
        for unit in ("systemd-networkd.service", "systemd-resolved.service", "systemd-timesyncd.service"):
            link = m / "etc/systemd/system" / unit
            if not link.exists():
                link.symlink_to("/dev/null")

    # ---- lifecycle

    def _cgroup_dirs(self) -> list[Path]:
        return [r / self.cgroup for r in CGROUP_ROOTS if r.is_dir()] or [Path("/sys/fs/cgroup") / self.cgroup]

    def _enter_cgroup(self):  # runs in the child before exec
        for d in self._cgroup_dirs():
            d.mkdir(exist_ok=True)
            (d / "cgroup.procs").write_text(str(os.getpid()))

    def _boot(self):
        cmd = [
            "systemd-nspawn", "--quiet", "--boot", "--register=no", "--keep-unit",
            f"--machine=talab-{self.name}", f"--hostname={self.name}",
            f"--directory={self.merged}", "--console=passive", "--kill-signal=SIGRTMIN+3",
        ]
        log = open(self.console, "ab")
        self.boots += 1
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=self._enter_cgroup)
        log.close()

    def _supervise(self):
        while True:
            rc = self.proc.wait()
            if self.stopping or rc != REBOOT_EXIT:
                return
            self._boot()

    def start(self):
        self.stopping = False
        self._boot()
        self.thread = threading.Thread(target=self._supervise, daemon=True, name=f"nspawn-{self.name}")
        self.thread.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_ssh(self, timeout: float = 60):
        def up():
            if self.proc.poll() is not None and self.proc.returncode != REBOOT_EXIT and not self.stopping:
                raise RuntimeError(f"{self.name}: nspawn exited {self.proc.returncode}:\n{self.console_tail()}")
            return port_open(self.ip, 22, b"SSH-")

        wait_until(up, timeout, f"sshd on {self.name} ({self.ip})")

    def stop(self, timeout: float = 60):
        self.stopping = True
        if self.running():
            self.proc.send_signal(signal.SIGTERM)  # nspawn asks the container's systemd to power off
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.thread:
            self.thread.join(10)

    def teardown(self):
        self.stop()
        if os.path.ismount(self.merged):
            r = subprocess.run(["umount", str(self.merged)], capture_output=True, timeout=30)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.merged)], capture_output=True, timeout=30)
        for d in self._cgroup_dirs():
            if d.exists():
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
                try:
                    d.rmdir()
                except OSError:
                    pass

    def console_tail(self, n: int = 3000) -> str:
        try:
            return self.console.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    # ---- commands

    def ssh(self, command: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run(self.lab.ssh_cmd(self) + [command], capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise RuntimeError(f"{self.name}: {command!r} exited {r.returncode}: {r.stdout}{r.stderr}")
        return r


class Lab:
    """N hosts mx1..mxN on 127.0.0.11.. with a fresh ssh key; the first
    `members` of them (`nodes`) are the cluster, the rest spares to add."""

    def __init__(self, directory: Path, n: int = 3, members: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hosts = [Host(self, i) for i in range(1, n + 1)]
        self.nodes = self.hosts[: members or n]
        self.key = self.dir / "id_ed25519"

    def ssh_options(self) -> list[str]:
        return [
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR",
            "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
        ]

    def ssh_cmd(self, host: Host) -> list[str]:
        return ["ssh", "-i", str(self.key), *self.ssh_options(), f"root@{host.ip}"]

    @staticmethod
    def cleanup_stale():
        """Ends what an earlier lab run left behind when its process was
        killed before its teardown: the processes in the lab's own cgroups
        (tempalias-lab-*) and overlay mounts on the cached rootfs."""
        for root in CGROUP_ROOTS + [Path("/sys/fs/cgroup")]:
            for d in root.glob("tempalias-lab-mx*") if root.is_dir() else []:
                for procs in d.rglob("cgroup.procs"):
                    for pid in procs.read_text().split():
                        try:
                            os.kill(int(pid), signal.SIGKILL)
                        except ProcessLookupError:
                            pass
        for root in CGROUP_ROOTS + [Path("/sys/fs/cgroup")]:
            for d in root.glob("tempalias-lab-mx*") if root.is_dir() else []:
                def empty():
                    return not any(p.read_text().split() for p in d.rglob("cgroup.procs"))

                wait_until(empty, 30, f"processes in {d} to end")
                for sub in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [d]:
                    try:
                        sub.rmdir()
                    except OSError:
                        pass
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) > 3 and parts[2] == "overlay" and f"lowerdir={CACHE}/" in parts[3]:
                subprocess.run(["umount", "-l", parts[1]], capture_output=True, timeout=30)

    def check_addresses_free(self):
        busy = [f"{h.ip}:{p}" for h in self.hosts for p in (22, 25, 80, 7001) if port_open(h.ip, p)]
        if busy:
            raise RuntimeError(f"lab addresses already in use (another lab running?): {busy}")

    def up(self, timeout: float = 90):
        self.cleanup_stale()
        self.check_addresses_free()
        rootfs = ensure_rootfs()
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True, timeout=30)
        pub = (self.dir / "id_ed25519.pub").read_text()
        for h in self.hosts:
            h.prepare(rootfs, pub)
            h.start()
        for h in self.hosts:
            h.wait_ssh(timeout)
        return self

    def reboot(self, timeout: float = 120):
        """`systemctl reboot` in every host at once; waits until sshd is back in each."""
        before = {h.name: h.boots for h in self.hosts}
        for h in self.hosts:
            subprocess.run(self.ssh_cmd(h) + ["systemctl reboot"], capture_output=True, timeout=30)
        for h in self.hosts:
            wait_until(lambda h=h: h.boots > before[h.name] and h.running(), timeout, f"{h.name} to boot again")
            h.wait_ssh(timeout)

    def down(self):
        for h in self.hosts:
            h.stopping = True
        for h in self.hosts:
            try:
                h.teardown()
            except Exception:  # noqa: BLE001 - teardown must go on for the others
                pass

    def inventory(self, group_vars: dict, hosts: list[Host] | None = None, name: str = "inventory.yml") -> Path:
        """An inventory whose group `tempalias` holds `hosts` (default: the
        cluster's nodes). YAML is a superset of JSON."""
        import json

        hosts = {
            h.name: {"ansible_host": h.ip, "tempalias_node_id": h.n, "tempalias_smtp_hostname": f"{h.name}.tempalias.test"}
            for h in (hosts if hosts is not None else self.nodes)
        }
        inv = {
            "tempalias": {
                "hosts": hosts,
                "vars": {
                    "ansible_user": "root",
                    "ansible_ssh_private_key_file": str(self.key),
                    "ansible_ssh_common_args": " ".join(self.ssh_options()),
                    **group_vars,
                },
            }
        }
        path = self.dir / name
        path.write_text(json.dumps(inv, indent=2))
        return path
