"""Dry runs: `POST /send?dryRun=true` and `dispatcher render` send and record nothing, and preview
exactly what a real send then delivers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from bson import ObjectId

from dispatcher import Failure, Settings, open_dispatcher
from dispatcher.app import create_app
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.smtp import SmtpSink
from dispatcher.fakes.twilio import FakeTwilio
from dispatcher.messages import TextContent
from test_cli import clean_env, run_cli

SID = "AC" + "1" * 32
TOKEN = "tok-dry"
TEMPLATE = ObjectId("65a0000000000000000000d1")


@pytest.fixture
def sink() -> Iterator[SmtpSink]:
    with SmtpSink() as server:
        yield server


@pytest.fixture
def users(database: Any) -> Any:
    database.users.insert_many(
        [
            {
                "_id": "u1",
                "name": "Ada",
                "emailAddress": "ada@example.com",
                "phoneNumber": "+15550000001",
                "clusters": ["c"],
            },
            {"_id": "u2", "name": "Bob", "emailAddress": "bob@example.com", "clusters": ["c"]},  # no phone: sms skipped
            {
                "_id": "u3",
                "name": "Cy",
                "emailAddress": "cy@example.com",
                "phoneNumber": "+15550000003",
                "clusters": ["c"],
            },
            {
                "_id": "u4",
                "name": "Di",
                "emailAddress": "di@example.com",
                "phoneNumber": "+15550000004",
                "clusters": ["c"],
            },
        ]
    )
    database.message_templates.insert_one(
        {
            "_id": TEMPLATE,
            "emailTitle": "Hello {{user.name}}",
            "emailMessage": "Your plan is {{data.plan}}.{{#if data.vip}} VIP!{{/if}}",
            "smsMessage": "{{user.name}}: plan {{data.plan}}",
        }
    )
    return database


@pytest.fixture
async def dry_client(
    users: Any, make_settings: Callable[..., Settings], sink: SmtpSink, nursery: trio.Nursery
) -> AsyncIterator[tuple[Any, FakeTwilio]]:
    fake = FakeTwilio(SID, TOKEN)
    twilio_url = await nursery.start(serve_asgi, fake)
    settings = make_settings(
        channels={"email": {"provider": "smtp"}, "sms": {"provider": "twilio"}},
        providers={
            "smtp": {"host": sink.host, "port": sink.port, "security": "none"},
            "twilio": {"account_sid": SID, "auth_token": TOKEN, "api_base_url": twilio_url},
        },
    )
    async with open_dispatcher(settings) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            yield test_app.test_client(), fake


BODY = {
    "channels": ["email", "sms"],
    "clusters": ["c"],
    "templateId": str(TEMPLATE),
    "data": {"plan": "gold", "vip": True},
}


async def test_a_dry_run_sends_and_records_nothing_and_previews_what_a_send_delivers(
    dry_client: tuple[Any, FakeTwilio], sink: SmtpSink, database: Any
) -> None:
    client, fake = dry_client
    response = await client.post("/send?dryRun=true", json=BODY)
    assert response.status_code == 200
    answer = await response.get_json()
    assert answer["dryRun"] is True
    assert answer["summary"] == {"users": 4, "selected": {"email": 4, "sms": 3}, "skipped": {"sms": 1}, "failed": {}}
    previews = answer["previews"]
    previewed_users = {p["userId"] for p in previews}
    assert len(previewed_users) == 3  # [dispatcher].preview_users
    if "u2" in previewed_users:
        assert {"userId": "u2", "channel": "sms", "reason": "no address"} in answer["skipped"]
    # The body's flag works as the query's.
    again = await client.post("/send", json={**BODY, "dryRun": True})
    assert (await again.get_json())["summary"] == answer["summary"]
    # Nothing reached a provider, nothing was recorded.
    assert sink.messages() == [] and fake.attempts == []
    assert database.dispatch_jobs.count_documents({}) == 0
    assert database.dispatch_deliveries.count_documents({}) == 0

    real = await client.post("/send", json=BODY)
    assert real.status_code == 200 and (await real.get_json())["failures"] == []
    mails = {mail.rcpt_tos[0]: mail.message() for mail in sink.messages()}
    texts = {request.form["To"]: request.form for request in fake.received}
    for preview in previews:
        [to] = preview["to"]
        if preview["channel"] == "email":
            mail = mails[to]
            assert mail["Subject"] == preview["subject"] and mail["From"] == preview["from"]
            assert mail.get_content().strip() == preview["text"].strip()
            assert preview["subject"].startswith("Hello ") and preview["text"].endswith("VIP!")
        else:
            assert texts[to]["Body"] == preview["body"] and texts[to]["From"] == preview["from"]


async def test_a_dry_run_refuses_what_a_send_refuses(dry_client: tuple[Any, FakeTwilio]) -> None:
    client, _ = dry_client
    response = await client.post("/send?dryRun=true", json={**BODY, "templateId": "nope"})
    assert response.status_code == 400 and "templateId" in (await response.get_json())["message"]
    response = await client.post("/send?dryRun=1", json={**BODY, "channels": ["fax"]})
    assert response.status_code == 400


async def test_unknown_recipients_and_render_failures_are_listed(
    users: Any, make_settings: Callable[..., Settings]
) -> None:
    async with open_dispatcher(make_settings()) as d:
        # The embedding API answers a typed `DryRun`; the HTTP layer writes it as JSON (wire.py).
        answer = await d.dry_run(
            {"channels": ["sms"], "recipients": ["u1", "ghost"], "messageContent": "hi {{ user.name }}"}
        )
    assert answer.failures == [Failure("ghost", "sms", "user not found")]
    assert [(m.user_id, m.content) for m in answer.previews] == [("u1", TextContent("hi Ada", "+15550009999"))]
    assert (answer.summary.users, answer.summary.selected, answer.summary.failed) == (1, {"sms": 1}, {"sms": 1})


def test_render_command_previews_one_user(users: Any, mongo_url: str, tmp_path: Path) -> None:
    env = clean_env(MONGODB_URL=mongo_url, DISPATCHER__STORE__DATABASE=users.name)
    result = run_cli(
        "render", "--template", str(TEMPLATE), "--user", "u1", "--data", '{"plan": "silver"}', cwd=tmp_path, env=env
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    by_channel = {p["channel"]: p for p in answer["previews"]}
    assert by_channel["email"]["subject"] == "Hello Ada" and by_channel["email"]["text"] == "Your plan is silver."
    assert by_channel["sms"]["body"] == "Ada: plan silver"
    assert users.dispatch_jobs.count_documents({}) == 0
    assert not (tmp_path / "var" / "outbox").exists()
    missing = run_cli("render", "--template", "nope", "--user", "u1", cwd=tmp_path, env=env)
    assert missing.returncode == 1 and "templateId" in missing.stderr
