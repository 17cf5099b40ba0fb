"""What several benchmarks read from /proc: the CPU model for the machine
line printed beside every figure, and a process's resident memory (one
reading, or the median of readings over a quiet moment). Standard library
only; a benchmark run as a script has this directory on sys.path already.
"""

from __future__ import annotations

import time
from pathlib import Path


def cpu_model() -> str:
    """The first `model name` of /proc/cpuinfo, or "" where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def rss_kib(pid: int) -> int:
    """VmRSS of `pid` in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle(pid: int, seconds: float = 3.0, interval: float = 0.2) -> int:
    """RSS in KiB after a quiet moment: the median of readings every
    `interval` s for `seconds` s (one reading alone catches a passing peak)."""
    readings = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        readings.append(rss_kib(pid))
        time.sleep(interval)
    return sorted(readings)[len(readings) // 2]
