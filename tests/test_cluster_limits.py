"""Cluster-wide rate limits (`dispatcher.cluster`): the local hand-out logic in virtual time
against the script's arithmetic in Python, then the real thing against a real `redis-server`
(several OS processes sharing one limit, round trips per token, a pause seen by another client,
Redis going away and coming back)."""

from __future__ import annotations

import bisect
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import coredis
import pytest
import trio
import trio.testing
from pydantic import SecretStr

from dispatcher.cluster import ClusterBucket, RateLimitUnavailable, Reservation, open_cluster
from dispatcher.cluster.limiter import RedisClock
from dispatcher.errors import TransientDeliveryError
from dispatcher.loadtest.metrics import mean_rate
from dispatcher.settings import ClusterSettings
from redis_server import RedisServer

WORKER = Path(__file__).with_name("cluster_limit_worker.py")
KEYS = ("t:ratelimit:{sms}:tat", "t:ratelimit:{sms}:pause")


def max_in_closed_window(times: list[float], window: float = 1.0) -> int:
    """The most events in any closed window [t, t + window] (stricter than the harness's half-open one)."""
    times = sorted(times)
    return max((bisect.bisect_right(times, t + window) - i for i, t in enumerate(times)), default=0)


# -- the hand-out logic, in virtual time -------------------------------------------------------


class ScriptInPython:
    """The Lua script's arithmetic on trio's clock, answering after `there` + `back` seconds
    (Redis reads its clock in between), so the buckets' clock mapping is exercised too."""

    def __init__(self, there: float = 0.0, back: float = 0.0) -> None:
        self.there, self.back = there, back
        self.tat: dict[str, int] = {}
        self.paused: dict[str, int] = {}
        self.calls = 0

    async def reserve(
        self, keys: tuple[str, str], interval_us: int, tolerance_us: int, count: int, *, patient: bool = True
    ) -> Reservation:
        await trio.sleep(self.there)
        self.calls += 1
        now = math.floor(trio.current_time() * 1e6)  # Redis's TIME truncates to the microsecond
        paused = self.paused.get(keys[1], 0)
        reply = Reservation(now, paused, 0, 0)
        if count > 0:
            tat = max(self.tat.get(keys[0], 0), now, paused)
            reply = Reservation(now, paused, tat - tolerance_us, count)
            self.tat[keys[0]] = tat + count * interval_us
        await trio.sleep(self.back)
        return reply

    def publish_pause(self, keys: tuple[str, str], deadline: float) -> None:
        self.paused[keys[1]] = max(self.paused.get(keys[1], 0), math.ceil(deadline * 1e6))


async def take(bucket: ClusterBucket, times: list[float], until: float) -> None:
    while trio.current_time() < until:
        await bucket.acquire()
        times.append(trio.current_time())


async def test_processes_sharing_the_script_never_exceed_rate_plus_burst(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = ScriptInPython(there=0.0001, back=0.0003)
    buckets = [ClusterBucket(script, KEYS, rate=1000, burst=5) for _ in range(3)]
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for bucket in buckets:
            for _ in range(8):
                nursery.start_soon(take, bucket, times, 3.0)
    assert max_in_closed_window(times) <= 1000 + 5
    steady = [t for t in times if 1.0 <= t <= 2.9]
    assert mean_rate(sorted(steady)) == pytest.approx(1000, rel=0.02)
    tokens = sum(b.stats.tokens for b in buckets)
    assert script.calls / tokens <= 0.05


async def test_a_stalled_loop_loses_tokens_instead_of_bursting(autojump_clock: trio.testing.MockClock) -> None:
    script = ScriptInPython(back=0.0002)
    bucket = ClusterBucket(script, KEYS, rate=100, burst=1)
    times: list[float] = []

    async def stall() -> None:
        for _ in range(10):
            await trio.sleep(0.2)
            autojump_clock.jump(0.06)  # time passes while no task runs: the loop was blocked

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stall)
        for _ in range(16):
            nursery.start_soon(take, bucket, times, 2.5)
    assert max_in_closed_window(times) <= 100 + 1
    assert bucket.stats.lost > 0  # what the stall took is not made up for


