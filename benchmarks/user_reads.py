"""What one read of a send's users costs, service side and store side: the price of each lane
reading the users itself (a three-channel fan-out reads them three times).

    python benchmarks/user_reads.py [USERS]      # default 10000

Reads USERS seeded users (the harness's shape) through `Store.stream_users` three times and
prints the CPU time of this process (the service's share: thread hops, BSON decoding) and of the
embedded store's process (nx-27017) for each read. Divide by the deliveries of a fan-out to
compare with its CPU per delivery.
"""

import sys
import time

import pymongo
import trio

from dispatcher.embedded_store import EmbeddedServer
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store
from process_cpu import cpu_seconds

USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10000


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(server.url)
        client.messaging.users.insert_many(
            [
                {
                    "_id": f"u{i:06d}",
                    "firstName": "Ana",
                    "email": f"u{i}@example.com",
                    "phone": "+15550001234",
                    "devices": ["token-" + "x" * 140],
                    "clusters": ["loadtest"],
                }
                for i in range(USERS)
            ]
        )
        store = Store.connect(server.url, StoreSettings(), UserFields(), 500)

        async def read() -> int:
            n = 0
            async for batch in store.stream_users([], ["loadtest"]):
                n += len(batch)
            return n

        for _ in range(3):
            before, started = cpu_seconds(server.pid), time.process_time()
            n = trio.run(read)
            service, store_cpu = time.process_time() - started, cpu_seconds(server.pid) - before
            print(
                f"read {n} users: service CPU {1000 * service:.0f} ms ({1e6 * service / n:.1f} µs per user), "
                f"store CPU {1000 * store_cpu:.0f} ms ({1e6 * store_cpu / n:.1f} µs per user)"
            )
        store.close()
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
