"""What the ledger's two writes per delivery cost the embedded store (nx-27017), in its own CPU.

    python benchmarks/store_writes.py [DELIVERIES]      # default 2000

Writes DELIVERIES claims (`InsertOne`, as `Ledger.claim_sending` does for a new job) and then
their outcomes, one bulk each, in the shapes the ledger uses or could use, and prints the store
process's CPU time per document. The ledger batches its round trips (group commit), so what is
left per delivery is this per-document work: it bounds the ledger's throughput on this store, and
says nothing about MongoDB.
"""

import datetime as dt
import sys

import pymongo
from pymongo import InsertOne, ReplaceOne, UpdateOne

from dispatcher.embedded_store import EmbeddedServer
from process_cpu import cpu_seconds

N = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
EXPIRES = dt.datetime.now(dt.UTC)


def claims(job: str) -> list[InsertOne]:
    return [
        InsertOne(
            {
                "_id": f"{job}|sms|u{i}",
                "job": job,
                "user": f"u{i}",
                "channel": "sms",
                "state": "sending",
                "run": "r1",
                "expires_at": EXPIRES,
            }
        )
        for i in range(N)
    ]


OUTCOMES = {
    "update of the attempt's fields (the ledger's)": lambda job, i: UpdateOne(
        {"_id": f"{job}|sms|u{i}"}, {"$set": {"state": "sent", "attempts": 1, "provider_id": f"SM{i}"}}
    ),
    "upsert of every field (the ledger before)": lambda job, i: UpdateOne(
        {"_id": f"{job}|sms|u{i}"},
        {
            "$set": {
                "job": job,
                "user": f"u{i}",
                "channel": "sms",
                "state": "sent",
                "error": None,
                "attempts": 1,
                "provider_id": f"SM{i}",
                "user_found": True,
                "expires_at": EXPIRES,
            }
        },
        upsert=True,
    ),
    "replacement of the whole document": lambda job, i: ReplaceOne(
        {"_id": f"{job}|sms|u{i}"},
        {
            "job": job,
            "user": f"u{i}",
            "channel": "sms",
            "state": "sent",
            "run": "r1",
            "attempts": 1,
            "provider_id": f"SM{i}",
            "expires_at": EXPIRES,
        },
    ),
}


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(server.url)
        deliveries = client.bench.deliveries
        deliveries.create_index([("job", 1), ("user", 1), ("channel", 1)], unique=True)

        for number, (name, outcome) in enumerate(OUTCOMES.items()):
            job = f"job{number}"
            before = cpu_seconds(server.pid)
            deliveries.bulk_write(claims(job), ordered=False)
            claimed = cpu_seconds(server.pid)
            deliveries.bulk_write([outcome(job, i) for i in range(N)], ordered=False)
            done = cpu_seconds(server.pid)
            print(
                f"claim (insert) {1e6 * (claimed - before) / N:.0f} µs, outcome as {name} "
                f"{1e6 * (done - claimed) / N:.0f} µs of store CPU per delivery"
            )
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
