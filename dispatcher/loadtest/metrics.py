"""Numbers from raw observations: latency percentiles, per-second delivery series, the densest
1-second window, achieved rates, and the peak resident memory of a process."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import psutil
import trio


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile (`q` in 0..100) of already sorted values; None when empty."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def latency_summary(latencies: Sequence[float]) -> dict[str, float | int | None]:
    """Count, mean, p50/p95/p99 and max, in milliseconds."""
    values = sorted(latencies)

    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)

    return {"count": len(values), "mean_ms": ms(sum(values) / len(values)) if values else None,
            "p50_ms": ms(percentile(values, 50)), "p95_ms": ms(percentile(values, 95)),
            "p99_ms": ms(percentile(values, 99)), "max_ms": ms(values[-1]) if values else None}


def per_second(times: Sequence[float], start: float, end: float) -> list[int]:
    """Counts of `times` in consecutive 1-second bins from `start` (the last bin may be partial)."""
    bins = [0] * max(1, math.ceil(end - start))
    for t in times:
        index = int(t - start)
        if 0 <= index < len(bins):
            bins[index] += 1
        elif index >= len(bins):
            bins.extend([0] * (index - len(bins) + 1))
            bins[index] += 1
    return bins


def max_in_window(sorted_times: Sequence[float], window: float = 1.0) -> int:
    """The most events in any half-open window [t, t + window)."""
    best = 0
    low = 0
    for high, t in enumerate(sorted_times):
        while sorted_times[low] <= t - window:
            low += 1
        best = max(best, high - low + 1)
    return best


def mean_rate(sorted_times: Sequence[float]) -> float | None:
    """Events per second between the first and the last event (n - 1 intervals)."""
    if len(sorted_times) < 2 or sorted_times[-1] <= sorted_times[0]:
        return None
    return (len(sorted_times) - 1) / (sorted_times[-1] - sorted_times[0])


@dataclass
class RssSampler:
    """Samples the resident set size of process `pid` every `interval` seconds while `run` runs.

    Sampling misses spikes shorter than the interval; the last sample is taken when cancelled.
    """

    pid: int
    interval: float = 0.1
    peak: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _started: float = 0.0

    def sample(self) -> None:
        try:
            rss = psutil.Process(self.pid).memory_info().rss
        except psutil.Error:
            return  # the process is gone: keep what we saw
        self.peak = max(self.peak, rss)
        self.samples.append((round(trio.current_time() - self._started, 3), rss))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._started = trio.current_time()
        self.sample()
        task_status.started()
        try:
            while True:
                await trio.sleep(self.interval)
                self.sample()
        finally:
            self.sample()
