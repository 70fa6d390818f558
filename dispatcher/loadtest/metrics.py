"""Numbers from raw observations: latency percentiles, per-second delivery series, the densest
1-second window, achieved rates, the rate while every lane is busy, and the resident memory and
CPU time of the service's processes."""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
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

    return {
        "count": len(values),
        "mean_ms": ms(sum(values) / len(values)) if values else None,
        "p50_ms": ms(percentile(values, 50)),
        "p95_ms": ms(percentile(values, 95)),
        "p99_ms": ms(percentile(values, 99)),
        "max_ms": ms(values[-1]) if values else None,
    }


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


def busy_window(lanes: Mapping[str, Sequence[float]]) -> tuple[float, float] | None:
    """The span during which every lane was delivering: from the latest first arrival to the
    earliest last one (lanes are sorted arrival times; empty lanes are left out). None when no
    such span exists (one lane finished before another started)."""
    active = [times for times in lanes.values() if times]
    if not active:
        return None
    start, end = max(t[0] for t in active), min(t[-1] for t in active)
    return (start, end) if end > start else None


def busy_rate(lanes: Mapping[str, Sequence[float]]) -> dict[str, float | None]:
    """Deliveries per second, all lanes together, while every lane was busy: the throughput the
    pipeline sustains, not diluted by the tail where only the slowest channel is still sending."""
    window = busy_window(lanes)
    if window is None:
        return {"deliveries_per_s": None, "window_s": None, "from_s": None}
    start, end = window
    count = sum(bisect.bisect_right(t, end) - bisect.bisect_left(t, start) for t in lanes.values() if t)
    first = min(t[0] for t in lanes.values() if t)
    return {
        "deliveries_per_s": round(count / (end - start), 2),
        "window_s": round(end - start, 3),
        "from_s": round(start - first, 3),
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


@dataclass
class _Tracked:
    root: int
    process: psutil.Process
    cpu: float = 0.0  # user + system CPU-seconds at the last sample
    system: float = 0.0  # of which in the kernel (syscalls: sockets, thread hand-offs)
    rss: int = 0
    peak_rss: int = 0
    alive: bool = True


@dataclass
class ProcessSampler:
    """Samples, every `interval` seconds while `run` runs, the resident memory and the CPU time
    (user + system) of process trees: each root returned by `roots()` (called at every sample: a
    restarted service has a new pid) and its descendants (`serve --workers`).

    A process keeps the CPU time of its last sample after it dies (a SIGKILLed service loses at
    most one interval). Sampling misses RSS spikes shorter than the interval; `peak` is the
    highest sum over all trees at one sample.
    """

    roots: Callable[[], Sequence[int]]
    interval: float = 0.1
    children_every: float = 1.0  # walking /proc for descendants costs more than reading one process
    peak: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    _tracked: dict[int, _Tracked] = field(default_factory=dict)
    _started: float = 0.0
    _children_at: float = -math.inf

    def _discover(self) -> None:
        now = trio.current_time() if self._started else 0.0
        walk = now - self._children_at >= self.children_every
        for root in self.roots():
            if root not in self._tracked:
                try:
                    self._tracked[root] = _Tracked(root, psutil.Process(root))
                except psutil.Error:
                    continue
                walk = True
            tracked = self._tracked[root]
            if walk and tracked.alive:
                try:
                    children = tracked.process.children(recursive=True)
                except psutil.Error:
                    continue
                for child in children:
                    self._tracked.setdefault(child.pid, _Tracked(root, child))
        if walk:
            self._children_at = now

    def sample(self) -> None:
        self._discover()
        total = 0
        for tracked in self._tracked.values():
            if not tracked.alive:
                continue
            try:
                with tracked.process.oneshot():
                    times = tracked.process.cpu_times()
                    tracked.rss = tracked.process.memory_info().rss
            except psutil.Error:
                tracked.alive = False  # gone: keep what we saw
                continue
            tracked.cpu = times.user + times.system
            tracked.system = times.system
            tracked.peak_rss = max(tracked.peak_rss, tracked.rss)
            total += tracked.rss
        self.peak = max(self.peak, total)
        self.samples.append((round(trio.current_time() - self._started, 3) if self._started else 0.0, total))

    def cpu_snapshot(self) -> dict[int, float]:
        """CPU-seconds per process now; `cpu_since` subtracts it."""
        self.sample()
        return {pid: t.cpu for pid, t in self._tracked.items()}

    def cpu_since(self, snapshot: Mapping[int, float], root: int | None = None) -> float:
        """CPU-seconds used since `snapshot` by every tracked process (or one root's tree); a
        process started since counts from its start."""
        self.sample()
        return sum(t.cpu - snapshot.get(pid, 0.0) for pid, t in self._tracked.items() if root is None or t.root == root)

    def system_snapshot(self) -> dict[int, float]:
        return {pid: t.system for pid, t in self._tracked.items()}

    def system_since(self, snapshot: Mapping[int, float]) -> float:
        """Kernel CPU-seconds since `snapshot` (taken with `system_snapshot` after `cpu_snapshot`)."""
        return sum(t.system - snapshot.get(pid, 0.0) for pid, t in self._tracked.items())

    def peak_of(self, root: int) -> int:
        """The highest RSS seen of one root's process (its workers' peaks are separate)."""
        tracked = self._tracked.get(root)
        return tracked.peak_rss if tracked is not None else 0

    def processes(self) -> list[dict[str, int | bool]]:
        return [
            {"pid": pid, "root": t.root, "peak_rss_bytes": t.peak_rss, "alive": t.alive}
            for pid, t in self._tracked.items()
        ]

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


def own_cpu_seconds() -> float:
    """CPU-seconds (user + system, every thread) of this process so far."""
    times = psutil.Process().cpu_times()
    return times.user + times.system
