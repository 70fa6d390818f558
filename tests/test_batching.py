"""Shared round trips (`dispatcher.batching`): callers that arrive while one is in flight go together
in the next, each gets its own outcome, and cancellation loses nothing it should not; the ledger's
group commit and the store's grouped user lookups through real pymongo."""

from __future__ import annotations

import threading
from typing import Any

import pymongo
import pymongo.monitoring
import pytest
import trio
from bson import ObjectId

from dispatcher.errors import StoreError
from dispatcher.batching import Batcher, Call
from dispatcher.ledger import Ledger, delivery_key
from dispatcher.messages import Delivery
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store


class Recorder:
    """A flush that records its batches; the first one waits until released, like a slow store."""

    def __init__(self) -> None:
        self.batches: list[list[Any]] = []
        self.release = threading.Event()

    def flush(self, batch: list[Call]) -> None:
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
    batcher = Batcher(recorder.flush)
    results: dict[int, Any] = {}

    async def submit(i: int) -> None:
        results[i] = await batcher.submit("x", i)

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
    batcher = Batcher(recorder.flush)
    outcomes: dict[str, Any] = {}

    async def submit(payload: str) -> None:
        try:
            outcomes[payload] = await batcher.submit("x", payload)
        except StoreError as exc:
            outcomes[payload] = exc

    async with trio.open_nursery() as nursery:
        for payload in ("a", "bad", "c"):
            nursery.start_soon(submit, payload)

    assert outcomes["a"] == "ok a" and outcomes["c"] == "ok c"
    assert isinstance(outcomes["bad"], StoreError)


async def test_a_caller_cancelled_before_its_write_was_taken_takes_it_back() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.flush)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit, "x", "first")
        await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(0.01):
            await batcher.submit("x", "abandoned")
        nursery.start_soon(batcher.submit, "x", "kept")
        await trio.testing.wait_all_tasks_blocked()
        recorder.release.set()
    assert recorder.batches == [["first"], ["kept"]]


async def test_a_flush_that_raises_fails_every_write_of_its_batch() -> None:
    def flush(batch: list[Call]) -> None:
        raise ValueError("bug")

    batcher = Batcher(flush)
    with pytest.raises(ValueError, match="bug"):
        await batcher.submit("x", 1)
    # The lock is free again and the next write is attempted.
    with pytest.raises(ValueError):
        await batcher.submit("x", 2)


async def test_with_several_slots_a_write_starts_while_another_is_in_flight() -> None:
    release = threading.Event()
    batches: list[list[Any]] = []

    def flush(batch: list[Call]) -> None:
        if batch[0].payload == "slow":
            release.wait(5)
        batches.append([call.payload for call in batch])
        for call in batch:
            call.succeed(f"ok {call.payload}")

    batcher = Batcher(flush, in_flight=2, beside=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit, "x", "slow")
        await trio.testing.wait_all_tasks_blocked()
        # With one at a time this would wait for "slow": it does not.
        with trio.fail_after(2):
            assert await batcher.submit("x", "quick") == "ok quick"
        assert batches == [["quick"]]
        release.set()
    assert batches == [["quick"], ["slow"]]


async def test_beside_a_large_round_trip_the_next_waits_and_gathers_the_queue() -> None:
    """Under load (the round trip in flight carries more than `beside` calls) callers queue up
    into one group again instead of many small ones."""
    release = threading.Event()
    batches: list[list[Any]] = []

    def flush(batch: list[Call]) -> None:
        if "slow" in batch[0].payload:
            release.wait(5)
        batches.append(sorted(call.payload for call in batch))
        for call in batch:
            call.succeed()

    batcher = Batcher(flush, in_flight=3, beside=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit_together, [Call("x", "slow-1"), Call("x", "slow-2")])
        await trio.testing.wait_all_tasks_blocked()
        for name in ("a", "b", "c"):
            nursery.start_soon(batcher.submit, "x", name)
        await trio.testing.wait_all_tasks_blocked()
        assert batches == []
        release.set()
    assert batches == [["slow-1", "slow-2"], ["a", "b", "c"]]


class StepsOf(trio.abc.Instrument):
    """Counts the scheduler's steps of one task: each is a pass of the loop it waited for."""

    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.steps = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self.steps += task is self.task


