"""What the operations page reads: jobs, one job's deliveries, the service's state.

Everything goes through the dispatcher's public API where it has one (a job's status, failures,
cancel); the rest reads the ledger's collections through the store's client, with the indexes the
ledger creates, one round trip per panel, off the event loop.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from pymongo.errors import PyMongoError

from ..errors import RequestError, StoreError
from ..ledger import FINAL_STATES
from ..states import RECEIPT_STATES
from .progress import ChannelProgress, channel_progress, selected_users

if TYPE_CHECKING:
    from pymongo.collection import Collection

    from ..core import Dispatcher


@dataclass(frozen=True, slots=True)
class JobRow:
    id: str
    state: str
    created_at: str | None
    finished_at: str | None
    request_id: str | None
    channels: tuple[str, ...]
    bars: tuple[ChannelProgress, ...]

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def job_row(doc: Mapping[str, Any], summary: Mapping[str, Any] | None = None) -> JobRow:
    """A job document as the page shows it; `summary` overrides the stored one (live counts)."""
    request = _request_of(doc)
    channels = tuple(request.get("channels") or ())
    final = doc.get("state") in FINAL_STATES
    counts = summary if summary is not None else (doc.get("summary") or {})
    bars = channel_progress(counts, channels, selected_users(request), final)
    return JobRow(
        id=doc["_id"],
        state=doc.get("state", "?"),
        created_at=doc.get("created_at"),
        finished_at=doc.get("finished_at"),
        request_id=doc.get("request_id"),
        channels=channels,
        bars=tuple(bars),
    )


def _request_of(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The job's request, or the parts of it a projection kept. nx-27017 (0.8) answers a projection
    on `request.channels` with a flat `"request.channels"` key where MongoDB nests it: read both."""
    request = dict(doc.get("request") or {})
    for key, value in doc.items():
        if key.startswith("request."):
            request[key.removeprefix("request.")] = value
    return request


