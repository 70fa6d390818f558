"""The `Retry-After` header, as HTTP providers send it."""

from __future__ import annotations

import datetime as dt
import email.utils
import math


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait (RFC 9110: delta-seconds, fractions tolerated, or an HTTP date); None when
    absent or unreadable, including negative and non-finite numbers (`inf`, `nan`), which no
    provider means. A date in the past is 0."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if math.isfinite(seconds) and seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - dt.datetime.now(dt.UTC)).total_seconds())
