"""Guarantees of the pipeline that a plausible simplification would break while every other test
stays green: a 429 pauses the whole channel, slot before token, streamed store reads, bounded
buffers between actors, `Retry-After` dates, and lanes that do not pace each other.

Virtual time (MockClock) everywhere except the two tests that read a real store through pymongo
worker threads; those assert bounds, never timings.
"""

from __future__ import annotations

import datetime as dt
import email.utils
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import httpx
import pymongo
import pytest
import trio
import trio.testing

from actors import run_pipeline
from dispatcher import Settings, open_dispatcher
from dispatcher.delivery import RetryPolicy, Transport, deliver
from dispatcher.errors import TransientDeliveryError
from dispatcher.journal import Unrecorded
from dispatcher.loadtest.metrics import max_in_window
from dispatcher.messages import Delivery, Message, TextContent, User
from dispatcher.models import SendRequest
from dispatcher.plan import ChannelPlan, RequestPlan
from dispatcher.providers import PROVIDERS, ProviderEntry
from dispatcher.providers.fcm import classify_error
from dispatcher.ratelimit import ChannelGate
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store


# How one attempt ends: None (accepted after `latency`), an exception to raise after `latency`,
# or an awaitable factory (the attempt waits for it, then is accepted).
Behaviour = Callable[[Message, str, int], Any]


class RecordingProvider:
    """Records (virtual time, user id, address) of every attempt and how many run at once."""

    name = "recording"

    def __init__(
        self,
        behaviour: Behaviour | None = None,
        latency: float | Callable[[Message, str, int], float] = 0.0,
        on_call: Callable[[], None] | None = None,
    ) -> None:
        self.behaviour = behaviour
        self.latency = latency
        self.on_call = on_call
        self.calls: list[tuple[float, str, str]] = []
        self.attempts: dict[str, int] = {}
        self.in_flight = 0
        self.max_in_flight = 0

    async def send(self, message: Message, address: str) -> None:
        self.calls.append((trio.current_time(), message.user_id, address))
        if self.on_call is not None:
            self.on_call()
        key = f"{message.user_id} {address}"
        attempt = self.attempts[key] = self.attempts.get(key, 0) + 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            latency = self.latency(message, address, attempt) if callable(self.latency) else self.latency
            await trio.sleep(latency)
            outcome = self.behaviour(message, address, attempt) if self.behaviour else None
            if isinstance(outcome, BaseException):
                raise outcome
            if callable(outcome):
                await outcome()
        finally:
            self.in_flight -= 1

    async def aclose(self) -> None:
        pass

    def starts(self, user_ids: Sequence[str] | None = None) -> list[float]:
        return [t for t, user, _ in self.calls if user_ids is None or user in user_ids]


def sms(user: str) -> Message:
    return Message("sms", user, (f"+1555{zlib.crc32(user.encode()) % 10**7:07d}",), TextContent("hi", "+15550000000"))


def policy(**overrides: Any) -> RetryPolicy:
    # A long attempt timeout: timeouts are not what these tests are about.
    return RetryPolicy(**{"max_attempts": 3, "timeout": 120.0, "initial": 0.01, "cap": 0.02, **overrides})


async def run_sender(transport: Transport, messages: list[Message], start_after: float = 0.0) -> list[Delivery]:
    """One send of one channel as the sender actor runs it: a task per message, at most the
    channel's concurrency of them for this send; the gate (limits) may be shared with other sends."""
    await trio.sleep(start_after)
    slots = trio.Semaphore(int(transport.gate.limiter.total_tokens))
    deliveries: list[Delivery] = []

    async def one(message: Message) -> None:
        try:
            deliveries.append(await deliver(message, transport))
        finally:
            slots.release()

    async with trio.open_nursery() as nursery:
        for message in messages:
            await slots.acquire()
            nursery.start_soon(one, message)
    return deliveries


async def run_sends(transport: Transport, *sends: tuple[list[Message], float]) -> list[list[Delivery]]:
    """Several concurrent sends of one channel, each starting `start_after` seconds in."""
    results: list[list[Delivery]] = [[] for _ in sends]

    async def one(i: int, messages: list[Message], start_after: float) -> None:
        results[i] = await run_sender(transport, messages, start_after)

    async with trio.open_nursery() as nursery:
        for i, (messages, start_after) in enumerate(sends):
            nursery.start_soon(one, i, messages, start_after)
    return results


def throttle_first_attempt_of(user: str, retry_after: float) -> Behaviour:
    def behaviour(message: Message, address: str, attempt: int) -> Any:
        if message.user_id == user and attempt == 1:
            return TransientDeliveryError("Fake 429: slow down", retry_after=retry_after, throttled=True)
        return None

    return behaviour


