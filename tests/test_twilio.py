"""The Twilio provider end to end: dispatcher -> twilio SDK -> httpx on Trio -> the fake Twilio API."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import trio

from dispatcher import Settings, open_dispatcher
from dispatcher.errors import ConfigError
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio
from dispatcher.providers.twilio import TwilioProvider
from dispatcher.sections import TwilioSettings

SID = "AC" + "0" * 31 + "1"
TOKEN = "tok"
SMS_FROM = "+15550009999"  # the sender conftest configures
VOICE_FROM = "+15550009998"


@pytest.fixture
async def fake() -> AsyncIterator[FakeTwilio]:
    yield FakeTwilio(SID, TOKEN)


@pytest.fixture
async def twilio_url(fake: FakeTwilio, nursery: trio.Nursery) -> str:
    return await nursery.start(serve_asgi, fake)


@pytest.fixture
def twilio_settings(make_settings: Callable[..., Settings], twilio_url: str) -> Callable[..., Settings]:
    """Settings with sms and voice on Twilio (the fake); `sms`/`token` override per test."""

    def make(sms: dict[str, Any] | None = None, token: str = TOKEN) -> Settings:
        return make_settings(
            channels={
                "sms": {
                    "provider": "twilio",
                    "backoff_initial_seconds": 0.01,
                    "max_attempts": 3,
                    "timeout_seconds": 5,
                    **(sms or {}),
                },
                "voice": {"provider": "twilio"},
            },
            providers={"twilio": {"account_sid": SID, "auth_token": token, "api_base_url": twilio_url}},
        )

    return make


def script(fake: FakeTwilio, *outcomes: str) -> None:
    fake.faults.script = deque(outcomes)  # type: ignore[arg-type]


async def test_sms_reaches_twilio_with_interpolated_body(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "name": "Ada", "phoneNumber": "+15551230001"})
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send(
            {
                "channels": ["sms"],
                "recipients": ["u1"],
                "messageContent": "Hi {{user.name}}, code {{data.code}}",
                "data": {"code": 42},
            }
        )
    assert result.failures == [] and result.summary.sent == {"sms": 1}
    [request] = fake.received
    assert request.path == f"/2010-04-01/Accounts/{SID}/Messages.json"
    assert request.form == {"To": "+15551230001", "From": SMS_FROM, "Body": "Hi Ada, code 42"}


async def test_wrong_token_is_refused_and_reported(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    async with open_dispatcher(twilio_settings(token="wrong")) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.error.startswith("Twilio 20003:")
    assert fake.received == [] and [a.outcome for a in fake.attempts] == ["unauthorized"]


async def test_voice_says_the_xml_escaped_text(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send(
            {"channels": ["voice"], "recipients": ["u1"], "messageContent": "Fish & chips < 5 pounds"}
        )
    assert result.failures == [] and result.summary.sent == {"voice": 1}
    [request] = fake.received
    assert request.path == f"/2010-04-01/Accounts/{SID}/Calls.json"
    assert request.form["To"] == "+15551230001" and request.form["From"] == VOICE_FROM
    assert request.form["Twiml"] == "<Response><Say>Fish &amp; chips &lt; 5 pounds</Say></Response>"


async def test_number_that_is_not_e164_fails_before_reaching_twilio(
    fake: FakeTwilio, twilio_settings, database
) -> None:
    database.users.insert_many(
        [{"_id": "bad", "phoneNumber": "555-1234"}, {"_id": "good", "phoneNumber": "+15551230002"}]
    )
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["bad", "good"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.user_id == "bad"
    assert failure.error == "invalid address: '555-1234' is not a valid sms address"
    assert fake.attempts_to("555-1234") == []
    assert [r.form["To"] for r in fake.received] == ["+15551230002"]


async def test_twilio_21211_is_a_permanent_error_naming_the_code(fake: FakeTwilio, twilio_url: str) -> None:
    from dispatcher.errors import PermanentDeliveryError
    from dispatcher.messages import Message, TextContent

    provider = TwilioProvider(
        TwilioSettings(account_sid=fake.account_sid, auth_token=fake.auth_token, api_base_url=twilio_url)
    )
    try:
        with pytest.raises(PermanentDeliveryError) as error:
            await provider.send(Message("sms", "u1", ("555-1234",), TextContent("x", "+15550009999")), "555-1234")
    finally:
        await provider.aclose()
    assert error.value.reason == "Twilio 21211: The 'To' number 555-1234 is not a valid phone number."
    assert len(fake.attempts_to("555-1234")) == 1


async def test_permanent_error_is_not_retried(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "permanent")
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.error == "Twilio 21610: Attempt to send to unsubscribed recipient"
    assert len(fake.attempts) == 1 and fake.received == []


async def test_503_is_retried_then_sent(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "transient", "ok")
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    assert result.failures == [] and result.summary.sent == {"sms": 1}
    assert [a.outcome for a in fake.attempts] == ["transient", "ok"]
    assert len(fake.received) == 1


async def test_503_every_time_fails_naming_the_code(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "transient", "transient", "transient")
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.error == "Twilio 20503: Service Unavailable (after 3 attempts)"
    assert len(fake.attempts) == 3 and fake.received == []


async def test_429_waits_for_retry_after(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "throttle", "ok")
    fake.faults.retry_after = 1
    async with open_dispatcher(twilio_settings()) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    assert result.failures == [] and result.summary.sent == {"sms": 1}
    first, second = fake.attempts
    assert (first.outcome, second.outcome) == ("throttle", "ok")
    # The backoff alone would be ~0.01 s: only the Retry-After header explains this gap.
    assert second.time - first.time >= 0.95


async def test_stalled_api_is_reported_as_unknown_not_resent(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "stall", "stall")
    async with open_dispatcher(
        twilio_settings({"timeout_seconds": 0.5, "max_attempts": 2, "on_ambiguous": "report"})
    ) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.error.startswith("outcome unknown: twilio: no answer within 0.5s")
    assert [a.outcome for a in fake.attempts] == ["stall"]  # an SMS that may have gone out is not sent again


async def test_stalled_api_times_out_per_attempt_when_resending(fake: FakeTwilio, twilio_settings, database) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    script(fake, "stall", "stall")
    async with open_dispatcher(
        twilio_settings({"timeout_seconds": 0.5, "max_attempts": 2, "on_ambiguous": "resend"})
    ) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert "no answer within 0.5s" in failure.error and "after 2 attempts" in failure.error
    assert [a.outcome for a in fake.attempts] == ["stall", "stall"]
    assert fake.attempts[1].time - fake.attempts[0].time >= 0.4  # the first attempt was given up on


async def test_unreachable_api_is_a_connection_error(make_settings, database) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15551230001"})
    settings = make_settings(
        channels={"sms": {"provider": "twilio", "backoff_initial_seconds": 0.01, "max_attempts": 2}},
        providers={"twilio": {"account_sid": SID, "auth_token": TOKEN, "api_base_url": f"http://127.0.0.1:{port}"}},
    )
    async with open_dispatcher(settings) as d:
        result = await d.send({"channels": ["sms"], "recipients": ["u1"], "messageContent": "x"})
    [failure] = result.failures
    assert failure.error == "Twilio connection error: ConnectError (after 2 attempts)"


async def test_many_concurrent_users_each_get_one_sms(fake: FakeTwilio, twilio_settings, database) -> None:
    numbers = [f"+1555123{i:04d}" for i in range(30)]
    database.users.insert_many([{"_id": f"u{i}", "phoneNumber": n, "clusters": ["all"]} for i, n in enumerate(numbers)])
    fake.faults.latency = (0.0, 0.05)  # answers out of order, so requests really overlap
    fake.faults.retry_after = 0.2
    script(fake, "throttle", "transient")  # two of them need a second attempt
    async with open_dispatcher(twilio_settings({"concurrency": 10})) as d:
        result = await d.send({"channels": ["sms"], "clusters": ["all"], "messageContent": "to {{user._id}}"})
    assert result.failures == [] and result.summary.sent == {"sms": 30}
    assert len(fake.attempts) == 32
    assert sorted(r.form["To"] for r in fake.received) == sorted(numbers)
    by_number = {r.form["To"]: r.form["Body"] for r in fake.received}
    assert all(by_number[n] == f"to u{i}" for i, n in enumerate(numbers))


def test_missing_credentials_stop_start_up() -> None:
    with pytest.raises(ConfigError, match=r"providers\.twilio\.account_sid"):
        TwilioProvider(TwilioSettings(auth_token=TOKEN))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="TWILIO_AUTH_TOKEN"):
        TwilioProvider(TwilioSettings(account_sid=SID))