async def test_a_round_trip_longer_than_the_interval_costs_rate_not_the_limit(
    autojump_clock: trio.testing.MockClock,
) -> None:
    script = ScriptInPython(there=0.003, back=0.005)  # 8 ms round trip: more than the timing allowance
    buckets = [ClusterBucket(script, KEYS, rate=1000, burst=1) for _ in range(2)]
    times: list[float] = []
    async with trio.open_nursery() as nursery:
        for bucket in buckets:
            for _ in range(8):
                nursery.start_soon(take, bucket, times, 2.0)
    assert max_in_closed_window(times) <= 1000 + 1
    assert 200 < len(times) < 1000  # slower, but going


async def test_a_pause_holds_this_process_and_is_published(autojump_clock: trio.testing.MockClock) -> None:
    script = ScriptInPython()
    here, there = ClusterBucket(script, KEYS, rate=50), ClusterBucket(script, KEYS, rate=50)
    await here.acquire()
    await there.acquire()
    deadline = trio.current_time() + 2.0
    here.pause_until(deadline)
    await here.acquire()
    assert trio.current_time() >= deadline
    await trio.sleep(0.1)  # `there` may hold reserved tokens from before: one batch at most
    await there.acquire()
    await there.acquire()
    assert trio.current_time() >= deadline


async def test_an_unlimited_channel_honours_a_cluster_pause(autojump_clock: trio.testing.MockClock) -> None:
    script = ScriptInPython()
    here, there = ClusterBucket(script, KEYS, rate=0), ClusterBucket(script, KEYS, rate=0)
    await there.acquire()
    deadline = trio.current_time() + 1.0
    here.pause_until(deadline)
    await trio.sleep(0.2)  # more than the poll interval
    await there.acquire()
    assert trio.current_time() >= deadline


async def test_the_clock_mapping_narrows_with_round_trips_and_survives_a_step(
    autojump_clock: trio.testing.MockClock,
) -> None:
    clock = RedisClock()
    redis_minus_local = 1_700_000_000.0
    # Redis reads its clock 0.2 ms after we send, then 0.8 ms after; answers take 1 ms each time.
    for there in (0.0002, 0.0008):
        sent = trio.current_time()
        clock.observe(sent, sent + 0.001, round((sent + there + redis_minus_local) * 1e6))
        await trio.sleep(0.05)
    offset, uncertainty = clock.offset()
    assert offset >= -redis_minus_local  # never early
    assert uncertainty < 0.0005  # tighter than either round trip alone
    sent = trio.current_time()  # Redis's clock steps one second back
    clock.observe(sent, sent + 0.001, round((sent + 0.0005 + redis_minus_local - 1.0) * 1e6))
    offset, uncertainty = clock.offset()
    assert offset == pytest.approx(1.0 - redis_minus_local + 0.0005, abs=0.001)
    assert 0 <= uncertainty <= 0.001 + 1e-6  # the last round trip alone (floats near 1.7e9 s)


# -- against a real Redis ----------------------------------------------------------------------

_namespaces = iter(range(10**6))


def settings_for(url: str) -> ClusterSettings:
    return ClusterSettings(redis_url=SecretStr(url), namespace=f"test{next(_namespaces)}-{time.time_ns()}")


