"""A group commit that writes both the jobs and the deliveries collection goes to the store as one
`bulkWrite` command (`Ledger._flush_in_one`), through real pymongo against the embedded store:
what lands, what a duplicate key means, and that nothing runs after a write it depends on failed."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pymongo
import pymongo.monitoring
import pytest
from pymongo import UpdateOne
from pymongo.errors import InvalidOperation

from dispatcher.batching import Call
from dispatcher.errors import StoreError
from dispatcher.ledger import Ledger, delivery_key
from dispatcher.messages import Delivery
from dispatcher.settings import StoreSettings

SETTINGS = StoreSettings()


class Commands(pymongo.monitoring.CommandListener):
    def __init__(self) -> None:
        self.names: list[str] = []

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        self.names.append(event.command_name)

    def succeeded(self, event: Any) -> None:
        pass

    def failed(self, event: Any) -> None:
        pass


@pytest.fixture
def watched(mongo_url: str, database: pymongo.database.Database) -> Iterator[tuple[Ledger, Commands]]:
    commands = Commands()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, event_listeners=[commands])
    try:
        ledger = Ledger(client, StoreSettings(database=database.name))
        yield ledger, commands
    finally:
        client.close()


def job_document(ledger: Ledger, job_id: str) -> dict[str, Any]:
    return ledger.job_document(job_id, {"channels": ["sms"], "recipients": ["u1"]}, "owner", 30, None)


async def test_a_small_sends_writes_are_two_commands_one_per_group(
    watched: tuple[Ledger, Commands], database: pymongo.database.Database
) -> None:
    ledger, commands = watched
    await ledger.ensure_indexes()
    commands.names.clear()

    taken = await ledger.claim_sending("job-1", "run-1", [("sms", "u1", None)], creating=job_document(ledger, "job-1"))
    assert taken == set()
    assert commands.names == ["bulkWrite"]
    assert database[SETTINGS.jobs_collection].find_one({"_id": "job-1"})["state"] == "running"
    assert database[SETTINGS.deliveries_collection].find_one({"_id": delivery_key("job-1", "sms", "u1")})["state"] == (
        "sending"
    )

    finished = await ledger.record(
        "job-1",
        [Delivery("u1", "sms", "sent", attempts=1, provider_id="SM1")],
        finishing={"state": "done", "summary": {"users": 1}},
    )
    assert finished
    assert commands.names == ["bulkWrite", "bulkWrite"]
    job = database[SETTINGS.jobs_collection].find_one({"_id": "job-1"})
    delivery = database[SETTINGS.deliveries_collection].find_one({"_id": delivery_key("job-1", "sms", "u1")})
    assert (job["state"], job["summary"]) == ("done", {"users": 1})
    assert (delivery["state"], delivery["provider_id"], delivery["run"]) == ("sent", "SM1", "run-1")


async def test_a_claim_someone_else_holds_comes_back_taken_and_the_job_is_written(
    watched: tuple[Ledger, Commands], database: pymongo.database.Database
) -> None:
    ledger, commands = watched
    await ledger.ensure_indexes()
    await ledger.claim_sending("job-2", "run-1", [("sms", "u1", None)])

    taken = await ledger.claim_sending("job-2", "run-2", [("sms", "u1", None)], creating=job_document(ledger, "job-2"))

    assert taken == {("sms", "u1")}
    assert database[SETTINGS.jobs_collection].find_one({"_id": "job-2"}) is not None
    assert database[SETTINGS.deliveries_collection].find_one({"_id": delivery_key("job-2", "sms", "u1")})["run"] == (
        "run-1"
    )


async def test_a_job_carried_again_does_not_stop_its_claim(
    watched: tuple[Ledger, Commands], database: pymongo.database.Database
) -> None:
    """The job's insert meets its own earlier write (a duplicate key at the first operation, where
    the store stops): the claim after it is still written, in a second command."""
    ledger, commands = watched
    await ledger.ensure_indexes()
    document = job_document(ledger, "job-3")
    await ledger.insert_job(dict(document))
    commands.names.clear()

    taken = await ledger.claim_sending("job-3", "run-1", [("sms", "u1", None)], creating=document)

    assert taken == set()
    assert commands.names == ["bulkWrite", "update"]
    assert database[SETTINGS.deliveries_collection].find_one({"_id": delivery_key("job-3", "sms", "u1")})["state"] == (
        "sending"
    )


def test_nothing_runs_after_a_write_that_failed_if_it_depends_on_it(
    watched: tuple[Ledger, Commands], database: pymongo.database.Database
) -> None:
    """An outcome the store refuses fails, the job's end chained after it is not written, and a
    claim of another job in the same group (after it in the command, not depending on it) is."""
    ledger, commands = watched
    deliveries = database[SETTINGS.deliveries_collection]
    jobs = database[SETTINGS.jobs_collection]
    jobs.insert_one({"_id": "job-4", "state": "running"})
    deliveries.insert_one({"_id": "x", "state": "sending"})
    refused = Call(
        "outcome", ([UpdateOne({"_id": "x"}, {"$bogus": {"state": "sent"}}, namespace=deliveries.full_name)], None, [])
    )
    end = Call(
        "job update",
        ([UpdateOne({"_id": "job-4"}, {"$set": {"state": "done"}}, namespace=jobs.full_name)], None, []),
        after=refused,
    )
    claim = Call(
        "claim",
        (
            [
                UpdateOne(
                    {"_id": "k", "state": {"$exists": False}},
                    {"$set": {"state": "sending"}},
                    upsert=True,
                    namespace=deliveries.full_name,
                )
            ],
            [("sms", "u5")],
            "job-5",
        ),
    )

    ledger._flush([refused, end, claim])

    assert isinstance(refused.error, StoreError) and end.error is refused.error
    assert claim.error is None and claim.result == set()
    assert jobs.find_one({"_id": "job-4"})["state"] == "running"
    assert deliveries.find_one({"_id": "k"})["state"] == "sending"
    assert commands.names == ["bulkWrite", "update"]


async def test_a_store_without_bulkwrite_gets_a_command_per_collection(
    watched: tuple[Ledger, Commands], database: pymongo.database.Database
) -> None:
    """Before MongoDB 8.0 pymongo refuses `MongoClient.bulk_write` before sending anything (the
    refusal is simulated here: the embedded store has the command): the group is written as
    before, and the ledger does not try again."""
    ledger, commands = watched
    await ledger.ensure_indexes()
    refusals = []

    def refuse(*args: Any, **kwargs: Any) -> None:
        refusals.append(args)
        raise InvalidOperation("MongoClient.bulk_write requires MongoDB server version 8.0+.")

    ledger._client.bulk_write = refuse  # type: ignore[method-assign]
    commands.names.clear()

    await ledger.claim_sending("job-6", "run-1", [("sms", "u1", None)], creating=job_document(ledger, "job-6"))
    await ledger.record("job-6", [Delivery("u1", "sms", "sent", attempts=1)], finishing={"state": "done"})

    assert len(refusals) == 1
    assert commands.names == ["insert", "update", "update", "update"]
    assert database[SETTINGS.jobs_collection].find_one({"_id": "job-6"})["state"] == "done"
    assert database[SETTINGS.deliveries_collection].find_one({"_id": delivery_key("job-6", "sms", "u1")})["state"] == (
        "sent"
    )
