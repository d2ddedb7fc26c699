"""What the bench measures the process with: resident memory and CPU time per thread (from /proc), and
the small statistics it reports them in."""

from __future__ import annotations

import math
import os
import resource
import statistics
import threading
from pathlib import Path

import numpy as np


def rss_mb(field_name: str = "VmRSS") -> float:
    """Resident memory now: VmRSS, or RssAnon (heap: what a leak grows) / RssFile (mapped libraries)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return float("nan")


def thread_cpu_s() -> dict[str, float]:
    """CPU seconds (user + system) of each live Python thread by name, plus "(process)" for the whole
    process — from /proc, so it is what the kernel ran, not wall time (waits excluded)."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}

    def cpu(path: str) -> float | None:
        try:
            fields = Path(path).read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14, 15 of stat)

    for t in threading.enumerate():
        if t.native_id is not None:
            v = cpu(f"/proc/self/task/{t.native_id}/stat")
            if v is not None:
                out[t.name] = out.get(t.name, 0.0) + v
    total = cpu("/proc/self/stat")
    if total is not None:
        out["(process)"] = total
    return out


def pid_cpu_s(pids: list[int]) -> dict[int, float]:
    """CPU seconds (user + system) of each of these processes (the capture processes), from /proc; a process
    that is gone is left out."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, float] = {}
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0



def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if values else None


def median(values: list[float | None]) -> float | None:
    """The median of the finite values (None and NaN left out: a round that measured nothing)."""
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return float(statistics.median(vals)) if vals else None
