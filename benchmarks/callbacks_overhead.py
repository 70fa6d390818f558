"""What `delivery.updated` callbacks cost a fan-out: a USERS-user SMS send with callbacks on
(delivery.updated + job.finished to a verifying receiver on loopback) against the same send
without, interleaved (off, on, off, on, ...), through the embedding API on the embedded store.

    python benchmarks/callbacks_overhead.py [USERS] [ROUNDS]      # default 10000 3

Prints each round's throughput (deliveries per second, from the send's start to its result),
the medians, their ratio (on / off), and for the rounds with callbacks the POSTs the receiver got
once the outbox is empty, against the bound USERS / batch_size + 1 (the job.finished), and that
every delivery's event arrived. On a shared machine wall-clock throughput swings by tens of per
cent between rounds; the CPU per delivery of the service and of its store (the callbacks'
delivery included) is the steadier measure of what callbacks cost, and its ratio the throughput
ratio of a CPU-bound deployment.
"""

import base64
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

from dispatcher import open_dispatcher
from dispatcher.embedded_store import EmbeddedServer
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.webhooks import WebhookReceiver
from dispatcher.settings import settings_from_dict
from process_cpu import cpu_seconds

USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BATCH_SIZE = 100


def settings(url: str, database: str, outbox: str):  # noqa: ANN201
    return settings_from_dict(
        {
            "store": {"url": url, "database": database},
            "providers": {"outbox": {"dir": outbox}},
            "sender": {"sms": "+15550009999"},
            "channels": {"active": ["sms"], "sms": {"concurrency": 64}},
            "callbacks": {
                "allow_http": True,
                "allow_private": True,
                "batch_size": BATCH_SIZE,
                "secret": SECRET,
            },
        }
    )


def received(receiver: WebhookReceiver, index: int) -> list[dict]:
    """The delivery.updated events of round `index` (duplicates dropped)."""
    return [
        e
        for r in receiver.unique().values()
        if r.path == f"/r{index}" and r.body["type"] == "delivery.updated"
        for e in r.body["data"]["deliveries"]
    ]


async def one_round(
    url: str, store_pid: int, index: int, callbacks: bool, receiver_url: str, receiver: WebhookReceiver
) -> dict:
    import pymongo

    database = f"bench_callbacks_{index}"
    client = pymongo.MongoClient(url)
    client[database].users.insert_many(
        [{"_id": f"u{i:05d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(USERS)]
    )
    request = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
    if callbacks:
        request.update(callbackUrl=f"{receiver_url}/r{index}", callbackEvents=["delivery.updated", "job.finished"])
    posts_before = receiver.posts
    with tempfile.TemporaryDirectory() as outbox:
        async with open_dispatcher(settings(url, database, outbox)) as d:
            await d.ledger.ensure_indexes()
            started = time.perf_counter()
            cpu_started = time.process_time(), cpu_seconds(store_pid)
            result = await d.send(request)
            seconds = time.perf_counter() - started
            assert result.summary.sent == {"sms": USERS}, result.summary
            if callbacks:
                # Until every event and the job.finished arrived and nothing is pending. An
                # indexed find, not count_documents: the embedded store answers that aggregation
                # by decoding every document of the outbox, which would be measured as the
                # callbacks' cost.
                outbox = client[database].dispatch_callbacks
                with trio.fail_after(120):
                    while (
                        len(received(receiver, index)) < USERS
                        or not any(r.path == f"/r{index}" for r in receiver.of_type("job.finished"))
                        or outbox.find_one({"role": {"$eq": "message"}, "state": {"$eq": "pending"}}, {"_id": 1})
                    ):
                        await trio.sleep(0.2)
            # CPU of the service and of its store for the whole send, callbacks delivered included
            # (the receiver runs in this process too: its share is counted against callbacks).
            cpu = time.process_time() - cpu_started[0], cpu_seconds(store_pid) - cpu_started[1]
    events = received(receiver, index)
    # No drop_database: nx-27017 0.8.1 drops the next connection after it. A database per round.
    client.close()
    return {
        "rate": USERS / seconds,
        "service_us": cpu[0] / USERS * 1e6,
        "store_us": cpu[1] / USERS * 1e6,
        "posts": receiver.posts - posts_before,
        "events": len(events),
    }


async def main(server: EmbeddedServer) -> None:
    receiver = WebhookReceiver(SECRET)
    results: dict[bool, list[dict]] = {False: [], True: []}
    try:
        async with trio.open_nursery() as nursery:
            receiver_url = await nursery.start(serve_asgi, receiver)
            index = 0
            for round_ in range(ROUNDS):
                for callbacks in (False, True):
                    index += 1
                    outcome = await one_round(server.url, server.pid, index, callbacks, receiver_url, receiver)
                    results[callbacks].append(outcome)
                    label = "on " if callbacks else "off"
                    extra = f", {outcome['posts']} POSTs, {outcome['events']} events" if callbacks else ""
                    print(
                        f"round {round_ + 1} callbacks {label}: {outcome['rate']:.0f} deliveries/s, CPU per delivery "
                        f"{outcome['service_us']:.0f} µs service + {outcome['store_us']:.0f} µs store{extra}; "
                        f"load average {os.getloadavg()[0]:.2f}",
                        flush=True,
                    )
            nursery.cancel_scope.cancel()
    finally:
        if server.poll() is not None:  # the store died: say how
            log = Path(server._scratch.name) / "output.log"
            print(f"store exited {server.poll()}: {log.read_text(errors='replace')[-3000:]}")
        server.stop()
    off = statistics.median(r["rate"] for r in results[False])
    on = statistics.median(r["rate"] for r in results[True])
    bound = USERS // BATCH_SIZE + 1
    print(f"median off {off:.0f}/s, on {on:.0f}/s, ratio {on / off:.2f}")
    cpu_off = statistics.median(r["service_us"] + r["store_us"] for r in results[False])
    cpu_on = statistics.median(r["service_us"] + r["store_us"] for r in results[True])
    print(
        f"median CPU per delivery (service + store) off {cpu_off:.0f} µs, on {cpu_on:.0f} µs: "
        f"a CPU-bound throughput ratio of {cpu_off / cpu_on:.2f}"
    )
    print(
        f"POSTs with callbacks: {[r['posts'] for r in results[True]]} (bound {bound}); rejected signatures {receiver.rejected}"
    )
    print(f"events received per round: {[r['events'] for r in results[True]]} of {USERS}")


if __name__ == "__main__":
    # Started by the main thread: the store dies with the thread that started it (PR_SET_PDEATHSIG),
    # and trio's worker threads end after a few idle seconds.
    trio.run(main, EmbeddedServer(None))
