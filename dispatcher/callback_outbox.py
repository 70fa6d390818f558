"""The callbacks outbox: the collection `dispatch_callbacks`, from which every process delivers.

- `job.finished`: one message, written in the same store round trip as the job's final state,
  before it; its id is derived from the job's (`<job>.finished`), so a job resumed after a crash
  between the two writes writes the same document again and the duplicate is refused.
- `delivery.updated`: no document per event. The delivery document *is* the event: every write
  that moves a delivery to a state a client hears of sets a fresh *stamp* on it, in the same
  write — an outcome (a reconciled one too) in `ev`, a receipt or a receipt timeout in `evr`. A
  delivery written is therefore its event made durable, with no second write a crash could skip
  and no extra store command in the group commit. Two fields, so that a receipt landing before
  the outcome's stamp was read does not hide the outcome (`sent`, then `delivered`, are two
  events). Outcomes are stamped only for jobs that asked for `delivery.updated`
  (`wants_updates`); receipts and timeouts always (their job is known only once written; the
  reader drops those nobody asked for).

A stamp is `<prefix>|<16-digit microseconds>|<delivery>`: `prefix` is this process's, and the
number grows with every group of writes (`_Stamps`), so one process's stamps, in both fields,
sort in the order it made them. Each process pages through its own stamps with a cursor (`role: "cursor"`, one
document per prefix, `collect`), never past the oldest write it still has in flight (`horizon`):
a write that lands late cannot fall behind the cursor. What it reads it turns into *messages* of
at most `batch_size` events of one job, in stamp order, once `batch_size` are waiting or the
oldest waited `batch_ms`: 10,000 deliveries make 10,000 / batch_size POSTs. The cursor's document
is written after the messages, with the last stamp of each job already in a message beyond it
(`formed`): a crash between the two writes reads the same deliveries again and forms the same
messages, whose ids (from their first and last stamps) the store then refuses as duplicates; a
message that grew meanwhile gets a new id (its events arrive twice: at least once, never lost).

A process holds its cursor with a lease (`[store].lease_seconds`), renewed every round; a cursor
whose lease expired (its process died, or stopped: it lets go at exit) is adopted by any process,
which reads it to the end and removes it. Two receipts of one delivery whose first stamp was not
read yet (`unconfirmed`, then a late `delivered`) are one event, in the later state (a field
holds one stamp). A process stalled for longer than its lease while a write was in
flight loses its cursor; that write's event can be lost if it lands after the adopter emptied and
removed the cursor.

A message (`role: "message"`) is `pending` until a POST of it succeeds (`delivered`) or it is
given up (`dead`, with the last error). Processes claim due messages with a lease (compare and
set on `lease_expires`), so two processes never POST one message at once, and a message whose
process died is claimed again when its lease expires. Its id is the `webhook-id` of every try:
receivers drop duplicates by it. Times are epoch seconds; `seq` orders listings newest first as
the job listing does.

Queries are equalities written `$eq` and ranges on one indexed field: the embedded store answers
those from its indexes (a bare value, `null`, `$in` or `$or` makes it decode every document).
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import pymongo
import trio
from pymongo import ReturnDocument
from pymongo.errors import BulkWriteError, DuplicateKeyError, PyMongoError

from .errors import StoreError
from .listing import encode_cursor, iso_ms, seq_of
from .states import RECEIPT_STATES

JOB_FINISHED = "job.finished"
DELIVERY_UPDATED = "delivery.updated"
EVENTS = (JOB_FINISHED, DELIVERY_UPDATED)
DEFAULT_EVENTS = (JOB_FINISHED,)
CALLBACK_STATES = ("pending", "delivered", "dead")
# Delivery states that are steps of one attempt, not news for a client.
_TRANSIENT_STATES = frozenset({"sending", "retrying"})
_DUPLICATE_KEY = 11000
# What an event says of its delivery.
_EVENT_FIELDS = {"job": 1, "user": 1, "channel": 1, "state": 1, "error": 1, "provider_id": 1, "ev": 1, "evr": 1}
# Events kept in memory for the cursor at most (about 2 MB); beyond, the store is read again.
_LANDED_MAX = 20_000
log = logging.getLogger(__name__)


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


class _Stamps:
    """This process's stamps, which of them are still on their way to the store, and the events
    of those known to have landed whole (thread-safe: taken and returned in the store's worker
    threads)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._lock = threading.Lock()
        self._last = 0
        self._flying: dict[int, int] = {}
        # (stamp, event) of writes that landed whole, not yet behind the cursor: the events the
        # store would give back for them, without reading them back. Stamps numbered below
        # `_unsure_below` were not all seen land (a receipt, a write that matched less than it
        # carried, an overflow): the store is read for them.
        self._landed: list[tuple[str, dict[str, Any]]] = []
        self._unsure_below = 0
        self._told: set[int] = set()  # stamps in flight whose landing was told (`landed`)

    def take(self) -> str:
        with self._lock:
            number = max(self._last + 1, time.time_ns() // 1000)
            self._last = number
            self._flying[number] = self._flying.get(number, 0) + 1
        return f"{self.prefix}|{number:016d}"

    def done(self, stamp: str) -> None:
        number = _stamp_number(stamp)
        with self._lock:
            left = self._flying.pop(number, 1) - 1
            if left:
                self._flying[number] = left
            if number in self._told:
                self._told.remove(number)
            else:  # its writer did not say what landed (receipts, timeouts): the store knows
                self._unsure_below = max(self._unsure_below, number + 1)

    def landed(self, stamp: str, events: list[tuple[str, dict[str, Any]]] | None) -> None:
        """The writes of `stamp` landed, with these events (None: which of them landed is not
        known). Called before `done(stamp)`, so a reader cannot pass the stamp without them."""
        number = _stamp_number(stamp)
        with self._lock:
            if events is not None:
                self._told.add(number)
            if number < self._unsure_below:
                return
            if events is None:
                self._unsure_below = number + 1
            elif len(self._landed) + len(events) > _LANDED_MAX:
                # A cursor not moving (the outbox unreachable): the store keeps them.
                self._landed.clear()
                self._unsure_below = self._last + 1
            else:
                self._landed.extend(events)

    def landed_between(self, at: str, high: str) -> list[tuple[str, dict[str, Any]]] | None:
        """The events stamped in (at, high), in stamp order, or None when the store must be read
        for them."""
        with self._lock:
            if _stamp_number(at) < self._unsure_below:
                return None
            found = [item for item in self._landed if at < item[0] < high]
        found.sort(key=lambda item: item[0])
        return found

    def forget(self, through: str) -> None:
        """The cursor is at `through`: events up to it are read."""
        with self._lock:
            self._landed = [item for item in self._landed if item[0] > through]

    def last(self) -> int:
        with self._lock:
            return self._last

    def horizon(self) -> str:
        """Every stamp below this one is written (or failed): a cursor may read up to it."""
        with self._lock:
            low = min(self._flying) if self._flying else self._last + 1
        return f"{self.prefix}|{low:016d}"


def _stamp_number(stamp: str) -> int:
    """The number of a stamp (`prefix|number`, or an event's `prefix|number|delivery`); 0 for a
    cursor at its start (`prefix|`)."""
    return int(stamp.split("|", 2)[1] or 0)


def _stamp_seconds(ev: str) -> float:
    return _stamp_number(ev) / 1e6


@functools.lru_cache(maxsize=4096)
def _stamp_time(number: str) -> str:
    """An event's `at`: its stamp's time (one per group of writes, shared by its events)."""
    return iso_ms_at(int(number) / 1e6)


def _event(ev: str, job: str, user: Any, channel: Any, state: Any, error: Any, provider_id: Any) -> dict[str, Any]:
    """A `delivery.updated` event as its message carries it (plus `job`, dropped there)."""
    event = {"job": job, "userId": user, "channel": channel, "state": state}
    if error:
        event["error"] = error
    event["at"] = _stamp_time(ev.split("|", 2)[1])
    if provider_id:
        event["providerId"] = provider_id
    return event


class Change(Protocol):
    """A delivery's move to `state` as the ledger tells its listeners (ledger.StateChange)."""

    job: str
    user: str
    channel: str
    state: str
    provider_id: str | None
    error: str | None


class CallbackOutbox:
    def __init__(
        self,
        client: pymongo.MongoClient[dict[str, Any]],
        database: str,
        collection: str,
        jobs_collection: str,
        deliveries_collection: str,
        *,
        owner: str,
        lease_seconds: float,
        batch_size: int,
        batch_ms: float,
        max_age_hours: float,
        retention_days: float,
    ) -> None:
        db = client[database]
        self._outbox = db[collection]
        self._jobs = db[jobs_collection]
        self._deliveries = db[deliveries_collection]
        self._owner = owner
        self._cursor_lease = lease_seconds
        self.batch_size = batch_size
        self.batch_seconds = batch_ms / 1000
        self.max_age = max_age_hours * 3600
        self._retention = dt.timedelta(days=retention_days)
        self._page = max(20 * batch_size, 2000)
        # Each job's target, as its document says (None: no callbacks). Filled for running jobs
        # by `track`, for the others on first use; bounded.
        self._targets: dict[str, Target | None] = {}
        self._owners: dict[str, tuple[str | None, str | None]] = {}  # job: (key id, request id)
        self._stamps = _Stamps(self._new_prefix())
        # The cursors this process reads: its own (by its prefix, None until written) and those
        # it adopted, as last written.
        self._cursors: dict[str, dict[str, Any] | None] = {}
        # Own prefix: every stamp below this number was read, and nothing was left waiting. A
        # round with no stamp taken since reads nothing (a `find` on the deliveries is a store
        # round trip the fan-out's writes queue behind).
        self._read_through: dict[str, int] = {}
        # One collection at a time: the delivery loop's and the one `release` makes at exit would
        # both create or drop the same cursors (a duplicate cursor document, a cursor read after
        # it was dropped).
        self._collecting = trio.Lock()

    async def _run(self, what: str, fn: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(fn)
        except PyMongoError as exc:
            raise StoreError(f"callback outbox {what} failed: {exc}") from exc

    def _new_prefix(self) -> str:
        return f"{self._owner}#{uuid.uuid4().hex[:6]}"

    def ensure_indexes(self, *, ttl: bool = True) -> None:
        """In a worker thread, with the ledger's (which drops the TTL index where `ttl` is off and
        purges on a timer instead)."""
        self._outbox.create_index([("role", 1), ("state", 1), ("next_at", 1)])
        self._outbox.create_index([("role", 1), ("lease_expires", 1)])  # cursors to adopt
        self._outbox.create_index([("state", 1), ("seq", -1)])
        self._outbox.create_index([("job", 1), ("role", 1)])  # a send's callbacks (the operations page)
        if ttl:
            self._outbox.create_index("expires_at", expireAfterSeconds=0)
        self._deliveries.create_index("ev")
        self._deliveries.create_index("evr")

    def track(self, job_id: str, target: Target | None, key_id: str | None, request_id: str | None) -> None:
        """What the events of `job_id` need, known to the process running it (no lookup)."""
        if len(self._targets) > 10_000:
            self._targets.clear()
            self._owners.clear()
        self._targets[job_id] = target
        self._owners[job_id] = (key_id, request_id)

    # -- stamping delivery writes (the ledger) ------------------------------------------------------

    async def wants_updates(self, job_id: str) -> bool:
        """Whether the outcomes of `job_id` are to be stamped (it asked for delivery.updated)."""
        if job_id not in self._targets:
            await self._run("target lookup", lambda: self._load_targets([job_id]))
        target = self._targets.get(job_id)
        return target is not None and DELIVERY_UPDATED in target.events

    @contextmanager
    def stamping(self) -> Iterator[str]:
        """A stamp for one group of delivery writes, in flight until the block ends (the writes
        came back or failed): each written delivery's `ev` is `f"{stamp}|{its id}"`."""
        stamps = self._stamps
        stamp = stamps.take()
        try:
            yield stamp
        finally:
            stamps.done(stamp)

    def landed(self, stamp: str, outcomes: Sequence[tuple[str, Change]] | None) -> None:
        """Within `stamping()`, once its writes came back: the outcomes stamped `ev` there, each
        as (delivery id, its change), all known to be written (None: some may not be: the store
        is read for this stamp). The cursor then forms their events without reading the
        deliveries back; the stamps stay in the store for a process that adopts the cursor."""
        if outcomes is None:
            self._stamps.landed(stamp, None)
            return
        events = []
        for key, c in outcomes:
            ev = f"{stamp}|{key}"
            events.append((ev, _event(ev, c.job, c.user, c.channel, c.state, c.error, c.provider_id)))
        self._stamps.landed(stamp, events)

    def _load_targets(self, jobs: list[str]) -> None:
        # One lookup per job: equality on `_id` is indexed, `$in` would scan every job.
        for job in jobs:
            doc = self._jobs.find_one({"_id": job}, {"callback": 1, "key_id": 1, "request_id": 1})
            if doc is not None:  # (not yet written: asked again next time)
                self.track(job, Target.from_doc(doc.get("callback")), doc.get("key_id"), doc.get("request_id"))

    # -- turning stamped deliveries into messages ----------------------------------------------------

    async def collect(self, now: float, *, flush: bool = False) -> int:
        """Read this process's stamps (and those of cursors nobody holds) into messages; return
        how many messages were formed. `flush`: batches not full yet are formed too (at exit)."""
        async with self._collecting:
            return int(await self._run("event collection", lambda: self._collect(now, flush)))

    def _collect(self, now: float, flush: bool) -> int:
        formed = 0
        own = self._stamps.prefix
        if own not in self._cursors:
            self._cursors[own] = None
        for orphan in self._outbox.find(
            {"role": {"$eq": "cursor"}, "lease_expires": {"$lt": now}}, {"_id": 1, "lease_expires": 1}
        ).limit(10):
            won = self._outbox.find_one_and_update(
                {"_id": orphan["_id"], "lease_expires": orphan["lease_expires"]},
                {"$set": {"holder": self._owner, "lease_expires": now + self._cursor_lease}},
                return_document=ReturnDocument.AFTER,
            )
            if won is not None and won["prefix"] != own:
                log.info("callbacks: adopted the event cursor of %s", won["prefix"])
                self._cursors[won["prefix"]] = won
        for prefix in list(self._cursors):
            formed += self._read(prefix, now, flush)
        return formed

    def _read(self, prefix: str, now: float, flush: bool) -> int:
        cursor = self._cursors[prefix]
        own = prefix == self._stamps.prefix
        at = cursor["at"] if cursor else f"{prefix}|"
        done = dict(cursor["formed"]) if cursor else {}
        high = self._stamps.horizon() if own else f"{prefix}|~"
        idle = own and not flush and self._stamps.last() < self._read_through.pop(prefix, -1)
        landed = self._stamps.landed_between(at, high) if own and not idle else None
        if idle:
            stamps, complete = [], True
        elif landed is not None:
            stamps, complete = landed, True
        else:
            stamps, complete = self._stamped(at, high)
        by_job: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for ev, event in stamps:
            if ev > done.get(event["job"], "") and event["state"] not in _TRANSIENT_STATES:
                by_job.setdefault(event["job"], []).append((ev, event))
        self._load_targets([job for job in by_job if job not in self._targets])
        messages: list[dict[str, Any]] = []
        waiting = high  # the first stamp left for a later round
        for job, events in by_job.items():
            target = self._targets.get(job)
            if target is None or DELIVERY_UPDATED not in target.events:
                continue
            for start in range(0, len(events), self.batch_size):
                part = events[start : start + self.batch_size]
                young = _stamp_seconds(part[0][0]) > now - self.batch_seconds
                if len(part) < self.batch_size and young and not flush:
                    waiting = min(waiting, part[0][0])
                    break
                messages.append(self._message(job, target, part, now))
                done[job] = part[-1][0]
        if messages:
            self.insert_messages(messages)
        if own and complete and waiting == high:
            self._read_through[prefix] = int(high.rpartition("|")[2])
        # Up to the last stamp read before the first one left waiting.
        new_at = at
        for ev, _ in stamps:
            if ev >= waiting:
                break
            new_at = ev
        fields = {
            "at": new_at,
            "formed": sorted([job, ev] for job, ev in done.items() if ev > new_at),
            "holder": self._owner,
            "lease_expires": now + self._cursor_lease,
        }
        if own:
            self._stamps.forget(new_at)
        if not own and not stamps and cursor is not None:
            # An adopted cursor read to its end: its process writes no more.
            self._outbox.delete_one({"_id": cursor["_id"], "holder": self._owner})
            del self._cursors[prefix]
        elif cursor is None:
            # No `expires_at`: a cursor goes when it has been read to its end, never by age.
            created = {"_id": f"cursor|{prefix}", "role": "cursor", "prefix": prefix, **fields}
            self._outbox.insert_one(created)
            self._cursors[prefix] = created
        elif self._outbox.update_one({"_id": cursor["_id"], "holder": self._owner}, {"$set": fields}).matched_count:
            cursor.update(fields)
        else:
            # Adopted by another process while this one stalled: it reads those stamps now;
            # this process stamps under a new prefix from here on.
            log.warning("callbacks: the event cursor %s was adopted by another process", prefix)
            del self._cursors[prefix]
            if own:
                self._stamps = _Stamps(self._new_prefix())
        return len(messages)

    def _stamped(self, at: str, high: str) -> tuple[list[tuple[str, dict[str, Any]]], bool]:
        """The events stamped in (at, high), in stamp order: (stamp, event with its `job`), and
        whether that is all of them (no page came back full)."""
        pages = {
            field: list(
                self._deliveries.find({field: {"$gt": at, "$lt": high}}, _EVENT_FIELDS).sort(field, 1).limit(self._page)
            )
            for field in ("ev", "evr")
        }
        # A full page stops where its field's stamps may go on: nothing after that is taken now.
        ends = [docs[-1][field] for field, docs in pages.items() if len(docs) == self._page]
        stamps = []
        for field, docs in pages.items():
            for doc in docs:
                ev = doc[field]
                if ends and ev > min(ends):
                    break
                state, error = doc.get("state"), doc.get("error")
                if field == "ev" and state in RECEIPT_STATES:
                    state, error = "sent", None  # the outcome; its receipt has its own stamp
                event = _event(
                    ev, doc["job"], doc.get("user"), doc.get("channel"), state, error, doc.get("provider_id")
                )
                stamps.append((ev, event))
        stamps.sort(key=lambda item: item[0])
        return stamps, not ends

    def _message(self, job: str, target: Target, part: list[tuple[str, dict[str, Any]]], now: float) -> dict[str, Any]:
        first, last = part[0][0], part[-1][0]
        message_id = f"{job}.u.{hashlib.sha1(f'{first} {last}'.encode()).hexdigest()[:16]}"
        key_id, request_id = self._owners.get(job, (None, None))
        events = [{k: v for k, v in event.items() if k != "job"} for _, event in part]
        return {
            **self._pending(message_id, DELIVERY_UPDATED, job, target, key_id, request_id, now),
            "body": message_body(DELIVERY_UPDATED, job, request_id, now, {"deliveries": events}),
            "count": len(events),
        }

    async def release(self) -> None:
        """At exit: what was stamped goes into messages, whatever their size, and the cursor is
        let go of (another process adopts it at once: a write still in flight is read there)."""
        await self.collect(time.time(), flush=True)
        prefix = self._stamps.prefix
        await self._run(
            "cursor release",
            lambda: self._outbox.update_one(
                {"_id": f"cursor|{prefix}", "holder": self._owner}, {"$set": {"lease_expires": 0.0}}
            ),
        )

    def _pending(
        self,
        message_id: str,
        kind: str,
        job_id: str,
        target: Target,
        key_id: str | None,
        request_id: str | None,
        now: float,
    ) -> dict[str, Any]:
        return {
            "_id": message_id,
            "role": "message",
            "type": kind,
            "job": job_id,
            "key_id": key_id,
            "request_id": request_id,
            "url": target.url,
            "created": now,
            "seq": seq_of(iso_ms_at(now), message_id),
            "state": "pending",
            "attempts": 0,
            "next_at": now,
            "lease_expires": 0.0,
            "expires_at": self._expires(now),
        }

    def job_finished(
        self, job_id: str, target: Target, data: dict[str, Any], key_id: str | None, request_id: str | None
    ) -> dict[str, Any]:
        """The `job.finished` message of a job (inserted by the ledger with the job's final state)."""
        now = time.time()
        return {
            **self._pending(f"{job_id}.finished", JOB_FINISHED, job_id, target, key_id, request_id, now),
            "body": message_body(JOB_FINISHED, job_id, request_id, now, data),
            "count": 1,
        }

    def insert_messages(self, docs: Sequence[dict[str, Any]]) -> None:
        """Insert messages; one already there (a resumed job, a round read again) stays as it is."""
        if not docs:
            return
        try:
            self._outbox.insert_many(list(docs), ordered=False)
        except BulkWriteError as exc:
            if any(error.get("code") != _DUPLICATE_KEY for error in exc.details.get("writeErrors", [])):
                raise

    def _expires(self, now: float) -> dt.datetime:
        return dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(seconds=self.max_age) + self._retention

    # -- claiming messages ---------------------------------------------------------------------------

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
                    {"events": 0, "data": 0, "body": 0},
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
                if won is not None:
                    claimed.append(won)
            return claimed

        return await self._run("claim", claim)

    async def settle(self, message: Mapping[str, Any], **fields: Any) -> None:
        """Record a try's outcome."""
        fields.setdefault("lease_expires", 0.0)
        await self._run("settle", lambda: self._outbox.update_one({"_id": message["_id"]}, {"$set": fields}))

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
            return list(self._outbox.find(query, {"events": 0, "data": 0, "body": 0}).sort("seq", -1).limit(limit + 1))

        docs = await self._run("listing", find)
        more = len(docs) > limit
        docs = docs[:limit]
        return docs, encode_cursor(docs[-1]["seq"]) if more and docs else None

    async def message(self, message_id: str) -> dict[str, Any] | None:
        return await self._run(
            "lookup",
            lambda: self._outbox.find_one({"_id": message_id, "role": "message"}, {"events": 0, "data": 0, "body": 0}),
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
                projection={"events": 0, "data": 0, "body": 0},
                return_document=ReturnDocument.AFTER,
            )

        try:
            return await self._run("retry", revive)
        except DuplicateKeyError:  # pragma: no cover - find_one_and_update never inserts here
            return None

    async def depth(self) -> tuple[int, int]:
        """(pending messages, dead messages): the outbox's gauges. Counted from the index on
        (role, state): `count_documents` is an aggregation, which the embedded store answers by
        decoding every document of the collection."""

        def count(state: str) -> int:
            return sum(1 for _ in self._outbox.find({"role": {"$eq": "message"}, "state": {"$eq": state}}, {"_id": 1}))

        return await self._run("count", lambda: (count("pending"), count("dead")))


def message_body(kind: str, job_id: str, request_id: str | None, created: float, data: Any) -> str:
    """What a message POSTs: `{type, jobId, requestId, timestamp, data}`, as JSON. Kept in the
    message as one string: the embedded store walks every value of a document on each read and
    write, and a message is written, claimed and settled once or more."""
    body = {"type": kind, "jobId": job_id, "requestId": request_id, "timestamp": iso_ms_at(created), "data": data}
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


def iso_ms_at(epoch: float) -> str:
    return iso_ms(dt.datetime.fromtimestamp(epoch, dt.UTC))


__all__ = [
    "CALLBACK_STATES",
    "DEFAULT_EVENTS",
    "DELIVERY_UPDATED",
    "EVENTS",
    "JOB_FINISHED",
    "CallbackOutbox",
    "Target",
    "host_of",
    "message_body",
    "shown_url",
]
