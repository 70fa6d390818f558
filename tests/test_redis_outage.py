"""A short Redis outage costs time, not deliveries: SMS at 100/s through the real cluster limiter,
the real redis-server killed and restarted empty 3.2 s later. Deliveries waiting on the
unreachable limiter wait (no attempt spent: one attempt each is enough) and are all sent once it
answers again."""

from __future__ import annotations

from collections import Counter

import trio
from test_cluster_limits import settings_for
from test_pacing import ScriptedProvider, message

from actors.sender import send as sender_actor
from dispatcher.cluster import open_cluster
from dispatcher.delivery import RetryPolicy, Transport
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
