"""Date helpers for templates, with the Day.js format tokens the predecessor's templates use."""

from __future__ import annotations

import re
from datetime import date, datetime, timezone, UTC
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from babel import Locale
from babel.dates import format_datetime

# Day.js tokens, longest first; [text] is literal.
_TOKENS = re.compile(r"\[([^\]]*)]|YYYY|YY|M{1,4}|D{1,2}|d{1,4}|H{1,2}|h{1,2}|m{1,2}|s{1,2}|SSS|ZZ|Z|A|a|X|x")

# Values above this are epoch milliseconds (Day.js's unit), below it seconds: 10**11 s is year 5138.
_EPOCH_MS_THRESHOLD = 10**11


def to_datetime(value: object) -> datetime:
    """Accept an ISO 8601 string, epoch seconds or milliseconds, a date or a datetime (naive = UTC)."""
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime(value.year, value.month, value.day)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = value / 1000 if abs(value) >= _EPOCH_MS_THRESHOLD else value
        moment = datetime.fromtimestamp(seconds, UTC)
    elif isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            try:
                return to_datetime(float(text))
            except ValueError:
                raise ValueError(f"not a date: {value!r}") from None
    else:
        raise ValueError(f"not a date: {value!r}")
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def zone(name: str | None) -> ZoneInfo | timezone:
    if not name or name.upper() == "UTC":
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {name!r}") from None


def _offset(moment: datetime, sep: str) -> str:
    minutes = int(moment.utcoffset().total_seconds() // 60)  # type: ignore[union-attr]
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}{sep}{mins:02d}"


def format_dayjs(moment: datetime, pattern: str, locale: Locale) -> str:
    def token(match: re.Match[str]) -> str:
        if match.group(1) is not None:
            return match.group(1)
        tok = match.group(0)
        hour12 = moment.hour % 12 or 12
        simple = {
            "YYYY": f"{moment.year:04d}",
            "YY": f"{moment.year % 100:02d}",
            "M": str(moment.month),
            "MM": f"{moment.month:02d}",
            "D": str(moment.day),
            "DD": f"{moment.day:02d}",
            "d": str(moment.isoweekday() % 7),
            "H": str(moment.hour),
            "HH": f"{moment.hour:02d}",
            "h": str(hour12),
            "hh": f"{hour12:02d}",
            "m": str(moment.minute),
            "mm": f"{moment.minute:02d}",
            "s": str(moment.second),
            "ss": f"{moment.second:02d}",
            "SSS": f"{moment.microsecond // 1000:03d}",
            "Z": _offset(moment, ":"),
            "ZZ": _offset(moment, ""),
            "A": "AM" if moment.hour < 12 else "PM",
            "a": "am" if moment.hour < 12 else "pm",
            "X": str(int(moment.timestamp())),
            "x": str(int(moment.timestamp() * 1000)),
        }
        if tok in simple:
            return simple[tok]
        # Names come from the locale (Day.js's default locale is English).
        names = {"MMM": "MMM", "MMMM": "MMMM", "dd": "EEEEEE", "ddd": "EEE", "dddd": "EEEE"}
        return format_datetime(moment, names[tok], locale=locale)

    return _TOKENS.sub(token, pattern)


def parse_locale(name: str) -> Locale:
    return Locale.parse(name.replace("-", "_"))
