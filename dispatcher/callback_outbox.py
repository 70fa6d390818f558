"""The callbacks outbox: the collection `dispatch_callbacks`, from which every process delivers.

Events are written in the ledger's group commit (`Ledger.attach_outbox`), so what caused them and
the events themselves reach the store together, not in a separate step a crash could skip:

- `job.finished`: one document, written in the same store round trip as the job's final state,
  before it; its id is derived from the job's (`<job>.finished`), so a job resumed after a crash
  between the two writes writes the same document again and the duplicate is refused.
- `delivery.updated`: every delivery state change of a job that asked for them (outcomes, those of
  reconciliations included, before their delivery writes; receipts and receipt timeouts right
  after theirs), as
  *chunks*: one document per job per group commit, with at most `batch_size` events. A chunk
  is not a callback yet: `form_batches` joins the chunks of one job, oldest first, into one
  message of at most `batch_size` events once it is full or its oldest event waited `batch_ms`
  (the message is its first chunk; the others become its members, pointing to it with `head`; a
  chunk that would overflow it is split). So a 10,000-user campaign makes 10,000 / batch_size
  POSTs for its deliveries.

A message (`role: "message"`) is `pending` until a POST of it succeeds (`delivered`) or it is
given up (`dead`, with the last error). Processes claim due messages with a lease (compare and
set on `lease_expires`), so two processes never POST one message at once, and a message whose
process died is claimed again when its lease expires. Its id is the `webhook-id` of every try:
receivers drop duplicates by it. Times are epoch seconds; `seq` orders listings newest first as
the job listing does.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pymongo
import trio
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from .errors import StoreError
from .listing import encode_cursor, iso_ms, seq_of

JOB_FINISHED = "job.finished"
DELIVERY_UPDATED = "delivery.updated"
EVENTS = (JOB_FINISHED, DELIVERY_UPDATED)
DEFAULT_EVENTS = (JOB_FINISHED,)
CALLBACK_STATES = ("pending", "delivered", "dead")
# Delivery states that are steps of one attempt, not news for a client.
_TRANSIENT_STATES = frozenset({"sending", "retrying"})
_DUPLICATE_KEY = 11000


@dataclass(frozen=True, slots=True)
class Target:
    """Where a job's callbacks go and which events it wants (stored on the job as `callback`)."""

    url: str
    events: tuple[str, ...]

    def to_doc(self) -> dict[str, Any]:
        return {"url": self.url, "events": list(self.events)}

    @classmethod
    def from_doc(cls, doc: Mapping[str, Any] | None) -> Target | None:
        if not doc or not doc.get("url"):
            return None
        return cls(doc["url"], tuple(doc.get("events") or DEFAULT_EVENTS))


def host_of(url: str) -> str:
    """What `[callbacks].per_host_concurrency` counts by: scheme, host and port."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or ''}"


def shown_url(url: str) -> str:
    """A callback URL without its query and fragment, which may hold a client's token."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