def test_three_processes_share_one_limit(redis_url: str, tmp_path: Path) -> None:
    rate, burst, processes = 100, 5, 3
    settings = settings_for(redis_url)
    outputs = [tmp_path / f"worker{i}.json" for i in range(processes)]
    workers = [
        subprocess.Popen(
            [sys.executable, str(WORKER), redis_url, settings.namespace, str(rate), str(burst), "4", str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for out in outputs
    ]

    async def warm_up() -> float:
        # While the workers start: past the restart guard of a fresh namespace. The bucket then
        # fills up, so the workers begin with a full burst (the edge case of the bound).
        async with open_cluster(settings) as cluster:
            await cluster.bucket("sms", rate, burst).acquire()
            return time.time()

    try:
        warm = trio.run(warm_up)
        for worker in workers:
            assert worker.stdout is not None and worker.stdout.readline() == "ready\n"
        start_at = time.time() + 0.2
        stop_at = start_at + 3.5
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(f"{start_at!r} {stop_at!r}\n")
            worker.stdin.close()
        for worker in workers:
            assert worker.wait(timeout=30) == 0
    finally:
        for worker in workers:
            worker.kill()
    results = [json.loads(out.read_text()) for out in outputs]
    times = sorted([warm, *(t for result in results for t in result["times"])])
    steady = [t for t in times if start_at + 1.0 <= t <= stop_at - 0.2]
    print(
        f"{processes} processes at {rate}/s burst {burst}: most in 1 s {max_in_closed_window(times)}, "
        f"steady rate {mean_rate(steady):.2f}/s, round trips per token "
        f"{sum(r['round_trips'] for r in results) / sum(r['tokens'] for r in results):.3f}"
    )
    assert max_in_closed_window(times) <= rate + burst
    assert mean_rate(steady) == pytest.approx(rate, rel=0.02)
    for result in results:  # each process had its share: one limit, really shared
        assert len(result["times"]) > 0.15 * len(times)


async def test_a_busy_channel_makes_few_round_trips(redis_url: str) -> None:
    async with open_cluster(settings_for(redis_url)) as cluster:
        bucket = cluster.bucket("sms", rate=1000, burst=1)
        await bucket.acquire()  # past the restart guard of a fresh namespace
        before = cluster.round_trips
        times: list[float] = []
        async with trio.open_nursery() as nursery:
            for _ in range(16):
                nursery.start_soon(take, bucket, times, trio.current_time() + 1.5)
        round_trips = cluster.round_trips - before
        print(
            f"1 process at 1000/s: {len(times)} tokens in 1.5 s, {round_trips / len(times):.4f} round trips "
            f"per token, most in 1 s {max_in_closed_window(times)}, lost {bucket.stats.lost}"
        )
        assert len(times) > 1000
        assert round_trips / len(times) <= 0.05
        assert max_in_closed_window(times) <= 1000 + 1


async def test_a_pause_set_by_one_client_delays_the_others(redis_url: str) -> None:
    settings = settings_for(redis_url)
    async with (
        open_cluster(settings) as one,
        open_cluster(settings) as other,
        coredis.Redis.from_url(redis_url) as redis,
    ):
        pausing, waiting = one.bucket("sms", rate=20), other.bucket("sms", rate=20)
        await pausing.acquire()
        await waiting.acquire()
        deadline = trio.current_time() + 0.5
        pausing.pause_until(deadline)
        with trio.fail_after(2):  # what Redis received, not what we think we sent
            while not await redis.exists([one.keys_for("sms")[1]]):
                await trio.sleep(0.005)
        await waiting.acquire()
        assert deadline <= trio.current_time() < deadline + 0.3


async def test_redis_down_fails_closed_then_recovers(own_redis: RedisServer) -> None:
    bound = 0.5
    async with open_cluster(
        settings_for(own_redis.url), unavailable_after=bound, timeout=0.2, restart_guard=1.0
    ) as cluster:
        bucket = cluster.bucket("sms", rate=20, burst=1)
        await bucket.acquire()
        assert await cluster.ping() and cluster.available

        own_redis.kill()
        await trio.sleep(0.1)  # anything reserved before is spent (one token at this rate)
        started = trio.current_time()
        with pytest.raises(RateLimitUnavailable) as caught:
            await bucket.acquire()
        assert bound - 0.05 <= trio.current_time() - started <= bound + 0.5  # retried, within its bound
        assert isinstance(caught.value, TransientDeliveryError)
        assert caught.value.reason.startswith("rate limiter unavailable: redis ")
        assert not cluster.available
        assert not await cluster.ping()
        started = trio.current_time()
        with pytest.raises(RateLimitUnavailable):
            await bucket.acquire()
        assert trio.current_time() - started < 0.3  # already past the bound: one attempt

        await trio.to_thread.run_sync(own_redis.start)
        restarted = trio.current_time()
        with trio.fail_after(5):
            await bucket.acquire()
        # Redis lost its state: tokens start after the restart guard, so that none overlaps with
        # tokens some process reserved before the loss.
        assert trio.current_time() - restarted >= 1.0 - 0.05
        assert cluster.available and await cluster.ping()
