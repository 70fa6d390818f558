"""The asynchronous API over HTTP (202 + Location, status, paged failures, cancel), the
Idempotency-Key header, and a store that dies in the middle of a send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.embedded_store import EmbeddedServer

REQUEST = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}


def seed(database: Any, count: int) -> None:
    database.users.insert_many(
        [{"_id": f"u{i:03d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(count)]
    )


def sent_files(outbox: Path) -> int:
    return len(list((outbox / "sms").glob("*.json"))) if (outbox / "sms").exists() else 0


async def wait_for_state(client: Any, location: str, *states: str) -> dict[str, Any]:
    with trio.fail_after(15):
        while True:
            body = await (await client.get(location)).get_json()
            if body["status"] in states:
                return body
            await trio.sleep(0.02)


async def test_prefer_respond_async_answers_202_with_a_location_to_poll(client: Any, database: Any) -> None:
    seed(database, 3)
    response = await client.post(
        "/send", json={**REQUEST, "recipients": ["ghost"]}, headers={"Prefer": "respond-async"}
    )
    assert response.status_code == 202
    body = await response.get_json()
    assert set(body) == {"id", "status"} and body["status"] in ("queued", "running")
    location = response.headers["Location"]
    assert location == f"/send/{body['id']}"
    status = await wait_for_state(client, location, "done")
    assert status["summary"]["sent"] == {"sms": 3} and status["summary"]["failed"] == {"sms": 1}
    page = await (await client.get(f"{location}/failures?limit=10")).get_json()
    assert page["failures"] == [{"userId": "ghost", "channel": "sms", "error": "user not found"}]
    assert page["next"] is None


async def test_async_query_parameter_and_paging(client: Any, database: Any) -> None:
    response = await client.post(
        "/send?async=true",
        json={"channels": ["sms"], "messageContent": "x", "recipients": [f"none{i}" for i in range(5)]},
    )
    assert response.status_code == 202
    location = response.headers["Location"]
    await wait_for_state(client, location, "done")
    first = await (await client.get(f"{location}/failures?limit=3")).get_json()
    second = await (await client.get(f"{location}/failures?limit=3&after={first['next']}")).get_json()
    assert len(first["failures"]) == 3 and len(second["failures"]) == 2 and second["next"] is None
    assert (await client.get(f"{location}/failures?limit=0")).status_code == 400


async def test_unknown_job_is_404_in_the_error_shape(client: Any) -> None:
    for method in ("get", "delete"):
        response = await getattr(client, method)("/send/0123456789abcdef")
        assert response.status_code == 404
        body = await response.get_json()
        assert body["statusCode"] == 404 and body["error"] == "Not Found" and "0123456789abcdef" in body["message"]


async def test_delete_cancels_a_running_job(make_settings: Any, database: Any, outbox: Path) -> None:
    seed(database, 40)
    settings = make_settings(channels={"sms": {"rate_per_second": 20, "concurrency": 1}})
    async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
        client = app.test_client()
        response = await client.post("/send?async=true", json=REQUEST)
        location = response.headers["Location"]
        with trio.fail_after(10):
            while sent_files(outbox) < 2:
                await trio.sleep(0.01)
        assert (await client.delete(location)).status_code == 200
        status = await wait_for_state(client, location, "cancelled")
    assert 2 <= sent_files(outbox) < 40
    assert status["summary"]["sent"]["sms"] == sent_files(outbox)


async def test_idempotency_key_header_replays_and_conflicts(client: Any, database: Any, outbox: Path) -> None:
    seed(database, 2)
    headers = {"Idempotency-Key": "order-17"}
    first = await client.post("/send", json=REQUEST, headers=headers)
    again = await client.post("/send", json=REQUEST, headers=headers)
    assert first.status_code == again.status_code == 200
    assert await first.get_json() == await again.get_json()
    assert sent_files(outbox) == 2
    other = await client.post("/send", json={**REQUEST, "messageContent": "changed"}, headers=headers)
    assert other.status_code == 422
    body = await other.get_json()
    assert body["error"] == "Unprocessable Content" or body["error"] == "Unprocessable Entity"
    assert "order-17" in body["message"]
    # An async replay names the same job.
    replay = await client.post("/send?async=true", json=REQUEST, headers=headers)
    assert replay.status_code == 202 and sent_files(outbox) == 2


async def test_store_killed_mid_send_answers_503_with_what_was_attempted(make_settings: Any, outbox: Path) -> None:
    server = await trio.to_thread.run_sync(EmbeddedServer, None)
    try:
        import pymongo

        client = pymongo.MongoClient(server.url)
        client.messaging.users.insert_many(
            [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(2000)]
        )
        client.close()
        settings = make_settings(
            store={"url": f"{server.url}?serverSelectionTimeoutMS=500", "database": "messaging"},
            channels={"sms": {"rate_per_second": 200, "burst": 1}},
            dispatcher={"store_batch_size": 100},
        )
        async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
            http = app.test_client()
            async with trio.open_nursery() as nursery:
                answers = []

                async def post() -> None:
                    answers.append(await http.post("/send", json=REQUEST))

                nursery.start_soon(post)
                with trio.fail_after(10):
                    while sent_files(outbox) < 50:
                        await trio.sleep(0.01)
                await trio.to_thread.run_sync(server.stop)
            [response] = answers
            assert response.status_code == 503
            body = await response.get_json()
            assert body["statusCode"] == 503 and body["error"] == "Service Unavailable"
            assert "store became unavailable" in body["message"] and body["id"]
            # Everything that went out is in the answer, nothing beyond it.
            assert 50 <= body["summary"]["sent"]["sms"] <= sent_files(outbox) < 2000
            # The same outage answers 503 on every path, with or without a template.
            for payload in (REQUEST, {**REQUEST, "templateId": "65a000000000000000000001"}):
                assert (await http.post("/send", json=payload)).status_code == 503
            assert (await http.get("/-/ready")).status_code == 503
    finally:
        server.stop() if server._process.poll() is None else None
