"""Hostile or careless input: always a 4xx in the documented shape naming the field, never a 500,
never an echo of a huge value, nothing sent; and an early answer does not wedge the connection."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve as hypercorn_serve

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.models import MAX_DEPTH, shown


def _valid(**overrides: Any) -> dict[str, Any]:
    body = {"channels": ["email"], "recipients": ["u1"], "messageTitle": "T", "messageContent": "C"}
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not None}


async def _post_raw(client: Any, raw: bytes | str) -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    return await client.post("/send", data=data, headers={"content-type": "application/json"})


async def _error(response: Any, status: int = 400) -> str:
    assert response.status_code == status
    assert response.content_type == "application/json"
    body = await response.get_json()
    assert set(body) == {"statusCode", "error", "message"}
    assert body["statusCode"] == status
    return body["message"]


@pytest.fixture
def user(database: Any) -> None:
    database.users.insert_one(
        {
            "_id": "u1",
            "emailAddress": "u1@example.com",
            "phoneNumber": "+15550000001",
            "deviceToken": "tok-1",
            "clusters": ["beta"],
        }
    )


# --- 1. input that used to be a 500, or accepted and then failed every delivery ---------------


@pytest.mark.parametrize(
    "raw",
    [
        '{"channels": ' + "[" * 10_000 + "]" * 10_000 + "}",
        '{"data": ' + '{"a": ' * 10_000 + "1" + "}" * 10_000 + "}",
        "[" * 100_000,
    ],
)
async def test_json_nested_ten_thousand_levels_is_400(client: Any, outbox: Path, raw: str) -> None:
    assert "nested too deeply" in await _error(await _post_raw(client, raw))
    assert not outbox.exists()


async def test_data_nested_past_the_limit_is_400_naming_the_field(client: Any, user: None, outbox: Path) -> None:
    deep: Any = "leaf"
    for _ in range(MAX_DEPTH):
        deep = {"a": deep}
    assert (await client.post("/send", json=_valid(data=deep))).status_code == 200
    message = await _error(await client.post("/send", json=_valid(data={"a": deep})))
    assert message == f"data: nested deeper than {MAX_DEPTH} levels"
    # Deep enough to trouble a recursive parser or encoder, shallow enough for json.loads.
    message = await _error(
        await _post_raw(
            client,
            '{"channels": ["sms"], "recipients": ["u1"], "messageContent": "x", "data": ' + "[" * 900 + "]" * 900 + "}",
        )
    )
    assert message == f"data: nested deeper than {MAX_DEPTH} levels"
    assert len(list((outbox / "email").iterdir())) == 1  # only the valid request sent anything


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"recipients": ["u1", "\ud800"]}, "recipients[1]"),
        ({"recipients": None, "clusters": ["\udfff"]}, "clusters[0]"),
        ({"messageTitle": "Hi \ud800"}, "messageTitle"),
        ({"messageContent": "\udc00 {{ user.name }}"}, "messageContent"),
        ({"data": {"plan": {"name": "Pro\ud83d"}}}, "data.plan.name"),
        ({"data": {"items": [1, "\ud800"]}}, "data.items[1]"),
        ({"data": {"\ud800": 1}}, "data: key"),
        ({"templateId": "\ud800"}, "templateId"),
        ({"emailSender": "a\ud800@example.com"}, "emailSender"),
        ({"emailCarbonCopies": ["\ud800@example.com"]}, "emailCarbonCopies[0]"),
        ({"emailAttachments": ["\ud800.pdf"]}, "emailAttachments[0]"),
    ],
)
async def test_lone_surrogate_anywhere_is_400_naming_the_field(
    client: Any, user: None, outbox: Path, overrides: dict[str, Any], field: str
) -> None:
    raw = json.dumps(_valid(**overrides))  # ensure_ascii: the surrogate travels as "\ud800"
    assert "\\u" in raw
    message = await _error(await _post_raw(client, raw))
    assert message.startswith(field)
    assert "Unicode" in message
    message.encode("utf-8")  # the answer itself is valid text
    assert not outbox.exists()


async def test_lone_surrogate_in_an_unknown_field_is_ignored(client: Any, user: None) -> None:
    response = await _post_raw(client, json.dumps(_valid(somethingNew="\ud800")))
    assert response.status_code == 200


@pytest.mark.parametrize(
    "name",
    [
        "report\r\nContent-Type: text/html.pdf",
        "a\nb.pdf",
        "a\x00.pdf",
        "a\tb.pdf",
        "invoice\u202efdp.exe",
        "a\u2028b.pdf",
    ],
)
async def test_control_character_in_attachment_name_is_400(client: Any, outbox: Path, name: str) -> None:
    message = await _error(await client.post("/send", json=_valid(emailAttachments=["ok.pdf", name])))
    assert message.startswith("emailAttachments: ")
    assert "control character" in message
    assert "\n" not in message and "\r" not in message
    assert not outbox.exists()


@pytest.mark.parametrize(
    "field, value",
    [
        ("emailSender", "from@example.com\r\nBcc: victim@example.com"),
        ("emailSender", "from@example.com\n"),
        ("emailSender", "from@example.com\u2028"),
        ("emailCarbonCopies", ["cc@example.com\r\nBcc: victim@example.com"]),
        ("emailBlindCarbonCopies", ["bcc@example.com\r"]),
        ("emailBlindCarbonCopies", ["bcc@exam\u2029ple.com"]),
    ],
)
async def test_line_breaks_in_addresses_are_400(client: Any, outbox: Path, field: str, value: Any) -> None:
    message = await _error(await client.post("/send", json=_valid(**{field: value})))
    assert message.startswith(f"{field}: ")
    assert "not a valid e-mail address" in message
    assert not outbox.exists()


@pytest.mark.parametrize(
    "data, message",
    [
        ('{"n": 100000000000000000000}', "data.n: integer out of range (64 bits at most)"),
        ('{"n": [1, -9223372036854775809]}', "data.n[1]: integer out of range (64 bits at most)"),
        ('{"n": 1e999}', "data.n: number out of range"),
        ('{"a\\u0000b": 1}', "data: key 'a\\x00b' contains a NUL character"),
    ],
)
async def test_data_the_store_cannot_hold_is_400(
    client: Any, user: None, outbox: Path, data: str, message: str
) -> None:
    # The accepted request is recorded in MongoDB: BSON has 64-bit integers and NUL-free keys.
    raw = '{"channels": ["sms"], "recipients": ["u1"], "messageContent": "x", "data": ' + data + "}"
    assert await _error(await _post_raw(client, raw)) == message
    assert not outbox.exists()


@pytest.mark.parametrize("content", ["{{ " + "1 + " * 3000 + "1 }}", "{{ " + "(" * 2000 + "1" + ")" * 2000 + " }}"])
async def test_template_nested_too_deeply_to_compile_is_400(client: Any, outbox: Path, content: str) -> None:
    message = await _error(await client.post("/send", json=_valid(messageContent=content)))
    assert message.startswith("messageContent: ")
    assert not outbox.exists()


@pytest.mark.parametrize("raw", ['{"channels": ["email"], "data": {"x": NaN}}', '{"data": Infinity}'])
async def test_non_json_constants_are_400(client: Any, raw: str) -> None:
    assert "malformed JSON" in await _error(await _post_raw(client, raw))


# --- 2. echoed values are shortened ---------------------------------------------------------


def test_shown_is_repr_for_short_values() -> None:
    assert shown("fax") == "'fax'"
    assert shown("\ud800") == "'\\ud800'"
    assert shown(42) == "42"


def test_shown_shortens_long_values_with_their_length() -> None:
    text = shown("x" * 500_000)
    assert text.startswith("'xxx") and text.endswith("… (500000 characters)")
    assert len(text) < 120
    assert len(shown(list(range(100_000)))) < 120


def test_shown_survives_deep_values() -> None:
    deep: Any = []
    for _ in range(100_000):
        deep = [deep]
    assert len(shown(deep)) < 120


@pytest.mark.parametrize(
    "overrides",
    [
        {"channels": ["x" * 500_000]},
        {"emailSender": "x" * 500_000},
        {"emailCarbonCopies": ["x" * 500_000]},
        {"emailAttachments": ["x\n" * 250_000]},
        {"data": {"k" * 500_000: "\ud800"}},
    ],
)
async def test_error_messages_do_not_echo_huge_values(client: Any, overrides: dict[str, Any]) -> None:
    message = await _error(await _post_raw(client, json.dumps(_valid(**overrides))))
    assert len(message) < 300
    assert "…" in message


async def test_unknown_huge_template_id_is_not_echoed(client: Any) -> None:
    message = await _error(await client.post("/send", json=_valid(templateId="t" * 500_000)))
    assert message.startswith("templateId: no template")
    assert len(message) < 300


# --- 4. messages written for the client -----------------------------------------------------


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"channels": None}, "channels: must be a non-empty array"),
        ({"channels": []}, "channels: must be a non-empty array"),
        ({"channels": "email"}, "channels: must be a non-empty array"),
        ({"channels": {"email": True}}, "channels: must be a non-empty array"),
        ({"channels": ["email", 1]}, "channels: must be an array of strings"),
        ({"recipients": "u1"}, "recipients: must be an array of strings"),
        ({"recipients": [["u1"]]}, "recipients: must be an array of strings"),
        ({"clusters": "beta"}, "clusters: must be an array of strings"),
        ({"clusters": [1]}, "clusters: must be an array of strings"),
        ({"emailAttachments": "a.pdf"}, "emailAttachments: must be an array of strings"),
        ({"emailCarbonCopies": [None]}, "emailCarbonCopies: must be an array of strings"),
        ({"emailBlindCarbonCopies": True}, "emailBlindCarbonCopies: must be an array of strings"),
        ({"data": [1, 2]}, "data: must be an object"),
        ({"data": "plan=Pro"}, "data: must be an object"),
        ({"messageTitle": 1}, "messageTitle: must be a string"),
        ({"messageContent": ["C"]}, "messageContent: must be a string"),
        ({"templateId": 5}, "templateId: must be a string"),
        ({"emailSender": ["a@example.com"]}, "emailSender: must be a string"),
    ],
)
async def test_validation_messages_are_plain_words(
    client: Any, outbox: Path, overrides: dict[str, Any], message: str
) -> None:
    assert await _error(await client.post("/send", json=_valid(**overrides))) == message
    assert not outbox.exists()


# --- 5. empty content -----------------------------------------------------------------------


@pytest.mark.parametrize("content", ["", "   ", "\n\t "])
async def test_empty_message_content_is_400(client: Any, user: None, outbox: Path, content: str) -> None:
    body = _valid(channels=["sms"], messageContent=content)
    assert await _error(await client.post("/send", json=body)) == "messageContent: must not be empty"
    assert not outbox.exists()


async def test_empty_message_content_is_ignored_with_a_template(client: Any, user: None, database: Any) -> None:
    template_id = database.message_templates.insert_one({"smsMessage": "Hi"}).inserted_id
    response = await client.post("/send", json=_valid(channels=["sms"], messageContent="", templateId=str(template_id)))
    assert response.status_code == 200
    assert (await response.get_json())["summary"]["sent"] == {"sms": 1}


# --- 3. an early answer on a real server ----------------------------------------------------


@pytest.fixture
async def server_url(make_settings: Any) -> AsyncIterator[str]:
    """The app on a real hypercorn server, on a port of its own, with a 1000-byte body limit."""
    async with open_dispatcher(make_settings(server={"max_body_bytes": 1000})) as d:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.graceful_timeout = 1
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            urls = await nursery.start(partial(hypercorn_serve, create_app(d), config, shutdown_trigger=stop.wait))
            try:
                yield urls[0]
            finally:
                stop.set()


async def _chunks(size: int, count: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(lambda: b"x" * 5_000_000, id="content-length"),
        pytest.param(lambda: _chunks(65_536, 80), id="chunked"),
        # 6.5 GB: only closing the connection, not reading the rest, answers this in time.
        pytest.param(lambda: _chunks(65_536, 100_000), id="endless"),
    ],
)
async def test_413_leaves_the_connection_usable(server_url: str, body: Any) -> None:
    # One client, one pooled connection, a timeout short enough to fail fast on a wedged one.
    async with httpx.AsyncClient(base_url=server_url, timeout=3, limits=httpx.Limits(max_connections=1)) as http:
        with trio.fail_after(10):
            response = await http.post("/send", content=body(), headers={"content-type": "application/json"})
        assert response.status_code == 413
        assert response.json() == {
            "statusCode": 413,
            "error": "Request Entity Too Large",
            "message": "body larger than 1000 bytes",
        }
        assert response.headers["connection"] == "close"
        for _ in range(3):
            response = await http.get("/-/healthz")
            assert response.status_code == 200
            assert "connection" not in response.headers  # read its (empty) body: kept alive
        response = await http.post("/send", json={"channels": ["fax"]})
        assert response.status_code == 400
        assert "connection" not in response.headers


async def test_early_404_to_a_large_post_leaves_the_connection_usable(server_url: str) -> None:
    async with httpx.AsyncClient(base_url=server_url, timeout=3, limits=httpx.Limits(max_connections=1)) as http:
        with trio.fail_after(10):
            response = await http.post("/nowhere", content=_chunks(65_536, 100_000))
        assert response.status_code == 404
        assert response.json()["message"] == "no route POST /nowhere"
        assert (await http.get("/-/healthz")).status_code == 200


# --- 6. OPTIONS (on the real server: the test client re-adds a default Content-Type) ---------


@pytest.mark.parametrize("path, methods", [("/send", {"POST", "OPTIONS"}), ("/-/healthz", {"GET", "OPTIONS"})])
async def test_options_is_204_with_allow(server_url: str, path: str, methods: set[str]) -> None:
    async with httpx.AsyncClient(base_url=server_url, timeout=3) as http:
        response = await http.options(path)
    assert response.status_code == 204
    assert methods <= {m.strip() for m in response.headers["Allow"].split(",")}
    assert "content-type" not in response.headers
    assert response.content == b""


async def test_options_on_an_unknown_route_is_json_404(client: Any) -> None:
    assert await _error(await client.options("/nowhere"), 404) == "no route OPTIONS /nowhere"


async def test_expect_100_continue_with_a_body_too_large_is_413_at_once(make_settings: Any) -> None:
    """No `100 Continue` for a body over the limit: the 413 comes before the client sends it."""
    from dispatcher.cli import serve
    from dispatcher.embedded_store import free_port

    settings = make_settings(server={"max_body_bytes": 1000, "port": free_port()})
    async with trio.open_nursery() as nursery:
        [url] = await nursery.start(partial(serve, settings))
        port = int(url.rsplit(":", 1)[1])
        head = (
            "POST /send HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
            "Content-Length: 10000000000\r\nExpect: 100-continue\r\n\r\n"
        )
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(head.encode())
            received = b""
            with trio.fail_after(5):
                while b"\r\n\r\n" not in received:
                    chunk = await stream.receive_some()
                    assert chunk, received
                    received += chunk
        assert received.startswith(b"HTTP/1.1 413"), received[:200]
        # A small body with the same header still gets its 100 Continue and an answer.
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            response = await http.post("/send", json={"channels": ["fax"]}, headers={"Expect": "100-continue"})
            assert response.status_code == 400
        nursery.cancel_scope.cancel()
