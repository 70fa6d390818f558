"""Deliveries over time, binned for a small server-drawn SVG chart (the job page).

The chart is computed here and drawn by a template: bins of equal width from the job's start to its
end (or now), each bin a stack of the states its deliveries ended in. No JavaScript is needed to
read it, and its size does not grow with the job: at most `MAX_BINS` bars.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

from .progress import STATES

MAX_BINS = 60
# Drawing area in SVG user units; the template scales it to the page's width.
WIDTH = 600.0
HEIGHT = 120.0
# Bin widths an axis can be labelled with, in seconds.
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)


@dataclass(frozen=True, slots=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    state: str
    count: int
    label: str  # "12:03:05 +10 s: 42 sent"


@dataclass(frozen=True, slots=True)
class Chart:
    bars: tuple[Bar, ...]
    peak: int  # deliveries in the fullest bin
    step: int  # seconds per bin
    total: int
    start: float
    end: float
    width: float = WIDTH
    height: float = HEIGHT

    @property
    def description(self) -> str:
        return f"{self.total} deliveries over {_duration(self.end - self.start)}, {_duration(self.step)} per bar; at most {self.peak} in one bar"


def deliveries_chart(events: Iterable[tuple[float | None, str]], start: float, end: float) -> Chart | None:
    """`events`: (epoch seconds or None, final state) of each delivery. None when there is nothing to draw."""
    timed = [(t, s) for t, s in events if t is not None]
    if not timed:
        return None
    start = min(start, min(t for t, _ in timed))
    end = max(end, max(t for t, _ in timed), start + 1)
    step = next((s for s in _STEPS if (end - start) / s <= MAX_BINS), _STEPS[-1])
    bins = int((end - start) // step) + 1
    counts: list[Counter[str]] = [Counter() for _ in range(bins)]
    for t, state in timed:
        counts[min(int((t - start) // step), bins - 1)][state] += 1
    peak = max(sum(c.values()) for c in counts)
    slot = WIDTH / bins
    order = {state: i for i, state in enumerate(STATES)}
    bars = []
    for i, counter in enumerate(counts):
        y = HEIGHT
        for state in sorted(counter, key=lambda s: order.get(s, len(order))):
            n = counter[state]
            h = HEIGHT * n / peak
            y -= h
            label = f"+{_duration(i * step)}: {n} {state}"
            bars.append(
                Bar(round(i * slot, 2), round(y, 2), round(max(slot - 1, 0.5), 2), round(h, 2), state, n, label)
            )
    return Chart(tuple(bars), peak, step, len(timed), start, end)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


__all__ = ["Chart", "deliveries_chart"]
