"""What a TTL index costs every read on the embedded store (nx-27017 on neosqlite).

    python benchmarks/ttl_reads.py [DOCUMENTS]      # default 5000

neosqlite purges a collection's TTL-expired documents before every `find`, `find_one`,
`count_documents`, `aggregate` and `distinct` (two `delete_many` over the TTL field), so each read
costs a pass over the collection. The ledger therefore creates no TTL index on the embedded store
and purges on a timer instead (`Ledger.purge_expired`). This prints the store process's CPU per
`find_one` by `_id`, with and without the index, at DOCUMENTS documents.
"""

import datetime as dt
import sys

import pymongo

from dispatcher.embedded_store import EmbeddedServer
from process_cpu import cpu_seconds

N = int(sys.argv[1]) if len(sys.argv) > 1 else 5000
READS = 200
EXPIRES = dt.datetime.now(dt.UTC) + dt.timedelta(days=30)


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(server.url)
        for ttl in (False, True):
            jobs = client.bench[f"jobs_ttl_{ttl}"]
            if ttl:
                jobs.create_index("expires_at", expireAfterSeconds=0)
            jobs.insert_many([{"_id": f"j{i}", "state": "done", "expires_at": EXPIRES} for i in range(N)])
            before = cpu_seconds(server.pid)
            for i in range(READS):
                assert jobs.find_one({"_id": f"j{(i * 7919) % N}"}) is not None
            spent = cpu_seconds(server.pid) - before
            print(
                f"TTL index {'on ' if ttl else 'off'}: {1e3 * spent / READS:.2f} ms of store CPU per find_one at {N} documents"
            )
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