async def test_an_idle_batcher_runs_a_lone_caller_at_once_and_a_busy_one_waits_a_tick_for_company() -> None:
    recorder = Recorder()
    recorder.release.set()
    batcher = Batcher(recorder.flush, in_flight=2, lone_at_once=True)

    async def steps_of_a_lone_submit(payload: int) -> int:
        counter = StepsOf(trio.lowlevel.current_task())
        trio.lowlevel.add_instrument(counter)
        try:
            await batcher.submit("x", payload)
        finally:
            trio.lowlevel.remove_instrument(counter)
        return counter.steps

    idle = await steps_of_a_lone_submit(0)
    async with trio.open_nursery() as nursery:
        # Three callers in one tick: the first goes at once, the others meanwhile queue up.
        for payload in (1, 2, 3):
            nursery.start_soon(batcher.submit, "x", payload)
    after_a_crowd = await steps_of_a_lone_submit(4)
    after_a_lone_one = await steps_of_a_lone_submit(5)
    batches = recorder.batches
    assert [len(batch) for batch in batches] == [1, 1, 2, 1, 1]
    assert sorted(batches[1] + batches[2]) == [1, 2, 3] and batches[3:] == [[4], [5]]
    assert after_a_crowd == idle + 1  # the tick it waited for others to join
    assert after_a_lone_one == idle
    # A batcher for callers woken together always waits that tick.
    batcher = Batcher(recorder.flush, in_flight=2)
    assert await steps_of_a_lone_submit(6) == idle + 1


async def test_with_every_slot_busy_writes_group_up_again() -> None:
    recorder = Recorder()
    batcher = Batcher(recorder.flush, in_flight=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher.submit, "x", 0)
        await trio.testing.wait_all_tasks_blocked()
        for i in range(1, 4):
            nursery.start_soon(batcher.submit, "x", i)
        await trio.testing.wait_all_tasks_blocked()
        recorder.release.set()
    assert [sorted(batch) for batch in recorder.batches] == [[0], [1, 2, 3]]


async def test_calls_submitted_together_share_a_group_and_none_runs_after_one_that_failed() -> None:
    ran: list[list[str]] = []

    def flush(batch: list[Call]) -> None:
        ran.append([])
        for call in batch:
            if call.blocked():
                continue
            ran[-1].append(call.payload)
            if call.payload == "bad":
                call.fail(StoreError("refused"))
            else:
                call.succeed()

    batcher = Batcher(flush, in_flight=3)
    first = Call("x", "a")
    second = Call("x", "bad", after=first)
    third = Call("x", "c", after=second)
    await batcher.submit_together([first, second, third])
    assert ran == [["a", "bad"]]
    assert first.error is None and isinstance(second.error, StoreError) and third.error is second.error


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
    assert states == {
        delivery_key("job-a", "sms", "u1"): "skipped",
        delivery_key("job-a", "sms", "u2"): "sending",
        delivery_key("job-b", "sms", "u1"): "sending",
        delivery_key("job-c", "email", "u9"): "skipped",
    }

    # The outcome of an attempt updates its claim: only what the attempt changed is written.
    await ledger.record("job-b", [Delivery("u1", "sms", "sent", attempts=2, provider_id="SM1")])
    doc = deliveries.find_one({"_id": delivery_key("job-b", "sms", "u1")})
    assert doc is not None
    assert {k: doc.get(k) for k in ("job", "user", "channel", "state", "attempts", "provider_id", "run")} == {
        "job": "job-b",
        "user": "u1",
        "channel": "sms",
        "state": "sent",
        "attempts": 2,
        "provider_id": "SM1",
        "run": "run-1",
    }


class FindCounter(pymongo.monitoring.CommandListener):
    def __init__(self) -> None:
        self.finds = 0

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        self.finds += event.command_name == "find"

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


async def test_small_selections_of_concurrent_sends_share_one_lookup(
    mongo_url: str, database: pymongo.database.Database
) -> None:
    oid = ObjectId()
    database.users.insert_many(
        [
            {"_id": "u1", "email": "a@example.com"},
            {"_id": "u2", "email": "b@example.com"},
            {"_id": oid, "email": "c@example.com"},
        ]
    )
    counter = FindCounter()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, event_listeners=[counter])
    store = Store(client, StoreSettings(database=database.name), UserFields())
    selections = {
        "one": ["u1"],
        "two and a miss": ["u2", "u1", "nobody"],
        "by object id": [str(oid)],
        "twice the same": ["u2", "u2"],
        **{f"more {i}": ["u1"] for i in range(6)},
    }
    found: dict[str, list[dict[str, Any]]] = {}

    async def read(name: str, ids: list[str]) -> None:
        found[name] = [user async for batch in store.stream_users(ids, ()) for user in batch]

    try:
        async with trio.open_nursery() as nursery:
            for name, ids in selections.items():
                nursery.start_soon(read, name, ids)
    finally:
        client.close()

    assert counter.finds <= 2  # ten selections; one at a time would be ten queries
    emails = {name: sorted(u["email"] for u in users) for name, users in found.items()}
    assert emails["one"] == ["a@example.com"] and emails["more 5"] == ["a@example.com"]
    assert emails["two and a miss"] == ["a@example.com", "b@example.com"]
    assert emails["twice the same"] == ["b@example.com"]
    assert found["by object id"] == [{"_id": str(oid), "email": "c@example.com"}]
    # Each send gets documents of its own.
    assert found["one"][0] is not found["more 0"][0]
