"""Cancel means cancel, and a 429 about one number holds back only that number, in virtual time
(trio's MockClock) through the real sender actor, gate and retry loop; Twilio's per-number codes
are classified by the real provider against the fake Twilio."""

from __future__ import annotations

import pytest
import trio
import trio.testing
from test_pacing import ScriptedProvider, message

from actors.sender import send as sender_actor
from dispatcher.delivery import RetryPolicy, Transport
from dispatcher.errors import TransientDeliveryError
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio
from dispatcher.journal import Unrecorded
from dispatcher.messages import Delivery, Message, TextContent
from dispatcher.providers.twilio import TwilioProvider
from dispatcher.ratelimit import ChannelGate
from dispatcher.sections import TwilioSettings


async def _run(
    provider: ScriptedProvider,
    messages: list[Message],
    gate: ChannelGate,
    journal: Unrecorded,
    *,
    cancel_at: float | None = None,
    policy: RetryPolicy | None = None,
) -> list[tuple[float, Delivery]]:
    """Every delivery with the time it ended; `cancel_at`: when the run is cancelled."""
    transport = Transport(provider, gate, policy or RetryPolicy(max_attempts=5))
    inbox_send, inbox_recv = trio.open_memory_channel[Message](len(messages))
    results_send, results_recv = trio.open_memory_channel[Delivery](len(messages))
    for m in messages:
        inbox_send.send_nowait(m)
    inbox_send.close()
    ended: list[tuple[float, Delivery]] = []

    async def drain() -> None:
        async for delivery in results_recv:
            ended.append((trio.current_time(), delivery))

    async def cancel() -> None:
        assert cancel_at is not None
        await trio.sleep_until(cancel_at)
        journal.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain)
        if cancel_at is not None:
            nursery.start_soon(cancel)
        await sender_actor(inbox_recv, results_send, transport, journal)
    return ended


async def test_cancel_stops_a_paced_send_at_once(autojump_clock: trio.testing.MockClock) -> None:
    """2 SMS/s, 20 queued, cancelled at 4 s: the deliveries waiting for a token end cancelled in
    the same instant, and the provider sees nothing after the cancel."""
    provider = ScriptedProvider(latency=0.05)
    journal = Unrecorded()
    start = trio.current_time()
    ended = await _run(provider, [message(i) for i in range(20)], ChannelGate(4, 2.0, 1), journal, cancel_at=start + 4)
    after = [t for t, _ in provider.starts if t > start + 4]
    assert after == []
    cancelled = [(t, d) for t, d in ended if d.status == "cancelled"]
    assert len(cancelled) == 20 - len(provider.starts) > 0
    assert max(t for t, _ in cancelled) - (start + 4) < 1.0
    assert all(d.status == "sent" for _, d in ended if d.status != "cancelled")


async def test_cancel_ends_a_wait_behind_a_429_pause(autojump_clock: trio.testing.MockClock) -> None:
    """The channel is paused 60 s by an account-wide 429: a cancel at 4 s ends the paused
    deliveries at once (the one that was refused says so), not after the pause."""

    def behaviour(m: Message, address: str, attempt: int) -> object:
        if m.user_id == "u0" and attempt == 1:
            return TransientDeliveryError("Twilio 20429: Too Many Requests", retry_after=60, throttled=True)
        return None

    provider = ScriptedProvider(behaviour, latency=0.05)
    journal = Unrecorded()
    start = trio.current_time()
    ended = await _run(provider, [message(i) for i in range(10)], ChannelGate(1, 0.0, 1), journal, cancel_at=start + 4)
    assert all(t < start + 4 for t, _ in provider.starts)
    assert all(t - (start + 4) < 1.0 for t, _ in ended if t > start + 4)
    refused = next(d for _, d in ended if d.user_id == "u0")
    assert refused.status == "cancelled" and refused.attempts == 1
    assert "20429" in (refused.error or "")


