"""Retention on the embedded store, through real pymongo: no TTL index (its engine would purge the
whole collection before every read), a TTL index left by an earlier version is dropped, and the
ledger's timed purge removes what expired from every collection that carries `expires_at`."""

from __future__ import annotations

import datetime as dt

import pymongo

from dispatcher.ledger import Ledger
from dispatcher.settings import StoreSettings

COLLECTIONS = (
    "dispatch_jobs",
    "dispatch_deliveries",
    "dispatch_jobs_keys",
    "dispatch_jobs_cancels",
    "dispatch_deliveries_receipts",
    "dispatch_callbacks",
)


def _ttl_indexes(database: pymongo.database.Database) -> list[str]:
    return [
        f"{name}.{index['name']}"
        for name in COLLECTIONS
        for index in database[name].list_indexes()
        if "expireAfterSeconds" in index
    ]


async def test_the_embedded_store_gets_no_ttl_index_and_loses_an_old_one(database: pymongo.database.Database) -> None:
    database.dispatch_jobs.create_index("expires_at", expireAfterSeconds=0)  # as an earlier version did
    assert len(_ttl_indexes(database)) == 1
    await Ledger(database.client, StoreSettings(database=database.name)).ensure_indexes()
    assert _ttl_indexes(database) == []


async def test_the_timed_purge_removes_what_expired_everywhere(database: pymongo.database.Database) -> None:
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    await ledger.ensure_indexes()
    now = dt.datetime.now(dt.UTC)
    for name in COLLECTIONS:
        database[name].insert_many(
            [
                {"_id": "old", "expires_at": now - dt.timedelta(minutes=1)},
                {"_id": "kept", "expires_at": now + dt.timedelta(days=1)},
            ]
        )
    await ledger.purge_expired()
    assert {name: sorted(d["_id"] for d in database[name].find()) for name in COLLECTIONS} == {
        name: ["kept"] for name in COLLECTIONS
    }
