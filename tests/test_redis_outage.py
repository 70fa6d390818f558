"""A short Redis outage costs time, not deliveries: SMS at 100/s through the real cluster limiter,
the real redis-server killed and restarted empty 3.2 s later. Deliveries waiting on the
unreachable limiter wait (no attempt spent: one attempt each is enough) and are all sent once it
answers again; a wait longer than `max_retry_after_seconds` stops the run, which the job resumes
(nothing fails for good); a partition republished after Redis lost it never runs beside its first
run; nothing is reported `outcome unknown`."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import trio
from test_cluster_limits import settings_for
from test_pacing import ScriptedProvider, message

from actors.sender import send as sender_actor
from dispatcher import open_dispatcher
from dispatcher.cluster import open_cluster
from dispatcher.context import RunContext
from dispatcher.delivery import RetryPolicy, Transport
from dispatcher.errors import Interrupted
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message
from dispatcher.ratelimit import ChannelGate
from redis_server import RedisServer

USERS = 300
RATE = 100


async def test_deliveries_wait_out_a_redis_restart_instead_of_failing(own_redis: RedisServer) -> None:
    provider = ScriptedProvider(latency=0.005)
    deliveries: list[Delivery] = []
    async with open_cluster(settings_for(own_redis.url), unavailable_after=0.5, timeout=0.2) as cluster:
        gate = ChannelGate(32, RATE, 1, cluster.bucket("sms", RATE, 1))
        transport = Transport(provider, gate, RetryPolicy(max_attempts=1, max_retry_after=60))
        inbox_send, inbox_recv = trio.open_memory_channel[Message](USERS)
        results_send, results_recv = trio.open_memory_channel[Delivery](USERS)
        for i in range(USERS):
            inbox_send.send_nowait(message(i))
        inbox_send.close()

        async def outage() -> None:
            while len(provider.starts) < USERS // 4:
                await trio.sleep(0.01)
            own_redis.kill()
            await trio.sleep(3.2)
            await trio.to_thread.run_sync(own_redis.start)

        async def drain() -> None:
            async for delivery in results_recv:
                deliveries.append(delivery)

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(outage)
                nursery.start_soon(drain)
                await sender_actor(inbox_recv, results_send, transport, Unrecorded())
    failed = [d for d in deliveries if d.status != "sent"]
    assert not failed, failed[:3]
    assert len(deliveries) == USERS
    assert max(Counter(address for _, address in provider.starts).values()) == 1
    starts = sorted(t for t, _ in provider.starts)
    assert max(b - a for a, b in zip(starts, starts[1:])) >= 3.0  # the outage did hold them back


# --- the whole service: a job's deliveries and its shared partitions through an outage ---------


class PartitionRuns:
    """Every run of a partition's users through the pipeline (`RunContext.run`), to find two runs
    of the same users at once (the partitions republished after Redis lost them, run beside the
    first ones, before the ledger held partitions)."""

    def __init__(self) -> None:
        self.active: Counter[frozenset[str]] = Counter()
        self.started: Counter[frozenset[str]] = Counter()
        self.overlaps = 0

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = RunContext.run

        async def run(context: RunContext, plan: Any, *args: Any, **kwargs: Any) -> Any:
            users = frozenset(plan.request.recipients)
            self.overlaps += self.active[users] > 0
            self.active[users] += 1
            self.started[users] += 1
            try:
                return await original(context, plan, *args, **kwargs)
            finally:
                self.active[users] -= 1

        monkeypatch.setattr(RunContext, "run", run)


def _seed(database: Any, count: int) -> None:
    database.users.insert_many(
        [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(count)]
    )


async def _outage_during(redis: RedisServer, outbox: Path, after_files: int, down: float = 3.2) -> None:
    """Kill Redis once the outbox holds `after_files` SMS, start it again (empty) `down` s later."""
    while not (outbox / "sms").exists() or len(list((outbox / "sms").glob("*.json"))) < after_files:
        await trio.sleep(0.01)
    await trio.to_thread.run_sync(redis.kill)
    await trio.sleep(down)
    await trio.to_thread.run_sync(redis.start)


async def _finished(database: Any, job_id: str) -> dict[str, Any]:
    while (job := database.dispatch_jobs.find_one({"_id": job_id}))["state"] not in ("done", "failed", "cancelled"):
        await trio.sleep(0.1)
    return job


def _received(outbox: Path) -> Counter[str]:
    return Counter(json.loads(p.read_text())["userId"] for p in (outbox / "sms").glob("*.json"))


@pytest.mark.parametrize("bound", [1.0, 300.0], ids=["outage-longer-than-the-wait", "outage-within-the-wait"])
async def test_a_shared_send_through_a_redis_restart_fails_nothing_and_runs_no_partition_twice(
    bound: float,
    own_redis: RedisServer,
    make_settings: Any,
    database: Any,
    outbox: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's run: SMS at 100/s shared by two processes' partition workers, Redis killed and
    restarted empty 3.2 s later. Waiting longer than `max_retry_after_seconds` for the limiter
    stops the partition's run (taken again once Redis answers), not the deliveries; the partitions
    the coordinator republishes wait for the runs still holding them."""
    users = 600
    _seed(database, users)
    runs = PartitionRuns()
    runs.install(monkeypatch)
    settings = make_settings(
        cluster={"redis_url": own_redis.url, "namespace": f"outage{time.time_ns()}"},
        dispatcher={"store_batch_size": 50},
        # A hold not renewed within the lease counts as a stalled run's: long enough for a busy machine.
        store={"lease_seconds": 6},
        channels={"sms": {"rate_per_second": RATE, "concurrency": 8, "max_retry_after_seconds": bound}},
    )
    async with open_dispatcher(settings) as first, open_dispatcher(settings):  # a second process's workers
        job_id = await first.submit({"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"})
        with trio.fail_after(90):
            await _outage_during(own_redis, outbox, users // 4)
            job = await _finished(database, job_id)
    deliveries = list(database.dispatch_deliveries.find({"job": job_id}))
    failed = [(d["user"], d.get("error")) for d in deliveries if d["state"] != "sent"]
    assert job["state"] == "done" and not failed, failed[:3]
    assert len(deliveries) == users and job["summary"]["sent"] == {"sms": users}
    received = _received(outbox)
    assert len(received) == users and set(received.values()) == {1}, received.most_common(3)
    assert runs.overlaps == 0, f"{runs.overlaps} partition runs beside a live run of the same users"


async def test_a_job_whose_limiter_wait_runs_out_is_resumed_not_failed(
    own_redis: RedisServer, make_settings: Any, database: Any, outbox: Path
) -> None:
    """A send that is not shared (fewer users than a partition): the run stops when a delivery
    has waited `max_retry_after_seconds` for the limiter, and the job resumes it at once; it
    waits for Redis again and sends the rest, each once."""
    users = 300
    _seed(database, users)
    settings = make_settings(
        cluster={"redis_url": own_redis.url, "namespace": f"outage{time.time_ns()}"},
        dispatcher={"store_batch_size": 500},
        channels={"sms": {"rate_per_second": RATE, "concurrency": 8, "max_retry_after_seconds": 1.0}},
    )
    recipients = [f"u{i:04d}" for i in range(users)]
    async with open_dispatcher(settings) as dispatcher:
        job_id = await dispatcher.submit({"channels": ["sms"], "recipients": recipients, "messageContent": "hi"})
        with trio.fail_after(60):
            await _outage_during(own_redis, outbox, users // 4)
            job = await _finished(database, job_id)
    deliveries = list(database.dispatch_deliveries.find({"job": job_id}))
    failed = [(d["user"], d.get("error")) for d in deliveries if d["state"] != "sent"]
    assert job["state"] == "done" and not failed, failed[:3]
    received = _received(outbox)
    assert len(received) == users and set(received.values()) == {1}, received.most_common(3)


async def test_a_waiting_send_whose_job_was_not_written_yet_is_resumed_too(
    own_redis: RedisServer, make_settings: Any, database: Any, outbox: Path
) -> None:
    """A small synchronous send writes its job with its first claim; with Redis away from the
    start nothing is claimed. When the wait runs out the job is written then: the client gets 503
    naming it, and it is resumed and sent once Redis answers."""
    users = 5
    _seed(database, users)
    settings = make_settings(
        cluster={"redis_url": own_redis.url, "namespace": f"outage{time.time_ns()}"},
        channels={"sms": {"rate_per_second": RATE, "max_retry_after_seconds": 1.0}},
    )
    recipients = [f"u{i:04d}" for i in range(users)]
    async with open_dispatcher(settings) as dispatcher:
        own_redis.kill()
        with pytest.raises(Interrupted) as interrupted:
            await dispatcher.send({"channels": ["sms"], "recipients": recipients, "messageContent": "hi"})
        job_id = interrupted.value.job_id
        assert job_id is not None and "rate limiter unavailable" in str(interrupted.value), interrupted.value
        await trio.to_thread.run_sync(own_redis.start)
        with trio.fail_after(30):
            job = await _finished(database, job_id)
    assert job["state"] == "done" and job["summary"]["sent"] == {"sms": users}
    received = _received(outbox)
    assert len(received) == users and set(received.values()) == {1}
