"""What each store command of a single-recipient send costs, one command at a time as the send
makes them: the embedded store's CPU (nx-27017, its own process) and this process's (pymongo's
client side), per command.

    python benchmarks/store_commands.py [COMMANDS] [ROUNDS]     # default 600 2

A send with the ledger makes four writes (the job's insert and its delivery's claim in one group
commit, the outcome and the job's end in the next) besides the user's `find_one`: four commands,
or two where the store has `bulkWrite` (the last two rows); the floor
(`floor_app.py`) makes two (`insert_one`, `update_one`). The job's insert is timed into a
collection with the jobs collection's indexes (`Ledger.ensure_indexes`) and into one with `_id`
alone, to see what the listing's indexes cost it.
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

import pymongo
from pymongo import InsertOne, UpdateOne

from dispatcher.embedded_store import EmbeddedServer
from dispatcher.ledger import Ledger, now_iso
from dispatcher.settings import StoreSettings
from dispatcher.listing import JOB_LISTING_INDEXES
from process_cpu import cpu_seconds

N = int(sys.argv[1]) if len(sys.argv) > 1 else 600
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 2
REQUEST = {
    "channels": ["email"],
    "recipients": ["user-000123"],
    "messageTitle": "Hello {{ user.name }}",
    "messageContent": "Hi {{ user.name }}, your load-test code is {{ data.code }}.",
    "data": {"code": "LT-2026"},
}
SUMMARY = {"users": 1, "sent": {"email": 1}, "skipped": {}, "failed": {}, "cancelled": {}}


def claim(job_id: str, namespace: str | None = None) -> InsertOne[dict[str, Any]]:
    doc = {"job": job_id, "user": "u1", "channel": "email", "state": "sending", "run": "r", "claimed_at": time.time()}
    return InsertOne({"_id": f"{job_id}|email|u1", **doc, "expires_at": dt.datetime.now(dt.UTC)}, namespace=namespace)


def outcome(job_id: str, namespace: str | None = None) -> UpdateOne:
    fields = {"state": "sent", "attempts": 1, "settled_at": time.time(), "provider_id": "x"}
    query = {"_id": f"{job_id}|email|u1", "state": {"$in": ["sending", "retrying"]}}
    return UpdateOne(query, {"$set": fields}, namespace=namespace)


def end(job_id: str, namespace: str | None = None) -> UpdateOne:
    fields = {"state": "done", "finished_at": now_iso(), "summary": SUMMARY}
    return UpdateOne({"_id": job_id}, {"$set": fields}, namespace=namespace)


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(server.url)
        db = client.bench
        ledger = Ledger(client, StoreSettings(database="bench"))

        def job(job_id: str) -> dict[str, Any]:
            return ledger.job_document(job_id, REQUEST, "owner", 30, None, request_id=uuid.uuid4().hex)

        indexed, bare, deliveries = db.jobs, db.jobs_bare, db.deliveries
        indexed.create_index([("state", 1), ("lease_expires", 1)])
        for keys in JOB_LISTING_INDEXES:
            indexed.create_index(list(keys))
        deliveries.create_index([("job", 1), ("user", 1), ("channel", 1)], unique=True)
        deliveries.create_index([("job", 1), ("state", 1)])
        deliveries.create_index("provider_id")
        deliveries.create_index([("state", 1), ("settled_at", 1)])
        bare.insert_one({"_id": "warm"})
        db.users.insert_one({"_id": "u1", "email": "u1@example.com"})
        commands: dict[str, Callable[[str], Any]] = {
            "job insert (jobs indexes)": lambda j: indexed.insert_many([job(j)], ordered=False),
            "job insert (_id only)": lambda j: bare.insert_many([job(j)], ordered=False),
            "claim (insert)": lambda j: deliveries.bulk_write([claim(j)], ordered=False),
            "outcome (update)": lambda j: deliveries.bulk_write([outcome(j)], ordered=False),
            "job end (jobs indexes)": lambda j: indexed.bulk_write([end(j)], ordered=False),
            "job end (_id only)": lambda j: bare.bulk_write([end(j)], ordered=False),
            "user find_one": lambda j: db.users.find_one({"_id": "u1"}),
            # What the ledger sends instead where the store has `bulkWrite` (MongoDB 8.0): each
            # pair above as one command (`Ledger._flush_in_one`).
            # (Job ids of their own: the rows above wrote these jobs.)
            "job insert + claim, one": lambda j: client.bulk_write(
                [InsertOne(job(j + "1"), namespace=indexed.full_name), claim(j + "1", deliveries.full_name)],
                ordered=True,
            ),
            "outcome + job end, one": lambda j: client.bulk_write(
                [outcome(j + "1", deliveries.full_name), end(j + "1", indexed.full_name)], ordered=True
            ),
            "floor insert_one": lambda j: db.floor.insert_one({"_id": j, "state": "sending"}),
            "floor update_one": lambda j: db.floor.update_one({"_id": j}, {"$set": {"state": "sent", "ids": ["x"]}}),
        }
        for job_id in [uuid.uuid4().hex for _ in range(20)]:  # warm-up, not counted
            for command in commands.values():
                command(job_id)
        figures: dict[str, list[tuple[float, float]]] = {name: [] for name in commands}
        for _ in range(ROUNDS):
            ids = [uuid.uuid4().hex for _ in range(N)]
            for name, command in commands.items():  # in a send's order, so each finds what it updates
                store, own = cpu_seconds(server.pid), time.process_time()
                for job_id in ids:
                    command(job_id)
                store, own = cpu_seconds(server.pid) - store, time.process_time() - own
                figures[name].append((store / N * 1000, own / N * 1000))
        print(f"{'command':28}{'store CPU ms':>14}{'client CPU ms':>15}   (median of {ROUNDS} rounds of {N})")
        for name, values in figures.items():
            store_ms = statistics.median(v[0] for v in values)
            client_ms = statistics.median(v[1] for v in values)
            print(f"{name:28}{store_ms:14.3f}{client_ms:15.3f}")
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