class Queries:
    def __init__(self, dispatcher: Dispatcher) -> None:
        self.dispatcher = dispatcher
        settings = dispatcher.settings.store
        db = dispatcher.store.client[settings.database]
        self._jobs: Collection[dict[str, Any]] = db[settings.jobs_collection]
        self._deliveries: Collection[dict[str, Any]] = db[settings.deliveries_collection]

    async def _run(self, what: str, fn: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn)
        except PyMongoError as exc:
            raise StoreError(f"{what} failed: {exc}") from exc

    @property
    def recorded(self) -> bool:
        return self.dispatcher.ledger is not None

    async def jobs(
        self, state: str | None, channel: str | None, cursor: str | None, limit: int
    ) -> tuple[list[JobRow], str | None]:
        """One page of jobs, newest first; the cursor continues after the page's last job."""
        query: dict[str, Any] = {}
        if state:
            query["state"] = state
        if channel:
            query["request.channels"] = channel
        # Provisional, until the job listing of issue #19 lands: an offset (the embedded store
        # cannot compare ISO time strings, neosqlite takes them for dates), so a page shifts by
        # the jobs created since the previous one.
        try:
            skip = max(0, int(cursor or 0))
        except ValueError:
            raise RequestError("cursor: not one this page gave") from None
        projection = {"request.channels": 1, "request.recipients": 1, "request.clusters": 1, "state": 1}
        projection |= {"created_at": 1, "finished_at": 1, "summary": 1, "request_id": 1}

        def find() -> list[dict[str, Any]]:
            found = self._jobs.find(query, projection).sort([("created_at", -1), ("_id", -1)])
            return list(found.skip(skip).limit(limit + 1))

        docs = await self._run("job listing", find)
        more = len(docs) > limit
        docs = docs[:limit]
        receipts = await self._receipt_counts([doc["_id"] for doc in docs])
        rows = [job_row(doc, {**(doc.get("summary") or {}), **receipts.get(doc["_id"], {})}) for doc in docs]
        return rows, str(skip + limit) if more else None

    async def _receipt_counts(self, job_ids: list[str]) -> dict[str, dict[str, dict[str, int]]]:
        """What receipts took past `sent`, per job, state and channel: for a whole page of jobs in
        one aggregation (the job's summary does not hold them: receipts arrive after it ends)."""
        if not job_ids:
            return {}
        pipeline = [
            {"$match": {"job": {"$in": job_ids}, "state": {"$in": list(RECEIPT_STATES)}}},
            {"$project": {"key": {"$concat": ["$job", "|", "$channel", "|", "$state"]}}},
            {"$group": {"_id": "$key", "n": {"$sum": 1}}},
        ]
        groups = await self._run("receipt counts", lambda: list(self._deliveries.aggregate(pipeline)))
        counts: dict[str, dict[str, dict[str, int]]] = {}
        for group in groups:
            job_id, channel, state = (group["_id"] or "||").split("|", 2)
            counts.setdefault(job_id, {state: {} for state in RECEIPT_STATES})[state][channel] = group["n"]
        return counts

    async def job(self, job_id: str) -> tuple[dict[str, Any], JobRow]:
        """The job's status (the API's body, live counts when this process runs it) and its row."""
        status = await self.dispatcher.status(job_id)
        doc = await self._run("job lookup", lambda: self._jobs.find_one({"_id": job_id}))
        return status, job_row(doc or {"_id": job_id}, status["summary"])

    async def progress(self, job_ids: list[str]) -> list[JobRow]:
        """Live rows of these jobs (unknown ids are left out)."""
        docs = await self._run("job lookup", lambda: list(self._jobs.find({"_id": {"$in": job_ids}})))
        rows = []
        for doc in docs:
            summary = None
            if doc.get("state") not in FINAL_STATES:
                summary = (await self.dispatcher.status(doc["_id"]))["summary"]
            rows.append(job_row(doc, summary))
        order = {job_id: i for i, job_id in enumerate(job_ids)}
        return sorted(rows, key=lambda row: order[row.id])

    async def delivery_times(self, job_id: str, limit: int = 200_000) -> list[tuple[float, str]]:
        """(epoch seconds, state) of each settled delivery of a job that the ledger timed."""
        query = {"job": job_id, _TIME_FIELD: {"$exists": True}}

        def find() -> list[tuple[float, str]]:
            found = self._deliveries.find(query, {_TIME_FIELD: 1, "state": 1, "_id": 0}).limit(limit)
            return [(_epoch(doc.get(_TIME_FIELD)), doc.get("state", "?")) for doc in found]

        return await self._run("delivery times", find)

    async def service(self) -> dict[str, Any]:
        """Channels and their limits, pauses now, the store and Redis."""
        d = self.dispatcher
        settings = d.settings
        channels = []
        for channel, transport in d.transports.items():
            cs = settings.channels[channel]
            gate = transport.gate
            channels.append(
                {
                    "name": channel,
                    "provider": cs.provider,
                    "concurrency": cs.concurrency,
                    "in_flight": gate.limiter.borrowed_tokens,
                    "rate": cs.rate_per_second,
                    "burst": cs.burst,
                    "paused_for": _paused_for(gate.bucket),
                    "on_ambiguous": d.on_ambiguous.get(channel),
                }
            )
        checks = await d.readiness()
        url = settings.store.url.get_secret_value()
        store = {
            "ok": checks.get("store", False),
            "where": _server_of(url) if url else f"embedded (nx-27017), data in {settings.store.data_dir}",
            "database": settings.store.database,
            "ledger": d.ledger is not None,
        }
        redis = None
        if d.cluster is not None:
            redis = {
                "ok": checks.get("redis", False),
                "where": _server_of(settings.cluster.redis_url.get_secret_value()),
                "namespace": settings.cluster.namespace,
                "round_trips": getattr(d.cluster, "round_trips", None),
            }
        return {"channels": channels, "store": store, "redis": redis, "in_flight": d.in_flight, "owner": d.owner}


# When a delivery settled, as the ledger records it.
_TIME_FIELD = "settled_at"


def _epoch(value: Any) -> float | None:
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=value.tzinfo or dt.UTC).timestamp()
    return parse_time(value) if isinstance(value, str) else None


def _paused_for(bucket: Any) -> float:
    """Seconds a provider's 429 still pauses the channel (0 when not paused). The buckets keep the
    deadline on trio's clock; a bucket that keeps none is never shown paused."""
    deadline = getattr(bucket, "_paused_until", None)
    if not isinstance(deadline, float):
        return 0.0
    return max(0.0, deadline - trio.current_time())


def _server_of(url: str) -> str:
    """Scheme, host and port of a URL: never its credentials or options."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    return f"{parts.scheme}://{host}" + (f":{parts.port}" if parts.port else "")


def parse_time(value: str | None) -> float | None:
    """An ISO time the ledger wrote, as epoch seconds."""
    if not value:
        return None
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def age(value: str | None, now: float | None = None) -> str:
    """How long ago, for a person: "12 s", "3 min", "2 h 05 min", "4 d"."""
    then = parse_time(value)
    if then is None:
        return "?"
    seconds = max(0, int((now if now is not None else time.time()) - then))
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    if seconds < 172800:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    return f"{seconds // 86400} d"


__all__ = ["JobRow", "Queries", "age", "job_row", "parse_time"]
