"""Push through the FCM provider, end to end: dispatcher -> real google-auth token refresh against
a fake token endpoint -> httpx -> fake FCM v1 API, asserting on what the fakes received."""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trio

from dispatcher import Settings, open_dispatcher
from dispatcher.errors import ConfigError
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.fcm import FCM_SCOPE, FakeFcm, FakeOAuthToken, write_service_account_key


@dataclass
class FcmWorld:
    fcm: FakeFcm
    tokens: FakeOAuthToken
    key_path: Path
    url: str


@pytest.fixture
async def world(nursery: trio.Nursery, tmp_path: Path) -> FcmWorld:
    tokens = FakeOAuthToken()
    token_url = await nursery.start(serve_asgi, tokens)
    key = write_service_account_key(tmp_path / "service-account.json", f"{token_url}/token", "demo")
    tokens.trust(key)
    fcm = FakeFcm("demo", tokens)
    url = await nursery.start(serve_asgi, fcm)
    return FcmWorld(fcm, tokens, key.path, url)


@pytest.fixture
def fcm_settings(make_settings: Callable[..., Settings], world: FcmWorld) -> Callable[..., Settings]:
    def make(push: dict[str, Any] | None = None, **fcm: Any) -> Settings:
        return make_settings(
            channels={"push": {"provider": "fcm", "backoff_initial_seconds": 0.01, **(push or {})}},
            providers={
                "fcm": {
                    "project_id": "demo",
                    "credentials_file": str(world.key_path),
                    "api_base_url": world.url,
                    "android_intent_action": "OPEN_APP",
                    **fcm,
                }
            },
        )

    return make


async def test_push_carries_bearer_token_texts_click_action_and_apns_subtitle(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "name": "Ada", "deviceToken": "device-token-ada-0001"})
    database.message_templates.insert_one(
        {
            "_id": "order-shipped",
            "pushTitle": "Hi {{user.name}}",
            "pushSubtitle": "Order {{data.order}}",
            "pushMessage": "Your order {{data.order}} has shipped",
            "pushData": json.dumps(
                {
                    "orderId": "{{data.order}}",
                    "android": {"priority": "high", "notification": {"color": "#ff0000"}},
                    "apns": {
                        "headers": {"apns-priority": "10"},
                        "payload": {"aps": {"sound": "default", "alert": {"launch-image": "ship.png"}}},
                    },
                }
            ),
        }
    )
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send(
            {"channels": ["push"], "recipients": ["u1"], "templateId": "order-shipped", "data": {"order": "A-17"}}
        )

    assert result.failures == [] and result.summary.sent == {"push": 1}
    [request] = world.fcm.received
    assert request.authorization == "Bearer fake-token-1"
    assert world.tokens.issued == ["fake-token-1"]
    assert FCM_SCOPE in world.tokens.received[0]["scope"]
    assert request.message == {
        "token": "device-token-ada-0001",
        "notification": {"title": "Hi Ada", "body": "Your order A-17 has shipped"},
        "data": {"orderId": "A-17"},
        "android": {"priority": "high", "notification": {"color": "#ff0000", "click_action": "OPEN_APP"}},
        "apns": {
            "headers": {"apns-priority": "10"},
            "payload": {"aps": {"sound": "default", "alert": {"subtitle": "Order A-17", "launch-image": "ship.png"}}},
        },
    }


async def test_apns_override_wins_over_generated_subtitle(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    database.message_templates.insert_one(
        {
            "_id": "t",
            "pushTitle": "T",
            "pushSubtitle": "generated",
            "pushData": json.dumps({"apns": {"payload": {"aps": {"alert": {"subtitle": "override"}}}}}),
        }
    )
    async with open_dispatcher(fcm_settings(android_intent_action="")) as d:
        await d.send({"channels": ["push"], "recipients": ["u1"], "templateId": "t"})

    [request] = world.fcm.received
    assert request.message == {
        "token": "device-token-0001",
        "notification": {"title": "T"},
        "apns": {"payload": {"aps": {"alert": {"subtitle": "override"}}}},
    }


async def test_plain_request_interpolates_title_body_and_omits_empty_parts(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "name": "Bo", "deviceToken": "device-token-0001"})
    database.message_templates.insert_one({"_id": "silent", "pushData": '{"sync": "{{data.what}}"}'})
    async with open_dispatcher(fcm_settings(android_intent_action="")) as d:
        await d.send(
            {
                "channels": ["push"],
                "recipients": ["u1"],
                "messageTitle": "Hello {{user.name}}",
                "messageContent": "You have {{data.n}} messages",
                "data": {"n": 3},
            }
        )
        await d.send({"channels": ["push"], "recipients": ["u1"], "templateId": "silent", "data": {"what": "inbox"}})

    assert [r.message for r in world.fcm.received] == [
        {"token": "device-token-0001", "notification": {"title": "Hello Bo", "body": "You have 3 messages"}},
        # A data-only push: no title and no body, so no notification object at all.
        {"token": "device-token-0001", "data": {"sync": "inbox"}},
    ]


async def test_gone_token_fails_the_user_while_the_other_device_receives(fcm_settings, world, database) -> None:
    good, gone = "device-token-good-000001", "gone-device-token-000002"
    database.users.insert_one({"_id": "u1", "deviceToken": [good, gone]})
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    assert result.summary.failed == {"push": 1} and result.summary.sent == {}
    [failure] = result.failures
    assert failure.user_id == "u1" and failure.channel == "push"
    assert "gone-d…0002" in failure.error and "FCM UNREGISTERED" in failure.error
    assert "good" not in failure.error
    assert [r.token for r in world.fcm.received] == [good]
    assert len(world.fcm.attempts_to(gone)) == 1  # permanent: not retried


