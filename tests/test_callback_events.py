"""`delivery.updated` events formed from the delivery writes themselves (their landing told to the
outbox, not read back from the store) against what the store holds: the same events, none for a
write that did not land, and the store read where the outbox was not told (a receipt)."""

from __future__ import annotations

import json
import time
from typing import Any

import pymongo

from dispatcher.callback_outbox import DELIVERY_UPDATED, CallbackOutbox, Target, iso_ms_at
from dispatcher.ledger import Ledger
from dispatcher.messages import Delivery
from dispatcher.states import Receipt
from dispatcher.settings import StoreSettings


def _outbox(database: pymongo.database.Database, ledger: Ledger) -> CallbackOutbox:
    outbox = CallbackOutbox(
        database.client,
        database.name,
        "dispatch_callbacks",
        "dispatch_jobs",
        "dispatch_deliveries",
        owner="p1",
        lease_seconds=30,
        batch_size=100,
        batch_ms=0,
        max_age_hours=1,
        retention_days=1,
    )
    ledger.attach_outbox(outbox)
    outbox.track("job", Target("https://example.com/hooks", (DELIVERY_UPDATED,)), None, "req")
    return outbox


def _events(database: pymongo.database.Database) -> list[dict[str, Any]]:
    messages = database.dispatch_callbacks.find({"role": "message"}).sort("created", 1)
    return [e for m in messages for e in json.loads(m["body"])["data"]["deliveries"]]


def _as_stored(doc: dict[str, Any], field: str, state: str) -> dict[str, Any]:
    """The event the delivery document `doc` holds under its stamp `field`."""
    event = {"userId": doc["user"], "channel": doc["channel"], "state": state}
    if doc.get("error") and state == doc["state"]:
        event["error"] = doc["error"]
    event["at"] = iso_ms_at(int(doc[field].split("|")[1]) / 1e6)
    if doc.get("provider_id"):
        event["providerId"] = doc["provider_id"]
    return event


async def test_events_from_the_writes_are_what_the_store_holds(database: pymongo.database.Database) -> None:
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    await ledger.ensure_indexes()
    outbox = _outbox(database, ledger)
    database.dispatch_jobs.insert_one({"_id": "job", "state": "running"})
    assert await ledger.claim_sending("job", "run", [("sms", "u1", None), ("sms", "u2", None)]) == set()
    await ledger.record(
        "job",
        [
            Delivery("u1", "sms", "sent", attempts=1, provider_id="SM1"),
            Delivery("u2", "sms", "failed", error="rejected", attempts=1),
            Delivery("ghost", "sms", "failed", error="user not found", user_found=False),
        ],
    )
    docs = {d["user"]: d for d in database.dispatch_deliveries.find({"job": "job"})}
    # Formed from the writes, not read back: stamps taken off the documents meanwhile change nothing.
    database.dispatch_deliveries.update_many({"job": "job"}, {"$unset": {"ev": ""}})
    assert await outbox.collect(time.time(), flush=True) == 1
    assert _events(database) == [_as_stored(docs[u], "ev", docs[u]["state"]) for u in ("ghost", "u1", "u2")]

    # Never claimed: its conditional write lands nowhere and the outbox is told so (the store is
    # read for that write's stamp): no event of it.
    await ledger.record("job", [Delivery("u3", "sms", "sent", attempts=1, provider_id="SM3")])
    assert await outbox.collect(time.time(), flush=True) == 0
    assert database.dispatch_deliveries.find_one({"_id": "job|sms|u3"}) is None

    # A receipt: its writer does not tell the outbox what landed, so the store is read for it.
    outcome = await ledger.apply_receipts(
        [Receipt("SM1", "delivered", "delivered", time.time(), delivery="job|sms|u1")]
    )
    assert outcome is not None
    assert await outbox.collect(time.time(), flush=True) == 1
    u1 = database.dispatch_deliveries.find_one({"_id": "job|sms|u1"})
    assert u1 is not None and u1["state"] == "delivered"
    assert _events(database)[3:] == [_as_stored(u1, "evr", "delivered")]

    # And the events after it follow.
    assert await ledger.claim_sending("job", "run", [("sms", "u4", None)]) == set()
    await ledger.record("job", [Delivery("u4", "sms", "sent", attempts=1, provider_id="SM4")])
    assert await outbox.collect(time.time(), flush=True) == 1
    u4 = database.dispatch_deliveries.find_one({"_id": "job|sms|u4"})
    assert u4 is not None
    assert _events(database)[4:] == [_as_stored(u4, "ev", "sent")]
