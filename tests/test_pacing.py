"""Rate limits, concurrency, retries and timeouts, in virtual time (trio's MockClock).

The sender actor is driven with an in-memory provider so no thread or socket lets real time in.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import trio
import trio.testing

from actors.sender import send as sender_actor
from dispatcher.errors import PermanentDeliveryError, TransientDeliveryError
from dispatcher.loadtest.metrics import max_in_window
from dispatcher.messages import Delivery, Message, TextContent
from dispatcher.ratelimit import ChannelGate, TokenBucket
from dispatcher.delivery import RetryPolicy, Transport


class ScriptedProvider:
    """Records when each send starts; `behaviour(message, address, attempt)` decides the outcome."""

    name = "scripted"

    def __init__(self, behaviour: Callable[[Message, str, int], Any] | None = None, latency: float = 0.0) -> None:
        self.behaviour = behaviour
        self.latency = latency
        self.starts: list[tuple[float, str]] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, message: Message, address: str) -> None:
        self.starts.append((trio.current_time(), address))
        attempt = self.attempts[address] = self.attempts.get(address, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await trio.sleep(self.latency)
            if self.behaviour is not None:
                outcome = self.behaviour(message, address, attempt)
                if isinstance(outcome, BaseException):
                    raise outcome
                if outcome == "stall":
                    await trio.sleep_forever()
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass


def message(i: int, addresses: tuple[str, ...] | None = None) -> Message:
    return Message("sms", f"u{i}", addresses or (f"+1555{i:07d}",), TextContent("hi", "+15550000000"))


async def run_sender(
    provider: ScriptedProvider,
    messages: list[Message],
    *,
    concurrency: int = 4,
    rate: float = 0.0,
    burst: int = 1,
    policy: RetryPolicy | None = None,
    gate: ChannelGate | None = None,
) -> list[Delivery]:
    transport = Transport(provider, gate or ChannelGate(concurrency, rate, burst), policy or RetryPolicy())
    inbox_send, inbox_recv = trio.open_memory_channel[Message](2)
    results_send, results_recv = trio.open_memory_channel[Delivery](2)
    deliveries: list[Delivery] = []

    async def feed() -> None:
        with inbox_send:
            for m in messages:
                await inbox_send.send(m)

    async def drain() -> None:
        async for d in results_recv:
            deliveries.append(d)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(feed)
        nursery.start_soon(drain)
        nursery.start_soon(sender_actor, inbox_recv, results_send, transport)
    return deliveries


def max_in_any_window(times: list[float]) -> int:
    return max_in_window(sorted(times))


async def test_token_bucket_respects_rate_and_burst(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=10, burst=3)
    times = []
    start = trio.current_time()
    for _ in range(33):
        await bucket.acquire()
        times.append(trio.current_time() - start)
    assert times[:3] == [0.0, 0.0, 0.0]  # the burst goes at once
    gaps = [b - a for a, b in zip(times[3:], times[4:])]
    assert all(gap == pytest.approx(0.1) for gap in gaps)
    assert times[-1] == pytest.approx(3.0)
    assert max_in_any_window(times) <= 10 + 3


async def test_token_bucket_refills_after_idle(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=2, burst=2)
    for _ in range(2):
        await bucket.acquire()
    await trio.sleep(5)
    start = trio.current_time()
    await bucket.acquire()
    await bucket.acquire()
    assert trio.current_time() == pytest.approx(start)  # full burst again, never more than `burst`
    await bucket.acquire()
    assert trio.current_time() == pytest.approx(start + 0.5)


async def test_unlimited_bucket_never_waits(autojump_clock: trio.testing.MockClock) -> None:
    bucket = TokenBucket(rate=0)
    start = trio.current_time()
    for _ in range(1000):
        await bucket.acquire()
    assert trio.current_time() == start


async def test_sender_paces_deliveries_to_the_channel_rate(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(latency=0.05)
    deliveries = await run_sender(provider, [message(i) for i in range(120)], concurrency=8, rate=20, burst=5)
    assert [d.status for d in deliveries].count("sent") == 120
    times = [t for t, _ in provider.starts]
    assert max_in_any_window(times) <= 20 + 5
    # 115 tokens after the burst at 20/s.
    assert max(times) - min(times) == pytest.approx(115 / 20, abs=0.01)


async def test_concurrency_limit_holds(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(latency=1.0)
    deliveries = await run_sender(provider, [message(i) for i in range(40)], concurrency=5)
    assert len(deliveries) == 40
    assert provider.max_in_flight == 5


async def test_limits_are_shared_by_concurrent_sends(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(latency=0.01)
    gate = ChannelGate(concurrency=4, rate=10, burst=1)
    async with trio.open_nursery() as nursery:
        for batch in range(3):
            nursery.start_soon(
                lambda b=batch: run_sender(
                    provider, [message(b * 100 + i) for i in range(20)], concurrency=4, gate=gate
                )
            )
    times = [t for t, _ in provider.starts]
    assert len(times) == 60
    assert max_in_any_window(times) <= 10 + 1


async def test_transient_errors_are_retried_with_backoff(autojump_clock: trio.testing.MockClock) -> None:
    def behaviour(m: Message, address: str, attempt: int) -> Any:
        return TransientDeliveryError("Fake 503: busy") if attempt < 3 else None

    provider = ScriptedProvider(behaviour)
    policy = RetryPolicy(max_attempts=4, timeout=5, initial=1.0, cap=30)
    [delivery] = await run_sender(provider, [message(1)], policy=policy)
    assert delivery.status == "sent"
    times = [t for t, _ in provider.starts]
    assert len(times) == 3
    # Equal jitter: the n-th wait lies in [initial * 2**(n-1) / 2, initial * 2**(n-1)].
    assert 0.5 <= times[1] - times[0] <= 1.0
    assert 1.0 <= times[2] - times[1] <= 2.0


async def test_backoff_is_capped() -> None:
    policy = RetryPolicy(max_attempts=20, initial=1.0, cap=4.0)
    assert all(2.0 <= policy.backoff(attempt, None) <= 4.0 for attempt in range(3, 20))


async def test_retry_after_is_honoured(autojump_clock: trio.testing.MockClock) -> None:
    def behaviour(m: Message, address: str, attempt: int) -> Any:
        return TransientDeliveryError("Fake 503", retry_after=7.0) if attempt == 1 else None

    provider = ScriptedProvider(behaviour)
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(initial=0.1))
    assert delivery.status == "sent"
    assert provider.starts[1][0] - provider.starts[0][0] >= 7.0


async def test_throttling_slows_the_whole_channel(autojump_clock: trio.testing.MockClock) -> None:
    first = message(0).addresses[0]

    def behaviour(m: Message, address: str, attempt: int) -> Any:
        if address == first and attempt == 1:
            return TransientDeliveryError("Fake 429", retry_after=10.0, throttled=True)
        return None

    provider = ScriptedProvider(behaviour, latency=0.5)
    deliveries = await run_sender(
        provider, [message(i) for i in range(6)], concurrency=1, policy=RetryPolicy(initial=0.1)
    )
    assert all(d.status == "sent" for d in deliveries)
    throttled_at = provider.starts[0][0] + 0.5
    assert all(t >= throttled_at + 10.0 for t, _ in provider.starts[1:])


async def test_permanent_error_is_not_retried(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(lambda m, a, n: PermanentDeliveryError("Fake 21211: invalid 'To'"))
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(max_attempts=5))
    assert (delivery.status, delivery.error) == ("failed", "Fake 21211: invalid 'To'")
    assert len(provider.starts) == 1


async def test_exhausted_retries_report_the_last_error(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(lambda m, a, n: TransientDeliveryError(f"Fake 503: try {n}"))
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(max_attempts=3, initial=0.1))
    assert delivery.status == "failed"
    assert delivery.error == "Fake 503: try 3 (after 3 attempts)"


async def test_attempt_timeout_is_retried_when_the_channel_resends(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(lambda m, a, n: "stall")
    start = trio.current_time()
    policy = RetryPolicy(max_attempts=2, timeout=3, initial=1, on_ambiguous="resend")
    [delivery] = await run_sender(provider, [message(1)], policy=policy)
    assert delivery.status == "failed"
    assert "no answer within 3s" in (delivery.error or "")
    assert len(provider.starts) == 2
    assert trio.current_time() - start >= 6


async def test_attempt_timeout_is_reported_not_repeated_by_default(autojump_clock: trio.testing.MockClock) -> None:
    # The request may have reached the provider: a retry could deliver the SMS twice.
    provider = ScriptedProvider(lambda m, a, n: "stall")
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(max_attempts=3, timeout=3))
    assert delivery.status == "failed"
    assert (delivery.error or "").startswith("outcome unknown: scripted: no answer within 3s")
    assert len(provider.starts) == 1


async def test_unambiguous_transient_errors_are_still_retried_by_default(
    autojump_clock: trio.testing.MockClock,
) -> None:
    provider = ScriptedProvider(lambda m, a, n: TransientDeliveryError("refused") if n == 1 else None)
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(max_attempts=3, initial=0.1))
    assert delivery.status == "sent" and delivery.attempts == 2


async def test_retry_after_beyond_the_cap_fails_now_as_throttled(autojump_clock: trio.testing.MockClock) -> None:
    provider = ScriptedProvider(lambda m, a, n: TransientDeliveryError("Fake 429", retry_after=100000, throttled=True))
    gate = ChannelGate(4, 0, 1)
    start = trio.current_time()
    [delivery] = await run_sender(
        provider, [message(1)], gate=gate, policy=RetryPolicy(max_attempts=5, max_retry_after=300)
    )
    assert delivery.status == "failed" and len(provider.starts) == 1
    assert "asked to wait 100000s" in (delivery.error or "") and "throttled" in (delivery.error or "")
    assert trio.current_time() - start < 1
    # ... and the channel is not paused for anyone else.
    later = ScriptedProvider()
    [ok] = await run_sender(later, [message(2)], gate=gate)
    assert ok.status == "sent" and trio.current_time() - start < 1


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-5", "1e400"])
def test_retry_after_rejects_non_finite_and_negative(value: str) -> None:
    from dispatcher.providers.retry_after import parse_retry_after

    assert parse_retry_after(value) is None


def test_retry_after_http_date_in_the_past_is_zero() -> None:
    from dispatcher.providers.retry_after import parse_retry_after

    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_provider_crash_fails_one_delivery_only(autojump_clock: trio.testing.MockClock) -> None:
    crasher = message(3).addresses[0]
    provider = ScriptedProvider(lambda m, a, n: RuntimeError("bug") if a == crasher else None)
    deliveries = await run_sender(provider, [message(i) for i in range(6)])
    by_user = {d.user_id: d for d in deliveries}
    assert by_user["u3"].status == "failed" and "internal error (RuntimeError)" in (by_user["u3"].error or "")
    assert sorted(u for u, d in by_user.items() if d.status == "sent") == ["u0", "u1", "u2", "u4", "u5"]


async def test_push_to_several_tokens_fails_as_one_naming_the_tokens(autojump_clock: trio.testing.MockClock) -> None:
    tokens = ("good-token", "dead-token-abcdefghijklmnop", "other-good")
    provider = ScriptedProvider(
        lambda m, a, n: PermanentDeliveryError("FCM UNREGISTERED") if a.startswith("dead") else None
    )
    [delivery] = await run_sender(provider, [message(1, tokens)])
    assert delivery.status == "failed"
    assert delivery.error == "1 of 3 devices failed: dead-t…mnop: FCM UNREGISTERED"
    assert sorted(a for _, a in provider.starts) == sorted(tokens)


async def test_stalled_waiters_do_not_fire_together(autojump_clock: trio.testing.MockClock) -> None:
    # Many waiters, and an event loop that stalls: tokens must still be spaced from the moment
    # each is handed out, so no one-second window exceeds rate + burst.
    bucket = TokenBucket(rate=100, burst=1)
    times: list[float] = []

    async def waiter() -> None:
        for _ in range(20):
            await bucket.acquire()
            times.append(trio.current_time())

    async def stall() -> None:
        for _ in range(10):
            await trio.sleep(0.2)
            autojump_clock.jump(0.06)  # time passes while no task runs: the loop was blocked

    async with trio.open_nursery() as nursery:
        nursery.start_soon(stall)
        for _ in range(16):
            nursery.start_soon(waiter)
    assert len(times) == 320
    assert max_in_any_window(times) <= 100 + 1
    # After a stall, tokens resume at most half an interval early, never as a burst.
    assert all(b - a >= 0.005 - 1e-9 for a, b in zip(times, times[1:]))


async def test_retry_after_date_beyond_the_cap_fails_now(autojump_clock: trio.testing.MockClock) -> None:
    import datetime as dt
    import email.utils

    from dispatcher.providers.retry_after import parse_retry_after

    tomorrow = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(days=1), usegmt=True)
    provider = ScriptedProvider(
        lambda m, a, n: TransientDeliveryError("Fake 429", retry_after=parse_retry_after(tomorrow), throttled=True)
    )
    start = trio.current_time()
    [delivery] = await run_sender(provider, [message(1)], policy=RetryPolicy(max_attempts=5, max_retry_after=300))
    assert delivery.status == "failed" and "throttled, the provider asked to wait 86" in (delivery.error or "")
    assert len(provider.starts) == 1 and trio.current_time() - start < 1
