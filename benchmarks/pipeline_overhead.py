"""What the pipeline itself costs per delivery: providers replaced by a null one that answers
after 20 ms, so only resolver, renderer, sender and collector use the CPU.

    python benchmarks/pipeline_overhead.py [USERS] [CONCURRENCY] [LEDGER]      # defaults 10000 64 on

Compare with `bare_loop.py` (the same null provider driven by a bare worker loop). Reaches into
the dispatcher's private transports to swap the provider: a benchmark, not an API.
"""

import sys
import time

import pymongo
import trio

from dispatcher import open_dispatcher, settings_from_dict
from dispatcher.embedded_store import open_embedded_store
from dispatcher.delivery import Transport

USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10000
CONCURRENCY = int(sys.argv[2]) if len(sys.argv) > 2 else 64
LEDGER = (sys.argv[3] if len(sys.argv) > 3 else "on") == "on"


class NullProvider:
    name = "null"
    calls = 0

    async def send(self, message: object, address: str) -> None:
        await trio.sleep(0.02)
        NullProvider.calls += 1

    async def aclose(self) -> None:
        pass


async def main() -> None:
    async with open_embedded_store(None) as url:
        users = pymongo.MongoClient(url).messaging.users
        docs = [
            {
                "_id": f"u{i}",
                "name": f"User {i}",
                "emailAddress": f"u{i}@example.com",
                "phoneNumber": f"+1555{i:07d}",
                "deviceToken": [f"t{i}a"] if i % 10 else [f"t{i}a", f"t{i}b"],
                "clusters": ["all"],
            }
            for i in range(USERS)
        ]
        for start in range(0, USERS, 5000):
            users.insert_many(docs[start : start + 5000])
        channel = {"concurrency": CONCURRENCY}
        settings = settings_from_dict(
            {"store": {"url": url, "ledger": LEDGER}, "channels": {"email": channel, "sms": channel, "push": channel}}
        )
        async with open_dispatcher(settings) as d:
            for name, transport in list(d.transports.items()):
                d.transports[name] = Transport(NullProvider(), transport.gate, transport.policy)
            started, cpu = time.perf_counter(), time.process_time()
            result = await d.send(
                {
                    "channels": ["email", "sms", "push"],
                    "clusters": ["all"],
                    "messageTitle": "Hi {{user.name}}",
                    "messageContent": "Hello {{ user.name }}, code {{ data.code }}",
                    "data": {"code": 7},
                }
            )
            elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    sent = sum(result.summary.sent.values())
    # CPU of this process only: the embedded store is another process (its share is not counted).
    print(
        f"{USERS} users, ledger {'on' if LEDGER else 'off'}: {elapsed:.2f}s, {sent / elapsed:.0f} deliveries/s ({NullProvider.calls} provider calls, "
        f"{NullProvider.calls / elapsed:.0f}/s), {cpu / NullProvider.calls * 1e6:.0f} µs CPU per provider call"
    )


trio.run(main)
