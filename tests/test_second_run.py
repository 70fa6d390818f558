"""A second run of the same users while the first is alive (a lease taken over from a stalled
process, a partition republished after Redis lost it, or reclaimed from a slow worker), through
real pymongo: it waits for the first run's claim to settle instead of reporting it unknown ("the
service stopped", when no process stopped) or resending it; a claim never settled within the
bound is reported as abandoned, with a reason that does not claim a crash."""

from __future__ import annotations

import pymongo
import trio

from dispatcher.journal import OUTCOME_NOT_WRITTEN, STOPPED_DURING_ATTEMPT, Journal
from dispatcher.ledger import Ledger
from dispatcher.messages import Delivery
from dispatcher.settings import StoreSettings


def _journals(database: pymongo.database.Database, policy: str, bound: float) -> tuple[Journal, Journal]:
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    first = Journal(ledger, "job", resumed=False, on_ambiguous={"sms": policy})
    second = Journal(ledger, "job", resumed=True, on_ambiguous={"sms": policy}, settle_within={"sms": bound})
    return first, second


async def test_a_second_run_waits_for_the_live_runs_claim(database: pymongo.database.Database) -> None:
    for policy in ("report", "resend"):
        database.dispatch_deliveries.delete_many({})
        first, second = _journals(database, policy, bound=30.0)
        assert await first.sending([("sms", "u1")]) == set()  # on the wire in the first run
        settled: dict[str, Delivery] = {}

        async def second_run(journal: Journal, into: dict[str, Delivery]) -> None:
            into.update(await journal.settled("sms", ["u1", "u2"]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(second_run, second, settled)
            await trio.sleep(1.0)
            assert not settled  # still waiting: the claim is fresh
            await first.record([Delivery("u1", "sms", "sent", attempts=1, provider_id="SM1")])
        assert settled["u1"].status == "sent" and settled["u1"].recorded, policy
        assert "u2" not in settled  # never claimed: the second run sends it
        # Nothing left for the second run to take over: its claim of u1 would be refused.
        assert await second.sending([("sms", "u1")]) == {("sms", "u1")}


async def test_a_claim_older_than_the_bound_is_abandoned(database: pymongo.database.Database) -> None:
    first, second = _journals(database, "report", bound=1.0)
    await first.sending([("sms", "u1")])
    with trio.fail_after(10):
        settled = await second.settled("sms", ["u1"])
    assert settled["u1"].status == "failed" and settled["u1"].error == STOPPED_DURING_ATTEMPT
    assert "service stopped" not in STOPPED_DURING_ATTEMPT


async def test_a_claim_of_a_run_known_to_have_ended_is_not_waited_for_and_says_what_happened(
    database: pymongo.database.Database,
) -> None:
    """A run stopped by a store outage (its outcome could not be written) or by Redis, in a
    process that goes on: the resumed run knows it ended, and the reason claims no crash."""
    first, second = _journals(database, "report", bound=30.0)
    await first.sending([("sms", "u1")])
    second.run_ended(first.run_id)
    with trio.fail_after(5):  # no wait for the claim's bound (30 s)
        settled = await second.settled("sms", ["u1"])
    assert settled["u1"].error == OUTCOME_NOT_WRITTEN
    assert "stopped" in OUTCOME_NOT_WRITTEN and "the service did not" in OUTCOME_NOT_WRITTEN


async def test_a_partition_is_held_by_one_run_at_a_time(database: pymongo.database.Database) -> None:
    """The ledger's hold on a shared partition (what a copy republished after Redis lost the
    stream meets): refused while its run holds it, taken once that run released it (and told who
    that was), refused for good once a run finished it."""
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    database.dispatch_jobs.insert_one({"_id": "job", "state": "running"})
    assert await ledger.hold_partition("job", 3, "a", 30.0) == (True, {})
    ours, holder = await ledger.hold_partition("job", 3, "b", 30.0)
    assert not ours and holder["run"] == "a" and not holder["done"]
    assert (await ledger.hold_partition("job", 4, "b", 30.0))[0]  # another partition is free
    assert not await ledger.renew_partition("job", 3, "b", 30.0) and await ledger.renew_partition("job", 3, "a", 30.0)
    await ledger.release_partition("job", 3, "a", done=False)  # stopped (Redis, the store): not delivered
    ours, before = await ledger.hold_partition("job", 3, "b", 30.0)
    assert ours and before["run"] == "a" and not before["until"]
    await ledger.release_partition("job", 3, "b", done=True)
    ours, holder = await ledger.hold_partition("job", 3, "c", 30.0)
    assert not ours and holder["done"]
    database.dispatch_jobs.update_one({"_id": "job"}, {"$set": {"held.4.until": 1.0}})  # b's hold expired
    ours, before = await ledger.hold_partition("job", 4, "c", 30.0)
    assert ours and before["run"] == "b" and before["until"] == 1.0  # expired, not known to have ended
    assert (await ledger.hold_partition("purged", 0, "c", 30.0))[1]["done"]  # no job: nothing to wait for
