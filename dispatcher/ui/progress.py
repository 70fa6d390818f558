"""Per-channel progress of a job, as the operations page draws it.

A bar is the job's selected users on one channel split by what became of their delivery, in a
fixed order (best news first), plus what is still pending. The number of users is known up front
only for a send that names its recipients; a send to clusters shows what is done so far and an
open-ended pending part until it finishes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Summary keys that count deliveries, in the order the bars draw them (and the legend lists them).
# States a newer summary may carry and this list does not know follow them, so nothing counted is
# left out.
STATES = ("delivered", "sent", "undelivered", "unconfirmed", "failed", "skipped", "cancelled")
# A summary's `sent` counts every delivery the provider accepted; these are the accepted ones a
# receipt (or its absence) took further. The bar's `sent` is what is left: accepted, no news yet.
_PAST_SENT = ("delivered", "undelivered", "unconfirmed")
_NOT_STATES = frozenset({"users"})


@dataclass(frozen=True, slots=True)
class Segment:
    state: str
    count: int
    x: float  # percent of the bar
    width: float


@dataclass(frozen=True, slots=True)
class ChannelProgress:
    channel: str
    total: int | None  # None: not known before the send ends
    segments: tuple[Segment, ...]
    pending: int | None
    done: int

    @property
    def label(self) -> str:
        """What a screen reader says for the bar (and the tooltip)."""
        parts = [f"{s.count} {s.state}" for s in self.segments if s.count]
        if self.pending:
            parts.append(f"{self.pending} pending")
        elif self.pending is None:
            parts.append("more pending")
        of = f" of {self.total}" if self.total is not None else ""
        return f"{self.channel}: " + (", ".join(parts) or "nothing yet") + of


def channel_progress(
    summary: Mapping[str, Any], channels: Sequence[str], total: int | None, final: bool
) -> list[ChannelProgress]:
    """One bar per channel. `total`: the users selected (None when unknown); once `final`, what
    was counted is the total."""
    states = [s for s in STATES if isinstance(summary.get(s), Mapping)]
    states += [k for k, v in summary.items() if isinstance(v, Mapping) and k not in STATES and k not in _NOT_STATES]
    bars = []
    for channel in channels:
        counts = [(state, int(summary[state].get(channel, 0))) for state in states]
        past_sent = sum(n for state, n in counts if state in _PAST_SENT)
        counts = [(state, max(0, n - past_sent) if state == "sent" else n) for state, n in counts]
        done = sum(n for _, n in counts)
        whole = done if final or total is None else max(total, done)
        pending = 0 if final else (None if total is None else whole - done)
        # Unknown total: the done part fills half the bar, so that it still moves.
        scale = whole if whole else 1
        if pending is None:
            scale = max(done * 2, 1)
        x = 0.0
        segments = []
        for state, n in counts:
            width = 100.0 * n / scale
            segments.append(Segment(state, n, round(x, 3), round(width, 3)))
            x += width
        bars.append(ChannelProgress(channel, None if pending is None else whole, tuple(segments), pending, done))
    return bars


def selected_users(request: Mapping[str, Any]) -> int | None:
    """The number of users a send selected, when its request says (recipients only)."""
    if request.get("clusters"):
        return None
    return len(set(request.get("recipients") or ()))


__all__ = ["STATES", "ChannelProgress", "Segment", "channel_progress", "selected_users"]
