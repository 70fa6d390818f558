"""The `Retry-After` header, as HTTP providers send it."""

from __future__ import annotations

import datetime as dt
import email.utils


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait (RFC 9110: delta-seconds, fractions tolerated, or an HTTP date); None when
    absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, (when - dt.datetime.now(dt.timezone.utc)).total_seconds())
