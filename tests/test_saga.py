"""`POST /saga/send`: Flow Manager commands mapped by metadataSchema, and the events posted back
to a fake Flow Manager on loopback."""

from __future__ import annotations

from collections import deque
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from bson import ObjectId

from dispatcher import Settings, open_dispatcher
from dispatcher.app import create_app
from dispatcher.fakes import Faults, serve_asgi
from dispatcher.fakes.flow_manager import FakeFlowManager
from dispatcher.saga import lookup, to_send_request
from dispatcher.settings import FlowManagerSettings

TEMPLATE = ObjectId("65a000000000000000000009")
SCHEMA = {
    "channels": "value.messagePayload.notification.channels",  # from the command's root
    "recipients": "notification.to",  # under value.messagePayload
    "messageTitle": "notification.title",
    "messageContent": "notification.body",
}


def command(saga: str = "saga-1", label: str = "sendNotification", **notification: Any) -> dict[str, Any]:
    body = {"channels": "email", "to": ["u1"], "title": "Order", "body": "Order {{ data.key }} shipped"}
    body.update(notification)
    return {"key": saga, "value": {"messageLabel": label, "messagePayload": {"notification": body}}}


@pytest.fixture
async def flow_manager(nursery: trio.Nursery) -> tuple[FakeFlowManager, str]:
    fake = FakeFlowManager()
    url = await nursery.start(serve_asgi, fake)
    return fake, url


@pytest.fixture
async def saga_client(
    database: Any, make_settings: Callable[..., Settings], flow_manager: tuple[FakeFlowManager, str]
) -> AsyncIterator[Any]:
    database.users.insert_many(
        [
            {"_id": "u1", "emailAddress": "u1@example.com", "clusters": ["c"]},
            {"_id": "u2", "emailAddress": "u2@example.com", "clusters": ["c"]},
        ]
    )
    database.message_templates.insert_one(
        {"_id": TEMPLATE, "emailTitle": "Shipped", "emailMessage": "Parcel {{data.parcel}} for {{user._id}}"}
    )
    settings = make_settings(
        flow_manager={
            "metadata_schema": SCHEMA,
            "service_url": flow_manager[1],
            "success_event_label": "notificationSent",
            "fail_event_label": "notificationFailed",
            "event_backoff_seconds": 0.05,
        }
    )
    async with open_dispatcher(settings) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            yield test_app.test_client()


def emails(outbox: Path) -> list[str]:
    return sorted(path.read_text() for path in (outbox / "email").glob("*.eml"))


async def wait_events(fake: FakeFlowManager, count: int) -> list[dict[str, Any]]:
    with trio.fail_after(15):
        while len(fake.events) < count:
            await fake.received.wait()
    return fake.events


def event(saga: str, label: str) -> dict[str, Any]:
    return {"key": saga, "value": {"messageLabel": label, "messagePayload": {}}}


async def test_a_mapped_command_sends_and_the_flow_manager_gets_the_success_event(
    saga_client: Any, flow_manager: tuple[FakeFlowManager, str], outbox: Path
) -> None:
    fake, _ = flow_manager
    response = await saga_client.post("/saga/send", json=command())
    assert response.status_code == 200 and await response.get_data() == b""
    assert await wait_events(fake, 1) == [event("saga-1", "notificationSent")]
    [mail] = emails(outbox)
    assert "To: u1@example.com" in mail and "Subject: Order" in mail
    assert "Order saga-1 shipped" in mail  # data is the whole command
    assert fake.stray == []