# --- 1. a 429 pauses the whole channel, at any concurrency -------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 100.0], ids=["unlimited", "paced"])
async def test_429_pauses_every_message_of_the_channel_and_of_other_sends(
    autojump_clock: trio.testing.MockClock, rate: float
) -> None:
    t0 = trio.current_time()
    # u0 is answered 429 after 0.1 s; everything else takes 1 s, so at the moment of the 429 three
    # slots are busy and one is free: without a channel-wide pause the next message takes it at once.
    provider = RecordingProvider(
        throttle_first_attempt_of("u0", 10.0), latency=lambda m, a, n: 0.1 if (m.user_id, n) == ("u0", 1) else 1.0
    )
    transport = Transport(provider, ChannelGate(concurrency=4, rate=rate, burst=4), policy())
    first = [sms(f"u{i}") for i in range(12)]
    second = [sms(f"v{i}") for i in range(6)]  # another request on the same channel, 2 s later
    a, b = await run_sends(transport, (first, 0.0), (second, 2.0))

    assert [d.status for d in a + b] == ["sent"] * 18
    resume = t0 + 0.1 + 10.0
    before = sorted(user for t, user, _ in provider.calls if t < resume)
    assert before == ["u0", "u1", "u2", "u3"], "only the first wave may start before the Retry-After ends"
    assert min(provider.starts([m.user_id for m in second])) >= resume
    # And the pause is a pause, not a serialisation: the channel is back to its concurrency after it.
    assert provider.max_in_flight == 4


# --- 2. the concurrency slot, then the rate token --------------------------------------------------------


async def test_slots_freed_together_do_not_release_a_burst_of_tokens(autojump_clock: trio.testing.MockClock) -> None:
    # Three sends share a channel of 4 slots at 4/s. The first four deliveries all hang until t=5.
    # Slot-then-token: the tasks waiting meanwhile hold nothing, and when the four slots free at
    # once they take tokens one by one. Token-then-slot would let eight tasks bank tokens during
    # the hang and then start together at t=5, far above 4/s.
    t0 = trio.current_time()
    calls = 0

    def latency(m: Message, a: str, n: int) -> float:
        nonlocal calls
        calls += 1
        return max(0.0, t0 + 5.0 - trio.current_time()) if calls <= 4 else 0.01

    provider = RecordingProvider(latency=latency)
    transport = Transport(provider, ChannelGate(concurrency=4, rate=4, burst=1), policy())
    results = await run_sends(transport, *[([sms(f"s{s}-{i}") for i in range(8)], 0.0) for s in range(3)])

    assert sum(d.status == "sent" for r in results for d in r) == 24
    starts = sorted(provider.starts())
    assert max_in_window(starts) <= 4 + 1
    assert all(b - a >= 0.25 - 1e-9 for a, b in zip(starts, starts[1:])), starts[:12]


async def test_429_holds_back_a_message_already_waiting_for_a_slot(autojump_clock: trio.testing.MockClock) -> None:
    # One slot. Send A holds it when send B's message arrives and waits for it; A gets a 429 and
    # frees the slot to back off. B's message must then wait for the pause: it can, because it
    # asks for the token only once it holds the slot (a token taken while queueing would be
    # stale by then).
    t0 = trio.current_time()
    provider = RecordingProvider(throttle_first_attempt_of("a0", 10.0), latency=0.1)
    transport = Transport(provider, ChannelGate(concurrency=1, rate=0, burst=1), policy())
    a, b = await run_sends(transport, ([sms("a0")], 0.0), ([sms("b0"), sms("b1")], 0.05))

    assert [d.status for d in a + b] == ["sent"] * 3
    assert min(provider.starts(["b0", "b1"])) >= t0 + 0.1 + 10.0


# --- 3. the store streams users in batches of store_batch_size (real store, real time) ----------------


def insert_users(database: pymongo.database.Database, count: int, cluster: str = "all") -> None:
    database.users.insert_many(
        [
            {"_id": f"u{i:04d}", "name": f"User {i}", "clusters": [cluster], "phoneNumber": f"+1555{i:07d}"}
            for i in range(count)
        ]
    )


async def test_store_streams_users_in_batches_of_store_batch_size(
    mongo_url: str, database: pymongo.database.Database
) -> None:
    insert_users(database, 47)
    store = Store.connect(mongo_url, StoreSettings(database=database.name), UserFields(), batch_size=5)
    try:
        sizes = [len(batch) async for batch in store.stream_users([], ["all"])]
    finally:
        store.close()
    assert sum(sizes) == 47 and max(sizes) <= 5 and len(sizes) == 10


