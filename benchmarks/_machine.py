"""What the benchmarks print about the machine they ran on: load, whole-machine CPU use, this process's memory."""

from __future__ import annotations

import os


def loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine."""
    with open("/proc/stat") as f:
        values = [float(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # guest time is already inside user
    return total - idle, total


def busy_since(start: tuple[float, float]) -> float:
    """The whole machine's CPU use since ``start`` (a ``cpu_times()``): 0.5 = one of two cores."""
    busy, total = cpu_times()
    return round((busy - start[0]) / max(total - start[1], 1e-9), 3)


def status_mb(key: str) -> float:
    """A memory figure of this process from /proc/self/status (``VmHWM``: peak resident, ``VmRSS``: now), in MB.
    Not ``ru_maxrss``: Linux carries that across fork + exec, so a child started by a big parent reports the parent's size."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def peak_rss_mb() -> float:
    return status_mb("VmHWM")
