"""The process-wide group commit of ledger writes: callers that arrive while a write is in flight go
together in the next one, each gets its own outcome, and cancellation loses nothing it should not."""

from __future__ import annotations

import threading
from typing import Any

import pymongo
import pytest
import trio

from dispatcher.errors import StoreError
from dispatcher.group_commit import GroupCommit, Write
from dispatcher.ledger import Ledger, delivery_key
from dispatcher.messages import Delivery
from dispatcher.settings import StoreSettings


class Recorder:
    """A flush that records its batches; the first one waits until released, like a slow store."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = threading.Event()

    def flush(self, batch: list[Write]) -> None:
        if not self.batches:
            self.release.wait(5)
        self.batches.append([w.payload for w in batch])
        for write in batch:
            if write.payload == "bad":
                write.fail(StoreError("refused"))
            else:
                write.succeed(f"ok {write.payload}")


async def test_writes_queued_during_a_write_go_together_in_the_next() -> None:
    recorder = Recorder()
    commits = GroupCommit(recorder.flush)
    results: dict[int, Any] = {}

    async def submit(i: int) -> None:
        results[i] = await commits.submit("x", i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(submit, 0)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 11):
            nursery.start_soon(submit, i)
        await trio.testing.wait_all_tasks_blocked()
        recorder.release.set()

    assert [sorted(batch) for batch in recorder.batches] == [[0], list(range(1, 11))]
    assert results == {i: f"ok {i}" for i in range(11)}


async def test_each_caller_gets_its_own_outcome() -> None:
    recorder = Recorder()
    recorder.release.set()
    commits = GroupCommit(recorder.flush)
    outcomes: dict[str, Any] = {}

    async def submit(payload: str) -> None:
        try:
            outcomes[payload] = await commits.submit("x", payload)
        except StoreError as exc:
            outcomes[payload] = exc

    async with trio.open_nursery() as nursery:
        for payload in ("a", "bad", "c"):
            nursery.start_soon(submit, payload)

    assert outcomes["a"] == "ok a" and outcomes["c"] == "ok c"
    assert isinstance(outcomes["bad"], StoreError)


async def test_a_caller_cancelled_before_its_write_was_taken_takes_it_back() -> None:
    recorder = Recorder()
    commits = GroupCommit(recorder.flush)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(commits.submit, "x", "first")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01):
            await commits.submit("x", "abandoned")
        nursery.start_soon(commits.submit, "x", "kept")
        await trio.testing.wait_all_tasks_blocked()
        recorder.release.set()
    assert recorder.batches == [["first"], ["kept"]]


async def test_a_flush_that_raises_fails_every_write_of_its_batch() -> None:
    def flush(batch: list[Write]) -> None:
        raise ValueError("bug")

    commits = GroupCommit(flush)
    with pytest.raises(ValueError, match="bug"):
        await commits.submit("x", 1)
    # The lock is free again and the next write is attempted.
    with pytest.raises(ValueError):
        await commits.submit("x", 2)


async def test_ledger_claims_and_outcomes_of_several_jobs_in_one_group(database: pymongo.database.Database) -> None:
    """Through real pymongo: a claim of a delivery someone else wrote comes back as taken, the
    other claims and another job's outcomes in the same bulk are written."""
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    await ledger.ensure_indexes()
    await ledger.record("job-a", [Delivery("u1", "sms", "skipped")])

    async with trio.open_nursery() as nursery:
        taken: dict[str, set[tuple[str, str]]] = {}

        async def claim(job: str, users: list[str]) -> None:
            taken[job] = await ledger.claim_sending(job, "run-1", [("sms", u, None) for u in users])

        nursery.start_soon(claim, "job-a", ["u1", "u2"])
        nursery.start_soon(claim, "job-b", ["u1"])
        nursery.start_soon(ledger.record, "job-c", [Delivery("u9", "email", "skipped")])

    assert taken == {"job-a": {("sms", "u1")}, "job-b": set()}
    deliveries = database[StoreSettings().deliveries_collection]
    states = {doc["_id"]: doc["state"] for doc in deliveries.find()}
    assert states == {delivery_key("job-a", "sms", "u1"): "skipped", delivery_key("job-a", "sms", "u2"): "sending",
                      delivery_key("job-b", "sms", "u1"): "sending", delivery_key("job-c", "email", "u9"): "skipped"}

    # The outcome of an attempt updates its claim: only what the attempt changed is written.
    await ledger.record("job-b", [Delivery("u1", "sms", "sent", attempts=2, provider_id="SM1")])
    doc = deliveries.find_one({"_id": delivery_key("job-b", "sms", "u1")})
    assert doc is not None
    assert {k: doc.get(k) for k in ("job", "user", "channel", "state", "attempts", "provider_id", "run")} == {
        "job": "job-b", "user": "u1", "channel": "sms", "state": "sent", "attempts": 2, "provider_id": "SM1",
        "run": "run-1"}
