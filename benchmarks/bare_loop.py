"""The ceiling for `pipeline_overhead.py`: the same null provider (20 ms) and the same number of
sends (31,000: 10,000 users on three channels, 1 in 10 with two devices), 64 workers per
channel reading a memory channel, nothing else.

    python benchmarks/bare_loop.py
"""

import time

import trio

USERS, WORKERS = 10000, 64
calls = 0


async def null_send() -> None:
    global calls
    await trio.sleep(0.02)
    calls += 1


async def lane(count: int) -> None:
    send, receive = trio.open_memory_channel[int](256)

    async def feed() -> None:
        with send:
            for i in range(count):
                await send.send(i)

    async def worker() -> None:
        async for _ in receive:
            await null_send()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        for _ in range(WORKERS):
            nursery.start_soon(worker)


async def main() -> None:
    started, cpu = time.perf_counter(), time.process_time()
    async with trio.open_nursery() as nursery:
        for count in (USERS, USERS, USERS + USERS // 10):
            nursery.start_soon(lane, count)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    print(
        f"bare loop: {calls} sends in {elapsed:.2f}s = {calls / elapsed:.0f}/s, {cpu / calls * 1e6:.0f} µs CPU per send"
    )


trio.run(main)
