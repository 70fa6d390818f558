"""Every invalid request answers 4xx in the documented shape, and nothing is sent."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

from dispatcher import open_dispatcher
from dispatcher.app import create_app


def _valid(**overrides: Any) -> dict[str, Any]:
    body = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "C"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def _assert_error(response: Any, status: int, *fragments: str) -> None:
    assert response.status_code == status
    assert response.content_type == "application/json"
    body = await response.get_json()
    assert body["statusCode"] == status
    assert isinstance(body["statusCode"], int)
    assert (
        body["error"]
        == {
            400: "Bad Request",
            404: "Not Found",
            405: "Method Not Allowed",
            413: "Request Entity Too Large",
            502: "Bad Gateway",
        }[status]
    )
    for fragment in fragments:
        assert fragment in body["message"]


@pytest.mark.parametrize(
    "body, fragments",
    [
        (_valid(channels=["fax"]), ["channels", "'fax' is not a supported channel"]),
        (_valid(channels=[]), ["channels"]),
        (_valid(channels=None), ["channels"]),
        (_valid(channels="email"), ["channels"]),
        (_valid(channels=["email", "email"]), ["channels", "more than once"]),
        (_valid(recipients=None), ["recipients or clusters"]),
        (_valid(recipients=[], clusters=[]), ["recipients or clusters"]),
        (_valid(recipients=[1, 2]), ["recipients"]),
        (_valid(messageContent=None), ["messageContent"]),
        (_valid(messageTitle=None), ["messageTitle"]),
        (_valid(channels=["push"], messageTitle=None), ["messageTitle"]),
        (_valid(emailCarbonCopies=["not-an-address"]), ["emailCarbonCopies", "not-an-address"]),
        (_valid(emailBlindCarbonCopies=["a@b.c", "x@"]), ["emailBlindCarbonCopies", "'x@'"]),
        (_valid(emailSender="nobody"), ["emailSender", "nobody"]),
        (_valid(data=[1, 2]), ["data"]),
        (_valid(messageContent="{{ user.name "), ["messageContent", "does not compile"]),
        (_valid(messageTitle="{{#if}}x{{/if}}"), ["messageTitle", "does not compile"]),
        # Request texts are Handlebars by default: Jinja's filters are not its syntax.
        (_valid(messageContent="{{ user.name|upper }}"), ["messageContent", "does not compile"]),
        (_valid(templateId="65a000000000000000000099"), ["templateId", "no template"]),
        (_valid(emailAttachments=["a.pdf"]), ["emailAttachments", "no Files Service"]),
        ([1, 2, 3], ["JSON object"]),
    ],
)
async def test_invalid_request_is_400_naming_the_problem(
    client: Any, outbox: Path, body: Any, fragments: list[str]
) -> None:
    response = await client.post("/send", json=body)
    await _assert_error(response, 400, *fragments)
    assert not outbox.exists()


async def test_sms_without_title_is_valid(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    response = await client.post("/send", json=_valid(channels=["sms"], messageTitle=None))
    assert response.status_code == 200
    assert (await response.get_json())["summary"]["sent"] == {"sms": 1}


async def test_malformed_json_is_400(client: Any) -> None:
    response = await client.post("/send", data=b'{"channels": [', headers={"content-type": "application/json"})
    await _assert_error(response, 400, "malformed JSON")


async def test_non_utf8_body_is_400(client: Any) -> None:
    response = await client.post("/send", data=b"\xff\xfe{", headers={"content-type": "application/json"})
    await _assert_error(response, 400, "malformed JSON")


async def test_body_over_limit_is_413(make_settings: Any, outbox: Path) -> None:
    async with open_dispatcher(make_settings(server={"max_body_bytes": 1000})) as d:
        async with create_app(d).test_app() as app:
            response = await app.test_client().post("/send", json=_valid(messageContent="x" * 2000))
            await _assert_error(response, 413, "1000 bytes")
    assert not outbox.exists()


async def test_inactive_channel_is_400(make_settings: Any) -> None:
    async with open_dispatcher(make_settings(channels={"active": ["email"]})) as d:
        async with create_app(d).test_app() as app:
            response = await app.test_client().post("/send", json=_valid(channels=["email", "sms"]))
            await _assert_error(response, 400, "'sms' is not an active channel")


async def test_template_missing_channel_text_is_400(client: Any, database: Any, outbox: Path) -> None:
    template_id = database.message_templates.insert_one(
        {"name": "mail only", "emailTitle": "T", "emailMessage": "M"}
    ).inserted_id
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com", "phoneNumber": "+15550000001"})
    response = await client.post(
        "/send", json={"channels": ["email", "sms"], "recipients": ["u1"], "templateId": str(template_id)}
    )
    await _assert_error(response, 400, "templateId", "sms", "smsMessage")
    assert not outbox.exists()


async def test_template_that_does_not_compile_is_400(client: Any, database: Any) -> None:
    template_id = database.message_templates.insert_one({"smsMessage": "Hi {{ user.name"}).inserted_id
    response = await client.post(
        "/send", json={"channels": ["sms"], "recipients": ["u1"], "templateId": str(template_id)}
    )
    await _assert_error(response, 400, "smsMessage", "does not compile")


async def test_template_over_size_limit_is_400(make_settings: Any) -> None:
    async with open_dispatcher(make_settings(templates={"max_template_chars": 10})) as d:
        async with create_app(d).test_app() as app:
            response = await app.test_client().post("/send", json=_valid(messageContent="x" * 11))
            await _assert_error(response, 400, "messageContent", "longer than 10")


@pytest.mark.parametrize(
    "method, path, status",
    [
        ("GET", "/nowhere", 404),
        ("PUT", "/send", 405),
        ("DELETE", "/send", 405),
        ("POST", "/-/healthz", 405),
    ],
)
async def test_unknown_route_or_method_is_json(client: Any, method: str, path: str, status: int) -> None:
    response = await client.open(path, method=method)
    await _assert_error(response, status)
    if status == 405:
        allowed = {m.strip() for m in response.headers["Allow"].split(",")}
        assert method not in allowed and ("POST" if path == "/send" else "GET") in allowed


async def test_health_and_ready(client: Any) -> None:
    assert (await client.get("/-/healthz")).status_code == 200
    response = await client.get("/-/ready")
    assert response.status_code == 200
    assert (await response.get_json())["status"] == "ready"


async def test_unknown_fields_are_ignored(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    response = await client.post("/send", json=_valid(somethingNew=True, priority="high"))
    assert response.status_code == 200
    assert (await response.get_json())["summary"]["sent"] == {"email": 1}


async def test_store_down_is_503_not_500(make_settings: Any) -> None:
    from dispatcher.embedded_store import free_port

    settings = make_settings(store={"url": f"mongodb://127.0.0.1:{free_port()}/?serverSelectionTimeoutMS=300"})
    async with open_dispatcher(settings) as d:
        async with create_app(d).test_app() as app:
            client = app.test_client()
            response = await client.post("/send", json=_valid(templateId="65a000000000000000000001"))
            assert response.status_code == 503
            assert (await response.get_json())["message"] == "the user and template store is unavailable"
            assert (await client.get("/-/ready")).status_code == 503


async def test_bug_in_an_actor_is_a_logged_500(
    client: Any, database: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from dispatcher.plan import ChannelPlan

    def broken(self: ChannelPlan, user: Any, data: Any, rendered: Any = None) -> None:
        raise ZeroDivisionError("simulated bug")

    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    monkeypatch.setattr(ChannelPlan, "message_for", broken)
    response = await client.post("/send", json=_valid())
    assert response.status_code == 500
    body = await response.get_json()
    assert body == {
        "statusCode": 500,
        "error": "Internal Server Error",
        "message": "internal error; see the service log",
    }
    assert "ZeroDivisionError: simulated bug" in caplog.text
    # The service keeps working after the bug.
    monkeypatch.undo()
    assert (await client.post("/send", json=_valid())).status_code == 200


@pytest.mark.parametrize("key", ["", "   ", "\t", "a\x00b", "line\nbreak", "x" * 257])
async def test_a_blank_or_control_or_overlong_idempotency_key_is_400(client: Any, database: Any, key: str) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    response = await client.post("/send", json=_valid(idempotencyKey=key))
    await _assert_error(response, 400, "idempotencyKey")
    if key.isprintable() or key.strip() == "":  # what a header can carry
        response = await client.post("/send", json=_valid(), headers={"Idempotency-Key": key})
        await _assert_error(response, 400, "Idempotency-Key")
    assert database.dispatch_jobs.count_documents({}) == 0


async def test_an_idempotency_key_of_256_characters_is_one_limit_everywhere(client: Any, database: Any) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com"})
    key = "k" * 256
    assert (await client.post("/send", json=_valid(), headers={"Idempotency-Key": key})).status_code == 200
    assert (await client.post("/send", json=_valid(idempotencyKey="j" * 256))).status_code == 200
    document = await (await client.get("/-/openapi.json")).get_json()
    [header] = [p for p in document["paths"]["/send"]["post"]["parameters"] if p.get("name") == "Idempotency-Key"]
    field = document["components"]["schemas"]["SendRequest"]["properties"]["idempotencyKey"]
    field = next((s for s in field.get("anyOf", [field]) if s.get("type") == "string"), field)
    assert header["schema"]["maxLength"] == field["maxLength"] == 256
    assert header["schema"]["pattern"] == field["pattern"]


async def test_an_outbox_that_becomes_unwritable_fails_readiness(client: Any, outbox: Path) -> None:
    assert (await client.get("/-/ready")).status_code == 200
    shutil.rmtree(outbox, ignore_errors=True)
    outbox.write_text("no longer a directory")  # a read-only mount as root would too
    response = await client.get("/-/ready")
    assert response.status_code == 503
    body = await response.get_json()
    assert body["statusCode"] == 503 and body["message"] == "not ready: the outbox directory cannot be written"
