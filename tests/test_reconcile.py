"""Reconciliation in a running job: an ambiguous Twilio attempt is resolved by listing what the
account created (the SDK's list calls against the fake Twilio), never reported unknown when the
provider can tell, never sent twice."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from dispatcher import Settings, open_dispatcher, settings_from_dict
from dispatcher.errors import ConfigError
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

SID = "AC" + "0" * 31 + "1"
TOKEN = "tok"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    yield FakeTwilio(SID, TOKEN)


@pytest.fixture
def settings(make_settings: Callable[..., Settings], fake: FakeTwilio, nursery: trio.Nursery) -> Callable[..., Any]:
    async def make(**sms: Any) -> Settings:
        url = await nursery.start(serve_asgi, fake)
        return make_settings(
            channels={
                "sms": {"provider": "twilio", "timeout_seconds": 0.3, "backoff_initial_seconds": 0.01, **sms},
                "voice": {"provider": "twilio", "timeout_seconds": 0.3, "backoff_initial_seconds": 0.01},
            },
            providers={
                "twilio": {
                    "account_sid": SID,
                    "auth_token": TOKEN,
                    "api_base_url": url,
                    "reconcile_settle_seconds": 0.2,
                }
            },
        )

    return make


def script(fake: FakeTwilio, *outcomes: str) -> None:
    fake.faults.script = deque(outcomes)  # type: ignore[arg-type]


async def test_timed_out_sms_that_twilio_received_ends_sent_and_is_not_sent_again(fake, settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "late")
    async with open_dispatcher(await settings()) as d:
        assert d.settings.channels.on_ambiguous("sms") == "reconcile"  # the default on Twilio
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "hello"})
    assert result.failures == [] and result.summary.sent == {"sms": 1}
    assert [a.outcome for a in fake.attempts] == ["late"]  # sent once
    assert fake.lists == 1
    doc = database.dispatch_deliveries.find_one({})
    assert doc["state"] == "sent" and doc["provider_id"] == fake.received[0].sid and doc["reconciled"] == "found"


async def test_timed_out_sms_that_never_reached_twilio_is_sent_once_more(fake, settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "stall", "ok")
    async with open_dispatcher(await settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "hello"})
    assert result.failures == []
    assert [a.outcome for a in fake.attempts] == ["stall", "ok"]
    assert len(fake.received) == 1
    doc = database.dispatch_deliveries.find_one({})
    assert doc["provider_id"] == fake.received[0].sid and doc["reconciled"] == "absent" and doc["attempts"] == 2


async def test_same_text_sent_by_an_earlier_send_is_not_taken_for_this_one(fake, settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "ok", "stall", "ok")
    async with open_dispatcher(await settings()) as d:
        first = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "same"})
        second = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "same"})
    assert first.failures == second.failures == []
    # The listing showed the first send's message: held by the first delivery, so not this one's.
    assert [a.outcome for a in fake.attempts] == ["ok", "stall", "ok"]
    sids = {doc["provider_id"] for doc in database.dispatch_deliveries.find({})}
    assert sids == {r.sid for r in fake.received} and len(sids) == 2


async def test_timed_out_call_that_twilio_created_ends_sent(fake, settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "late")
    async with open_dispatcher(await settings()) as d:
        result = await d.send({"channels": ["voice"], "recipients": ["u1"], "messageContent": "hello"})
    assert result.failures == [] and len(fake.attempts) == 1
    assert database.dispatch_deliveries.find_one({})["provider_id"] == fake.received[0].sid


async def test_listing_that_fails_leaves_the_outcome_unknown(fake, settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "stall")
    async with open_dispatcher(await settings()) as d:
        fake.lists_fail = True
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "hello"})
    [failure] = result.failures
    assert failure.error.startswith("outcome unknown: twilio: no answer within 0.3s")
    assert "could not be asked" in failure.error


def test_reconcile_needs_a_provider_that_can_be_asked() -> None:
    with pytest.raises(ConfigError, match=r"channels\.email\.on_ambiguous"):
        settings_from_dict({"channels": {"email": {"provider": "outbox", "on_ambiguous": "reconcile"}}})