class GatedProvider:
    """Every attempt waits for `release`; records how many users the store had yielded by then."""

    name = "gated"

    def __init__(self) -> None:
        self.release = trio.Event()
        self.first_call = trio.Event()
        self.read = 0  # set by the test's wrapper around the store
        self.started = 0
        self.held_at_call: list[int] = []

    async def send(self, message: Message, address: str) -> None:
        self.started += 1
        self.held_at_call.append(self.read - self.started)
        self.first_call.set()
        await self.release.wait()

    async def aclose(self) -> None:
        pass


def held_bound(batch: int, queue: int, concurrency: int) -> int:
    """Users read from the store and not yet handed to the provider, at most: a batch in the
    resolver's hand, two in the users channel, one in the renderer's, `queue` messages, and the
    sender's slots plus the one message it holds while waiting for a slot (twice, for slack)."""
    return 4 * batch + queue + 2 * concurrency + 2


async def test_a_send_to_many_users_reads_the_store_only_as_far_as_deliveries_go(
    make_settings: Callable[..., Settings], database: pymongo.database.Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    users, batch, queue, concurrency = 400, 10, 4, 2
    insert_users(database, users)
    provider = GatedProvider()
    monkeypatch.setitem(PROVIDERS, "gated", ProviderEntry("gated", None, lambda settings: provider))
    settings = make_settings(
        dispatcher={"store_batch_size": batch, "queue_size": queue},
        channels={"active": ["sms"], "sms": {"provider": "gated", "concurrency": concurrency}},
    )
    batches: list[int] = []
    async with open_dispatcher(settings) as d:
        original = d.store.stream_users

        async def counting(recipients: Sequence[str], clusters: Sequence[str]) -> AsyncIterator[list[User]]:
            async for users_batch in original(recipients, clusters):
                batches.append(len(users_batch))
                provider.read += len(users_batch)
                yield users_batch

        monkeypatch.setattr(d.store, "stream_users", counting)
        result = None

        async def run() -> None:
            nonlocal result
            result = await d.send({"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"})

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run)
            with trio.fail_after(10):
                await provider.first_call.wait()
            # Deliveries are stuck: let the resolver (pymongo on worker threads, real time) run as
            # far as the buffers let it, i.e. until the count stops moving.
            last, quiet = -1, 0
            with trio.move_on_after(3):
                while quiet < 6:
                    await trio.sleep(0.05)
                    quiet, last = (quiet + 1, last) if provider.read == last else (0, provider.read)
            read_while_stuck = provider.read
            provider.release.set()

    assert result is not None and result.summary.sent == {"sms": users}
    bound = held_bound(batch, queue, concurrency)
    assert read_while_stuck <= bound + concurrency, (
        f"{read_while_stuck} of {users} users read while nothing was delivered"
    )
    assert max(batches) <= batch
    assert max(provider.held_at_call) <= bound


# --- 4. bounded buffers between actors (virtual time, in-memory store) -----------------------------------


class MemoryStore:
    """The two methods the resolver uses, over a list of users, counting what it hands out."""

    def __init__(self, users: list[User], batch_size: int) -> None:
        self.users = users
        self.batch_size = batch_size
        self.read = 0

    async def stream_users(self, recipients: Sequence[str], clusters: Sequence[str]) -> AsyncIterator[list[User]]:
        selected = [u for u in self.users if u["_id"] in recipients or set(u["clusters"]) & set(clusters)]
        for i in range(0, len(selected), self.batch_size):
            await trio.sleep(0)  # a round trip: the other actors get to run
            batch = [dict(u) for u in selected[i : i + self.batch_size]]
            self.read += len(batch)
            yield batch

    def user_id(self, user: User) -> str:
        return str(user["_id"])


def memory_users(count: int) -> list[User]:
    return [
        {"_id": f"u{i:04d}", "clusters": ["all"], "emailAddress": f"u{i}@example.com", "phoneNumber": f"+1555{i:07d}"}
        for i in range(count)
    ]


def lane(channel: str, address_field: str) -> ChannelPlan:
    return ChannelPlan(
        channel=channel,
        address_field=address_field,
        build=lambda context: TextContent(f"hi {context['user']['_id']}", "sender"),
        id_of=lambda user: str(user["_id"]),
    )


def plan_for(*lanes: ChannelPlan) -> RequestPlan:
    request = SendRequest.parse(
        {"channels": [p.channel for p in lanes], "clusters": ["all"], "messageTitle": "t", "messageContent": "c"}
    )
    return RequestPlan(request, tuple(lanes))


