"""What the operations page reads: jobs, one job's deliveries, the service's state.

Everything goes through the dispatcher's public API, as the key's `Viewer` (a key sees the jobs it
created, an admin key every job): the listing, a job's status, failures and deliveries. What the
API does not give (receipt counts for a page of jobs, the users a running job selected, delivery
times for the chart) is read from the ledger's collections through the store's client, on the
ledger's indexes, one round trip per panel, off the event loop, only for jobs the API showed.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import trio
from pymongo.errors import PyMongoError

from ..callback_views import Callback
from ..errors import NotFound, StoreError
from ..job_views import JobStatus, ReceiptCounts
from ..ledger import FINAL_STATES
from ..listing import JobQuery, Viewer
from ..states import RECEIPT_STATES
from ..wire import callback_json, callback_page_json, job_json, summary_json
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


def job_row(job: JobStatus, total: int | None) -> JobRow:
    """A job as the dispatcher answers it (`Dispatcher.status`, `Dispatcher.jobs`) as the page
    draws it. `total`: the users its request selected, when known (see `progress.selected_users`)."""
    bars = channel_progress(summary_json(job), job.channels, total, job.state in FINAL_STATES)
    return JobRow(
        id=job.id,
        state=job.state,
        created_at=job.created_at,
        finished_at=job.finished_at,
        request_id=job.request_id,
        channels=job.channels,
        bars=tuple(bars),
    )


def _request_of(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    """The job's request, or the parts of it a projection kept. nx-27017 (0.8) answers a projection
    on `request.recipients` with a flat `"request.recipients"` key where MongoDB nests it: read both."""
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

    async def jobs(self, query: JobQuery, viewer: Viewer) -> tuple[list[JobRow], str | None]:
        """One page of the jobs `viewer` may see (the API's listing), newest first, with the
        receipts' counts (one aggregation for the page) and the totals of the running ones."""
        page = await self.dispatcher.jobs(query, viewer)
        receipts = await self._receipt_counts([job.id for job in page.jobs])
        totals = await self._totals([job.id for job in page.jobs if job.state not in FINAL_STATES])
        rows = []
        for job in page.jobs:
            counted = receipts.get(job.id)
            if counted is not None:
                job = dataclasses.replace(job, receipts=ReceiptCounts.from_counts(counted))
            rows.append(job_row(job, totals.get(job.id)))
        return rows, page.next

    async def _totals(self, job_ids: list[str]) -> dict[str, int | None]:
        """The users each job's request selected, where it says (a finished job needs none: what
        it counted is its total)."""
        if not job_ids:
            return {}
        projection = {"request.recipients": 1, "request.clusters": 1}
        docs = await self._run("job lookup", lambda: list(self._jobs.find({"_id": {"$in": job_ids}}, projection)))
        return {doc["_id"]: selected_users(_request_of(doc)) for doc in docs}

    async def _receipt_counts(self, job_ids: list[str]) -> dict[str, dict[str, dict[str, int]]]:
        """What receipts took past `sent`, per job, state and channel: for a whole page of jobs in
        one aggregation (the listing's summaries do not hold them: receipts arrive after a job ends)."""
        if not job_ids:
            return {}
        pipeline: list[dict[str, Any]] = [
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

    async def job(self, job_id: str, viewer: Viewer) -> tuple[dict[str, Any], JobRow]:
        """The job's status (the API's body: live counts when this process runs it) and its row;
        `NotFound` for a job `viewer` may not see."""
        status = await self.dispatcher.status(job_id, viewer)
        totals = await self._totals([job_id])
        return job_json(status), job_row(status, totals.get(job_id))

    async def progress(self, job_ids: list[str], viewer: Viewer) -> list[JobRow]:
        """Live rows of these jobs; those `viewer` may not see, or unknown, are left out."""
        statuses = []
        for job_id in dict.fromkeys(job_ids):
            try:
                statuses.append(await self.dispatcher.status(job_id, viewer))
            except NotFound:
                continue
        totals = await self._totals([s.id for s in statuses if s.state not in FINAL_STATES])
        return [job_row(status, totals.get(status.id)) for status in statuses]

    async def job_callbacks(self, job_id: str, limit: int = 50) -> list[dict[str, Any]] | None:
        """The callbacks of a job the page showed (as `GET /callbacks` shows them: type, state,
        events, attempts, next attempt, last error), oldest first; None without callbacks."""
        callbacks = getattr(self.dispatcher, "callbacks", None)
        if callbacks is None:
            return None
        outbox = self.dispatcher.store.client[self.dispatcher.settings.store.database][
            self.dispatcher.settings.store.callbacks_collection
        ]
        query = {"job": {"$eq": job_id}, "role": {"$eq": "message"}}
        docs = await self._run(
            "callback lookup",
            lambda: list(outbox.find(query, {"events": 0, "data": 0, "body": 0}).sort("created", 1).limit(limit)),
        )
        return [callback_json(Callback.from_doc(doc)) for doc in docs]

    async def dead_callbacks(self, viewer: Viewer, cursor: str | None, limit: int = 20) -> dict[str, Any] | None:
        """One page of the dead callbacks `viewer` may see (`GET /callbacks?state=dead`), and the
        outbox's depth for a viewer who sees everything; None without callbacks."""
        callbacks = getattr(self.dispatcher, "callbacks", None)
        if callbacks is None:
            return None
        page = callback_page_json(await self.dispatcher.list_callbacks("dead", viewer, limit, cursor))
        depth = await callbacks.outbox.depth() if viewer.key_id is None else None
        return {**page, "pending": depth[0] if depth else None, "dead": depth[1] if depth else None}

    async def delivery_times(self, job_id: str, limit: int = 200_000) -> list[tuple[float | None, str]]:
        """(epoch seconds, state) of each settled delivery of a job that the ledger timed (None
        for a time it cannot read)."""
        query = {"job": job_id, _TIME_FIELD: {"$exists": True}}

        def find() -> list[tuple[float | None, str]]:
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
                    "destinations_paused": _destinations_paused(gate),
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


def _destinations_paused(gate: Any) -> int:
    """How many single destinations or senders a provider's 429 holds back now (never which:
    they are phone numbers and addresses)."""
    paused = getattr(gate, "_paused", None)
    if not isinstance(paused, dict):
        return 0
    now = trio.current_time()
    return sum(1 for deadline in paused.values() if deadline > now)


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
