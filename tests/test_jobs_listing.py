"""The job id on every answer, jobs owned by their API key (admin keys see all), and the job
listing: filters, cursor paging that holds while jobs arrive, and queries the indexes answer."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import neosqlite
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from dispatcher import open_dispatcher, remote
from dispatcher.app import create_app
from dispatcher.cli import build_parser
from dispatcher.auth import load_api_keys
from dispatcher.errors import ConfigError, RequestError
from dispatcher.settings import AuthSettings
from dispatcher.listing import EVERYONE, JOB_LISTING_INDEXES, JobQuery, Viewer, encode_cursor, listing_filter
from dispatcher.wire import send_result_json

SMS = {"channels": ["sms"], "recipients": ["u1"], "messageContent": "hi"}
EMAIL = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "hi"}
KEYS = {"alice": "alice-key", "bob": "bob-key", "ops": "ops-key"}


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def as_key(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "api-keys"
    path.write_text(
        f"alice:{sha(KEYS['alice'])}\nbob : {sha(KEYS['bob'])}\nops:{sha(KEYS['ops'])} admin  # operators\n"
    )
    return path


@asynccontextmanager
async def serving(make_settings: Callable[..., Any], **sections: Any) -> AsyncIterator[Any]:
    async with open_dispatcher(make_settings(**sections)) as d, create_app(d).test_app() as app:
        yield app.test_client()


async def wait_done(client: Any, location: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    with trio.fail_after(15):
        while True:
            body = await (await client.get(location, headers=headers or {})).get_json()
            if body["status"] in ("done", "failed", "cancelled"):
                return body
            await trio.sleep(0.02)


# --- the job id


async def test_synchronous_answer_carries_the_job_id_and_its_location(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    response = await client.post("/send", json=SMS, headers={"X-Request-ID": "req-17"})
    assert response.status_code == 200
    body = await response.get_json()
    assert response.headers["Location"] == f"/send/{body['id']}"
    assert body["summary"]["sent"] == {"sms": 1}
    job = await (await client.get(response.headers["Location"])).get_json()
    assert job["id"] == body["id"] and job["status"] == "done" and job["requestId"] == "req-17"
    assert job["channels"] == ["sms"] and job["summary"]["sent"] == body["summary"]["sent"] == {"sms": 1}


async def test_embedding_api_returns_the_job_id(dispatcher: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    result = await dispatcher.send(SMS)
    assert result.job_id is not None and send_result_json(result)["id"] == result.job_id
    assert (await dispatcher.status(result.job_id)).summary.sent == {"sms": 1}
    # Replaying an idempotency key names the first job.
    first = await dispatcher.send(SMS, idempotency_key="k1")
    again = await dispatcher.send(SMS, idempotency_key="k1")
    assert first.job_id == again.job_id != result.job_id


async def test_without_the_ledger_there_is_no_id_to_give(make_settings: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    async with serving(make_settings, store={"ledger": False}) as client:
        response = await client.post("/send", json=SMS)
        assert response.status_code == 200 and "Location" not in response.headers
        assert "id" not in await response.get_json()


# --- ownership


def test_keys_file_marks_admin_keys_and_refuses_unknown_attributes(keys_file: Path, tmp_path: Path) -> None:
    keys = load_api_keys(AuthSettings(keys_file=str(keys_file)))
    assert keys.ids == ("alice", "bob", "ops")
    assert [keys.authenticate_key(KEYS[name]).admin for name in ("alice", "bob", "ops")] == [False, False, True]
    bad = tmp_path / "bad-keys"
    bad.write_text(f"carol:{sha('c')} superuser\n")
    with pytest.raises(ConfigError, match=r"auth.keys_file: .* line 1: unknown attribute 'superuser'"):
        load_api_keys(AuthSettings(keys_file=str(bad)))


async def test_another_keys_job_is_404_and_admin_sees_every_job(
    make_settings: Any, database: Any, keys_file: Path
) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    async with serving(make_settings, auth={"keys_file": str(keys_file)}) as client:
        sent = await client.post("/send", json={**SMS, "recipients": ["u1", "ghost"]}, headers=as_key("alice"))
        location = sent.headers["Location"]
        assert sent.status_code == 200
        for path, method in ((location, "GET"), (f"{location}/failures", "GET"), (location, "DELETE")):
            answer = await client.open(path, method=method, headers=as_key("bob"))
            assert answer.status_code == 404, (method, path)
            body = await answer.get_json()
            assert body["statusCode"] == 404 and body["message"].startswith("no send ")
        # Not even a hint that the id exists: the same answer as an unknown id.
        unknown = await (await client.get("/send/0123456789abcdef", headers=as_key("bob"))).get_json()
        assert unknown["message"].startswith("no send ")
        assert (await client.get(location, headers=as_key("alice"))).status_code == 200
        failures = await (await client.get(f"{location}/failures", headers=as_key("ops"))).get_json()
        assert failures["failures"] == [{"userId": "ghost", "channel": "sms", "error": "user not found"}]
        await client.post("/send", json=SMS, headers=as_key("bob"))
        owned = {
            name: [job["id"] for job in (await (await client.get("/send", headers=as_key(name))).get_json())["jobs"]]
            for name in KEYS
        }
    assert owned["alice"] == [location.rsplit("/", 1)[1]]
    assert len(owned["bob"]) == 1 and owned["bob"] != owned["alice"]
    assert owned["ops"] == owned["bob"] + owned["alice"]  # newest first


async def test_embedding_api_sees_every_job_whoever_created_it(dispatcher: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    job_id = (await dispatcher.send(SMS, key_scope="alice")).job_id
    assert (await dispatcher.status(job_id)).id == job_id
    with pytest.raises(RequestError, match="no send"):
        await dispatcher.status(job_id, Viewer("bob"))


# --- the listing


async def test_listing_filters_by_status_channel_and_creation_time(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001", "emailAddress": "u1@example.com"})
    sms = (await (await client.post("/send", json=SMS)).get_json())["id"]
    await trio.sleep(0.01)  # distinct creation times (milliseconds)
    middle = dt.datetime.now(dt.UTC)
    await trio.sleep(0.01)
    email = (await (await client.post("/send", json=EMAIL)).get_json())["id"]

    async def ids(query: str) -> list[str]:
        response = await client.get(f"/send?{query}")
        assert response.status_code == 200, await response.get_json()
        return [job["id"] for job in (await response.get_json())["jobs"]]

    assert await ids("") == [email, sms]
    assert await ids("channel=sms") == [sms]
    assert await ids("channel=email&status=done") == [email]
    assert await ids("status=running") == []
    stamp = middle.isoformat().replace("+00:00", "Z")
    assert await ids(f"createdAfter={stamp}") == [email]
    assert await ids(f"createdBefore={stamp}") == [sms]
    listed = (await (await client.get("/send?limit=1")).get_json())["jobs"][0]
    assert set(listed) >= {"id", "status", "createdAt", "startedAt", "finishedAt", "summary", "requestId"}
    assert listed["summary"]["sent"] == {"email": 1}
    for bad in ("status=finished", "channel=fax", "limit=0", "limit=x", "createdAfter=yesterday", "cursor=%21%21"):
        response = await client.get(f"/send?{bad}")
        assert response.status_code == 400, bad
        assert bad.split("=")[0] in (await response.get_json())["message"]


async def test_cursor_paging_is_stable_while_new_jobs_arrive(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    before = [(await (await client.post("/send", json=SMS)).get_json())["id"] for _ in range(7)]
    seen: list[str] = []
    cursor = None
    while True:
        page = await (await client.get("/send?limit=3" + (f"&cursor={cursor}" if cursor else ""))).get_json()
        seen.extend(job["id"] for job in page["jobs"])
        # New jobs between pages land before the cursor: nothing shifts, nothing repeats.
        await client.post("/send", json=SMS)
        cursor = page["next"]
        if cursor is None:
            break
    assert seen == before[::-1]


async def test_listing_queries_are_answered_from_indexes(dispatcher: Any, database: Any) -> None:
    """Every query the listing makes walks an index of the jobs collection, in the listing's order:
    checked with the query plan of the engine under the embedded store (neosqlite, the same
    SQL nx-27017 runs), for each kind of filter and their combinations."""
    await dispatcher.ledger.ensure_indexes()
    jobs = database[dispatcher.settings.store.jobs_collection]
    indexed = [list(index["key"]) for index in jobs.index_information().values()]
    for keys in JOB_LISTING_INDEXES:
        assert [name for name, _ in keys] in [[name for name, _ in index] for index in indexed]

    engine = neosqlite.Connection(":memory:")
    mirror = engine["jobs"]
    mirror.insert_many(
        [
            {
                "_id": f"j{i:03d}",
                "seq": f"20261204T10{i // 60:02d}{i % 60:02d}000|j{i:03d}",
                "key_id": "alice" if i % 3 else "bob",
                "state": "done" if i % 2 else "running",
                "request": {"channels": ["sms", "email"] if i % 2 else ["sms"]},
            }
            for i in range(200)
        ]
    )
    for keys in JOB_LISTING_INDEXES:
        mirror.create_index(list(keys))
    cursor = encode_cursor("20261204T100100000|j060")
    queries = [
        JobQuery(),
        JobQuery(status="done"),
        JobQuery(channel="email"),
        JobQuery(cursor=cursor),
        JobQuery(created_after=dt.datetime(2026, 12, 4, 10, 1, tzinfo=dt.UTC), status="running"),
        JobQuery(created_before=dt.datetime(2026, 12, 4, 10, 2, tzinfo=dt.UTC), channel="sms", cursor=cursor),
    ]
    for query in queries:
        for viewer in (EVERYONE, Viewer("alice")):
            filters = listing_filter(query, viewer)
            found = mirror.find(filters).sort("seq", -1).limit(query.limit + 1)
            steps = [step["detail"] for step in found.explain()["queryPlanner"]["winningPlan"]]
            table_steps = [step for step in steps if step.startswith(("SCAN jobs", "SEARCH jobs"))]
            assert table_steps and all("USING INDEX" in step for step in table_steps), (filters, steps)
            assert not any("TEMP B-TREE" in step for step in steps), (filters, steps)  # sorted by the index
            # And the plan answers correctly: the same jobs as filtering by hand.
            expected = sorted(
                (d for d in mirror.find({}) if _matches(d, query, viewer)), key=lambda d: d["seq"], reverse=True
            )[: query.limit + 1]
            assert [d["_id"] for d in found] == [d["_id"] for d in expected], filters


def _matches(doc: dict[str, Any], query: JobQuery, viewer: Viewer) -> bool:
    bounds = query.seq_range()
    return (
        viewer.sees(doc)
        and (query.status is None or doc["state"] == query.status)
        and (query.channel is None or query.channel in doc["request"]["channels"])
        and ("$lt" not in bounds or doc["seq"] < bounds["$lt"])
        and ("$gte" not in bounds or doc["seq"] >= bounds["$gte"])
    )


# --- the command line


async def test_jobs_cli_lists_shows_pages_failures_and_cancels_with_the_keys_rights(
    make_settings: Any, database: Any, keys_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    settings = make_settings(auth={"keys_file": str(keys_file)})
    config = Config()
    config.bind = ["127.0.0.1:0"]
    stop = trio.Event()
    async with open_dispatcher(settings) as d, trio.open_nursery() as nursery:
        urls = await nursery.start(partial(hypercorn_serve, create_app(d), config, shutdown_trigger=stop.wait))
        url = urls[0]

        def cli(key: str, *argv: str) -> tuple[int, str]:
            monkeypatch.setenv("DISPATCHER_API_KEY", KEYS[key])
            out = io.StringIO()
            args = build_parser().parse_args(["jobs", *argv, "--url", url])
            return remote.run(args, out), out.getvalue()

        async def run_cli(key: str, *argv: str) -> tuple[int, str]:
            return await trio.to_thread.run_sync(partial(cli, key, *argv))

        job = (await d.send({**SMS, "recipients": ["u1", "ghost"]}, key_scope="alice")).job_id
        code, table = await run_cli("alice", "list")
        assert code == 0 and table.splitlines()[0].split() == ["ID", "STATUS", "CREATED", "SENT", "FAILED", "REQUEST"]
        assert job in table and "sms=1" in table
        code, table = await run_cli("bob", "list")
        assert code == 0 and job not in table
        code, shown_job = await run_cli("ops", "show", job)
        assert code == 0 and json.loads(shown_job)["id"] == job
        code, failures = await run_cli("alice", "failures", job)
        assert code == 0 and failures.splitlines()[1].split() == ["ghost", "sms", "user", "not", "found"]
        assert (await run_cli("bob", "cancel", job))[0] == 1  # 404: another key's job
        code, listing = await run_cli("alice", "list", "--json", "--status", "done")
        assert code == 0 and [j["id"] for j in json.loads(listing)["jobs"]] == [job]
        stop.set()
