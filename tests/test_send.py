"""Who gets what: recipient selection, skips, unknown ids, templates, counting."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bson import ObjectId
from outbox_files import outbox_mails, outbox_records

from dispatcher import Dispatcher


async def test_user_in_recipients_and_cluster_gets_one_message(
    dispatcher: Dispatcher, database: Any, outbox: Path
) -> None:
    database.users.insert_many(
        [
            {"_id": "u1", "emailAddress": "u1@example.com", "clusters": ["beta"]},
            {"_id": "u2", "emailAddress": "u2@example.com", "clusters": ["beta", "staff"]},
            {"_id": "u3", "emailAddress": "u3@example.com", "clusters": ["other"]},
        ]
    )
    result = await dispatcher.send(
        {
            "channels": ["email"],
            "recipients": ["u1"],
            "clusters": ["beta", "staff"],
            "messageTitle": "T",
            "messageContent": "C",
        }
    )
    assert result.failures == []
    assert result.summary.users == 2
    assert sorted(m["To"] for m in outbox_mails(outbox)) == ["u1@example.com", "u2@example.com"]


async def test_recipients_only(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_many(
        [{"_id": f"u{i}", "phoneNumber": f"+1555000000{i}", "clusters": ["c"]} for i in range(4)]
    )
    result = await dispatcher.send({"channels": ["sms"], "recipients": ["u1", "u3"], "messageContent": "hi"})
    assert result.summary.users == 2 and result.summary.sent == {"sms": 2}
    assert sorted(r["to"] for r in outbox_records(outbox, "sms")) == ["+15550000001", "+15550000003"]


async def test_clusters_only(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_many(
        [{"_id": f"u{i}", "phoneNumber": f"+1555000000{i}", "clusters": [f"c{i % 2}"]} for i in range(6)]
    )
    result = await dispatcher.send({"channels": ["sms"], "clusters": ["c1"], "messageContent": "hi"})
    assert result.summary.users == 3
    assert sorted(r["userId"] for r in outbox_records(outbox, "sms")) == ["u1", "u3", "u5"]


async def test_objectid_recipient_matches_objectid_and_string_ids(
    dispatcher: Dispatcher, database: Any, outbox: Path
) -> None:
    oid = ObjectId()
    database.users.insert_many(
        [{"_id": oid, "phoneNumber": "+15550000001"}, {"_id": "plain-id", "phoneNumber": "+15550000002"}]
    )
    result = await dispatcher.send(
        {"channels": ["sms"], "recipients": [str(oid), "plain-id"], "messageContent": "{{ user._id }}"}
    )
    assert result.failures == [] and result.summary.sent == {"sms": 2}
    assert sorted(r["body"] for r in outbox_records(outbox, "sms")) == sorted([str(oid), "plain-id"])


async def test_objectid_shaped_string_id_is_found(dispatcher: Dispatcher, database: Any) -> None:
    hex_id = "64b000000000000000000042"
    database.users.insert_one({"_id": hex_id, "phoneNumber": "+15550000001"})
    result = await dispatcher.send({"channels": ["sms"], "recipients": [hex_id], "messageContent": "x"})
    assert result.failures == [] and result.summary.sent == {"sms": 1}


async def test_unknown_recipient_fails_once_per_channel(dispatcher: Dispatcher, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com", "phoneNumber": "+15550000001"})
    result = await dispatcher.send(
        {"channels": ["email", "sms"], "recipients": ["u1", "ghost"], "messageTitle": "T", "messageContent": "C"}
    )
    assert sorted((f.user_id, f.channel, f.error) for f in result.failures) == [
        ("ghost", "email", "user not found"),
        ("ghost", "sms", "user not found"),
    ]
    assert result.summary.users == 1
    assert result.summary.sent == {"email": 1, "sms": 1}
    assert result.summary.failed == {"email": 1, "sms": 1}


async def test_user_without_address_is_skipped_not_failed(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_many(
        [
            {"_id": "full", "emailAddress": "f@example.com", "phoneNumber": "+15550000001", "deviceToken": "tok-1"},
            {"_id": "mail-only", "emailAddress": "m@example.com", "phoneNumber": "", "deviceToken": []},
            {"_id": "nothing", "clusters": ["c"]},
        ]
    )
    result = await dispatcher.send(
        {
            "channels": ["email", "sms", "push", "voice"],
            "recipients": ["full", "mail-only", "nothing"],
            "messageTitle": "T",
            "messageContent": "C",
        }
    )
    assert result.failures == []
    summary = result.summary
    assert summary.users == 3
    assert summary.sent == {"email": 2, "sms": 1, "push": 1, "voice": 1}
    assert summary.skipped == {"email": 1, "sms": 2, "push": 2, "voice": 2}
    assert len(outbox_records(outbox, "voice")) == 1


async def test_user_with_two_device_tokens_gets_one_push_per_token(
    dispatcher: Dispatcher, database: Any, outbox: Path
) -> None:
    database.users.insert_one({"_id": "u1", "deviceToken": ["phone", "tablet", "phone"]})
    result = await dispatcher.send(
        {"channels": ["push"], "recipients": ["u1"], "messageTitle": "Hello", "messageContent": "Body"}
    )
    assert result.summary.sent == {"push": 1}  # counted per (user, channel)
    records = outbox_records(outbox, "push")
    assert sorted(r["to"] for r in records) == ["phone", "tablet"]
    assert {(r["title"], r["body"]) for r in records} == {("Hello", "Body")}


async def test_template_by_id_uses_per_channel_fields(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    template_id = database.message_templates.insert_one(
        {
            "name": "welcome",
            "emailTitle": "Welcome {{ user.name }}",
            "emailMessage": "Text for {{ user.name }}",
            "emailHtmlMessage": "<p>{{ user.name }}</p>",
            "smsMessage": "SMS {{ data.code }}",
            "voiceMessage": "Voice {{ data.code }}",
            "pushTitle": "Push {{ user.name }}",
            "pushSubtitle": "Sub",
            "pushMessage": "Push body",
            "pushData": '{"data": {"code": "{{ data.code }}", "n": 1}, "android": {"priority": "high"}}',
        }
    ).inserted_id
    database.users.insert_one(
        {
            "_id": "u1",
            "name": "Ada",
            "emailAddress": "ada@example.com",
            "phoneNumber": "+15550000001",
            "deviceToken": "tok",
        }
    )
    result = await dispatcher.send(
        {
            "channels": ["email", "sms", "voice", "push"],
            "recipients": ["u1"],
            "templateId": str(template_id),
            "data": {"code": "X9"},
            "messageTitle": "ignored",
            "messageContent": "ignored",
        }
    )
    assert result.failures == []
    [mail] = outbox_mails(outbox)
    assert mail["Subject"] == "Welcome Ada"
    assert mail.get_content_type() == "multipart/alternative"
    assert mail.get_body(("plain",)).get_content().strip() == "Text for Ada"
    assert mail.get_body(("html",)).get_content().strip() == "<p>Ada</p>"
    assert [r["body"] for r in outbox_records(outbox, "sms")] == ["SMS X9"]
    assert [r["body"] for r in outbox_records(outbox, "voice")] == ["Voice X9"]
    [push] = outbox_records(outbox, "push")
    assert (push["title"], push["subtitle"], push["body"]) == ("Push Ada", "Sub", "Push body")
    assert push["data"] == {"code": "X9", "n": "1"}
    assert push["android"] == {"priority": "high"}


async def test_template_with_string_id(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.message_templates.insert_one({"_id": "promo", "smsMessage": "Promo for {{ user.name }}"})
    database.users.insert_one({"_id": "u1", "name": "Bo", "phoneNumber": "+15550000001"})
    result = await dispatcher.send({"channels": ["sms"], "recipients": ["u1"], "templateId": "promo"})
    assert result.failures == []
    assert [r["body"] for r in outbox_records(outbox, "sms")] == ["Promo for Bo"]


async def test_email_cc_bcc_and_sender_override(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    await dispatcher.send(
        {
            "channels": ["email"],
            "recipients": ["u1"],
            "messageTitle": "T",
            "messageContent": "C",
            "emailSender": "team@example.org",
            "emailCarbonCopies": ["cc@example.com"],
            "emailBlindCarbonCopies": ["bcc@example.com"],
        }
    )
    [mail] = outbox_mails(outbox)
    assert mail["From"] == "team@example.org"
    assert mail["Cc"] == "cc@example.com"
    assert "Bcc" not in mail
    assert mail["X-Envelope-Bcc"] == "bcc@example.com"
    assert mail["Message-ID"] and mail["Date"]


async def test_configured_sender_is_the_default(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com", "phoneNumber": "+15550000001"})
    await dispatcher.send(
        {"channels": ["email", "sms"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "C"}
    )
    assert outbox_mails(outbox)[0]["From"] == "noreply@example.com"
    assert outbox_records(outbox, "sms")[0]["sender"] == "+15550009999"


async def test_custom_user_fields(make_settings: Any, database: Any, outbox: Path) -> None:
    from dispatcher import open_dispatcher

    settings = make_settings(user_fields={"id": "login", "phone_number": "mobile", "clusters": "groups"})
    database.users.insert_many(
        [
            {"login": "ada", "mobile": "+15550000001", "groups": ["g"]},
            {"login": "bob", "mobile": "+15550000002", "groups": ["h"]},
        ]
    )
    async with open_dispatcher(settings) as d:
        result = await d.send(
            {
                "channels": ["sms"],
                "recipients": ["ada", "nobody"],
                "clusters": ["h"],
                "messageContent": "hi {{ user.login }}",
            }
        )
    assert sorted(r["body"] for r in outbox_records(outbox, "sms")) == ["hi ada", "hi bob"]
    assert [(f.user_id, f.error) for f in result.failures] == [("nobody", "user not found")]


async def test_large_cluster_streams_through_small_buffers(make_settings: Any, database: Any, outbox: Path) -> None:
    from dispatcher import open_dispatcher

    database.users.insert_many(
        [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(600)]
    )
    settings = make_settings(dispatcher={"queue_size": 2, "store_batch_size": 50})
    async with open_dispatcher(settings) as d:
        result = await d.send({"channels": ["sms", "voice"], "clusters": ["all"], "messageContent": "x"})
    assert result.summary.users == 600
    assert result.summary.sent == {"sms": 600, "voice": 600}
    assert len({r["userId"] for r in outbox_records(outbox, "sms")}) == 600


async def test_http_send_answers_failures_and_summary(client: Any, database: Any) -> None:
    database.users.insert_many(
        [{"_id": "u1", "emailAddress": "u1@example.com", "clusters": ["c"]}, {"_id": "u2", "clusters": ["c"]}]
    )
    response = await client.post(
        "/send",
        json={
            "channels": ["email"],
            "recipients": ["missing"],
            "clusters": ["c"],
            "messageTitle": "T",
            "messageContent": "C",
        },
    )
    assert response.status_code == 200
    body = await response.get_json()
    # The predecessor's shape, plus the job's id (also in Location).
    assert body == {
        "failures": [{"userId": "missing", "channel": "email", "error": "user not found"}],
        "summary": {"users": 2, "sent": {"email": 1}, "skipped": {"email": 1}, "failed": {"email": 1}},
        "id": response.headers["Location"].removeprefix("/send/"),
    }
