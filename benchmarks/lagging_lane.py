"""Memory of a send whose SMS lane lags far behind its e-mail lane, against the audience's size,
and what the lagging lane's backlog costs compared with reading its users again from the store.

    python benchmarks/lagging_lane.py [USERS ...]      # default 10000 100000

For each audience size: seeds that many users (the harness's shape) into an embedded nx-27017,
runs a two-lane send (e-mail and SMS; in-memory providers, e-mail unpaced, SMS at 50/s) through
`actors.run_pipeline` with one resolver, and stops it once every e-mail went out: by then the whole
audience was read and the SMS lane's share waits in its backlog. Prints this process's RSS before
the send and at its peak, the time e-mail took, and the user documents returned by the store.

Then, per batch of 500 users: the CPU of the backlog's spill (pickle to a temporary file and back)
against reading the same batch again from the store by `_id` range (this process + nx-27017).
"""

from __future__ import annotations

import pickle
import sys
import tempfile
import time
from typing import Any

import psutil
import pymongo
import pymongo.monitoring
import trio

from actors import run_pipeline
from dispatcher.delivery import RetryPolicy, Transport
from dispatcher.embedded_store import EmbeddedServer
from dispatcher.messages import Message, TextContent
from dispatcher.models import SendRequest
from dispatcher.plan import ChannelPlan, RequestPlan
from dispatcher.ratelimit import ChannelGate
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store
from process_cpu import cpu_seconds

SIZES = [int(a) for a in sys.argv[1:]] or [10_000, 100_000]
SMS_RATE = 50.0


class Counting:
    name = "null"

    def __init__(self) -> None:
        self.sent = 0

    async def send(self, message: Message, address: str) -> str:
        self.sent += 1
        return "id"

    async def aclose(self) -> None:
        pass


class Reads(pymongo.monitoring.CommandListener):
    def __init__(self) -> None:
        self.documents = 0

    def started(self, event: Any) -> None:
        pass

    def succeeded(self, event: Any) -> None:
        if event.command_name in ("find", "getMore"):
            cursor = event.reply.get("cursor", {})
            self.documents += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))

    def failed(self, event: Any) -> None:
        pass


def lane(channel: str, field: str) -> ChannelPlan:
    return ChannelPlan(channel, field, lambda c: TextContent(f"Hi {c['user']['firstName']}", "x"), lambda u: u["_id"])


def seed(client: pymongo.MongoClient, users: int) -> None:
    client.messaging.users.delete_many({})
    for start in range(0, users, 10_000):
        client.messaging.users.insert_many(
            [
                {
                    "_id": f"u{i:07d}",
                    "firstName": "Ana",
                    "email": f"u{i}@example.com",
                    "phone": f"+1555{i:07d}",
                    "devices": ["token-" + "x" * 140],
                    "clusters": ["loadtest"],
                }
                for i in range(start, min(users, start + 10_000))
            ]
        )


async def lagging_send(url: str, users: int) -> dict[str, float]:
    reads = Reads()
    client: pymongo.MongoClient = pymongo.MongoClient(url, event_listeners=[reads])
    store = Store(client, StoreSettings(), UserFields(), 500)
    email, sms = Counting(), Counting()
    transports = {
        "email": Transport(email, ChannelGate(concurrency=64, rate=0, burst=1), RetryPolicy()),
        "sms": Transport(sms, ChannelGate(concurrency=8, rate=SMS_RATE, burst=1), RetryPolicy()),
    }
    request = SendRequest.parse(
        {"channels": ["email", "sms"], "clusters": ["loadtest"], "messageTitle": "t", "messageContent": "c"}
    )
    plan = RequestPlan(request, (lane("email", "email"), lane("sms", "phone")))
    me = psutil.Process()
    before = peak = me.memory_info().rss
    started = trio.current_time()
    email_done = 0.0
    async with trio.open_nursery() as nursery:

        async def sample() -> None:
            nonlocal peak, email_done
            while email.sent < users:
                peak = max(peak, me.memory_info().rss)
                await trio.sleep(0.05)
            email_done = trio.current_time() - started
            peak = max(peak, me.memory_info().rss)
            nursery.cancel_scope.cancel()

        nursery.start_soon(sample)
        await run_pipeline(plan, store, transports, queue_size=256)
    client.close()
    return {
        "rss_before_mb": before / 2**20,
        "rss_peak_mb": peak / 2**20,
        "email_seconds": email_done,
        "sms_sent": sms.sent,
        "documents_read": reads.documents,
    }


def spill_versus_reread(url: str, server_pid: int) -> tuple[float, float, float]:
    """CPU per batch of 500: (spill here, re-read here, re-read in the store)."""
    client: pymongo.MongoClient = pymongo.MongoClient(url)
    users = client.messaging.users
    batches = [list(users.find({}).sort("_id", 1).skip(i * 500).limit(500)) for i in range(20)]
    started = time.process_time()
    with tempfile.TemporaryFile() as spill:
        for batch in batches:
            pickle.dump(batch, spill, protocol=pickle.HIGHEST_PROTOCOL)
        spill.seek(0)
        for _ in batches:
            pickle.load(spill)
    spill_cpu = (time.process_time() - started) / len(batches)
    store_before = cpu_seconds(server_pid)
    started = time.process_time()
    after = ""
    for _ in batches:
        batch = list(users.find({"_id": {"$gt": after}}).sort("_id", 1).limit(500))
        after = batch[-1]["_id"]
    reread_here = (time.process_time() - started) / len(batches)
    reread_store = (cpu_seconds(server_pid) - store_before) / len(batches)
    client.close()
    return spill_cpu, reread_here, reread_store


def main() -> None:
    server = EmbeddedServer(None)
    try:
        client: pymongo.MongoClient = pymongo.MongoClient(server.url)
        print("| users | RSS before | RSS peak | e-mail done in | SMS sent meanwhile | user documents read |")
        print("|---:|---:|---:|---:|---:|---:|")
        for users in SIZES:
            seed(client, users)
            r = trio.run(lagging_send, server.url, users)
            print(
                f"| {users:,} | {r['rss_before_mb']:.0f} MiB | {r['rss_peak_mb']:.0f} MiB | {r['email_seconds']:.1f} s "
                f"| {r['sms_sent']:,.0f} | {r['documents_read']:,.0f} |"
            )
        spill, here, there = spill_versus_reread(server.url, server.pid)
        print(
            f"\nper batch of 500 users: backlog spill (pickle out and back) {spill * 1000:.1f} ms CPU; "
            f"re-read by _id range {here * 1000:.1f} ms here + {there * 1000:.1f} ms in nx-27017"
        )
        client.close()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
