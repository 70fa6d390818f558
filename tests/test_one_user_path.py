"""A send to one named user on one channel runs the pipeline's stages in its own task
(`actors.supervisor._run_one`): no actor task is started, and each way such a send can end is
reported as the pipeline reports it. Real store (pymongo against the embedded server)."""

from __future__ import annotations

from typing import Any

import pymongo
import pytest
import trio

from actors import run_pipeline
from actors.journal import Unrecorded
from dispatcher.delivery import RetryPolicy, Transport
from dispatcher.messages import Message, TextContent
from dispatcher.models import SendRequest
from dispatcher.plan import ChannelPlan, RequestPlan
from dispatcher.ratelimit import ChannelGate
from dispatcher.settings import StoreSettings, UserFields
from dispatcher.store import Store


class Provider:
    name = "null"

    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    async def send(self, message: Message, address: str) -> str:
        self.sent.append((message.user_id, address))
        return f"id-{message.user_id}"

    async def aclose(self) -> None:
        pass


class Spawns(trio.abc.Instrument):
    def __init__(self) -> None:
        self.count = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.count += 1


def plan(*recipients: str, channels: tuple[str, ...] = ("sms",)) -> RequestPlan:
    request = SendRequest.parse(
        {"channels": list(channels), "recipients": list(recipients), "messageTitle": "t", "messageContent": "c"}
    )
    lanes = tuple(
        ChannelPlan(
            channel=channel,
            address_field={"sms": "phoneNumber", "email": "emailAddress"}[channel],
            build=lambda context: TextContent(f"hi {context['user']['_id']}", "sender"),
            id_of=lambda user: str(user["_id"]),
        )
        for channel in channels
    )
    return RequestPlan(request, lanes)


@pytest.fixture
def store(mongo_url: str, database: pymongo.database.Database) -> Any:
    database.users.insert_many(
        [
            {"_id": "u1", "phoneNumber": "+15550000001", "emailAddress": "u1@example.com"},
            {"_id": "u2", "emailAddress": "u2@example.com"},  # no phone number
        ]
    )
    client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(mongo_url)
    yield Store(client, StoreSettings(database=database.name), UserFields())
    client.close()


async def send(store: Store, the_plan: RequestPlan, journal: Unrecorded | None = None) -> tuple[Any, Provider, Spawns]:
    provider = Provider()
    transports = {
        channel: Transport(provider, ChannelGate(concurrency=4, rate=0, burst=1), RetryPolicy())
        for channel in ("sms", "email")
    }
    spawns = Spawns()
    trio.lowlevel.add_instrument(spawns)
    try:
        result = await run_pipeline(the_plan, store, transports, queue_size=16, journal=journal)
    finally:
        trio.lowlevel.remove_instrument(spawns)
    return result, provider, spawns


async def test_one_user_on_one_channel_is_sent_without_starting_a_task(store: Store) -> None:
    result, provider, spawns = await send(store, plan("u1"))
    assert provider.sent == [("u1", "+15550000001")]
    assert (result.summary.users, result.summary.sent, result.failures) == (1, {"sms": 1}, [])
    # The store's lookup hops to a worker thread (not a task); no actor is started.
    assert spawns.count == 0

    # Two channels (or two users) still go through the actors.
    result, provider, spawns = await send(store, plan("u1", channels=("sms", "email")))
    assert sorted(provider.sent) == [("u1", "+15550000001"), ("u1", "u1@example.com")]
    assert result.summary.users == 1 and spawns.count > 0


async def test_a_user_without_the_address_is_skipped_and_an_unknown_one_not_found(store: Store) -> None:
    result, provider, _ = await send(store, plan("u2"))
    assert provider.sent == []
    assert (result.summary.users, result.summary.skipped, result.failures) == (1, {"sms": 1}, [])

    result, provider, _ = await send(store, plan("nobody"))
    assert provider.sent == []
    assert result.summary.users == 0 and result.summary.failed == {"sms": 1}
    assert [(f.user_id, f.channel, f.error) for f in result.failures] == [("nobody", "sms", "user not found")]


async def test_a_run_cancelled_before_it_started_calls_no_provider(store: Store) -> None:
    journal = Unrecorded()
    journal.cancel()
    result, provider, _ = await send(store, plan("u1"), journal)
    assert provider.sent == []
    assert result.summary.sent == {} and result.failures == []