async def test_a_slow_channel_keeps_the_resolver_from_running_ahead(autojump_clock: trio.testing.MockClock) -> None:
    users, batch, queue, concurrency = 300, 10, 4, 2
    store = MemoryStore(memory_users(users), batch)
    held: list[int] = []
    provider = RecordingProvider(latency=1.0)
    provider.on_call = lambda: held.append(store.read - len(provider.calls))
    transport = Transport(provider, ChannelGate(concurrency=concurrency, rate=0, burst=1), policy())

    result = await run_pipeline(plan_for(lane("sms", "phoneNumber")), store, {"sms": transport}, queue)

    assert result.summary.sent == {"sms": users} and result.summary.users == users
    assert len(provider.calls) == users
    assert max(held) <= held_bound(batch, queue, concurrency), f"up to {max(held)} users read and not delivered"


class StalledJournal(Unrecorded):
    """A run journal whose first write of outcomes hangs until released (a slow ledger)."""

    def __init__(self, delivered: Callable[[], int]) -> None:
        super().__init__()
        self.release = trio.Event()
        self.delivered = delivered
        self.delivered_at_stall: int | None = None

    async def record(self, deliveries: Sequence[Delivery]) -> None:
        if self.delivered_at_stall is None:
            self.delivered_at_stall = self.delivered()
        await self.release.wait()


async def test_a_stalled_collector_stops_deliveries_after_a_bounded_number(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The results channel is bounded too: when the collector cannot keep up (its ledger write
    # hangs), the senders stop instead of delivering everything into an ever-growing buffer.
    users, queue, concurrency = 300, 4, 2
    provider = RecordingProvider(latency=0.01)
    transport = Transport(provider, ChannelGate(concurrency=concurrency, rate=0, burst=1), policy())
    journal = StalledJournal(lambda: len(provider.calls))
    result = None

    async def run() -> None:
        nonlocal result
        result = await run_pipeline(
            plan_for(lane("sms", "phoneNumber")),
            MemoryStore(memory_users(users), 10),
            {"sms": transport},
            queue,
            journal=journal,
        )

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run)
        await trio.sleep(60)
        assert journal.delivered_at_stall is not None
        stalled_for_a_minute = len(provider.calls) - journal.delivered_at_stall
        journal.release.set()

    assert result is not None and result.summary.sent == {"sms": users}
    assert stalled_for_a_minute <= queue + 2 * concurrency + 1


# --- 5. Retry-After as an HTTP date ---------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
async def test_retry_after_http_date_delays_the_retry(autojump_clock: trio.testing.MockClock, status: int) -> None:
    def behaviour(message: Message, address: str, attempt: int) -> Any:
        if attempt > 1:
            return None
        # The provider's own answer, classified by the provider's own code: a date 30 s after now
        # on the wall clock (what a server sends), whatever the virtual clock says.
        date = email.utils.format_datetime(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), usegmt=True)
        return classify_error(httpx.Response(status, headers={"Retry-After": date}))

    provider = RecordingProvider(behaviour)
    transport = Transport(provider, ChannelGate(concurrency=2, rate=0, burst=1), policy(initial=0.1, cap=1.0))
    [deliveries] = await run_sends(transport, ([sms("u1")], 0.0))

    assert [d.status for d in deliveries] == ["sent"]
    first, second = provider.starts()
    # An HTTP date has whole seconds: 29-30 s, where the backoff alone is at most 0.1 s.
    assert 29.0 <= second - first <= 30.5


# --- 6. lanes are independent: a paced SMS lane does not pace e-mail ----------------------------------------


async def test_fast_channel_finishes_while_slow_channel_is_still_paced(autojump_clock: trio.testing.MockClock) -> None:
    users = 60
    t0 = trio.current_time()
    store = MemoryStore(memory_users(users), batch_size=5)
    email_provider = RecordingProvider(latency=0.01)
    sms_provider = RecordingProvider(latency=0.01)
    transports = {
        "email": Transport(email_provider, ChannelGate(concurrency=4, rate=0, burst=1), policy()),
        "sms": Transport(sms_provider, ChannelGate(concurrency=4, rate=1, burst=1), policy()),
    }
    plan = plan_for(lane("email", "emailAddress"), lane("sms", "phoneNumber"))

    result = await run_pipeline(plan, store, transports, queue_size=2)

    assert result.summary.sent == {"email": users, "sms": users}
    email_times, sms_times = sorted(email_provider.starts()), sorted(sms_provider.starts())
    # SMS goes at 1/s: 59 s for 60 messages.
    assert sms_times[-1] - t0 == pytest.approx(users - 1, abs=0.1)
    # Every e-mail left in the first second, while at most a couple of SMS had.
    assert email_times[-1] - t0 < 1.0
    assert sum(t <= email_times[-1] for t in sms_times) <= 2
