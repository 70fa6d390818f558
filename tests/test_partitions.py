"""Partitions of large sends on a Redis Stream (`dispatcher.cluster.partitions`), against a real
`redis-server`: every partition consumed once by several queues, progress counted once per
partition, a SIGKILLed process's partition reclaimed, a slow-but-alive worker not robbed, a failing
handler retried without spinning, a graceful shutdown handing its partition over at once, a
draining process finishing its partition and taking no other, consumers of dead processes
forgotten (never one holding a partition), and a Redis restart survived.

Run as a script, this file is the consumer process that the SIGKILL test kills:
    python tests/test_partitions.py URL NAMESPACE CLAIM_IDLE_SECONDS
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import coredis
import trio
from coredis.retry import NoRetryPolicy

from dispatcher.cluster.partitions import Partition, PartitionQueue
from redis_server import RedisServer

_namespaces = iter(range(10**6))
IDLE = 0.5  # claim_idle_seconds of the tests


def namespace() -> str:
    return f"ptest{next(_namespaces)}-{time.time_ns()}"


def partitions_of(job_id: str, n: int) -> list[Partition]:
    return [Partition(job_id, None if i == 0 else f"u{i * 10:05d}", f"u{(i + 1) * 10:05d}", i) for i in range(n)]


@asynccontextmanager
async def open_queue(url: str, ns: str, timeout: float = 0.5) -> AsyncIterator[PartitionQueue]:
    """A queue on a client of its own (as a process of the cluster would have)."""
    client: coredis.Redis[bytes] = coredis.Redis.from_url(
        url, connect_timeout=timeout, stream_timeout=timeout, retry_policy=NoRetryPolicy()
    )
    async with client:
        yield PartitionQueue(client, ns, timeout=timeout)


async def wait_for_progress(queue: PartitionQueue, job_id: str, want: int, within: float) -> None:
    with trio.fail_after(within):
        while (await queue.progress(job_id))[0] < want:
            await trio.sleep(0.02)


def test_partition_fields_round_trip() -> None:
    for partition in (Partition("j1", None, "u10", 0), Partition("j1", "u10", "u20", 1)):
        fields = partition.to_fields()
        assert Partition.from_fields(fields) == partition
        assert Partition.from_fields({k.encode(): v.encode() for k, v in fields.items()}) == partition
    assert Partition("j", None, "u1", 0).to_fields()["after"] == ""


async def test_two_queues_consume_every_partition_once(redis_url: str) -> None:
    ns, n = namespace(), 40
    seen: list[tuple[str, int]] = []
    completed: list[str] = []

    async def record(name: str, partition: Partition) -> None:
        await trio.sleep(0.01)
        seen.append((name, partition.index))

    async def complete(job_id: str) -> None:
        completed.append(job_id)

    async with open_queue(redis_url, ns) as one, open_queue(redis_url, ns) as other:
        await one.expect("job1", n)
        assert await one.progress("job1") == (0, n)
        await one.publish("job1", partitions_of("job1", n))  # before anyone consumes: kept
        async with trio.open_nursery() as nursery:
            for name, queue in (("one", one), ("other", other)):
                await nursery.start(
                    partial(
                        queue.serve,
                        partial(record, name),
                        workers=2,
                        claim_idle_seconds=IDLE,
                        block_ms=200,
                        on_job_complete=complete,
                    )
                )
            await wait_for_progress(one, "job1", n, within=5)
            await trio.sleep(0.3)  # nothing more arrives
            nursery.cancel_scope.cancel()
        assert sorted(index for _, index in seen) == list(range(n))
        assert {name for name, _ in seen} == {"one", "other"}
        assert await other.progress("job1") == (n, n)
        assert await one.done("job1") == n
        assert completed == ["job1"]
        assert one.stats.reclaimed + other.stats.reclaimed == 0
        client = one._client
        assert await client.xlen(one.stream) == 0  # XDEL with the XACK: nothing left to trim
        assert (await client.xpending(one.stream, one.group)).pending == 0
        assert 0 < await client.ttl(one.finished_key("job1")) <= 86_400


async def test_a_partition_delivered_twice_is_counted_once(redis_url: str) -> None:
    ns, n = namespace(), 5
    calls: Counter[int] = Counter()

    async def record(partition: Partition) -> None:
        calls[partition.index] += 1

    async with open_queue(redis_url, ns) as queue:
        await queue.expect("job2", n)
        await queue.publish("job2", partitions_of("job2", n))
        await queue.publish("job2", partitions_of("job2", n))  # a retried publish: every partition twice
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(queue.serve, record, workers=2, claim_idle_seconds=IDLE, block_ms=100))
            with trio.fail_after(5):
                while sum(calls.values()) < 2 * n or await queue._client.xlen(queue.stream):
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
        assert calls == {i: 2 for i in range(n)}
        assert await queue.progress("job2") == (n, n)
        assert queue.stats.duplicates == n
        assert await queue.mark_finished(Partition("job2", None, "u1", 0)) == (False, n, n)
        assert await queue.progress("unknown") == (0, None)


async def test_a_killed_process_partition_is_reclaimed(redis_url: str) -> None:
    ns = namespace()
    async with open_queue(redis_url, ns) as queue:
        await queue.expect("job3", 1)
        worker = subprocess.Popen(
            [sys.executable, __file__, redis_url, ns, str(IDLE)], stdout=subprocess.PIPE, text=True
        )
        try:
            assert worker.stdout is not None
            assert await trio.to_thread.run_sync(worker.stdout.readline) == "ready\n"
            await queue.publish("job3", partitions_of("job3", 1))
            line = await trio.to_thread.run_sync(worker.stdout.readline)
            assert line == "got 0\n"  # mid-partition, and keeping its entry alive ...
            await trio.sleep(2 * IDLE)
            pending = await queue._client.xpending(queue.stream, queue.group, "-", "+", 10)
            assert len(pending) == 1 and pending[0].idle < IDLE * 1000
            worker.send_signal(signal.SIGKILL)  # ... until it dies without a word
            worker.wait()
            killed = trio.current_time()
        finally:
            worker.kill()
            worker.wait()
        delivered: list[int] = []

        async def record(partition: Partition) -> None:
            delivered.append(partition.index)

        async with trio.open_nursery() as nursery:
            await nursery.start(partial(queue.serve, record, workers=1, claim_idle_seconds=IDLE, block_ms=100))
            await wait_for_progress(queue, "job3", 1, within=5)
            nursery.cancel_scope.cancel()
        assert delivered == [0]
        assert queue.stats.reclaimed == 1
        assert trio.current_time() - killed >= IDLE - 0.2  # after the idle time (its last touch: < IDLE/3 before)


async def test_a_slow_worker_that_is_alive_keeps_its_partition(redis_url: str) -> None:
    ns = namespace()
    started = trio.Event()
    delivered: list[str] = []

    async def slow(partition: Partition) -> None:
        started.set()
        await trio.sleep(5 * IDLE)
        delivered.append("slow")

    async def fast(partition: Partition) -> None:
        delivered.append("fast")

    async with open_queue(redis_url, ns) as slow_queue, open_queue(redis_url, ns) as other:
        await slow_queue.expect("job4", 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(slow_queue.serve, slow, workers=1, claim_idle_seconds=IDLE, block_ms=100))
            await slow_queue.publish("job4", partitions_of("job4", 1))
            with trio.fail_after(2):
                await started.wait()
            await nursery.start(partial(other.serve, fast, workers=2, claim_idle_seconds=IDLE, block_ms=100))
            await wait_for_progress(other, "job4", 1, within=5)
            await trio.sleep(IDLE)
            nursery.cancel_scope.cancel()
        assert delivered == ["slow"]
        assert other.stats.reclaimed == 0 and slow_queue.stats.lost == 0


async def test_a_failing_handler_is_retried_after_the_idle_time_without_spinning(redis_url: str) -> None:
    ns = namespace()
    attempts: list[float] = []
    succeeded: list[int] = []

    async def flaky(partition: Partition) -> None:
        attempts.append(trio.current_time())
        if len(attempts) == 1:
            raise RuntimeError("provider exploded")
        succeeded.append(partition.index)

    async with open_queue(redis_url, ns) as queue:
        await queue.expect("job5", 3)
        await queue.publish("job5", partitions_of("job5", 1))
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(queue.serve, flaky, workers=1, claim_idle_seconds=IDLE, block_ms=100))
            with trio.fail_after(2):
                while not attempts:
                    await trio.sleep(0.01)
            await queue.publish("job5", partitions_of("job5", 3)[1:])  # others go on meanwhile
            await wait_for_progress(queue, "job5", 3, within=5)
            nursery.cancel_scope.cancel()
        assert queue.stats.failed == 1 and queue.stats.reclaimed == 1
        assert len(attempts) == 4  # once each, and one retry
        assert attempts[-1] - attempts[0] >= IDLE - 0.05  # the retry waited for the idle time
        assert sorted(succeeded) == [0, 1, 2]


async def test_a_cancelled_worker_hands_its_partition_over_at_once(redis_url: str) -> None:
    ns, idle = namespace(), 10.0  # far longer than the test: only the hand-over can explain a quick take-over
    started = trio.Event()

    async def hang(partition: Partition) -> None:
        started.set()
        await trio.sleep_forever()

    delivered: list[int] = []

    async def record(partition: Partition) -> None:
        delivered.append(partition.index)

    async with open_queue(redis_url, ns) as leaving, open_queue(redis_url, ns) as staying:
        await leaving.expect("job6", 1)
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(leaving.serve, hang, workers=1, claim_idle_seconds=idle, block_ms=100))
            await leaving.publish("job6", partitions_of("job6", 1))
            with trio.fail_after(2):
                await started.wait()
            nursery.cancel_scope.cancel()  # shutdown mid-partition
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(staying.serve, record, workers=1, claim_idle_seconds=idle, block_ms=100))
            await wait_for_progress(staying, "job6", 1, within=2)
            nursery.cancel_scope.cancel()
        assert delivered == [0] and staying.stats.reclaimed == 1


async def test_a_draining_process_finishes_its_partition_and_takes_no_other(redis_url: str) -> None:
    ns = namespace()
    started, release = trio.Event(), trio.Event()
    delivered: dict[str, list[int]] = {"draining": [], "staying": []}

    async def slow(name: str, partition: Partition) -> None:
        started.set()
        await release.wait()
        delivered[name].append(partition.index)

    async def record(name: str, partition: Partition) -> None:
        delivered[name].append(partition.index)

    async with open_queue(redis_url, ns) as draining, open_queue(redis_url, ns) as staying:
        await draining.expect("job8", 3)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(draining.serve, partial(slow, "draining"), workers=2, claim_idle_seconds=10, block_ms=100)
            )
            await draining.publish("job8", partitions_of("job8", 1))
            with trio.fail_after(2):
                await started.wait()
            draining.stop_taking()
            await draining.publish("job8", partitions_of("job8", 3)[1:])
            await trio.sleep(0.5)  # several block times: an idle worker that still delivered would have
            release.set()
            with trio.fail_after(2):
                await draining.stopped.wait()  # serve returned: the held partition was finished first
        assert delivered["draining"] == [0] and await draining.progress("job8") == (1, 3)
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(staying.serve, partial(record, "staying"), workers=1, claim_idle_seconds=10, block_ms=100)
            )
            await wait_for_progress(staying, "job8", 3, within=3)
            nursery.cancel_scope.cancel()
        # A worker whose read returned after the drain began handed its entry over (reclaimed).
        assert sorted(delivered["staying"]) == [1, 2] and staying.stats.reclaimed <= 1


async def test_idle_consumers_that_hold_nothing_are_forgotten(redis_url: str) -> None:
    ns = namespace()
    async with open_queue(redis_url, ns) as queue:
        await queue.ensure_group()
        await queue.publish("job9", partitions_of("job9", 2))
        client = queue._client
        # "gone" read an entry and acknowledged it; "holding" still holds one.
        for consumer in ("gone", "holding"):
            read = await client.xreadgroup(queue.group, consumer, {queue.stream: ">"}, count=1)
            assert read
            if consumer == "gone":
                entry = next(iter(read.values()))[0]
                await client.xack(queue.stream, queue.group, [entry.identifier])
        await trio.sleep(0.05)
        assert await queue.forget_idle_consumers(idle_seconds=3600) == 0  # not idle long enough
        assert await queue.forget_idle_consumers(idle_seconds=0.01) == 1
        names = {(c.get(b"name") or c.get("name")) for c in await client.xinfo_consumers(queue.stream, queue.group)}
        assert names in ({b"holding"}, {"holding"})


async def test_consumption_resumes_after_a_redis_restart(own_redis: RedisServer) -> None:
    ns = namespace()
    delivered: list[tuple[str, int]] = []

    async def record(partition: Partition) -> None:
        await trio.sleep(0.05)
        delivered.append((partition.job_id, partition.index))

    async with open_queue(own_redis.url, ns, timeout=0.2) as queue:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(queue.serve, record, workers=2, claim_idle_seconds=IDLE, block_ms=100))
            await queue.expect("before", 20)
            await queue.publish("before", partitions_of("before", 20))
            with trio.fail_after(3):
                while len(delivered) < 4:
                    await trio.sleep(0.01)
            own_redis.kill()  # mid-consumption; no persistence: the stream and counters are lost
            await trio.sleep(0.5)
            assert not queue.available
            await trio.to_thread.run_sync(own_redis.start)
            await queue.expect("after", 5)
            await queue.publish("after", partitions_of("after", 5))
            await wait_for_progress(queue, "after", 5, within=5)
            nursery.cancel_scope.cancel()
        assert queue.available
        assert sorted(i for job, i in delivered if job == "after") == list(range(5))
        # Published before the restart and not finished by then: gone with Redis's data.
        assert len([1 for job, _ in delivered if job == "before"]) < 20
        assert (await queue.progress("before"))[1] is None


# -- the consumer process of the SIGKILL test --------------------------------------------------


async def _consumer_process(url: str, ns: str, claim_idle: float) -> None:
    async def hang(partition: Partition) -> None:
        print(f"got {partition.index}", flush=True)
        await trio.sleep_forever()

    async with open_queue(url, ns) as queue, trio.open_nursery() as nursery:
        await nursery.start(partial(queue.serve, hang, workers=1, claim_idle_seconds=claim_idle, block_ms=100))
        print("ready", flush=True)


if __name__ == "__main__":
    trio.run(_consumer_process, sys.argv[1], sys.argv[2], float(sys.argv[3]))
