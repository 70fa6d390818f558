"""The delivery ledger: jobs and deliveries recorded, idempotency keys, the asynchronous API,
cancellation, and resuming a job that a dead instance left behind (real pymongo, real store)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.errors import Conflict, NotFound, StillRunning
from dispatcher.journal import STOPPED_DURING_ATTEMPT
from dispatcher.ledger import delivery_key
from dispatcher.web import status_of
from dispatcher.wire import failure_json, send_result_json

REQUEST = {
    "channels": ["sms", "push"],
    "clusters": ["all"],
    "messageContent": "hi {{ user.name }}",
    "messageTitle": "T",
}


def seed(database: Any, count: int = 6) -> None:
    database.users.insert_many(
        [
            {
                "_id": f"u{i}",
                "name": f"N{i}",
                "phoneNumber": f"+1555000{i:04d}",
                "deviceToken": f"tok-{i}",
                "clusters": ["all"],
            }
            for i in range(count)
        ]
    )


def outbox_messages(outbox: Path, channel: str) -> list[dict[str, Any]]:
    folder = outbox / channel
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))] if folder.exists() else []


async def test_a_send_is_recorded_as_a_job_with_one_delivery_per_user_and_channel(
    make_settings: Any, database: Any
) -> None:
    seed(database, 3)
    database.users.insert_one({"_id": "mute", "clusters": ["all"]})  # no address: skipped
    async with open_dispatcher(make_settings()) as d:
        result = await d.send({**REQUEST, "recipients": ["ghost"]})
    [job] = list(database.dispatch_jobs.find())
    assert job["state"] == "done" and job["request"]["clusters"] == ["all"]
    assert job["summary"] == result.summary.to_json()
    states = {(doc["user"], doc["channel"]): doc for doc in database.dispatch_deliveries.find({"job": job["_id"]})}
    assert len(states) == 5 * 2
    assert {k: v["state"] for k, v in states.items() if k[0] == "u0"} == {("u0", "sms"): "sent", ("u0", "push"): "sent"}
    assert states[("mute", "sms")]["state"] == "skipped"
    assert states[("ghost", "push")]["state"] == "failed" and states[("ghost", "push")]["error"] == "user not found"
    # The outbox's message id (its file name) is the provider id of the delivery.
    assert states[("u1", "sms")]["provider_id"].endswith(".json") and states[("u1", "sms")]["attempts"] == 1


async def test_same_idempotency_key_and_body_returns_the_first_result_without_sending(
    make_settings: Any, database: Any, outbox: Path
) -> None:
    seed(database, 3)
    async with open_dispatcher(make_settings()) as d:
        first = await d.send(REQUEST, idempotency_key="k-1")
        second = await d.send(REQUEST, idempotency_key="k-1")
        third = await d.send({**REQUEST, "idempotencyKey": "k-1"})  # the body form
    assert send_result_json(second) == send_result_json(first) == send_result_json(third)
    assert len(outbox_messages(outbox, "sms")) == 3
    assert database.dispatch_jobs.count_documents({}) == 1


async def test_same_key_with_another_body_is_a_conflict_naming_it(make_settings: Any, database: Any) -> None:
    seed(database, 1)
    async with open_dispatcher(make_settings()) as d:
        await d.send(REQUEST, idempotency_key="k-2")
        with pytest.raises(Conflict, match="k-2.*different request") as conflict:
            await d.send({**REQUEST, "messageContent": "other"}, idempotency_key="k-2")
    assert status_of(conflict.value) == 422


async def test_keys_are_scoped(make_settings: Any, database: Any, outbox: Path) -> None:
    seed(database, 1)
    async with open_dispatcher(make_settings()) as d:
        await d.send(REQUEST, idempotency_key="k", key_scope="tenant-a")
        await d.send(REQUEST, idempotency_key="k", key_scope="tenant-b")
    assert len(outbox_messages(outbox, "sms")) == 2


async def test_concurrent_identical_requests_with_one_key_deliver_once(
    make_settings: Any, database: Any, outbox: Path
) -> None:
    seed(database, 4)
    results = []
    async with open_dispatcher(make_settings(channels={"sms": {"rate_per_second": 20}})) as d:

        async def send() -> None:
            results.append(await d.send(REQUEST, idempotency_key="same"))

        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(send)
    assert len(outbox_messages(outbox, "sms")) == 4
    assert {json.dumps(send_result_json(r), sort_keys=True) for r in results} == {
        json.dumps(send_result_json(results[0]), sort_keys=True)
    }


async def test_submit_then_status_and_paged_failures(make_settings: Any, database: Any) -> None:
    seed(database, 2)
    async with open_dispatcher(make_settings()) as d:
        job_id = await d.submit({**REQUEST, "recipients": [f"missing{i}" for i in range(5)]})
        with trio.fail_after(10):
            while (status := await d.status(job_id)).state != "done":
                await trio.sleep(0.02)
        assert status.summary.failed == {"sms": 5, "push": 5}
        assert status.started_at and status.finished_at and status.created_at
        pages, after = [], None
        while True:
            page = await d.failures(job_id, after, limit=4)
            pages.append(page.failures)
            after = page.next
            if after is None:
                break
        with pytest.raises(NotFound):
            await d.status("no-such-job")
    assert [len(p) for p in pages] == [4, 4, 2]
    everything = [f for p in pages for f in p]
    assert len({(f.user_id, f.channel) for f in everything}) == 10
    assert {f.error for f in everything} == {"user not found"}


async def test_cancel_stops_what_has_not_started(make_settings: Any, database: Any, outbox: Path) -> None:
    seed(database, 30)
    settings = make_settings(channels={"sms": {"rate_per_second": 20, "concurrency": 1}})
    async with open_dispatcher(settings) as d:
        job_id = await d.submit({**REQUEST, "channels": ["sms"]})
        with trio.fail_after(10):
            while len(outbox_messages(outbox, "sms")) < 3:
                await trio.sleep(0.01)
        await d.cancel(job_id)
        with trio.fail_after(10):
            while (status := await d.status(job_id)).state not in ("cancelled", "done"):
                await trio.sleep(0.02)
    sent = len(outbox_messages(outbox, "sms"))
    assert status.state == "cancelled"
    assert 3 <= sent < 30
    assert status.summary.sent["sms"] == sent
    # Nothing is left `sending`: what did not go out is recorded as cancelled (or never started).
    assert database.dispatch_deliveries.count_documents({"job": job_id, "state": "sending"}) == 0


def _abandoned_job(database: Any, job_id: str, request: dict[str, Any], deliveries: dict[tuple[str, str], str]) -> None:
    """What a process killed mid-send leaves behind: a running job with an expired lease."""
    database.dispatch_jobs.insert_one(
        {
            "_id": job_id,
            "request": request,
            "state": "running",
            "created_at": "2026-12-01T00:00:00.000Z",
            "started_at": "2026-12-01T00:00:01.000Z",
            "finished_at": None,
            "summary": None,
            "error": None,
            "cancel_requested": False,
            "lease_owner": "dead-host:1",
            "lease_expires": time.time() - 1,
        }
    )
    if deliveries:
        database.dispatch_deliveries.insert_many(
            [
                {
                    "_id": delivery_key(job_id, channel, user),
                    "job": job_id,
                    "user": user,
                    "channel": channel,
                    "state": state,
                    "error": None,
                    "attempts": 1,
                    "user_found": True,
                }
                for (user, channel), state in deliveries.items()
            ]
        )


async def test_an_abandoned_job_is_resumed_without_repeating_settled_deliveries(
    make_settings: Any, database: Any, outbox: Path
) -> None:
    seed(database, 6)
    _abandoned_job(
        database,
        "job-1",
        {**REQUEST},
        {
            ("u0", "sms"): "sent",
            ("u1", "sms"): "failed",
            ("u2", "sms"): "sending",
            ("u0", "push"): "sent",
            ("u2", "push"): "sending",
        },
    )
    async with open_dispatcher(make_settings()) as d:
        with trio.fail_after(15):
            while (status := await d.status("job-1")).state != "done":
                await trio.sleep(0.05)
        failures = [failure_json(f) for f in (await d.failures("job-1")).failures]
    sms_to = sorted(m["to"] for m in outbox_messages(outbox, "sms"))
    push_to = sorted(m["to"] for m in outbox_messages(outbox, "push"))
    # sms: u0 sent and u1 failed before the crash; u2's outcome is unknown and sms reports it.
    assert sms_to == [f"+1555000{i:04d}" for i in (3, 4, 5)]
    # push resends what was in flight (a duplicate push costs little): u2 again, u0 not.
    assert push_to == sorted(f"tok-{i}" for i in (1, 2, 3, 4, 5))
    assert {"userId": "u2", "channel": "sms", "error": STOPPED_DURING_ATTEMPT} in failures
    assert status.summary.sent == {"sms": 4, "push": 6}
    assert status.summary.users == 6
    job = database.dispatch_jobs.find_one({"_id": "job-1"})
    assert job["lease_owner"] != "dead-host:1"


async def test_a_job_with_a_live_lease_is_left_to_its_owner(make_settings: Any, database: Any, outbox: Path) -> None:
    seed(database, 2)
    _abandoned_job(database, "job-2", {**REQUEST}, {})
    database.dispatch_jobs.update_one({"_id": "job-2"}, {"$set": {"lease_expires": time.time() + 60}})
    async with open_dispatcher(make_settings()) as d:
        await trio.sleep(0.5)
        assert (await d.status("job-2")).state == "running"
    assert outbox_messages(outbox, "sms") == []


async def test_without_the_ledger_sends_work_and_jobs_are_refused(make_settings: Any, database: Any) -> None:
    seed(database, 1)
    async with open_dispatcher(make_settings(store={"ledger": False})) as d:
        result = await d.send(REQUEST)
        with pytest.raises(Exception, match="ledger"):
            await d.submit(REQUEST)
    assert result.summary.sent == {"sms": 1, "push": 1}
    assert database.dispatch_jobs.count_documents({}) == 0


async def test_two_runs_of_one_job_never_both_send_a_delivery(make_settings: Any, database: Any, outbox: Path) -> None:
    # A partition processed twice, or a job resumed while its old owner still runs: each
    # delivery is claimed by compare-and-set before its provider call, so one run sends it.
    from actors import run_pipeline
    from dispatcher.journal import Journal
    from dispatcher.models import SendRequest

    seed(database, 50)
    async with open_dispatcher(make_settings(store={"ledger": True})) as d:
        assert d.ledger is not None
        plan = await d.prepare(SendRequest.parse({**REQUEST, "channels": ["sms"]}))
        results = []

        async def run() -> None:
            journal = Journal(d.ledger, "job-twice", resumed=True, on_ambiguous={"sms": "report"})
            results.append(await run_pipeline(plan, d.store, d.transports, 8, journal=journal))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            nursery.start_soon(run)
    assert len(outbox_messages(outbox, "sms")) == 50
    assert sum(r.summary.sent.get("sms", 0) for r in results) == 50


def short_lease(make_settings: Any) -> Any:
    """A lease of 0.3 s, and SMS paced at 20/s: a send of 20 or 40 users outlasts several leases."""
    return make_settings(store={"lease_seconds": 0.3}, channels={"sms": {"rate_per_second": 20, "concurrency": 1}})


def start_sms_send(nursery: trio.Nursery, d: Any) -> list[Any]:
    """Start a send of REQUEST on SMS alone in `nursery`; the list gets its result, or what it
    raised, when it ends."""
    ended: list[Any] = []

    async def send() -> None:
        try:
            ended.append(await d.send({**REQUEST, "channels": ["sms"]}))
        except Exception as exc:
            ended.append(exc)

    nursery.start_soon(send)
    return ended


async def test_a_run_whose_lease_was_taken_over_stops_and_says_so(
    make_settings: Any, database: Any, outbox: Path
) -> None:
    # Another instance claimed the job (this one was too slow to renew its lease): the store
    # answered, so the client is told who delivers the rest, not that the store went away.
    seed(database, 40)
    settings = short_lease(make_settings)
    async with open_dispatcher(settings) as d:
        async with trio.open_nursery() as nursery:
            caught = start_sms_send(nursery, d)
            with trio.fail_after(10):
                while (job := database.dispatch_jobs.find_one({})) is None or len(outbox_messages(outbox, "sms")) < 2:
                    await trio.sleep(0.01)
            database.dispatch_jobs.update_one({"_id": job["_id"]}, {"$set": {"lease_owner": "other-host:1"}})
    [error] = caught
    assert type(error).__name__ == "Interrupted"
    assert f"another instance took over job {job['_id']}" in str(error)
    assert "store" not in str(error)
    assert len(outbox_messages(outbox, "sms")) < 40


async def test_a_run_longer_than_its_lease_keeps_it_renewed(make_settings: Any, database: Any, outbox: Path) -> None:
    # One task renews every run's lease (`Recorded.keep_leases`): a send of two seconds under a
    # lease of 0.3 s must find its lease in the future whenever it is looked at, and end done.
    seed(database, 40)
    settings = short_lease(make_settings)
    async with open_dispatcher(settings) as d:
        async with trio.open_nursery() as nursery:
            results = start_sms_send(nursery, d)
            seen: list[float] = []
            with trio.fail_after(20):
                while not results:
                    job = database.dispatch_jobs.find_one({})
                    if job is not None and job["state"] == "running":
                        assert job["lease_expires"] > time.time(), "the lease of a running job expired"
                        seen.append(job["lease_expires"])
                    await trio.sleep(0.05)
    [result] = results
    assert result.summary.sent == {"sms": 40}
    assert len(set(seen)) >= 3  # renewed again and again, not once


async def test_a_renewal_that_fails_unexpectedly_ends_no_send(
    make_settings: Any, database: Any, outbox: Path, caplog: Any
) -> None:
    # One task renews every run's lease: a bug in one renewal is logged, and neither that send
    # nor the process ends with it.
    seed(database, 20)
    settings = short_lease(make_settings)
    async with open_dispatcher(settings) as d:
        assert d.ledger is not None
        failures = 0

        async def broken(*args: Any, **kwargs: Any) -> Any:
            nonlocal failures
            failures += 1
            raise RuntimeError("a bug in renewing")

        d.ledger.renew = broken  # type: ignore[method-assign]
        result = await d.send({**REQUEST, "channels": ["sms"]})
        again = await d.send({**REQUEST, "channels": ["sms"], "recipients": ["u1"], "clusters": []})
    assert result.summary.sent == {"sms": 20} and again.summary.sent == {"sms": 1}
    assert failures >= 2
    assert "renewing its lease failed" in caplog.text


ONE_SMS = {"channels": ["sms"], "messageContent": "hi {{ user.name }}"}


async def test_a_small_send_writes_its_job_with_its_first_claim_and_its_end_with_its_only_outcome(
    make_settings: Any, database: Any
) -> None:
    """Two group commits for a send of one delivery instead of four (issue 20); a send whose
    only delivery is written without a claim (an unknown user) carries its job's creation and
    end too; a send of several users carries only the creation."""
    seed(database, 3)
    async with open_dispatcher(make_settings()) as d:
        assert d.ledger is not None
        groups: list[list[str]] = []
        flush = d.ledger._writes._run

        def counted(batch: list[Any]) -> None:
            groups.append(sorted(call.kind for call in batch))
            flush(batch)

        d.ledger._writes._run = counted
        results = [
            await d.send({**ONE_SMS, "recipients": ["u0"]}),
            await d.send({**ONE_SMS, "recipients": ["ghost"]}),
            await d.send({**ONE_SMS, "recipients": ["u1", "u2"]}),
        ]
    assert groups[:2] == [["claim", "job"], ["job update", "outcome"]]
    assert groups[2] == ["job", "job update", "outcome"]
    assert sorted(kind for group in groups[3:] for kind in group) == [
        "claim",
        "claim",
        "job",
        "job update",
        "outcome",
        "outcome",
    ]
    for result in results:
        job = database.dispatch_jobs.find_one({"_id": result.job_id})
        assert job is not None and job["state"] == "done" and job["lease_expires"] == 0
        assert job["summary"] == result.summary.to_json()
    assert results[1].summary.to_json()["failed"] == {"sms": 1}
    states = {doc["user"]: doc["state"] for doc in database.dispatch_deliveries.find()}
    assert states == {"u0": "sent", "ghost": "failed", "u1": "sent", "u2": "sent"}


async def test_a_send_still_running_when_its_wait_ends_is_written_before_its_id_is_given(
    make_settings: Any, database: Any
) -> None:
    seed(database, 1)
    async with open_dispatcher(make_settings()) as d:
        with pytest.raises(StillRunning) as running:
            await d.send({**ONE_SMS, "recipients": ["u0"]}, wait_seconds=0)
        job_id = running.value.job_id
        assert (await d.status(job_id)).state in ("running", "done")
        with trio.fail_after(10):
            while (status := await d.status(job_id)).state != "done":
                await trio.sleep(0.02)
    assert status.summary.sent == {"sms": 1}
    assert database.dispatch_jobs.count_documents({}) == 1