async def test_a_429_about_one_number_holds_back_only_that_number(autojump_clock: trio.testing.MockClock) -> None:
    """u0's number answers 14107 with Retry-After 60: the other numbers go on at once, and u0's
    next attempt comes after the 60 s."""

    def behaviour(m: Message, address: str, attempt: int) -> object:
        if m.user_id == "u0" and attempt == 1:
            return TransientDeliveryError(
                "Twilio 14107: SMS send rate limit exceeded", retry_after=60, throttled=True, pause_key=f"to:{address}"
            )
        return None

    provider = ScriptedProvider(behaviour, latency=0.05)
    start = trio.current_time()
    ended = await _run(provider, [message(i) for i in range(10)], ChannelGate(2, 0.0, 1), Unrecorded())
    others = [t for t, d in ended if d.user_id != "u0"]
    assert len(others) == 9 and max(others) - start < 1.0
    u0 = [t for t, address in provider.starts if address == message(0).addresses[0]]
    assert len(u0) == 2 and u0[1] - u0[0] >= 60
    assert all(d.status == "sent" for _, d in ended)


async def test_an_account_429_still_pauses_the_whole_channel(autojump_clock: trio.testing.MockClock) -> None:
    def behaviour(m: Message, address: str, attempt: int) -> object:
        if m.user_id == "u0" and attempt == 1:
            return TransientDeliveryError("Twilio 20429: Too Many Requests", retry_after=10, throttled=True)
        return None

    provider = ScriptedProvider(behaviour, latency=0.05)
    start = trio.current_time()
    await _run(provider, [message(i) for i in range(6)], ChannelGate(1, 0.0, 1), Unrecorded())
    # u0 failed at ~0.05 s: nothing else started in the 10 s that followed.
    assert not [t for t, _ in provider.starts if start + 0.06 < t < start + 10]


@pytest.mark.parametrize(("code", "key"), [(14107, "to:+15550000001"), (21611, "from:+15550000000")])
async def test_twilio_per_number_codes_pause_that_number(code: int, key: str) -> None:
    """Against the fake Twilio through the SDK: 14107 names the destination, 21611 the sender;
    20429 names nothing (the account)."""
    fake = FakeTwilio("AC1", "tok", throttled_numbers={"+15550000001": 7})
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, fake)
        provider = TwilioProvider(TwilioSettings(account_sid="AC1", auth_token="tok", api_base_url=url))
        try:
            m = Message("sms", "u1", ("+15550000001",), TextContent("hi", "+15550000000"))
            if code == 21611:
                from dispatcher.providers import twilio

                error = twilio._classify(  # the fake has no sender queue: classify its answer directly
                    twilio.TwilioRestException(400, "uri", "queue full", code=21611),
                    None,
                    "+15550000001",
                    "+15550000000",
                )
            else:
                with pytest.raises(TransientDeliveryError) as raised:
                    await provider.send(m, "+15550000001")
                error = raised.value
                assert error.retry_after == 7
            assert isinstance(error, TransientDeliveryError) and error.throttled and error.pause_key == key
            assert str(code) in error.reason
        finally:
            await provider.aclose()
            nursery.cancel_scope.cancel()


async def test_a_permit_obtained_as_the_run_is_cancelled_is_given_back() -> None:
    """A delivery waiting for one of the channel's `unsettled` permits gets it in the same tick
    as the run is cancelled: it is not attempted, and the permit goes back to the channel (a
    permit kept would shrink the channel's allowance for every later send of the process)."""
    from dispatcher.delivery import _Door

    gate = ChannelGate(concurrency=1, rate=0, burst=1)  # two unsettled permits
    others = [object(), object()]
    for other in others:
        gate.unsettled.acquire_on_behalf_of_nowait(other)
    journal = Unrecorded()
    door = _Door(message(1), journal, gate)
    claimed: list[bool] = []

    async def claim() -> None:
        claimed.append(await door.claim())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(claim)
        await trio.testing.wait_all_tasks_blocked()
        gate.unsettled.release_on_behalf_of(others[0])  # handed to the waiting door...
        journal.cancel()  # ...which is cancelled before it runs again
    assert claimed == [False]
    assert gate.unsettled.borrowed_tokens == 1  # only the other borrower's
