"""CPU time of another process (the embedded store), for the micro-benchmarks that measure what
the store spends: `python benchmarks/<script>.py` puts this folder on the import path."""

import psutil


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` so far."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system
