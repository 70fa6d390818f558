"""One recipient resolver per send: every selected user is read from the store once, whatever the
number of channels, and a slow lane neither holds the others back nor keeps the audience in
memory (its backlog goes to disk)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

import pymongo
import pymongo.monitoring
import pytest
import trio
import trio.testing

from actors import run_pipeline
from actors.backlog import Backlog
from dispatcher.delivery import RetryPolicy, Transport
from dispatcher.messages import Message, TextContent, User
from dispatcher.models import SendRequest
from dispatcher.plan import ChannelPlan, RequestPlan
from dispatcher.ratelimit import ChannelGate
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store


class NullProvider:
    """Accepts everything at once, counting and timing (virtual time) what it was given."""

    name = "null"

    def __init__(self) -> None:
        self.times: list[float] = []

    async def send(self, message: Message, address: str) -> str:
        self.times.append(trio.current_time())
        return f"id-{message.user_id}"

    async def aclose(self) -> None:
        pass


def transport(rate: float = 0.0, concurrency: int = 32) -> Transport:
    return Transport(NullProvider(), ChannelGate(concurrency=concurrency, rate=rate, burst=1), RetryPolicy())


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


THREE_LANES = (lane("email", "emailAddress"), lane("sms", "phoneNumber"), lane("push", "deviceToken"))


class UserReads(pymongo.monitoring.CommandListener):
    """Counts the user documents the server returned to find and getMore."""

    def __init__(self) -> None:
        self.documents = 0
        self._finds: set[int] = set()

    def started(self, event: pymongo.monitoring.CommandStartedEvent) -> None:
        if event.command_name == "find" and event.command.get("find") == "users":
            self._finds.add(event.request_id)
        elif event.command_name == "getMore" and event.command.get("collection") == "users":
            self._finds.add(event.request_id)

    def succeeded(self, event: pymongo.monitoring.CommandSucceededEvent) -> None:
        if event.request_id in self._finds:
            cursor = event.reply.get("cursor", {})
            self.documents += len(cursor.get("firstBatch", cursor.get("nextBatch", [])))

    def failed(self, event: pymongo.monitoring.CommandFailedEvent) -> None:
        pass


async def test_a_three_channel_send_reads_each_user_from_the_store_once(
    mongo_url: str, database: pymongo.database.Database
) -> None:
    users = 10_000
    database.users.insert_many(
        [
            {
                "_id": f"u{i:05d}",
                "clusters": ["all"],
                "emailAddress": f"u{i}@example.com",
                "phoneNumber": f"+1555{i:07d}",
                "deviceToken": f"token-{i}",
            }
            for i in range(users)
        ]
    )
    reads = UserReads()
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url, event_listeners=[reads])
    store = Store(client, StoreSettings(database=database.name), UserFields(), batch_size=500)
    transports = {name: transport() for name in ("email", "sms", "push")}
    try:
        result = await run_pipeline(plan_for(*THREE_LANES), store, transports, queue_size=256)
    finally:
        client.close()

    assert result.summary.users == users
    assert result.summary.sent == {"email": users, "sms": users, "push": users}
    assert reads.documents == users  # not 3 x users: one resolver for the three lanes


class MemoryStore:
    """The two methods the resolver uses, over a list of users, counting what it hands out."""

    def __init__(self, users: list[User], batch_size: int) -> None:
        self.users = users
        self.batch_size = batch_size
        self.read = 0

    async def stream_users(self, recipients: Sequence[str], clusters: Sequence[str]) -> AsyncIterator[list[User]]:
        for i in range(0, len(self.users), self.batch_size):
            await trio.sleep(0)
            batch = [dict(u) for u in self.users[i : i + self.batch_size]]
            self.read += len(batch)
            yield batch

    def user_id(self, user: User) -> str:
        return str(user["_id"])


async def test_a_paced_sms_lane_neither_slows_email_nor_makes_the_audience_read_twice(
    autojump_clock: trio.testing.MockClock,
) -> None:
    users = 200
    store = MemoryStore(
        [
            {"_id": f"u{i:03d}", "emailAddress": f"u{i}@example.com", "phoneNumber": f"+1555{i:07d}"}
            for i in range(users)
        ],
        batch_size=10,
    )
    transports = {"email": transport(), "sms": transport(rate=1.0, concurrency=4)}
    t0 = trio.current_time()
    read_when_email_done = 0

    async def watch() -> None:
        nonlocal read_when_email_done
        provider = transports["email"].provider
        assert isinstance(provider, NullProvider)
        while len(provider.times) < users:
            await trio.sleep(0.01)
        read_when_email_done = store.read

    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch)
        result = await run_pipeline(
            plan_for(lane("email", "emailAddress"), lane("sms", "phoneNumber")), store, transports, queue_size=4
        )

    email, sms = (transports[name].provider.times for name in ("email", "sms"))  # type: ignore[attr-defined]
    assert result.summary.sent == {"email": users, "sms": users}
    assert store.read == users  # each user read once, for both lanes
    # E-mail went at its own pace: done within a second, when the whole audience had been read
    # (the SMS lane's share waited in its backlog), while SMS goes at 1/s for 200 s.
    assert max(email) - t0 < 1.0
    assert read_when_email_done == users
    assert max(sms) - t0 == pytest.approx(users - 1, abs=0.5)


async def test_a_backlog_keeps_order_across_memory_and_disk() -> None:
    backlog = Backlog[list[int]](in_memory=2)
    for i in range(10):
        backlog.put([i, i])
    assert backlog.spilled == 8  # two in memory, the rest on disk
    taken = [await backlog.get() for _ in range(5)]
    for i in range(10, 13):  # written while older batches are still on disk: behind them
        backlog.put([i, i])
    backlog.close()
    while (batch := await backlog.get()) is not None:
        taken.append(batch)
    assert taken == [[i, i] for i in range(13)]
    assert await backlog.get() is None
