"""Shared fan-outs in cluster mode: one job's partitions delivered by several dispatchers on one
Redis and one store, each delivery once; a worker process killed mid-partition is taken over."""

from __future__ import annotations

import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

from dispatcher import open_dispatcher
from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

from kill_runs import kill_config, seed_users
from service_process import Service

_namespaces = itertools.count()


async def test_two_dispatchers_share_one_job_and_send_each_message_once(
    make_settings: Any, database: Any, redis_url: str, outbox: Path
) -> None:
    seed_users(database, 600)
    settings = make_settings(
        cluster={"redis_url": redis_url, "namespace": f"fan{next(_namespaces)}-{time.time_ns()}"},
        dispatcher={"store_batch_size": 50},
        store={"lease_seconds": 2},
    )
    async with open_dispatcher(settings) as first, open_dispatcher(settings) as second:
        result = await first.send(
            {"channels": ["sms"], "clusters": ["all"], "recipients": ["ghost"], "messageContent": "hi"}
        )
        handled = (first.fanout.queue.stats.handled, second.fanout.queue.stats.handled)  # type: ignore[union-attr]
    received = Counter(json.loads(p.read_text())["userId"] for p in (outbox / "sms").glob("*.json"))
    assert len(received) == 600 and set(received.values()) == {1}
    assert result.summary.sent == {"sms": 600} and result.summary.users == 600
    assert [(f.user_id, f.channel, f.error) for f in result.failures] == [("ghost", "sms", "user not found")]
    assert sum(handled) == 12 and min(handled) > 0, f"partitions per dispatcher: {handled}"


async def test_a_worker_killed_mid_partition_is_taken_over_without_duplicates(
    mongo_url: str, redis_url: str, database: Any, tmp_path: Path
) -> None:
    users = 600
    seed_users(database, users)
    fake = FakeTwilio("AC123", "secret", Faults(latency=0.03))
    async with trio.open_nursery() as nursery:
        twilio_url = await nursery.start(serve_asgi, fake)
        extra = f'[dispatcher]\nstore_batch_size = 50\n[cluster]\nnamespace = "kill{time.time_ns()}"\n'
        config = kill_config(tmp_path / "config.toml", twilio_url, 8, extra=extra)
        services = [Service(config, mongo_url, database.name, tmp_path / f"service{i}.log") for i in range(2)]
        for service in services:
            service.env["REDIS_URL"] = redis_url
        try:
            for service in services:
                await service.start()
            async with httpx.AsyncClient(timeout=30) as client:
                response = await client.post(
                    f"http://127.0.0.1:{services[0].port}/send?async=true",
                    json={"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"},
                )
                assert response.status_code == 202
                location = f"http://127.0.0.1:{services[0].port}{response.headers['Location']}"
                with trio.fail_after(30):
                    while len(fake.received) < users * 0.3:
                        await trio.sleep(0.005)
                services[1].kill()  # a worker, mid-partition
                with trio.fail_after(60):
                    while (status := (await client.get(location)).json())["status"] != "done":
                        await trio.sleep(0.1)
        finally:
            for service in services:
                service.stop()
            nursery.cancel_scope.cancel()
    deliveries = {d["user"]: d for d in database.dispatch_deliveries.find({"job": status["id"]})}
    phone_of = {f"+1555{i:07d}": f"u{i:04d}" for i in range(users)}
    received = Counter(phone_of[r.form["To"]] for r in fake.received)
    assert len(deliveries) == users and max(received.values()) == 1
    sent = {u for u, d in deliveries.items() if d["state"] == "sent"}
    unknown = {u for u, d in deliveries.items() if (d.get("error") or "").startswith("outcome unknown")}
    assert all(received[u] == 1 for u in sent) and set(received) - sent <= unknown
    assert all(d["state"] == "sent" for u, d in deliveries.items() if u not in unknown)
    assert status["summary"]["sent"]["sms"] == len(sent)
    print(f"shared fan-out, worker killed: received {len(received)}, sent {len(sent)}, unknown {len(unknown)}")


async def test_redis_restarted_during_a_shared_send_the_job_still_finishes_once_each(
    make_settings: Any, database: Any, outbox: Path
) -> None:
    from redis_server import start_redis_server

    seed_users(database, 600)
    redis = await trio.to_thread.run_sync(start_redis_server)
    try:
        settings = make_settings(
            cluster={"redis_url": redis.url, "namespace": f"restart{time.time_ns()}"},
            dispatcher={"store_batch_size": 25},
            store={"lease_seconds": 1},
            channels={"sms": {"concurrency": 2}},
        )
        async with open_dispatcher(settings) as first, open_dispatcher(settings):  # a second process's workers
            results = []

            async def send() -> None:
                results.append(await first.send({"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}))

            with trio.fail_after(60):  # without republishing, the job would wait forever
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(send)
                    while not (outbox / "sms").exists() or len(list((outbox / "sms").glob("*.json"))) < 150:
                        await trio.sleep(0.01)
                    await trio.to_thread.run_sync(redis.kill)
                    await trio.sleep(0.5)
                    await trio.to_thread.run_sync(redis.start)
        [result] = results
    finally:
        await trio.to_thread.run_sync(redis.kill)
    received = Counter(json.loads(p.read_text())["userId"] for p in (outbox / "sms").glob("*.json"))
    assert max(received.values()) == 1, "a user received the SMS twice"
    assert result.summary.sent["sms"] == len(received)
    assert result.summary.sent["sms"] + result.summary.failed.get("sms", 0) == 600
    assert all(f.error.startswith("outcome unknown") for f in result.failures)


async def test_metrics_report_the_redis_cost_of_the_shared_limits(
    make_settings: Any, database: Any, redis_url: str
) -> None:
    from dispatcher.app import create_app

    seed_users(database, 40)
    settings = make_settings(
        cluster={"redis_url": redis_url, "namespace": f"m{time.time_ns()}"},
        channels={"sms": {"rate_per_second": 1000, "burst": 10}},
    )
    name = "dispatcher_redis_limit_round_trips_total "
    async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
        client = app.test_client()
        text = (await (await client.get("/-/metrics")).get_data()).decode()
        [before] = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name)]
        response = await client.post(
            "/send", json={"channels": ["sms"], "recipients": [f"u{i:04d}" for i in range(40)], "messageContent": "hi"}
        )
        assert response.status_code == 200
        text = (await (await client.get("/-/metrics")).get_data()).decode()
    assert "# TYPE dispatcher_redis_limit_round_trips_total counter" in text
    [after] = [float(line.split()[1]) for line in text.splitlines() if line.startswith(name)]
    round_trips = after - before
    assert 1 <= round_trips < 40  # tokens are reserved in batches, not one round trip per SMS
