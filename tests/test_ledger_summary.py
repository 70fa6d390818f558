"""A job's counts assembled from its deliveries (shared fan-outs answer from the ledger), through
real pymongo: every state per channel, users counted once on the first channel, requested ids
that matched nobody not counted as users, deliveries still `sending` counted nowhere but users."""

from __future__ import annotations

import pymongo

from dispatcher.ledger import Ledger
from dispatcher.messages import Delivery
from dispatcher.settings import StoreSettings


async def test_summary_counts_every_state_of_every_channel(database: pymongo.database.Database) -> None:
    ledger = Ledger(database.client, StoreSettings(database=database.name))
    await ledger.claim_sending(
        "job", "run", [("email", u, None) for u in ("u1", "u2", "u3", "u4")] + [("sms", "u1", None)]
    )
    await ledger.record(
        "job",
        [
            Delivery("u1", "email", "sent", attempts=1, provider_id="m1"),
            Delivery("u2", "email", "failed", "550 no such user", attempts=1),
            Delivery("u3", "email", "sent", attempts=2),
            # u4 stays `sending`: a user, but no outcome
            Delivery("u5", "email", "skipped"),
            Delivery("ghost", "email", "failed", "user not found", user_found=False),
            Delivery("u1", "sms", "sent", attempts=1),
            Delivery("u2", "sms", "skipped"),
            Delivery("u3", "sms", "cancelled"),
            Delivery("ghost", "sms", "failed", "user not found", user_found=False),
        ],
    )
    await ledger.record("other-job", [Delivery("u9", "email", "sent")])

    assert await ledger.summary("job", ["email", "sms"]) == {
        "users": 5,
        "sent": {"email": 2, "sms": 1},
        "skipped": {"email": 1, "sms": 1},
        "failed": {"email": 2, "sms": 1},
        "cancelled": {"sms": 1},
    }
    # Channels not asked for are left out; the first one asked for counts the users.
    assert (await ledger.summary("job", ["sms"]))["users"] == 3
