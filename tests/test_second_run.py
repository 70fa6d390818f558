"""A second run of the same users while the first is alive (a lease taken over from a stalled
process, a partition republished after Redis lost it, or reclaimed from a slow worker), through
real pymongo: it waits for the first run's claim to settle instead of reporting it unknown ("the
service stopped", when no process stopped) or resending it; a claim never settled within the
bound is reported as abandoned, with a reason that does not claim a crash."""

from __future__ import annotations

import pymongo
import trio

from dispatcher.journal import STOPPED_DURING_ATTEMPT, Journal
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
