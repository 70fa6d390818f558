"""What assembling a job's counts from the ledger costs the embedded store (the end of every shared
fan-out): `Ledger.summary` (two passes) against the thirteen counts it replaced.

    python benchmarks/job_summary.py [DELIVERIES]      # default 9000

Seeds DELIVERIES delivery documents of one job over three channels, computes the summary both
ways (the results must agree) and prints the store process's CPU time and the wall time of each.
"""

import sys
import time

import pymongo
import trio

from dispatcher.embedded_store import EmbeddedServer
from dispatcher.ledger import Ledger
from dispatcher.settings import StoreSettings
from process_cpu import cpu_seconds

N = int(sys.argv[1]) if len(sys.argv) > 1 else 9000
CHANNELS = ["email", "sms", "push"]
STATES = ("sent", "skipped", "failed", "cancelled")


def thirteen_counts(deliveries: pymongo.collection.Collection) -> dict:
    body = {"users": deliveries.count_documents({"job": "j", "channel": CHANNELS[0], "user_found": {"$ne": False}})}
    for state in STATES:
        counts = {c: deliveries.count_documents({"job": "j", "channel": c, "state": state}) for c in CHANNELS}
        body[state] = {c: n for c, n in counts.items() if n}
    return body


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(server.url)
        settings = StoreSettings()
        deliveries = client[settings.database][settings.deliveries_collection]
        deliveries.insert_many(
            [
                {
                    "_id": f"j|{CHANNELS[i % 3]}|u{i}",
                    "job": "j",
                    "user": f"u{i}",
                    "channel": CHANNELS[i % 3],
                    "state": STATES[i % 7 % 3],
                    "attempts": 1,
                }
                for i in range(N)
            ]
        )

        def measure(fn):
            cpu, started = cpu_seconds(server.pid), time.perf_counter()
            result = fn()
            return result, cpu_seconds(server.pid) - cpu, time.perf_counter() - started

        old, old_cpu, old_wall = measure(lambda: thirteen_counts(deliveries))
        new, new_cpu, new_wall = measure(lambda: trio.run(Ledger(client, settings).summary, "j", CHANNELS))
        assert old == new, (old, new)
        print(
            f"{N} deliveries: thirteen counts {old_cpu:.2f} s of store CPU ({old_wall:.2f} s); "
            f"Ledger.summary {new_cpu:.2f} s ({new_wall:.2f} s)"
        )
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
