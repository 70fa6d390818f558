"""Who may see a job, and the query of the job listing behind `GET /send` (and the operations
page; the page it answers is `job_views.JobPage`).

A job belongs to the API key that created it: the job document records the key's id (its name
in the keys file, or the first 12 hex digits of its digest; never the key). A `Viewer` is who
asks: a key sees its own jobs, an `admin` key and the embedding API see every job, and a job
another key owns is answered as if it did not exist (404, not 403: the id is not confirmed).

The listing is newest first and paged by an opaque cursor. Jobs are ordered by `seq`, the job's
creation time and id in one string (`20261204T142856123|<id>`), written once when the job
is created; a cursor encodes the `seq` of the last job of a page, so the next page is `seq < cursor`:
jobs created while a client pages sort before its cursor and never shift what comes after it
(no job is shown twice or skipped). Every filter is an equality or a range on an indexed field
with `seq` as the index's second key (see `Ledger.ensure_indexes`), so no query needs a
collection scan.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .channels import CHANNELS
from .errors import RequestError
from .models import shown

JOB_STATES = ("queued", "running", "done", "failed", "cancelled")
MAX_LIMIT = 200
DEFAULT_LIMIT = 50


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who asks about jobs: `key_id` None sees every job (admin keys, no keys configured, the
    embedding API); otherwise only the jobs that key created."""

    key_id: str | None = None

    def sees(self, job: Mapping[str, Any]) -> bool:
        return self.key_id is None or job.get("key_id") == self.key_id


EVERYONE = Viewer()


def seq_of(created_at: str, job_id: str) -> str:
    """The listing's sort key: creation time (fixed width, so strings compare as times), then the
    id to break ties. The time is written in ISO-8601's basic form (`20261204T142856123`): the
    embedded store takes a query value that looks like an extended-form date for a date and
    compares it as one, which a string field never matches."""
    return f"{_compact(created_at)}|{job_id}"


def _compact(iso: str) -> str:
    return iso.replace("-", "").replace(":", "").replace(".", "").removesuffix("Z")


def iso_ms(value: dt.datetime) -> str:
    """The fixed-width form every job time is written in: `2026-12-04T14:28:56.123Z`."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII)
# Unpadded base64url, as `encode_cursor` writes it (the OpenAPI document gives the same pattern).
CURSOR_PATTERN = r"^([A-Za-z0-9_-]{4})*([A-Za-z0-9_-]{2,3})?$"
_CURSOR = re.compile(CURSOR_PATTERN)


def encode_cursor(seq: str) -> str:
    return base64.urlsafe_b64encode(seq.encode("utf-8")).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The position a cursor stands for. Any well-formed cursor is a position (the page starts
    below it), so a forged one shows no more than paging would: the owner filter still applies."""
    if not _CURSOR.match(cursor):
        raise RequestError("cursor: not a cursor this service gave (pass `next` of the previous page)")
    try:
        return base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode("utf-8", errors="replace")
    except (binascii.Error, ValueError):
        raise RequestError("cursor: not a cursor this service gave (pass `next` of the previous page)") from None


@dataclass(frozen=True, slots=True)
class JobQuery:
    """One page of the listing: filters (all optional), page size and the cursor of the page
    before. `created_after` is inclusive, `created_before` exclusive."""

    status: str | None = None
    channel: str | None = None
    created_after: dt.datetime | None = None
    created_before: dt.datetime | None = None
    limit: int = DEFAULT_LIMIT
    cursor: str | None = None

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in JOB_STATES:
            raise RequestError(f"status: must be one of {', '.join(JOB_STATES)}")
        if self.channel is not None and self.channel not in CHANNELS:
            raise RequestError(f"channel: {shown(self.channel)} is not a supported channel")
        if not 1 <= self.limit <= MAX_LIMIT:
            raise RequestError(f"limit: must be between 1 and {MAX_LIMIT}")
        if self.cursor is not None:
            decode_cursor(self.cursor)

    @classmethod
    def from_args(cls, args: Mapping[str, str]) -> JobQuery:
        """From query parameters (`status`, `channel`, `createdAfter`, `createdBefore`, `limit`,
        `cursor`); a bad value raises `RequestError` naming it."""
        # A parameter given empty is a value, and not a valid one (as the OpenAPI document says).
        try:
            limit = int(args.get("limit", DEFAULT_LIMIT))
        except ValueError:
            raise RequestError("limit: must be an integer") from None
        return cls(
            status=args.get("status"),
            channel=args.get("channel"),
            created_after=_time(args, "createdAfter"),
            created_before=_time(args, "createdBefore"),
            limit=limit,
            cursor=args.get("cursor") or None,
        )

    def seq_range(self) -> dict[str, str]:
        """The bounds on `seq` this query implies (a time bound compares with the time part of
        `seq` exactly, as both are the same fixed-width string)."""
        bounds: dict[str, str] = {}
        upper = [decode_cursor(self.cursor)] if self.cursor is not None else []
        if self.created_before is not None:
            upper.append(_compact(iso_ms(self.created_before)))
        if upper:
            bounds["$lt"] = min(upper)
        if self.created_after is not None:
            bounds["$gte"] = _compact(iso_ms(self.created_after))
        return bounds


# The indexes the listing's queries run on (created by `Ledger.ensure_indexes`).
JOB_LISTING_INDEXES: tuple[tuple[tuple[str, int], ...], ...] = (
    (("seq", -1),),
    (("key_id", 1), ("seq", -1)),
    (("state", 1), ("seq", -1)),
    (("request.channels", 1), ("seq", -1)),
)


def listing_filter(query: JobQuery, viewer: Viewer) -> dict[str, Any]:
    """The store filter of one page (sorted by `seq` descending). Equalities are written `$eq`:
    the embedded store then matches them on its indexes (a bare value makes it test array
    elements too, which its indexes cannot answer). The channel is matched in the array of the
    request's channels: MongoDB answers that from its multikey index; the embedded store walks
    the `seq` index newest first and stops at the page's end."""
    filters: dict[str, Any] = {}
    if viewer.key_id is not None:
        filters["key_id"] = {"$eq": viewer.key_id}
    if query.status is not None:
        filters["state"] = {"$eq": query.status}
    if query.channel is not None:
        filters["request.channels"] = query.channel
    bounds = query.seq_range()
    if bounds:
        filters["seq"] = bounds
    return filters


def _time(args: Mapping[str, str], name: str) -> dt.datetime | None:
    raw = args.get(name)
    if raw is None:
        return None
    # RFC 3339, as the OpenAPI document's `date-time` says: an empty value or a bare date is refused.
    try:
        if not _RFC3339.match(raw):
            raise ValueError(raw)
        value = dt.datetime.fromisoformat(raw.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise RequestError(f"{name}: must be an RFC 3339 date-time (e.g. 2026-12-04T09:00:00Z)") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


__all__ = [
    "DEFAULT_LIMIT",
    "EVERYONE",
    "JOB_STATES",
    "MAX_LIMIT",
    "JOB_LISTING_INDEXES",
    "JobQuery",
    "Viewer",
    "decode_cursor",
    "encode_cursor",
    "iso_ms",
    "listing_filter",
    "seq_of",
]
