"""Process measurements shared by the benchmarks."""

from __future__ import annotations

import contextlib

import psutil


def tree_cpu_s(proc: psutil.Process) -> float:
    """User + system CPU seconds of a process and its live descendants (all their threads)."""
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = p.cpu_times()
            total += times.user + times.system
    return total