async def test_an_invalid_command_answers_400_and_the_fail_event(
    saga_client: Any, flow_manager: tuple[FakeFlowManager, str], outbox: Path
) -> None:
    fake, _ = flow_manager
    response = await saga_client.post("/saga/send", json=command("saga-2", channels=["fax"]))
    assert response.status_code == 400
    assert (await response.get_json())["message"] == "channels: 'fax' is not a supported channel"
    unmapped = command("saga-3")
    del unmapped["value"]["messagePayload"]["notification"]["channels"]
    response = await saga_client.post("/saga/send", json=unmapped)
    assert response.status_code == 400 and "metadataSchema.channels" in (await response.get_json())["message"]
    events = await wait_events(fake, 2)
    assert sorted(events, key=lambda e: e["key"]) == [
        event("saga-2", "notificationFailed"),
        event("saga-3", "notificationFailed"),
    ]
    # Not a command at all: no saga to answer, only the 400.
    response = await saga_client.post("/saga/send", json={"value": {}})
    assert response.status_code == 400 and (await response.get_json())["message"].startswith("key:")
    assert emails(outbox) == []


async def test_a_redelivered_command_sends_once(
    saga_client: Any, flow_manager: tuple[FakeFlowManager, str], outbox: Path, database: Any
) -> None:
    fake, _ = flow_manager
    first = await saga_client.post("/saga/send", json=command("saga-4", to=["u1", "u2"]))
    assert first.status_code == 200
    await wait_events(fake, 1)
    again = await saga_client.post("/saga/send", json=command("saga-4", to=["u1", "u2"]))
    assert again.status_code == 200
    assert len(emails(outbox)) == 2 and database.dispatch_jobs.count_documents({}) == 1
    # The same saga with another label is another command.
    other = await saga_client.post("/saga/send", json=command("saga-4", label="remind", to=["u2"]))
    assert other.status_code == 200
    events = await wait_events(fake, 2)
    assert len(emails(outbox)) == 3 and database.dispatch_jobs.count_documents({}) == 2
    assert events == [event("saga-4", "notificationSent")] * 2
    await trio.sleep(1.5)  # three polling rounds: the redelivery posted no event of its own
    assert len(fake.events) == 2


async def test_events_are_retried_until_the_flow_manager_takes_them(
    saga_client: Any, flow_manager: tuple[FakeFlowManager, str], database: Any
) -> None:
    fake, _ = flow_manager
    fake.faults = Faults(script=deque(["transient", "transient"]))
    assert (await saga_client.post("/saga/send", json=command("saga-5"))).status_code == 200
    assert await wait_events(fake, 1) == [event("saga-5", "notificationSent")]
    assert fake.attempts == 3
    with trio.fail_after(10):  # the outcome is written once the answer is in
        while (doc := database.dispatch_saga_events.find_one())["state"] != "sent":
            await trio.sleep(0.05)
    assert doc["attempts"] == 3


def test_paths_resolve_from_the_root_then_under_the_payload() -> None:
    cmd = {"key": "k", "value": {"messageLabel": "l", "messagePayload": {"a": {"b": [1, 2]}, "key": "inner"}}}
    assert lookup(cmd, "value.messagePayload.a.b") == [1, 2]
    assert lookup(cmd, "a.b.1") == 2
    assert lookup(cmd, "key") == "k"  # the root wins when both resolve


def test_template_per_label_and_data_path() -> None:
    settings = FlowManagerSettings(
        metadata_schema={"channels": "ch", "recipients": "to", "emailSender": "from"},
        template_ids={"orderShipped": str(TEMPLATE)},
        data_path="value.messagePayload.order",
    )
    cmd = {
        "key": "s",
        "value": {
            "messageLabel": "orderShipped",
            "messagePayload": {"ch": "email", "to": "u1", "from": ["ops@example.com"], "order": {"parcel": 7}},
        },
    }
    request = to_send_request(cmd, settings)
    assert request.channels == ("email",) and request.recipients == ("u1",)
    assert request.template_id == str(TEMPLATE) and request.email_sender == "ops@example.com"
    assert request.data == {"parcel": 7}


async def test_without_a_metadata_schema_the_route_says_what_to_configure(client: Any) -> None:
    response = await client.post("/saga/send", json=command())
    assert response.status_code == 404
    assert "metadataSchema" in (await response.get_json())["message"]
