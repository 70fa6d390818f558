"""What `delivery.updated` callbacks cost a fan-out: a USERS-user SMS send with callbacks on
(delivery.updated + job.finished to a verifying receiver on loopback) against the same send
without, interleaved (off, on, off, on, ...), through the embedding API on the embedded store.
The receiver is the customer's system: it runs in a process of its own (callback_receiver.py),
verifying every POST with `standardwebhooks`, and its CPU is reported apart from the service's.

    python benchmarks/callbacks_overhead.py [USERS] [ROUNDS]      # default 10000 3

Prints each round's throughput (deliveries per second, from the send's start to its result),
the medians, their ratio (on / off), and for the rounds with callbacks the POSTs the receiver got
once the outbox is empty, against the bound USERS / batch_size + 1 (the job.finished), and that
every delivery's event arrived. On a shared machine wall-clock throughput swings by tens of per
cent between rounds; the CPU per delivery of the service and of its store (the callbacks'
delivery included) is the steadier measure of what callbacks cost, and its ratio the throughput
ratio of a CPU-bound deployment. CPU is counted per process from the send's start until every
event and the job.finished arrived and no message is pending.
"""

import base64
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from dispatcher import open_dispatcher
from dispatcher.embedded_store import EmbeddedServer
from dispatcher.ledger import Ledger
from dispatcher.settings import settings_from_dict
from process_cpu import cpu_seconds

USERS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 3
SECRET = "whsec_" + base64.b64encode(os.urandom(32)).decode()
BATCH_SIZE = 100


class _Indexed:
    """When the dispatcher's own index creation (started in the background as it opens) is done:
    left running, it overlaps the measured send (seconds of store time, in some rounds only)."""

    done = trio.Event()
    _create = Ledger.ensure_indexes

    @staticmethod
    async def ensure_indexes(ledger: Ledger) -> None:
        await _Indexed._create(ledger)
        _Indexed.done.set()


Ledger.ensure_indexes = _Indexed.ensure_indexes  # type: ignore[method-assign]


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


class Receiver:
    """callback_receiver.py in its own process."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).with_name("callback_receiver.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "CALLBACK_SECRET": SECRET},
            text=True,
        )
        assert self.process.stdout is not None
        self.url = self.process.stdout.readline().strip()
        assert self.url.startswith("http://"), self.url
        self.pid = self.process.pid

    async def get(self, endpoint: str, **params: object) -> dict:
        async with httpx.AsyncClient(base_url=self.url, timeout=130) as http:
            response = await http.get(endpoint, params=params)
            response.raise_for_status()
            return response.json()

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()  # it exits when its stdin closes
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def one_round(url: str, store_pid: int, index: int, callbacks: bool, receiver: Receiver) -> dict:
    import pymongo

    database = f"bench_callbacks_{index}"
    client = pymongo.MongoClient(url)
    client[database].users.insert_many(
        [{"_id": f"u{i:05d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(USERS)]
    )
    request = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
    if callbacks:
        request.update(callbackUrl=f"{receiver.url}/r{index}", callbackEvents=["delivery.updated", "job.finished"])
    posts_before = (await receiver.get("/stats"))["posts"]
    arrived = {"events": 0}
    _Indexed.done = trio.Event()
    with tempfile.TemporaryDirectory() as outbox:
        async with open_dispatcher(settings(url, database, outbox)) as d:
            with trio.fail_after(60):
                await _Indexed.done.wait()
            started = time.perf_counter()
            cpu_started = time.process_time(), cpu_seconds(store_pid), cpu_seconds(receiver.pid)
            result = await d.send(request)
            seconds = time.perf_counter() - started
            assert result.summary.sent == {"sms": USERS}, result.summary
            if callbacks:
                # Until every event and the job.finished arrived (the receiver answers once they
                # did: no polling), then until nothing is pending. An indexed find, not
                # count_documents: the embedded store answers that aggregation by decoding every
                # document of the outbox, which would be measured as the callbacks' cost.
                arrived = await receiver.get("/wait", path=f"/r{index}", events=USERS)
                outbox = client[database].dispatch_callbacks
                with trio.fail_after(120):
                    while outbox.find_one({"role": {"$eq": "message"}, "state": {"$eq": "pending"}}, {"_id": 1}):
                        await trio.sleep(0.05)
            # CPU of the service, its store and the receiver for the whole send, callbacks
            # delivered included.
            cpu = (
                time.process_time() - cpu_started[0],
                cpu_seconds(store_pid) - cpu_started[1],
                cpu_seconds(receiver.pid) - cpu_started[2],
            )
    stats = await receiver.get("/stats")
    # No drop_database: nx-27017 0.8.1 drops the next connection after it. A database per round.
    client.close()
    return {
        "rate": USERS / seconds,
        "service_us": cpu[0] / USERS * 1e6,
        "store_us": cpu[1] / USERS * 1e6,
        "receiver_us": cpu[2] / USERS * 1e6,
        "posts": stats["posts"] - posts_before,
        "rejected": stats["rejected"],
        "events": arrived["events"],
    }


async def main(server: EmbeddedServer) -> None:
    receiver = Receiver()
    results: dict[bool, list[dict]] = {False: [], True: []}
    try:
        index = 0
        for round_ in range(ROUNDS):
            for callbacks in (False, True):
                index += 1
                outcome = await one_round(server.url, server.pid, index, callbacks, receiver)
                results[callbacks].append(outcome)
                label = "on " if callbacks else "off"
                extra = (
                    f" + {outcome['receiver_us']:.0f} µs receiver, {outcome['posts']} POSTs, {outcome['events']} events"
                    if callbacks
                    else ""
                )
                print(
                    f"round {round_ + 1} callbacks {label}: {outcome['rate']:.0f} deliveries/s, CPU per delivery "
                    f"{outcome['service_us']:.0f} µs service + {outcome['store_us']:.0f} µs store{extra}; "
                    f"load average {os.getloadavg()[0]:.2f}",
                    flush=True,
                )
    finally:
        receiver.stop()
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
    for part in ("service", "store"):
        part_off = statistics.median(r[f"{part}_us"] for r in results[False])
        part_on = statistics.median(r[f"{part}_us"] for r in results[True])
        print(f"median {part} CPU per delivery: off {part_off:.0f} µs, on {part_on:.0f} µs ({part_on - part_off:+.0f})")
    print(f"median receiver CPU per delivery: {statistics.median(r['receiver_us'] for r in results[True]):.0f} µs")
    rejected = max((r["rejected"] for r in results[True]), default=0)
    print(
        f"POSTs with callbacks: {[r['posts'] for r in results[True]]} (bound {bound}); rejected signatures {rejected}"
    )
    print(f"events received per round: {[r['events'] for r in results[True]]} of {USERS}")


if __name__ == "__main__":
    # Started by the main thread: the store dies with the thread that started it (PR_SET_PDEATHSIG),
    # and trio's worker threads end after a few idle seconds.
    trio.run(main, EmbeddedServer(None))
