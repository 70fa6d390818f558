"""The delivery ledger: what was accepted and what became of every delivery, in MongoDB.

Two collections (names under `[store]`): one job document per accepted send, one delivery
document per (job, user, channel). A delivery is written `sending` before its provider call and
`sent`/`failed`/`skipped`/`cancelled` after. Those writes, and the creation and end of every job,
go through one group commit per process (`batching.py`, up to `WRITES_IN_FLIGHT` groups at once):
what every run of every job asks to write while groups are in flight goes in the next, never a
round trip per delivery or per job. A caller awaits each write before its next, so two groups
in flight never hold two writes of one delivery; writes that must land in order without a wait
between them go in one group (a job's creation with its first claim, its only outcome with its
end: `creating`, `finishing`), where `_flush` writes jobs, then deliveries, then job updates, each
only if the one before it succeeded (in one `bulkWrite` command where the store has it). Claims of one delivery by two runs are compare-and-set. After a crash, a `sending` delivery is the only kind whose
outcome is unknown. Idempotency keys live in a third, small collection `<jobs_collection>_keys`.

Times that the service compares (lease expiry) are epoch seconds; `expires_at` is a BSON date
for MongoDB's TTL index, and for the purge that runs on a timer (`purge_expired`). On the embedded
store there is no TTL index: its engine purges a collection with a TTL index before every read (a
pass over the whole collection: 2.5 against 0.35 ms of store CPU per `find_one` at 5,000 jobs,
`benchmarks/ttl_reads.py`), so there the timer alone keeps retention.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pymongo
import trio
from pymongo import InsertOne, ReturnDocument, UpdateOne
from pymongo.collection import Collection
from pymongo.errors import (
    BulkWriteError,
    ClientBulkWriteException,
    DuplicateKeyError,
    InvalidOperation,
    OperationFailure,
    PyMongoError,
)

from .errors import StoreError
from .batching import Batcher, Call
from .callback_outbox import CallbackOutbox
from .listing import JOB_LISTING_INDEXES, JobQuery, Viewer, encode_cursor, listing_filter, seq_of
from .messages import Delivery
from .models import Failure
from .settings import StoreSettings
from .states import ACCEPTED_STATES, RANK, RECEIPT_STATES, SETTLED_STATES, Receipt, below

log = logging.getLogger(__name__)

ACTIVE_STATES = ("queued", "running")
FINAL_STATES = ("done", "failed", "cancelled")
FINAL_DELIVERY_STATES = SETTLED_STATES
_DUPLICATE_KEY = 11000
# Group commits of ledger writes in flight at once. One made every write of a single-recipient
# send wait for the group in flight before its own (p50 48 ms against 18 ms without the ledger at
# 100 req/s: docs/benchmarks.md P); a few let it start at once, but only beside groups of at most
# WRITES_BESIDE writes: under a fan-out's load the writes gather in one group at a time again
# (`batching.Batcher`). Small, as the store serves the groups one at a time anyway.
WRITES_IN_FLIGHT = 3
WRITES_BESIDE = 4


@dataclass(frozen=True, slots=True)
class StateChange:
    """One delivery moved to `state` (what `Ledger.watch` listeners are told)."""

    job: str
    user: str
    channel: str
    state: str
    provider_id: str | None = None
    error: str | None = None


@dataclass(slots=True)
class ReceiptOutcome:
    """What became of a group of receipts: moved a delivery, changed nothing (duplicate or
    behind it), or kept for a delivery not recorded yet."""

    applied: int = 0
    unchanged: int = 0
    kept: int = 0


def now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def delivery_key(job_id: str, channel: str, user_id: str) -> str:
    return f"{job_id}|{channel}|{user_id}"


@dataclass(frozen=True, slots=True)
class IdempotencyClaim:
    """The outcome of presenting an idempotency key: ours (a new job) or someone's before us."""

    job_id: str
    ours: bool
    same_body: bool = True