class CallbackOutbox:
    def __init__(
        self,
        client: pymongo.MongoClient[dict[str, Any]],
        database: str,
        collection: str,
        jobs_collection: str,
        *,
        batch_size: int,
        batch_ms: float,
        max_age_hours: float,
        retention_days: float,
    ) -> None:
        db = client[database]
        self._outbox = db[collection]
        self._jobs = db[jobs_collection]
        self.batch_size = batch_size
        self.batch_seconds = batch_ms / 1000
        self.max_age = max_age_hours * 3600
        self._retention = dt.timedelta(days=retention_days)
        # Each job's target, as its document says (None: no delivery.updated wanted). Filled for
        # running jobs by `track`, for the others on first use; bounded.
        self._targets: dict[str, Target | None] = {}
        self._owners: dict[str, tuple[str | None, str | None]] = {}  # job: (key id, request id)

    async def _run(self, what: str, fn: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn)
        except PyMongoError as exc:
            raise StoreError(f"callback outbox {what} failed: {exc}") from exc

    def ensure_indexes(self) -> None:
        """In a worker thread, with the ledger's."""
        self._outbox.create_index([("role", 1), ("state", 1), ("next_at", 1)])
        # Equalities are written `$eq` below: the embedded store answers those from its indexes
        # (a bare value, or null, makes it decode every document: 10,000 events per poll).
        self._outbox.create_index([("role", 1), ("seq", 1)])
        self._outbox.create_index([("head", 1)])
        self._outbox.create_index([("state", 1), ("seq", -1)])
        self._outbox.create_index([("job", 1), ("role", 1)])  # a send's callbacks (the operations page)
        self._outbox.create_index("expires_at", expireAfterSeconds=0)

    def track(self, job_id: str, target: Target | None, key_id: str | None, request_id: str | None) -> None:
        """What the chunks of `job_id` need, known to the process running it (no lookup)."""
        if len(self._targets) > 10_000:
            self._targets.clear()
            self._owners.clear()
        self._targets[job_id] = target
        self._owners[job_id] = (key_id, request_id)

    # -- writing events (in the ledger's worker thread) -------------------------------------------

    def stage(self, changes: Iterable[Any]) -> None:
        """Write the `delivery.updated` chunks of these state changes (`ledger.StateChange`s) for
        the jobs that asked for them. Raises `PyMongoError` (the ledger fails the writes that
        caused them)."""
        by_job: dict[str, list[dict[str, Any]]] = {}
        now = time.time()
        for change in changes:
            if change.state in _TRANSIENT_STATES:
                continue
            event = {"userId": change.user, "channel": change.channel, "state": change.state, "at": iso_ms_at(now)}
            if change.error:
                event["error"] = change.error
            if change.provider_id:
                event["providerId"] = change.provider_id
            by_job.setdefault(change.job, []).append(event)
        if not by_job:
            return
        self._load_targets([job for job in by_job if job not in self._targets])
        docs = []
        for job, events in by_job.items():
            target = self._targets.get(job)
            if target is None or DELIVERY_UPDATED not in target.events:
                continue
            for start in range(0, len(events), self.batch_size):
                docs.append(self._chunk(job, target, events[start : start + self.batch_size], now))
        if docs:
            self._outbox.insert_many(docs, ordered=False)

    def _load_targets(self, jobs: list[str]) -> None:
        if not jobs:
            return
        found = {
            doc["_id"]: doc
            for doc in self._jobs.find({"_id": {"$in": jobs}}, {"callback": 1, "key_id": 1, "request_id": 1})
        }
        for job in jobs:
            doc = found.get(job) or {}
            self.track(job, Target.from_doc(doc.get("callback")), doc.get("key_id"), doc.get("request_id"))

    def _chunk(self, job: str, target: Target, events: list[dict[str, Any]], now: float) -> dict[str, Any]:
        chunk_id = uuid.uuid4().hex
        key_id, request_id = self._owners.get(job, (None, None))
        return {
            "_id": chunk_id,
            "role": "chunk",
            "head": None,
            "type": DELIVERY_UPDATED,
            "job": job,
            "key_id": key_id,
            "request_id": request_id,
            "url": target.url,
            "events": events,
            "count": len(events),
            "created": now,
            "seq": seq_of(iso_ms_at(now), chunk_id),
            "state": "pending",
            "attempts": 0,
            "expires_at": self._expires(now),
        }

    def job_finished(
        self, job_id: str, target: Target, data: dict[str, Any], key_id: str | None, request_id: str | None
    ) -> dict[str, Any]:
        """The `job.finished` message of a job (inserted by the ledger with the job's final state)."""
        now = time.time()
        message_id = f"{job_id}.finished"
        return {
            "_id": message_id,
            "role": "message",
            "head": message_id,
            "type": JOB_FINISHED,
            "job": job_id,
            "key_id": key_id,
            "request_id": request_id,
            "url": target.url,
            "data": data,
            "count": 1,
            "created": now,
            "seq": seq_of(iso_ms_at(now), message_id),
            "state": "pending",
            "attempts": 0,
            "next_at": now,
            "lease_expires": 0.0,
            "expires_at": self._expires(now),
        }

    def insert_messages(self, docs: Sequence[dict[str, Any]]) -> None:
        """Insert `job.finished` messages; one already there (a resumed job) is left as it is."""
        if not docs:
            return
        try:
            self._outbox.insert_many(list(docs), ordered=False)
        except BulkWriteError as exc:
            if any(error.get("code") != _DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                raise

    def _expires(self, now: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(seconds=self.max_age) + self._retention

    # -- forming and claiming messages --------------------------------------------------------------

    async def form_batches(self, now: float) -> int:
        """Join waiting chunks into messages (see the module); return how many were formed."""

        def form() -> int:
            chunks = list(
                self._outbox.find(
                    {"role": {"$eq": "chunk"}},
                    {"_id": 1, "job": 1, "count": 1, "created": 1, "seq": 1},
                )
                .sort("seq", 1)
                .limit(20_000)
            )
            by_job: dict[str, list[dict[str, Any]]] = {}
            for chunk in chunks:
                by_job.setdefault(chunk["job"], []).append(chunk)
            formed = 0
            for job_chunks in by_job.values():
                batch: list[dict[str, Any]] = []
                size = 0
                for chunk in job_chunks:
                    room = self.batch_size - size
                    if chunk["count"] > room:
                        # Fill the message to the brim (POSTs = events / batch_size): the chunk's
                        # first events close it, the rest opens the next.
                        head, chunk = self._split(chunk, room)
                        batch.append(head)
                        formed += self._form(batch, now)
                        batch, size = [], 0
                    batch.append(chunk)
                    size += chunk["count"]
                    if size == self.batch_size:
                        formed += self._form(batch, now)
                        batch, size = [], 0
                if batch and (size >= self.batch_size or batch[0]["created"] <= now - self.batch_seconds):
                    formed += self._form(batch, now)
            return formed

        return await self._run("batching", form)

    def _split(self, chunk: dict[str, Any], keep: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Cut a chunk after its first `keep` (> 0) events: the rest becomes a chunk of its own,
        sorted right after it. The rest is written first: a crash between the two writes repeats
        events (at least once), it never loses them."""
        doc = self._outbox.find_one({"_id": chunk["_id"]})
        assert doc is not None
        events = doc["events"]
        rest = {**doc, "_id": f"{doc['_id']}+{keep}", "events": events[keep:], "count": len(events) - keep}
        rest["seq"] = doc["seq"] + "+"
        try:
            self._outbox.insert_one(rest)
        except DuplicateKeyError:
            pass
        self._outbox.update_one({"_id": doc["_id"]}, {"$set": {"events": events[:keep], "count": keep}})
        return {**chunk, "count": keep}, {**chunk, "_id": rest["_id"], "count": rest["count"], "seq": rest["seq"]}

    def _form(self, batch: list[dict[str, Any]], now: float) -> int:
        head = batch[0]["_id"]
        others = [chunk["_id"] for chunk in batch[1:]]
        # The others first, then the head: once the head is a message (and may be sent), nothing
        # joins it any more, so every try of it carries the same events.
        if others:
            self._outbox.update_many(
                {"_id": {"$in": others}, "role": "chunk"}, {"$set": {"head": head, "role": "member"}}
            )
        result = self._outbox.update_one(
            {"_id": head, "role": "chunk"},
            {"$set": {"role": "message", "head": head, "next_at": now, "lease_expires": 0.0}},
        )
        return result.modified_count

    async def claim_due(self, owner: str, now: float, lease: float, accept: Any, limit: int) -> list[dict[str, Any]]:
        """Claim up to `limit` due messages that `accept(doc)` takes (it says no for a host at
        its concurrency bound), each with its events."""

        def claim() -> list[dict[str, Any]]:
            due = list(
                self._outbox.find(
                    {
                        "role": {"$eq": "message"},
                        "state": {"$eq": "pending"},
                        "next_at": {"$lte": now},
                        "lease_expires": {"$lt": now},
                    },
                    {"events": 0, "data": 0},
                )
                .sort("next_at", 1)
                .limit(limit * 4)
            )
            claimed: list[dict[str, Any]] = []
            for doc in due:
                if len(claimed) >= limit or not accept(doc):
                    continue
                won = self._outbox.find_one_and_update(
                    {"_id": doc["_id"], "state": "pending", "lease_expires": doc["lease_expires"]},
                    {"$set": {"lease_owner": owner, "lease_expires": now + lease}},
                    return_document=ReturnDocument.AFTER,
                )
                if won is None:
                    continue
                if won["type"] == DELIVERY_UPDATED:
                    members = self._outbox.find({"head": {"$eq": won["_id"]}}, {"events": 1, "seq": 1}).sort("seq", 1)
                    won["events"] = [event for member in members for event in member.get("events") or ()]
                claimed.append(won)
            return claimed

        return await self._run("claim", claim)

    async def settle(self, message: Mapping[str, Any], **fields: Any) -> None:
        """Record a try's outcome; `state="delivered"` settles the chunks of the message too."""
        fields.setdefault("lease_expires", 0.0)

        def write() -> None:
            if fields.get("state") == "delivered":
                self._outbox.update_many({"head": {"$eq": message["_id"]}}, {"$set": {"state": "delivered"}})
            self._outbox.update_one({"_id": message["_id"]}, {"$set": fields})

        await self._run("settle", write)

    # -- the API -----------------------------------------------------------------------------------

    async def page(
        self, state: str, key_id: str | None, limit: int, cursor: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Messages in `state`, newest first (`key_id` None: everyone's)."""
        query: dict[str, Any] = {"role": {"$eq": "message"}, "state": {"$eq": state}}
        if key_id is not None:
            query["key_id"] = {"$eq": key_id}
        if cursor is not None:
            query["seq"] = {"$lt": cursor}

        def find() -> list[dict[str, Any]]:
            return list(self._outbox.find(query, {"events": 0, "data": 0}).sort("seq", -1).limit(limit + 1))

        docs = await self._run("listing", find)
        more = len(docs) > limit
        docs = docs[:limit]
        return docs, encode_cursor(docs[-1]["seq"]) if more and docs else None

    async def message(self, message_id: str) -> dict[str, Any] | None:
        return await self._run(
            "lookup",
            lambda: self._outbox.find_one({"_id": message_id, "role": "message"}, {"events": 0, "data": 0}),
        )

    async def retry(self, message_id: str, now: float) -> dict[str, Any] | None:
        """A dead message becomes pending again, due now, with a fresh age and tries."""

        def revive() -> dict[str, Any] | None:
            return self._outbox.find_one_and_update(
                {"_id": message_id, "role": "message", "state": "dead"},
                {
                    "$set": {
                        "state": "pending",
                        "next_at": now,
                        "created": now,
                        "attempts": 0,
                        "lease_expires": 0.0,
                        "expires_at": self._expires(now),
                    }
                },
                projection={"events": 0, "data": 0},
                return_document=ReturnDocument.AFTER,
            )

        try:
            return await self._run("retry", revive)
        except DuplicateKeyError:  # pragma: no cover - find_one_and_update never inserts here
            return None

    async def depth(self) -> tuple[int, int]:
        """(pending messages and chunks, dead messages): the outbox's gauges."""

        def count() -> tuple[int, int]:
            return (
                self._outbox.count_documents({"state": {"$eq": "pending"}}),
                self._outbox.count_documents({"state": {"$eq": "dead"}}),
            )

        return await self._run("count", count)


def iso_ms_at(epoch: float) -> str:
    return iso_ms(dt.datetime.fromtimestamp(epoch, dt.UTC))


def message_json(doc: Mapping[str, Any]) -> dict[str, Any]:
    """A callback as `GET /callbacks` shows it (no events, no secrets, no query string)."""
    return {
        "id": doc["_id"],
        "type": doc["type"],
        "jobId": doc.get("job"),
        "requestId": doc.get("request_id"),
        "url": shown_url(doc.get("url") or ""),
        "state": doc["state"],
        "events": doc.get("count", 1),
        "attempts": doc.get("attempts", 0),
        "createdAt": iso_ms_at(doc["created"]),
        "nextAttemptAt": iso_ms_at(doc["next_at"]) if doc.get("next_at") and doc["state"] == "pending" else None,
        "lastError": doc.get("last_error"),
    }


__all__ = [
    "CALLBACK_STATES",
    "DEFAULT_EVENTS",
    "DELIVERY_UPDATED",
    "EVENTS",
    "JOB_FINISHED",
    "CallbackOutbox",
    "Target",
    "host_of",
    "message_json",
    "shown_url",
]
