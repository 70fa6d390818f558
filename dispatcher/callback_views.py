"""What the dispatcher answers about callbacks, as typed values read from the outbox's messages.

`Dispatcher.list_callbacks` answers a `CallbackPage`, `retry_callback` a `Callback`. Nothing here
knows JSON: the HTTP layer writes these values (`wire.py`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .callback_outbox import shown_url


@dataclass(frozen=True, slots=True)
class Callback:
    """One callback message (`callback_outbox.py`), without its events, body or secrets: its id
    (the `webhook-id` of every try), its event type, its job and the `X-Request-ID` of the request
    that created the job, where it goes (`url` without its query and fragment, which may hold a
    client's token), its state (pending, delivered, dead), how many events it carries, its tries,
    when it was written (or revived by a retry), when a pending one is tried next, and the last
    try's error."""

    id: str
    type: str
    job_id: str | None
    request_id: str | None
    url: str
    state: str
    events: int
    attempts: int
    created_at: dt.datetime
    next_attempt_at: dt.datetime | None
    last_error: str | None

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any]) -> Callback:
        pending = doc["state"] == "pending"
        return cls(
            id=doc["_id"],
            type=doc["type"],
            job_id=doc.get("job"),
            request_id=doc.get("request_id"),
            url=shown_url(doc.get("url") or ""),
            state=doc["state"],
            events=doc.get("count", 1),
            attempts=doc.get("attempts", 0),
            created_at=_time(doc["created"]),
            next_attempt_at=_time(doc["next_at"]) if pending and doc.get("next_at") else None,
            last_error=doc.get("last_error"),
        )


@dataclass(frozen=True, slots=True)
class CallbackPage:
    """One page of the callbacks in one state, newest first; `next` is the cursor of the page
    after it (None on the last)."""

    callbacks: list[Callback]
    next: str | None


def _time(epoch: float) -> dt.datetime:
    """The outbox's times are seconds since the epoch."""
    return dt.datetime.fromtimestamp(epoch, dt.UTC)


__all__ = ["Callback", "CallbackPage"]
