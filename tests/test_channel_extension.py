"""A channel is one entry of the channel table: a test-only `webhook` channel, registered with
`dispatcher.channels.register`, goes through settings, request validation and a real send to the
outbox (the provider that serves any channel)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymongo
import pytest

from dispatcher import ConfigError, RequestError, SendRequest, Settings, open_dispatcher, settings_from_dict
from dispatcher.channels import CHANNELS, BuildContext, BuildFn, ChannelSpec, TextSource, register
from dispatcher.messages import Content, TextContent


def _build_webhook(texts: TextSource, ctx: BuildContext) -> BuildFn:
    body = texts.get("webhookMessage", texts.request.message_content)
    assert body is not None

    def build(context: dict[str, Any]) -> Content:
        return TextContent(body(context), "dispatcher")

    return build


@pytest.fixture
def webhook() -> Iterator[ChannelSpec]:
    spec = register(
        ChannelSpec(
            "webhook",
            lambda settings: "webhookUrl",
            (("webhookMessage",),),
            needs_title=False,
            build=_build_webhook,
            valid_address=lambda value: value.startswith("https://"),
        )
    )
    try:
        yield spec
    finally:
        CHANNELS.pop("webhook", None)


def hook_request(**extra: Any) -> dict[str, Any]:
    return {"channels": ["webhook"], "clusters": ["hooks"], "messageContent": "Hello {{ user.name }}", **extra}


async def test_registered_channel_delivers_through_the_outbox(
    webhook: ChannelSpec, make_settings: Callable[..., Settings], database: pymongo.database.Database, outbox: Path
) -> None:
    database.users.insert_many(
        [
            {"_id": "h1", "name": "Ada", "clusters": ["hooks"], "webhookUrl": "https://example.com/ada"},
            {"_id": "h2", "name": "Bob", "clusters": ["hooks"], "webhookUrl": "https://example.com/bob"},
            {"_id": "h3", "name": "Cy", "clusters": ["hooks"]},  # no address: skipped
        ]
    )
    settings = make_settings(channels={"active": ["email", "webhook"], "webhook": {"provider": "outbox"}})
    assert settings.channels["webhook"].provider == "outbox"

    async with open_dispatcher(settings) as d:
        result = await d.send(hook_request())

    assert result.failures == []
    assert result.summary.to_json() == {"users": 3, "sent": {"webhook": 2}, "skipped": {"webhook": 1}, "failed": {}}
    records = [json.loads(p.read_text()) for p in sorted((outbox / "webhook").glob("*.json"))]
    assert sorted((r["userId"], r["to"], r["body"]) for r in records) == [
        ("h1", "https://example.com/ada", "Hello Ada"),
        ("h2", "https://example.com/bob", "Hello Bob"),
    ]


async def test_registered_channel_takes_its_text_from_a_template(
    webhook: ChannelSpec, make_settings: Callable[..., Settings], database: pymongo.database.Database, outbox: Path
) -> None:
    database.users.insert_one({"_id": "h1", "name": "Ada", "clusters": ["hooks"], "webhookUrl": "https://e.com/a"})
    database.message_templates.insert_many(
        [
            {"_id": "hook", "webhookMessage": "Hook for {{ user.name }}"},
            {"_id": "no-hook", "smsMessage": "not for hooks"},
        ]
    )
    settings = make_settings(channels={"active": ["webhook"]})
    async with open_dispatcher(settings) as d:
        with pytest.raises(RequestError, match="no webhook text .needs webhookMessage"):
            await d.send(hook_request(templateId="no-hook"))
        result = await d.send(hook_request(templateId="hook"))
    assert result.summary.sent == {"webhook": 1}
    [record] = [json.loads(p.read_text()) for p in (outbox / "webhook").glob("*.json")]
    assert record["body"] == "Hook for Ada"


def test_registered_channel_is_validated_like_the_built_in_ones(webhook: ChannelSpec) -> None:
    assert SendRequest.parse(hook_request()).channels == ("webhook",)
    with pytest.raises(ConfigError, match=r"channels\.webhook\.provider: 'twilio' cannot deliver webhook"):
        settings_from_dict({"channels": {"webhook": {"provider": "twilio"}}})
    # Active only when the configuration says so.
    settings = settings_from_dict({"channels": {"active": ["sms"]}})
    assert settings.channels.active == ("sms",)


def test_channel_unknown_once_unregistered() -> None:
    with pytest.raises(RequestError, match="'webhook' is not a supported channel"):
        SendRequest.parse(hook_request())
    with pytest.raises(ConfigError, match="'webhook' is not a channel"):
        settings_from_dict({"channels": {"active": ["webhook"]}})


def test_provider_that_cannot_serve_the_channel_is_refused_naming_the_key() -> None:
    with pytest.raises(
        ConfigError, match=r"channels\.sms\.provider: 'fcm' cannot deliver sms \(use one of outbox, twilio\)"
    ):
        settings_from_dict({"channels": {"sms": {"provider": "fcm"}}})


def test_registered_channel_is_active_by_default(webhook: ChannelSpec) -> None:
    # The channel defaults come from the table when the settings are validated, not at import.
    settings = settings_from_dict({})
    assert "webhook" in settings.channels.active
    assert settings.channels["webhook"].provider == "outbox"
