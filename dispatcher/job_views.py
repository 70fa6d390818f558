"""What the dispatcher answers about jobs, as typed values read from the ledger's documents.

`Dispatcher.status` and `cancel` answer a `JobStatus`, `jobs` a `JobPage`, `failures` a
`FailurePage`, `deliveries` a `UserDeliveries`. Nothing here knows JSON: the HTTP layer writes
these values (`wire.py`), and the `job.finished` callback carries a `JobStatus` written the same
way as `GET /send/{id}`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .models import Failure, Summary


@dataclass(frozen=True, slots=True)
class ReceiptCounts:
    """Of a job's sent deliveries, those that receipts (or their absence) took further, by
    channel: a receipt said it arrived, said it did not, or never came."""

    delivered: dict[str, int]
    undelivered: dict[str, int]
    unconfirmed: dict[str, int]

    @classmethod
    def from_counts(cls, counts: Mapping[str, Mapping[str, int]]) -> ReceiptCounts:
        """From `Ledger.receipt_counts` (by state, then channel)."""
        return cls(
            dict(counts.get("delivered") or {}),
            dict(counts.get("undelivered") or {}),
            dict(counts.get("unconfirmed") or {}),
        )


@dataclass(frozen=True, slots=True)
class JobStatus:
    """A job: its state (queued, running, done, failed, cancelled), its times (ISO-8601 in UTC,
    as the ledger recorded them), its counts, why it failed if it did, the `X-Request-ID` of the
    request that created it, and its channels. `receipts` is None where they were not counted
    (the listing)."""

    id: str
    state: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    summary: Summary
    error: str | None
    request_id: str | None
    channels: tuple[str, ...]
    receipts: ReceiptCounts | None = None

    @classmethod
    def from_doc(
        cls,
        doc: Mapping[str, Any],
        live: Summary | None = None,
        receipts: Mapping[str, Mapping[str, int]] | None = None,
    ) -> JobStatus:
        """A job document; `live` replaces the stored counts (those of a job this process runs
        are fresher than its last lease renewal), `receipts` are `Ledger.receipt_counts`."""
        request = doc.get("request") or {}
        return cls(
            id=doc["_id"],
            state=doc["state"],
            created_at=doc.get("created_at"),
            started_at=doc.get("started_at"),
            finished_at=doc.get("finished_at"),
            summary=live if live is not None else Summary.from_json(doc.get("summary") or {}),
            error=doc.get("error"),
            request_id=doc.get("request_id"),
            # nx-27017 (0.8) answers the listing's projection on `request.channels` with a flat
            # "request.channels" key where MongoDB nests it.
            channels=tuple(request.get("channels") or doc.get("request.channels") or ()),
            receipts=ReceiptCounts.from_counts(receipts) if receipts is not None else None,
        )


@dataclass(frozen=True, slots=True)
class JobPage:
    """One page of the job listing, newest first; `next` is the cursor of the page after it
    (None on the last)."""

    jobs: list[JobStatus]
    next: str | None


@dataclass(frozen=True, slots=True)
class FailurePage:
    """One page of a job's failures, in a stable order; `next` is the `after` of the page after
    it (None on the last)."""

    job_id: str
    failures: list[Failure]
    next: str | None


@dataclass(frozen=True, slots=True)
class Receipt:
    """A provider receipt that moved a delivery: the provider's word for it, the state it gave,
    the provider's error code, when it came."""

    status: str | None
    state: str | None
    code: str | None
    at: dt.datetime | None


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One delivery of one user, as the ledger holds it: where it stands and how it got there.
    `failure` (permanent or temporary) is given for an undelivered one; `reconciled` says how an
    ambiguous attempt was settled with the provider."""

    channel: str | None
    state: str | None
    attempts: int
    provider_id: str | None
    error: str | None
    claimed_at: dt.datetime | None
    settled_at: dt.datetime | None
    receipt_at: dt.datetime | None
    receipts: list[Receipt]
    failure: str | None = None
    reconciled: str | None = None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> DeliveryRecord:
        receipts = sorted((doc.get("receipts") or {}).values(), key=lambda r: r.get("at") or 0)
        return cls(
            channel=doc.get("channel"),
            state=doc.get("state"),
            attempts=doc.get("attempts", 0),
            provider_id=doc.get("provider_id"),
            error=doc.get("error"),
            claimed_at=_time(doc.get("claimed_at")),
            settled_at=_time(doc.get("settled_at")),
            receipt_at=_time(doc.get("receipt_at")),
            receipts=[Receipt(r.get("status"), r.get("state"), r.get("code"), _time(r.get("at"))) for r in receipts],
            failure=doc.get("failure") or None,
            reconciled=doc.get("reconciled") or None,
        )


@dataclass(frozen=True, slots=True)
class UserDeliveries:
    """One user's deliveries in one job, one per channel."""

    job_id: str
    user_id: str
    deliveries: list[DeliveryRecord]


def _time(seconds: float | None) -> dt.datetime | None:
    """The ledger's delivery times are seconds since the epoch."""
    return dt.datetime.fromtimestamp(seconds, dt.UTC) if seconds is not None else None


__all__ = [
    "DeliveryRecord",
    "FailurePage",
    "JobPage",
    "JobStatus",
    "Receipt",
    "ReceiptCounts",
    "UserDeliveries",
]
