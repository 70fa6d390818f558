"""CPU of single-recipient sends through `Dispatcher.send` in this process, the event loop's
thread apart from the worker threads (pymongo): no HTTP, a null provider answering after 5 ms,
8 clients in a closed loop, on the embedded store (its own process, not counted).

    python benchmarks/send_cpu.py [on|off] [SENDS] [--profile FILE]   # defaults: on 1500

`--profile` writes a cProfile of the loop thread (on `time.thread_time`, so waits cost nothing)
to FILE. Reaches into the dispatcher's transports to swap the provider: a benchmark, not an API.
Run it from two checkouts (`PYTHONPATH`) alternately to compare them.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pymongo
import trio

from dispatcher import Dispatcher, open_dispatcher, settings_from_dict
from dispatcher.delivery import Transport
from dispatcher.embedded_store import open_embedded_store

CLIENTS = 8


class NullProvider:
    name = "null"

    async def send(self, message: object, address: str) -> None:
        await trio.sleep(0.005)

    async def aclose(self) -> None:
        pass


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each thread of this process."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        out[tid] = (int(fields[11]) + int(fields[12])) / ticks
    return out


def request(i: int) -> dict[str, Any]:
    return {
        "channels": ["email"],
        "recipients": [f"u{i}"],
        "messageTitle": "Hi {{user.name}}",
        "messageContent": "Hello {{user.name}}",
    }


@asynccontextmanager
async def open_null_dispatcher(ledger: bool, users: int, warm_up: int) -> AsyncIterator[Dispatcher]:
    """A dispatcher on an embedded store holding `users` users, its providers replaced by the
    null one, after `warm_up` sends to users 0, 1, ... (also `loop_passes.py`'s set-up)."""
    async with open_embedded_store(None) as url:
        pymongo.MongoClient(url).messaging.users.insert_many(
            [{"_id": f"u{i}", "name": f"User {i}", "emailAddress": f"u{i}@example.com"} for i in range(users)]
        )
        settings = settings_from_dict(
            {"store": {"url": url, "ledger": ledger}, "channels": {"email": {"concurrency": 16}}}
        )
        async with open_dispatcher(settings) as d:
            for name, transport in list(d.transports.items()):
                d.transports[name] = Transport(NullProvider(), transport.gate, transport.policy)
            for i in range(warm_up):
                await d.send(request(i))
            yield d


async def main(ledger: bool, sends: int, profile: str | None, rate: float) -> None:
    async with open_null_dispatcher(ledger, sends, warm_up=100) as d:
        profiler = cProfile.Profile(time.thread_time) if profile else None

        async def client(k: int) -> None:
            for i in range(k, sends, CLIENTS):
                await d.send(request(i))

        async def paced(i: int) -> None:
            await trio.sleep_until(start + i / rate)
            await d.send(request(i))

        before, cpu, wall = thread_cpu(), time.process_time(), time.perf_counter()
        if profiler:
            profiler.enable()
        start = trio.current_time()
        async with trio.open_nursery() as nursery:
            for k in range(0 if rate else CLIENTS):
                nursery.start_soon(client, k)
            for i in range(sends if rate else 0):
                nursery.start_soon(paced, i)
        if profiler:
            profiler.disable()
            profiler.dump_stats(profile)
        after, cpu, wall = thread_cpu(), time.process_time() - cpu, time.perf_counter() - wall
    loop = str(os.getpid())
    loop_cpu = after[loop] - before.get(loop, 0.0)
    threads = sum(v - before.get(tid, 0.0) for tid, v in after.items() if tid != loop)
    print(
        f"ledger {'on' if ledger else 'off'}: {cpu / sends * 1e6:.0f} µs CPU a send (loop thread "
        f"{loop_cpu / sends * 1e6:.0f}, other threads {threads / sends * 1e6:.0f}), {sends / wall:.0f} sends/s"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("ledger", nargs="?", choices=["on", "off"], default="on")
    parser.add_argument("sends", nargs="?", type=int, default=1500)
    parser.add_argument("--profile", metavar="FILE")
    parser.add_argument("--rate", type=float, default=0.0, help="open loop: sends a second (default: closed loop)")
    args = parser.parse_args()
    trio.run(main, args.ledger == "on", args.sends, args.profile, args.rate)