async def test_invalid_argument_is_permanent_and_not_retried(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.fcm.faults.script = deque(["permanent"])
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    [failure] = result.failures
    assert failure.error.startswith("FCM INVALID_ARGUMENT: ")
    assert [r.outcome for r in world.fcm.attempts] == ["permanent"]


async def test_unavailable_is_retried_until_sent(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.fcm.faults.script = deque(["transient", "ok"])
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    assert result.failures == [] and result.summary.sent == {"push": 1}
    assert [r.outcome for r in world.fcm.attempts] == ["transient", "ok"]
    assert len(world.tokens.issued) == 1  # a 503 keeps the token


async def test_quota_exceeded_waits_for_retry_after(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.fcm.faults.script = deque(["throttle"])
    world.fcm.faults.retry_after = 1
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    assert result.failures == []
    first, second = world.fcm.attempts
    assert (first.outcome, second.outcome) == ("throttle", "ok")
    assert second.time - first.time >= 0.95


async def test_one_token_request_serves_many_concurrent_sends(fcm_settings, world, database) -> None:
    database.users.insert_many(
        [{"_id": f"u{i}", "clusters": ["all"], "deviceToken": f"device-token-{i:04}"} for i in range(20)]
    )
    async with open_dispatcher(fcm_settings()) as d:
        result = await d.send({"channels": ["push"], "clusters": ["all"], "messageTitle": "T", "messageContent": "B"})

    assert result.summary.sent == {"push": 20}
    assert world.tokens.issued == ["fake-token-1"]
    assert len(world.fcm.received) == 20
    assert {r.authorization for r in world.fcm.received} == {"Bearer fake-token-1"}


async def test_rejected_token_is_replaced_once_then_the_send_succeeds(fcm_settings, world, database) -> None:
    database.users.insert_many([{"_id": "u1", "deviceToken": "device-token-0001"}])
    async with open_dispatcher(fcm_settings()) as d:
        await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})
        world.tokens.revoke()  # FCM now answers 401 to the cached token
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    assert result.failures == []
    assert [r.outcome for r in world.fcm.attempts] == ["ok", "unauthenticated", "ok"]
    assert world.fcm.attempts[-1].authorization == "Bearer fake-token-2"


async def test_token_rejected_even_after_refresh_is_permanent(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.fcm.auth = lambda token: False  # the project refuses this service account altogether
    async with open_dispatcher(fcm_settings(push={"max_attempts": 5})) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    [failure] = result.failures
    assert failure.error.startswith("FCM UNAUTHENTICATED: ") and "after 2 attempts" in failure.error
    assert len(world.fcm.attempts) == 2 and len(world.tokens.issued) == 2


async def test_token_endpoint_failure_is_transient(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.tokens.faults.script = deque(["permanent"])  # 400 invalid_grant, which google-auth does not retry
    async with open_dispatcher(fcm_settings(push={"max_attempts": 1})) as d:
        failed = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})
        sent = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    [failure] = failed.failures
    assert failure.error.startswith("FCM auth: ") and "invalid_grant" in failure.error
    assert sent.failures == [] and world.tokens.issued == ["fake-token-1"]
    assert len(world.fcm.attempts) == 1  # nothing reached FCM without a token


async def test_unreachable_fcm_is_a_connection_error(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    with trio.socket.socket() as sock:  # a port that was free a moment ago: connecting is refused
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with open_dispatcher(fcm_settings(push={"max_attempts": 2}, api_base_url=f"http://127.0.0.1:{port}")) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    [failure] = result.failures
    assert failure.error == "FCM connection error: ConnectError (after 2 attempts)"


async def test_stalled_fcm_times_out_per_attempt(fcm_settings, world, database) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": "device-token-0001"})
    world.fcm.faults.script = deque(["stall", "ok"])
    async with open_dispatcher(fcm_settings(push={"timeout_seconds": 0.3})) as d:
        result = await d.send({"channels": ["push"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "B"})

    assert result.failures == []
    assert [r.outcome for r in world.fcm.attempts] == ["stall", "ok"]


@pytest.mark.parametrize("problem", ["missing", "not_json", "no_private_key", "unset"])
async def test_unusable_credentials_stop_the_dispatcher_naming_the_key(make_settings, tmp_path, problem) -> None:
    path = tmp_path / "key.json"
    if problem == "not_json":
        path.write_text("this is not JSON")
    elif problem == "no_private_key":
        path.write_text(
            json.dumps({"type": "service_account", "client_email": "a@b.c", "token_uri": "http://127.0.0.1:1/token"})
        )
    with pytest.raises(ConfigError, match=r"^providers\.fcm\.credentials_file: "):
        # A missing key file is refused by the settings, an unusable one when the dispatcher opens.
        settings = make_settings(
            channels={"push": {"provider": "fcm"}},
            providers={"fcm": {"project_id": "demo", "credentials_file": "" if problem == "unset" else str(path)}},
        )
        async with open_dispatcher(settings):
            pass


async def test_missing_project_id_stops_the_dispatcher(make_settings, world) -> None:
    with pytest.raises(ConfigError, match=r"^providers\.fcm\.project_id: "):
        make_settings(
            channels={"push": {"provider": "fcm"}}, providers={"fcm": {"credentials_file": str(world.key_path)}}
        )