class Ledger:
    def __init__(self, client: pymongo.MongoClient[dict[str, Any]], settings: StoreSettings) -> None:
        db = client[settings.database]
        self._client = client
        # Every collection whose documents carry `expires_at`: the callbacks outbox's too.
        self._expiring = [
            db[name]
            for name in (
                settings.jobs_collection,
                settings.deliveries_collection,
                f"{settings.jobs_collection}_keys",
                f"{settings.jobs_collection}_cancels",
                f"{settings.deliveries_collection}_receipts",
                settings.callbacks_collection,
            )
        ]
        self._jobs: Collection[dict[str, Any]] = db[settings.jobs_collection]
        self._deliveries: Collection[dict[str, Any]] = db[settings.deliveries_collection]
        # Every write carries its namespace, so that a group writing both collections can go in
        # one command (`_flush_in_one`); a collection's own bulk_write ignores it.
        self._jobs_ns = self._jobs.full_name
        self._deliveries_ns = self._deliveries.full_name
        # Until the store says it cannot (a server before MongoDB 8.0 has no `bulkWrite` command).
        self._one_command = True
        self._keys: Collection[dict[str, Any]] = db[f"{settings.jobs_collection}_keys"]
        # One small document per cancel request, by time: what every process's cancel watch polls
        # (dispatcher/cancels.py), instead of looking up every job it runs.
        self._cancels: Collection[dict[str, Any]] = db[f"{settings.jobs_collection}_cancels"]
        # Receipts that arrived before the delivery they name was recorded.
        self._orphans: Collection[dict[str, Any]] = db[f"{settings.deliveries_collection}_receipts"]
        self._listeners: list[Callable[[list[StateChange]], None]] = []
        self._outbox: CallbackOutbox | None = None
        self._retention = dt.timedelta(days=settings.retention_days)
        self._key_ttl = settings.idempotency_ttl_hours * 3600
        self._writes = Batcher(self._flush, in_flight=WRITES_IN_FLIGHT, beside=WRITES_BESIDE, lone_at_once=True)
        # Receipts have a group commit of their own: a burst of them must not lengthen the
        # round trips that claims and outcomes of running fan-outs wait on.
        self._receipt_writes = Batcher(self._stamped_receipts)

    async def _run(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except PyMongoError as exc:
            raise StoreError(f"ledger {what} failed: {exc}") from exc

    def _expires_at(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self._retention

    def _delivery_update(self, query: dict[str, Any], fields: dict[str, Any], *, upsert: bool = False) -> UpdateOne:
        return UpdateOne(query, {"$set": fields}, upsert=upsert, namespace=self._deliveries_ns)

    def _job_update(self, job_id: str, fields: dict[str, Any]) -> UpdateOne:
        return UpdateOne({"_id": job_id}, {"$set": fields}, namespace=self._jobs_ns)

    async def ensure_indexes(self) -> None:
        def create() -> None:
            self._deliveries.create_index([("job", 1), ("user", 1), ("channel", 1)], unique=True)
            self._deliveries.create_index([("job", 1), ("state", 1)])
            self._deliveries.create_index("provider_id")  # receipts name a delivery by it
            self._deliveries.create_index([("state", 1), ("settled_at", 1)])  # the receipt timeout
            ttl = _purges_by_ttl_index(self._client)
            for collection in self._expiring:
                if ttl:
                    collection.create_index("expires_at", expireAfterSeconds=0)
                else:
                    _drop_ttl_index(collection)
            self._cancels.create_index("at")
            self._jobs.create_index([("state", 1), ("lease_expires", 1)])
            # The listing (listing.py): newest first by `seq`, after an equality on each filter.
            for keys in JOB_LISTING_INDEXES:
                self._jobs.create_index(list(keys))
            # Jobs written before `seq` existed get one, so that the listing shows them too.
            for doc in self._jobs.find({"seq": {"$exists": False}}, {"_id": 1, "created_at": 1}):
                self._jobs.update_one(
                    {"_id": doc["_id"]}, {"$set": {"seq": seq_of(doc.get("created_at") or "", doc["_id"])}}
                )

            if self._outbox is not None:
                self._outbox.ensure_indexes(ttl=ttl)

        await self._run("index creation", create)

    # -- jobs -----------------------------------------------------------------------------------

    async def insert_job(self, doc: dict[str, Any]) -> None:
        """Write a job's document (`job_document`) on its own."""
        await self._writes.submit("job", ([doc], None, None))

    def job_document(
        self,
        job_id: str,
        request: dict[str, Any],
        owner: str,
        lease: float,
        idempotency_key: str | None,
        *,
        key_id: str | None = None,
        request_id: str | None = None,
        callback: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A job its owner starts at once: `running` from the first write (one round trip less
        per send than queued-then-running). `key_id` is the API key that created it (None: no
        key, e.g. the embedding API), `request_id` the HTTP request's id. Written by `insert_job`,
        or with the first write of its run (`creating`)."""
        created = now_iso()
        return {
            "_id": job_id,
            "seq": seq_of(created, job_id),
            "key_id": key_id,
            "request_id": request_id,
            "callback": callback,
            "request": request,
            "state": "running",
            "created_at": created,
            "started_at": created,
            "finished_at": None,
            "summary": None,
            "error": None,
            "cancel_requested": False,
            "idempotency_key": idempotency_key,
            "lease_owner": owner,
            "lease_expires": time.time() + lease,
            "expires_at": self._expires_at(),
        }

    async def delete_job(self, job_id: str) -> None:
        # Only ever our own job, just created and never started (its lease keeps others off).
        await self._run("job removal", self._jobs.delete_one, {"_id": job_id})

    async def job(self, job_id: str) -> dict[str, Any] | None:
        return await self._run("job lookup", self._jobs.find_one, {"_id": job_id})

    async def list_jobs(self, query: JobQuery, viewer: Viewer) -> tuple[list[dict[str, Any]], str | None]:
        """One page of jobs, newest first, and the cursor of the next (None on the last page)."""
        filters = listing_filter(query, viewer)
        projection = {"request.channels": 1, **{f: 1 for f in _LISTED_FIELDS}}

        def find() -> list[dict[str, Any]]:
            cursor = self._jobs.find(filters, projection).sort("seq", -1).limit(query.limit + 1)
            return list(cursor)

        docs = await self._run("job listing", find)
        more = len(docs) > query.limit
        docs = docs[: query.limit]
        return docs, encode_cursor(docs[-1]["seq"]) if more and docs else None

    async def claim(self, job_id: str, owner: str, lease: float) -> dict[str, Any] | None:
        """Take over an active job whose lease has expired (or is already ours)."""
        query = {
            "_id": job_id,
            "state": {"$in": list(ACTIVE_STATES)},
            "$or": [{"lease_expires": {"$lt": time.time()}}, {"lease_owner": owner}],
        }
        update = {"$set": {"lease_owner": owner, "lease_expires": time.time() + lease}}
        return await self._run(
            "job claim", self._jobs.find_one_and_update, query, update, return_document=ReturnDocument.AFTER
        )

    async def orphaned_jobs(self, limit: int = 20) -> list[str]:
        """Active jobs nobody holds a live lease on: their owner died."""
        query = {"state": {"$in": list(ACTIVE_STATES)}, "lease_expires": {"$lt": time.time()}}
        docs = await self._run("job scan", lambda: list(self._jobs.find(query, {"_id": 1}).limit(limit)))
        return [doc["_id"] for doc in docs]

    async def renew(self, job_id: str, owner: str, lease: float, summary: dict[str, Any]) -> dict[str, Any] | None:
        """Extend our lease and publish progress; None when the lease is no longer ours."""
        query = {"_id": job_id, "lease_owner": owner}
        update = {"$set": {"lease_expires": time.time() + lease, "summary": summary}}
        return await self._run(
            "lease renewal", self._jobs.find_one_and_update, query, update, return_document=ReturnDocument.AFTER
        )

    # -- runs of shared partitions (cluster mode) ------------------------------------------------
    # `held.<index>` of the job: the run delivering partition `index`, until when (epoch seconds,
    # renewed while it runs) and whether it finished. In the store, not in Redis: a partition
    # republished after Redis lost its data is recognised while its first run is still going.

    async def hold_partition(self, job_id: str, index: int, run_id: str, lease: float) -> tuple[bool, dict[str, Any]]:
        """Take partition `index` for `run_id` unless a run holds it (lease not expired) or
        finished it: `(True, the hold before ours, {} if none)`, else `(False, the holder's)`;
        a hold is `{"run", "until", "done"}` (`until` 0: released)."""
        now = time.time()
        held = f"held.{index}"
        query = {
            "_id": job_id,
            "$or": [{held: {"$exists": False}}, {f"{held}.done": False, f"{held}.until": {"$lt": now}}],
        }
        update = {"$set": {held: {"run": run_id, "until": now + lease, "done": False}}}

        def hold() -> tuple[bool, dict[str, Any]]:
            # Whole `held` projected: a dotted projection is not answered alike by every store.
            before = self._jobs.find_one_and_update(query, update, {"held": 1}, return_document=ReturnDocument.BEFORE)
            if before is not None:
                return True, (before.get("held") or {}).get(str(index)) or {}
            doc = self._jobs.find_one({"_id": job_id}, {"held": 1})
            if doc is None:  # the job is gone (purged): nothing of it is to be delivered
                return False, {"run": None, "until": 0, "done": True}
            # Released between the two reads: nothing holds it now.
            return False, (doc.get("held") or {}).get(str(index)) or {"run": None, "until": 0, "done": False}

        return await self._run("partition hold", hold)

    async def renew_partition(self, job_id: str, index: int, run_id: str, lease: float) -> bool:
        """Extend our hold; False when another run took the partition over (ours had expired)."""
        held = f"held.{index}"
        query = {"_id": job_id, f"{held}.run": run_id}
        result = await self._run(
            "partition renewal", self._jobs.update_one, query, {"$set": {f"{held}.until": time.time() + lease}}
        )
        return bool(result.matched_count)

    async def release_partition(self, job_id: str, index: int, run_id: str, *, done: bool) -> None:
        """End our hold: `done` (delivered: a copy of it is skipped), or not (another run takes it)."""
        held = f"held.{index}"
        update = {"$set": {f"{held}.until": 0, f"{held}.done": done}}
        await self._run("partition release", self._jobs.update_one, {"_id": job_id, f"{held}.run": run_id}, update)

    async def update_job(
        self,
        job_id: str,
        *,
        callbacks: Sequence[dict[str, Any]] = (),
        creating: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Set `fields` on a job; `callbacks` (outbox messages, e.g. its `job.finished`) are
        written in the same group commit, just before. `creating`: the job's document, not
        written yet, written first in the same group."""
        update = Call("job update", ([self._job_update(job_id, fields)], None, list(callbacks)))
        await self._together([_creation(creating), update])

    async def request_cancel(self, job_id: str) -> dict[str, Any] | None:
        def cancel() -> dict[str, Any] | None:
            doc = self._jobs.find_one_and_update(
                {"_id": job_id, "state": {"$in": list(ACTIVE_STATES)}},
                {"$set": {"cancel_requested": True}},
                return_document=ReturnDocument.AFTER,
            )
            if doc is not None:
                expires = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
                self._cancels.replace_one(
                    {"_id": job_id}, {"_id": job_id, "at": time.time(), "expires_at": expires}, upsert=True
                )
            return doc

        return await self._run("job cancellation", cancel)

    async def cancels_since(self, since: float) -> list[tuple[str, float]]:
        """The jobs whose cancel was requested after `since` (epoch seconds), with its time."""
        docs = await self._run("cancel lookup", lambda: list(self._cancels.find({"at": {"$gt": since}})))
        return [(doc["_id"], doc["at"]) for doc in docs]

    # -- idempotency keys -----------------------------------------------------------------------

    async def claim_key(self, key: str, body_hash: str, job_id: str) -> IdempotencyClaim:
        """Bind `key` to `job_id`, or report the job it is already bound to (within the TTL)."""
        key_id = hashlib.sha256(key.encode()).hexdigest()

        def claim() -> IdempotencyClaim:
            now = time.time()
            doc = {
                "_id": key_id,
                "job_id": job_id,
                "body_hash": body_hash,
                "valid_until": now + self._key_ttl,
                "expires_at": dt.datetime.now(dt.UTC) + dt.timedelta(seconds=self._key_ttl),
            }
            try:
                self._keys.insert_one(doc)
                return IdempotencyClaim(job_id, ours=True)
            except DuplicateKeyError:
                pass
            existing = self._keys.find_one({"_id": key_id})
            if existing is not None and existing["valid_until"] < now:
                # Expired but not purged yet: the key is free again (one winner if several race).
                replaced = self._keys.find_one_and_update(
                    {"_id": key_id, "valid_until": existing["valid_until"]},
                    {
                        "$set": {
                            "job_id": job_id,
                            "body_hash": body_hash,
                            "valid_until": doc["valid_until"],
                            "expires_at": doc["expires_at"],
                        }
                    },
                )
                if replaced is not None:
                    return IdempotencyClaim(job_id, ours=True)
                existing = self._keys.find_one({"_id": key_id})
            if existing is None:  # purged between our insert and read: try once more
                self._keys.insert_one(doc)
                return IdempotencyClaim(job_id, ours=True)
            return IdempotencyClaim(existing["job_id"], ours=False, same_body=existing["body_hash"] == body_hash)

        return await self._run("idempotency key", claim)

    # -- deliveries -----------------------------------------------------------------------------

    async def prior(self, job_id: str, channel: str, user_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """What an earlier run of this job recorded for these users on this channel."""
        keys = [delivery_key(job_id, channel, u) for u in user_ids]
        docs = await self._run("delivery lookup", lambda: list(self._deliveries.find({"_id": {"$in": keys}})))
        return {doc["user"]: doc for doc in docs}

    async def claim_sending(
        self,
        job_id: str,
        run_id: str,
        deliveries: Sequence[tuple[str, str, tuple[str, str] | None]],
        *,
        creating: dict[str, Any] | None = None,
    ) -> set[tuple[str, str]]:
        """Mark these (channel, user, previous) deliveries `sending` for run `run_id`, just before
        their provider calls, and return those that could NOT be claimed: another run holds or
        settled them. A claim is a compare-and-set, so two runs of the same partition or job never
        both send one delivery: an insert (the unique `_id` refuses a delivery anyone wrote), or,
        for a delivery left `sending` or `retrying` by a run, an update whose filter names that
        run and state (`previous = (run, state)`, run `""` for one that recorded no run).
        `creating`: the job's document, not written yet: written first in the same group, and
        nothing is claimed if it fails."""
        expires = self._expires_at()
        now = time.time()
        ops: list[UpdateOne] = []
        for channel, user, previous in deliveries:
            doc = {
                "job": job_id,
                "user": user,
                "channel": channel,
                "state": "sending",
                "run": run_id,
                "claimed_at": now,
                "expires_at": expires,
            }
            key = delivery_key(job_id, channel, user)
            if previous is None:
                # An insert in effect (no delivery document lacks a state: one that exists makes
                # the upsert a duplicate key, as an insert would), but as an update it goes in
                # the same command as the group's outcomes: one store command per group, not two.
                ops.append(self._delivery_update({"_id": key, "state": _UNWRITTEN}, doc, upsert=True))
            else:
                run, state = previous
                ops.append(self._delivery_update({"_id": key, "state": state, "run": run or None}, doc, upsert=True))
        if not ops:
            return set()
        claim = Call("claim", (ops, [d[:2] for d in deliveries], job_id))
        await self._together([_creation(creating), claim])
        taken: set[tuple[str, str]] = claim.result
        return taken

    async def release(self, job_id: str, run_id: str, delivery: Delivery) -> None:
        """Between a failed attempt that reached no one and the next: `retrying`, still this run's
        (the next attempt claims it back by compare-and-set). A crash meanwhile leaves a delivery
        that can be sent again, not an ambiguous one."""
        key = {"_id": delivery_key(job_id, delivery.channel, delivery.user_id), "run": run_id}
        update = {"state": "retrying", "attempts": delivery.attempts, "error": delivery.error}
        await self._writes.submit("outcome", ([self._delivery_update(key, update)], None, []))

    async def record(
        self,
        job_id: str,
        deliveries: Sequence[Delivery],
        *,
        creating: dict[str, Any] | None = None,
        finishing: dict[str, Any] | None = None,
    ) -> bool:
        """Record final outcomes. A delivery with attempts was claimed first (providers are only
        called after the claim), so its document exists and only what the attempt changed is
        written (less work for the store: benchmarks/store_writes.py), and only while it is still
        `sending` (a run that lost its claim cannot overwrite what another recorded); any other
        is written whole.

        In the same group: `creating`, the job's document not written yet (before the outcomes,
        which are not written if it fails), and `finishing`, fields that end the job (after them,
        only if they were written). Returns whether `finishing` was written: an outcome written
        without it is still written (the job's end is then written on its own)."""
        if not deliveries:
            return False
        now = time.time()
        ops = []
        # The fields of each write, stamped in the group commit when the job asked for
        # delivery.updated (the write is its event: callback_outbox.py).
        stamped: list[tuple[str, dict[str, Any]]] | None = None
        if self._outbox is not None and await self._outbox.wants_updates(job_id):
            stamped = []
        for d in deliveries:
            key = delivery_key(job_id, d.channel, d.user_id)
            if d.attempts:
                outcome: dict[str, Any] = {"state": d.status, "attempts": d.attempts, "settled_at": now}
                if d.error is not None:
                    outcome["error"] = d.error
                if d.provider_id is not None:
                    outcome["provider_id"] = d.provider_id
                if d.reconciled is not None:
                    outcome["reconciled"] = d.reconciled
                # `retrying`: cancelled while it waited to retry (its claim given back meanwhile).
                ops.append(self._delivery_update({"_id": key, "state": _CLAIMED}, outcome))
            else:
                outcome = {
                    "job": job_id,
                    "user": d.user_id,
                    "channel": d.channel,
                    "state": d.status,
                    "error": d.error,
                    "attempts": d.attempts,
                    "provider_id": d.provider_id,
                    "user_found": d.user_found,
                    "settled_at": now,
                    "expires_at": self._expires_at(),
                }
                ops.append(self._delivery_update({"_id": key}, outcome, upsert=True))
            if stamped is not None:
                stamped.append((key, outcome))
        # For listeners (`watch`) and the outbox's stamped events only: not made for nobody.
        changes = (
            [StateChange(job_id, d.user_id, d.channel, d.status, d.provider_id, d.error) for d in deliveries]
            if self._listeners or stamped is not None
            else []
        )
        written = Call("outcome", (ops, stamped, changes))
        end = Call("job update", ([self._job_update(job_id, finishing)], None, [])) if finishing else None
        await self._together([_creation(creating), written, end], optional_last=end is not None)
        if end is not None and end.error is not None:
            log.warning("job %s: its end not written with its last outcome: %s", job_id, end.error)
        return end is not None and end.error is None

    async def _together(self, calls: Sequence[Call | None], *, optional_last: bool = False) -> None:
        """Write `calls` (None: nothing) in one group, each only if the one before it was written;
        raise the error of the first that failed (`optional_last`: not the last one's, its caller
        looks at it)."""
        chain = [call for call in calls if call is not None]
        for before, call in zip(chain, chain[1:]):
            call.after = before
        await self._writes.submit_together(chain)
        for call in chain[:-1] if optional_last else chain:
            if call.error is not None:
                raise call.error

    # -- receipts -------------------------------------------------------------------------------

    def watch(self, listener: Callable[[list[StateChange]], None]) -> None:
        """Call `listener` with every group of delivery state changes once written: claims
        (`sending`), outcomes, receipts and receipt timeouts all pass here. It runs in the
        store's worker thread, right after the write: keep it short and never raise."""
        self._listeners.append(listener)

    def attach_outbox(self, outbox: CallbackOutbox) -> None:
        """Stamp delivery writes for `outbox`'s `delivery.updated` events, in the writes
        themselves: outcomes of the jobs that asked for them (`ev`), every receipt and timeout
        (`evr`)."""
        self._outbox = outbox

    @contextmanager
    def _stamp(self) -> Iterator[str | None]:
        """A stamp for one group of delivery writes while they are in flight (None: no outbox)."""
        if self._outbox is None:
            yield None
            return
        with self._outbox.stamping() as stamp:
            yield stamp

    def _changed(self, changes: list[StateChange]) -> None:
        if not changes:
            return
        for listener in self._listeners:
            try:
                listener(changes)
            except Exception:  # a listener's bug must not fail the write it follows
                log.exception("delivery state listener failed")

    async def apply_receipts(self, receipts: Sequence[Receipt]) -> ReceiptOutcome:
        """Move the deliveries these receipts name forward, through the group commit. A receipt
        for an id no delivery holds yet is kept (in `<deliveries>_receipts`) for
        `apply_kept_receipts`."""
        if not receipts:
            return ReceiptOutcome()
        return await self._receipt_writes.submit("receipt", (list(receipts), None, None))

    async def apply_kept_receipts(self, drop_before: float, limit: int = 1000) -> tuple[ReceiptOutcome, list[str]]:
        """Apply the kept receipts whose delivery has been recorded since; drop (and return the
        ids of) those received before `drop_before` whose delivery still does not exist."""
        docs = await self._run("receipt lookup", lambda: list(self._orphans.find({}).sort("at", 1).limit(limit)))
        if not docs:
            return ReceiptOutcome(), []
        kept = [
            (
                doc["_id"],
                Receipt(
                    doc["sid"],
                    doc["state"],
                    doc["status"],
                    doc["at"],
                    doc.get("code"),
                    doc.get("reason"),
                    doc.get("permanent", False),
                    doc.get("delivery"),
                ),
            )
            for doc in docs
        ]
        return await self._receipt_writes.submit("kept receipt", (kept, drop_before, None))

    def _stamped_receipts(self, calls: list[Call]) -> None:
        with self._stamp() as stamp:
            self._write_receipts(calls, stamp)

    def _write_receipts(self, calls: list[Call], stamp: str | None = None) -> None:
        """In the store's worker thread. A receipt that names its delivery (the callback URL
        carries its id) is one conditional update in one ordered bulk for the whole group, by
        primary key; only when the bulk changed fewer deliveries than it had receipts does one
        read (by `_id`) tell which changed, which were behind (duplicates) and which name a
        delivery whose outcome is not written yet (kept). A receipt that names only its SID is one
        conditional `find_one_and_update` by `provider_id` (equality: the embedded store uses the
        index for it, not for `$in`, a scan of every delivery), plus a lookup when it changed
        nothing. Every filter names the states the receipt may replace, so receipts that race,
        in this process or another, never move a delivery backwards."""
        if not calls:
            return
        fresh = [(call, None, r) for call in calls if call.kind == "receipt" for r in call.payload[0]]
        kept = [(call, kept_id, r) for call in calls if call.kind == "kept receipt" for kept_id, r in call.payload[0]]
        items = sorted(fresh + kept, key=lambda item: RANK[item[2].state])
        try:
            outcomes = {id(call): ReceiptOutcome() for call in calls}
            changes, orphans, done = [], [], []
            drops: list[str] = []
            named = self._apply_named([r for _, _, r in items if r.delivery], stamp)
            for call, kept_id, r in items:
                outcome = outcomes[id(call)]
                verdict = named[id(r)] if r.delivery else self._apply_by_sid(r, stamp)
                if isinstance(verdict, StateChange):
                    outcome.applied += 1
                    changes.append(verdict)
                elif verdict == "unchanged":
                    outcome.unchanged += 1  # a duplicate, or behind the delivery
                elif kept_id is None:
                    orphans.append(r)
                    outcome.kept += 1
                    continue
                elif r.at < call.payload[1]:
                    drops.append(kept_id)
                    continue
                else:
                    outcome.kept += 1
                    continue
                if kept_id is not None:
                    done.append(kept_id)
            if orphans:
                expires = self._expires_at()
                with_ids = [
                    {
                        "_id": f"{r.sid}|{r.status}",
                        "sid": r.sid,
                        "state": r.state,
                        "status": r.status,
                        "at": r.at,
                        "code": r.code,
                        "reason": r.reason,
                        "permanent": r.permanent,
                        "delivery": r.delivery,
                        "expires_at": expires,
                    }
                    for r in orphans
                ]
                try:
                    self._orphans.insert_many(with_ids, ordered=False)
                except BulkWriteError as exc:  # the same receipt kept twice: once is enough
                    if any(e.get("code") != _DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
                        raise
            if done or drops:
                self._orphans.delete_many({"_id": {"$in": done + drops}})
        except PyMongoError as exc:
            for call in calls:
                call.fail(StoreError(f"ledger receipt write failed: {exc}"))
            return
        for call in calls:
            call.succeed((outcomes[id(call)], drops) if call.kind == "kept receipt" else outcomes[id(call)])
        self._changed(changes)

    def _apply_named(self, receipts: list[Receipt], stamp: str | None) -> dict[int, StateChange | str]:
        """Receipts naming their delivery, in rank order: each one's change, "unchanged", or
        "missing" (no delivery holds its SID yet), by `id()` of the receipt."""
        verdicts: dict[int, StateChange | str] = {}
        if not receipts:
            return verdicts
        firsts: dict[tuple[str | None, str, str], Receipt] = {}
        written: list[Receipt] = []
        for r in receipts:
            # The same status twice (Twilio retries a callback): the second changes nothing.
            if firsts.setdefault((r.delivery, r.sid, r.state), r) is r:
                written.append(r)
        ops = [
            UpdateOne(
                {"_id": r.delivery, "provider_id": r.sid, "state": {"$in": below(r.state)}},
                {"$set": _receipt_set(r, stamp)},
            )
            for r in written
        ]
        modified = self._deliveries.bulk_write(ops, ordered=True).modified_count
        docs: dict[str, dict[str, Any]] = {}
        if modified < len(ops):
            for key in {r.delivery or "" for r in written}:
                doc = self._read_one({"_id": key}, {"provider_id": 1, "receipts": 1})
                if doc is not None:
                    docs[key] = doc
        for r in receipts:
            first = firsts[(r.delivery, r.sid, r.state)]
            if first is not r:
                verdict = verdicts[id(first)]
                verdicts[id(r)] = "unchanged" if isinstance(verdict, StateChange) else verdict
                continue
            doc = docs.get(r.delivery or "") if modified < len(ops) else None
            if modified == len(ops) or (
                doc is not None
                and doc.get("provider_id") == r.sid
                and ((doc.get("receipts") or {}).get(r.state) or {}).get("at") == r.at
            ):
                job, channel, user = (r.delivery or "").split("|", 2)
                verdicts[id(r)] = StateChange(job, user, channel, r.state, r.sid, r.error())
            elif doc is not None and doc.get("provider_id") == r.sid:
                verdicts[id(r)] = "unchanged"
            else:
                verdicts[id(r)] = "missing"
        return verdicts

    def _apply_by_sid(self, r: Receipt, stamp: str | None) -> StateChange | str:
        """A receipt naming only its SID: its change, "unchanged" or "missing" (see above)."""
        doc = self._deliveries.find_one_and_update(
            {"provider_id": r.sid, "state": {"$in": below(r.state)}},
            {"$set": _receipt_set(r, stamp)},
            projection={"job": 1, "user": 1, "channel": 1},
        )
        if doc is not None:
            return StateChange(doc["job"], doc["user"], doc["channel"], r.state, r.sid, r.error())
        if self._read_one({"provider_id": r.sid, "state": {"$in": _ANY_STATE}}, {"_id": 1}) is not None:
            return "unchanged"
        return "missing"

    def _read_one(self, query: dict[str, Any], projection: dict[str, Any]) -> dict[str, Any] | None:
        """`find_one`, as an update that changes nothing (`$setOnInsert` without upsert). The
        embedded store purges TTL-expired documents before every read, a scan of the collection
        (~11 ms of its CPU at 13,000 deliveries, growing with it), and not before an update (~1 ms);
        for MongoDB it is one findAndModify that writes nothing."""
        never = {"$setOnInsert": {"read_only": True}}  # without upsert: never applied
        return self._deliveries.find_one_and_update(query, never, projection=projection)

    async def mark_unconfirmed(self, channels: Sequence[str], settled_before: float) -> int:
        """Deliveries on `channels` still `sent` since before `settled_before` (epoch seconds):
        no receipt came, they become `unconfirmed`. Returns how many."""
        if not channels:
            return 0
        query = {"state": "sent", "channel": {"$in": list(channels)}, "settled_at": {"$lt": settled_before}}

        def mark() -> int:
            projection = {"job": 1, "user": 1, "channel": 1, "provider_id": 1}
            docs = list(self._deliveries.find(query, projection).limit(10_000))
            if not docs:
                return 0
            # The state is in the filter again: a receipt landing meanwhile wins.
            with self._stamp() as stamp:
                ops = [
                    UpdateOne(
                        {"_id": d["_id"], "state": "sent"}, {"$set": _stamped({"state": "unconfirmed"}, stamp, d)}
                    )
                    for d in docs
                ]
                result = self._deliveries.bulk_write(ops, ordered=False)
            self._changed(
                [StateChange(d["job"], d["user"], d["channel"], "unconfirmed", d.get("provider_id")) for d in docs]
            )
            return result.modified_count

        return await self._run("receipt timeout", mark)

    def _flush(self, batch: list[Call]) -> None:
        """One group of writes (in a worker thread). A group that writes both collections (a
        small send's job with its claim, its outcome with its end) goes in one command where the
        store has it: a store command costs ~0.5 ms of the store's CPU and ~0.2 ms of pymongo's
        whatever it carries (docs/benchmarks.md P)."""
        if self._one_command and _in_one(batch, self._outbox is not None):
            try:
                batch = self._flush_in_one(batch)
            except InvalidOperation:  # raised before anything is sent: a store before MongoDB 8.0
                self._one_command = False
        if batch:
            self._flush_apart(batch)

    def _flush_in_one(self, batch: list[Call]) -> list[Call]:
        """The group as one ordered `bulkWrite` (jobs, then deliveries, then job updates, as
        `_flush_apart` orders them), so a write that depends on the one before it (`Call.after`)
        runs only if that one was written. The store stops at the first error: the calls before
        it are written, the failing one is settled as `_bulk` would, and those after it, not run,
        are returned for `_flush_apart` (which fails those that depended on a failed one)."""
        order = {"job": 0, "claim": 1, "outcome": 1, "job update": 2}
        calls = sorted(batch, key=lambda w: order[w.kind])
        models: list[Any] = []
        for w in calls:
            if w.kind == "job":
                models.append(InsertOne(w.payload[0][0], namespace=self._jobs_ns))
            else:
                models.append(w.payload[0][0])
        error: dict[str, Any] | None = None
        failed_at = len(calls)
        try:
            self._client.bulk_write(models, ordered=True)
        except ClientBulkWriteException as exc:
            errors = exc.details.get("writeErrors")  # ordered: at most one, a document
            if exc.error is not None or not errors:
                return self._failed(calls, exc)
            error = errors[0]
            failed_at = error["idx"]
        except InvalidOperation:
            raise
        except PyMongoError as exc:
            return self._failed(calls, exc)
        for w in calls[:failed_at]:
            w.succeed(set() if w.kind == "claim" else None)
        if error is not None:
            w = calls[failed_at]
            if error.get("code") == _DUPLICATE_KEY and w.kind in ("claim", "job"):
                # As in `_bulk`: a claim another run holds; a job carried again.
                w.succeed({w.payload[1][0]} if w.kind == "claim" else None)
            else:
                w.fail(StoreError(f"ledger write failed: {error.get('errmsg', error)}"))
        if self._listeners:
            written = [w for w in calls[: failed_at + 1] if w.kind in ("claim", "outcome") and w.error is None]
            self._changed([change for w in written for change in _changes(w)])
        return calls[failed_at + 1 :]

    def _failed(self, calls: list[Call], exc: PyMongoError) -> list[Call]:
        for w in calls:
            w.fail(StoreError(f"ledger write failed: {exc}"))
        return []

    def _flush_apart(self, batch: list[Call]) -> None:
        """One group of writes: new jobs, then every delivery write in one unordered bulk, then
        job updates; a failed command fails only the writes it carried."""
        _bulk(
            [w for w in batch if w.kind == "job"],
            "job creation",
            lambda docs: self._jobs.insert_many(docs, ordered=False),
        )
        deliveries = [w for w in batch if w.kind in ("claim", "outcome") and not w.blocked()]
        with self._stamp() as stamp:
            stamped = [w for w in deliveries if w.kind == "outcome" and w.payload[1]]
            for w in stamped:
                for key, fields in w.payload[1]:
                    fields["ev"] = f"{stamp}|{key}"
            results: list[Any] = []
            _bulk(
                deliveries,
                "delivery write",
                lambda ops: results.append(self._deliveries.bulk_write(ops, ordered=False)),
            )
            if stamp is not None and self._outbox is not None:
                # What was stamped, for the outbox to read without reading it back, if every
                # operation of the bulk was applied (else it reads the store for this stamp).
                ops = sum(len(w.payload[0]) for w in deliveries)
                whole = not stamped or (
                    bool(results)
                    and results[0].inserted_count + results[0].matched_count + results[0].upserted_count == ops
                )
                events = [(key, c) for w in stamped for (key, _), c in zip(w.payload[1], w.payload[2], strict=True)]
                self._outbox.landed(stamp, events if whole else None)
        if self._listeners:
            self._changed([change for w in deliveries if w.error is None for change in _changes(w)])
        updates = [w for w in batch if w.kind == "job update" and not w.blocked()]
        if self._outbox is not None and any(w.payload[2] for w in updates):
            try:
                self._outbox.insert_messages([doc for w in updates for doc in w.payload[2]])
            except PyMongoError as exc:
                for w in updates:
                    if w.payload[2]:
                        w.fail(StoreError(f"callback outbox write failed: {exc}"))
                updates = [w for w in updates if not w.done]
        _bulk(updates, "job update", lambda ops: self._jobs.bulk_write(ops, ordered=False))

    async def summary(self, job_id: str, channels: Sequence[str]) -> dict[str, Any]:
        """A job's counts, from its deliveries (for jobs whose deliveries several processes wrote):
        two passes over them, not a count per channel and state (thirteen scans of a
        three-channel job on a store that counts by scanning). Grouped on one string key: the
        embedded store cannot group on a compound key."""
        states = ("sent", "skipped", "failed", "cancelled")
        pipeline: list[dict[str, Any]] = [
            {"$match": {"job": job_id}},
            {"$project": {"key": {"$concat": ["$channel", "|", "$state"]}}},
            {"$group": {"_id": "$key", "n": {"$sum": 1}}},
        ]

        def count() -> dict[str, Any]:
            users = self._deliveries.count_documents(
                {"job": job_id, "channel": channels[0], "user_found": {"$ne": False}}
            )
            return {"users": users, "groups": list(self._deliveries.aggregate(pipeline))}

        counted = await self._run("job summary", count)
        body: dict[str, Any] = {"users": counted["users"], **{state: {} for state in states}}
        for group in counted["groups"]:
            channel, _, state = (group["_id"] or "").partition("|")
            if state in ACCEPTED_STATES:  # receipts came later: the provider accepted it
                state = "sent"
            if channel in channels and state in states:
                body[state][channel] = body[state].get(channel, 0) + group["n"]
        return body

    async def receipt_counts(self, job_id: str) -> dict[str, dict[str, int]]:
        """How many of a job's deliveries receipts (or their absence) took past `sent`, by state
        and channel: `{"delivered": {"sms": 3}, "undelivered": {}, "unconfirmed": {}}`."""
        pipeline: list[dict[str, Any]] = [
            {"$match": {"job": job_id, "state": {"$in": list(RECEIPT_STATES)}}},
            {"$project": {"key": {"$concat": ["$channel", "|", "$state"]}}},
            {"$group": {"_id": "$key", "n": {"$sum": 1}}},
        ]
        groups = await self._run("receipt counts", lambda: list(self._deliveries.aggregate(pipeline)))
        counts: dict[str, dict[str, int]] = {state: {} for state in RECEIPT_STATES}
        for group in groups:
            channel, _, state = (group["_id"] or "").partition("|")
            if state in counts:
                counts[state][channel] = group["n"]
        return counts

    async def holds(self, provider_id: str) -> bool:
        """Whether some delivery already holds this provider id."""
        doc = await self._run("delivery lookup", self._deliveries.find_one, {"provider_id": provider_id}, {"_id": 1})
        return doc is not None

    async def deliveries_of(self, job_id: str, user_id: str) -> list[dict[str, Any]]:
        """Every delivery of one user in one job (one per channel)."""
        query = {"job": job_id, "user": user_id}
        return await self._run("delivery lookup", lambda: list(self._deliveries.find(query).sort("channel", 1)))

    async def failures(self, job_id: str, after: str | None, limit: int) -> list[dict[str, Any]]:
        query: dict[str, Any] = {"job": job_id, "state": {"$in": ["failed", "undelivered"]}}
        if after:
            query["_id"] = {"$gt": after}
        return await self._run(
            "failure listing", lambda: list(self._deliveries.find(query).sort("_id", 1).limit(limit))
        )

    async def all_failures(self, job_id: str) -> list[Failure]:
        """Every failure of a job, a page at a time (the result of a job read back)."""
        failures: list[Failure] = []
        after = None
        while True:
            page = await self.failures(job_id, after, 1000)
            failures.extend(Failure(d["user"], d["channel"], d.get("error") or "failed") for d in page)
            if len(page) < 1000:
                return failures
            after = page[-1]["_id"]

    async def purge_expired(self) -> None:
        """Remove what retention no longer keeps, for servers without a TTL monitor."""
        cutoff = {"expires_at": {"$lt": dt.datetime.now(dt.UTC)}}

        def purge() -> None:
            for collection in self._expiring:
                collection.delete_many(cutoff)

        await self._run("purge", purge)


def _purges_by_ttl_index(client: pymongo.MongoClient[dict[str, Any]]) -> bool:
    """Whether the server purges expired documents in the background (MongoDB's TTL monitor) rather
    than before every read (the embedded store, which names itself in `serverStatus`)."""
    try:
        return client.admin.command("serverStatus").get("process") != "nx_27017"
    except OperationFailure:  # a MongoDB user without the clusterMonitor role
        return True


def _drop_ttl_index(collection: Collection[dict[str, Any]]) -> None:
    """Drop the TTL index an earlier version created on a store that purges before every read."""
    for index in collection.list_indexes():
        if "expireAfterSeconds" in index:
            collection.drop_index(index["name"])


_LISTED_FIELDS = (
    "seq",
    "state",
    "created_at",
    "started_at",
    "finished_at",
    "summary",
    "error",
    "request_id",
    "key_id",
)


# What a fresh claim's filter says: no delivery document at all (every one has a state).
_UNWRITTEN = {"$exists": False}
# An outcome is written over the run's own claim only (`retrying`: cancelled while it waited to retry).
_CLAIMED = {"$in": ["sending", "retrying"]}

# Every state a delivery document can be in: on the embedded store an update filtered on
# `provider_id` alone is slow (4 ms against 1 ms with the state named too).
_ANY_STATE = [*SETTLED_STATES, "sending", "retrying"]


def _receipt_set(r: Receipt, stamp: str | None) -> dict[str, Any]:
    """The fields a receipt sets on its delivery (`stamp`: its delivery.updated event's)."""
    update: dict[str, Any] = {"state": r.state, "receipt_at": r.at, "provider_status": r.status}
    if r.state == "undelivered":
        update.update(error=r.error(), failure="permanent" if r.permanent else "temporary")
        if r.code:
            update["provider_code"] = r.code
    # Keyed by state, not pushed: each state is reached once, and the embedded store keeps pushed
    # documents as strings.
    update[f"receipts.{r.state}"] = r.entry()
    if stamp is not None:
        update["evr"] = f"{stamp}|{r.sid}"
    return update


def _changes(write: Call) -> list[StateChange]:
    """The state changes a settled claim or outcome write made."""
    ops, keys, extra = write.payload
    if write.kind == "outcome":
        return list(extra)
    taken = write.result or set()
    return [StateChange(extra, user, channel, "sending") for channel, user in keys if (channel, user) not in taken]


def _in_one(batch: list[Call], outbox: bool) -> bool:
    """Whether `_flush_in_one` can write this group: it writes both collections (else one
    collection's bulk is one command already), each call one operation, and nothing for the
    callbacks' outbox (stamped outcomes, messages with a job's update: `_flush_apart` does those)."""
    kinds = {w.kind for w in batch}
    if not kinds <= {"job", "claim", "outcome", "job update"}:
        return False
    if not (kinds & {"job", "job update"} and kinds & {"claim", "outcome"}):
        return False
    for w in batch:
        if len(w.payload[0]) != 1:
            return False
        if outbox and ((w.kind == "outcome" and w.payload[1]) or (w.kind == "job update" and w.payload[2])):
            return False
    return True


def _creation(doc: dict[str, Any] | None) -> Call | None:
    """The write of a job's document carried by another write of its run (None: none)."""
    return Call("job", ([doc], None, None)) if doc is not None else None


def _stamped(fields: dict[str, Any], stamp: str | None, doc: dict[str, Any]) -> dict[str, Any]:
    return {**fields, "evr": f"{stamp}|{doc['_id']}"} if stamp is not None else fields


def _bulk(writes: list[Call], what: str, command: Any) -> None:
    """Run `command` once on the operations of every write
    and settle each write from the per-operation errors: a duplicate key on a claim means another
    run holds that delivery (`keys[i]` joins the claim's result); any other error fails its write.
    (Each payload is `(operations, keys, what to tell listeners)`; an outcome's `keys` are the
    fields its writes set, to stamp: callback_outbox.py.)"""
    if not writes:
        return
    ops = [op for write in writes for op in write.payload[0]]
    try:
        command(ops)
        errors: dict[int, dict[str, Any]] = {}
    except BulkWriteError as exc:
        errors = {error["index"]: error for error in exc.details.get("writeErrors", [])}
    except PyMongoError as exc:
        for write in writes:
            write.fail(StoreError(f"ledger {what} failed: {exc}"))
        return
    start = 0
    for write in writes:
        own, keys, _ = write.payload
        taken = set()
        failure = None
        for i in range(len(own)):
            error = errors.get(start + i)
            if error is None:
                continue
            if write.kind == "claim" and error.get("code") == _DUPLICATE_KEY:
                taken.add(keys[i])
            elif write.kind == "job" and error.get("code") == _DUPLICATE_KEY:
                # A creation carried again after a write that carried it was cancelled before it
                # knew: job ids are fresh uuid4s, so the job there is this very one.
                pass
            else:
                failure = StoreError(f"ledger {what} failed: {error.get('errmsg', error)}")
        start += len(own)
        if failure is not None:
            write.fail(failure)
        else:
            write.succeed(taken if write.kind == "claim" else None)


def body_hash(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


__all__ = [
    "ACTIVE_STATES",
    "FINAL_DELIVERY_STATES",
    "FINAL_STATES",
    "IdempotencyClaim",
    "Ledger",
    "ReceiptOutcome",
    "StateChange",
    "body_hash",
    "delivery_key",
    "now_iso",
]
