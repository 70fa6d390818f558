"""Property-based `POST /send`: whatever the body, never a 500, errors in the documented shape,
nothing sent for a rejected request, and the service still answers afterwards.

The tests are synchronous Hypothesis tests that call `trio.run` once per example, each run opening
a dispatcher and the app (lifespan included) on the test's database and outbox. pytest-trio can
run `@given` on an async test, but it sets the async fixtures up once and reuses them, closed, in
the next examples' event loops. Examples are bounded (`max_examples`) and run without deadline;
the file takes well under a minute.
"""

from __future__ import annotations

import json
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
import trio
from hypothesis import HealthCheck, given, settings, strategies as st

from dispatcher import Settings, open_dispatcher
from dispatcher.app import create_app
from dispatcher.channels import CHANNELS

FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Any Unicode, lone surrogates included (Hypothesis leaves category Cs out unless asked).
ANY_CHAR = st.characters(codec=None, categories=None)
WEIRD_TEXT = st.text(ANY_CHAR, max_size=40) | st.sampled_from(
    [
        "",
        " ",
        "\ud800",
        "a\udfffb",
        "\r\n",
        "x\x00y",
        "\u2028",
        "\u202e",
        "{{ user.name }}",
        "{{",
        "{% if %}",
        "{{ user.__class__ }}",
        "{{ 'a' * 100000000 }}",
        "u1",
        "beta",
        "email",
        "a@example.com",
        "65a000000000000000000001",
    ]
)
HUGE_TEXT = st.builds(lambda n, c: c * n, st.integers(1, 700_000), st.sampled_from(["x", "é", "\n", "{", "\ud800"]))
TEXT = WEIRD_TEXT | HUGE_TEXT

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | WEIRD_TEXT
JSON = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(WEIRD_TEXT, inner, max_size=4), max_leaves=20
)


def _nest(depth: int, kind: str) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind == "list" else {"a": value}
    return value


def _deep_text(depth: int, kind: str) -> str:
    return "[" * depth + "]" * depth if kind == "list" else '{"a":' * depth + "1" + "}" * depth


KINDS = st.sampled_from(["list", "object"])
# Values for a field: deep enough to matter, shallow enough for json.dumps to write them.
DEEP = st.builds(_nest, st.integers(1, 400), KINDS)
# Whole bodies, written as text: nesting no recursive parser survives.
DEEP_BODIES = st.builds(
    lambda depth, kind, where: (where % _deep_text(depth, kind)).encode(),
    st.integers(1, 50_000),
    KINDS,
    st.sampled_from(
        [
            "%s",
            '{"channels": ["sms"], "recipients": ["u1"], "messageContent": "x", "data": {"k": %s}}',
            '{"channels": %s}',
            '{"recipients": ["u1", %s]}',
        ]
    ),
)


def _strings(element: st.SearchStrategy[Any] = TEXT) -> st.SearchStrategy[Any]:
    return st.lists(element, max_size=5)


# Per field: something plausible (usually), or anything at all.
PLAUSIBLE: dict[str, st.SearchStrategy[Any]] = {
    "channels": st.lists(st.sampled_from(sorted(CHANNELS)), min_size=1, max_size=4, unique=True),
    "recipients": st.lists(st.sampled_from(["u1", "u2", "nobody"]), min_size=1, max_size=3),
    "clusters": st.lists(st.sampled_from(["beta", "gamma"]), max_size=2),
    "templateId": st.sampled_from(["65a000000000000000000001", "65a000000000000000000099"]),
    "messageTitle": st.just("Hello {{ data.x }}") | WEIRD_TEXT,
    "messageContent": st.just("Hi {{ user.name }}") | WEIRD_TEXT,
    "data": st.dictionaries(WEIRD_TEXT, JSON, max_size=4),
    "emailAttachments": st.lists(WEIRD_TEXT, max_size=2),
    "emailCarbonCopies": st.lists(st.sampled_from(["cc@example.com", "bad@", "a@b.c\r\nBcc: x@y.z"]), max_size=2),
    "emailBlindCarbonCopies": st.lists(st.just("bcc@example.com") | WEIRD_TEXT, max_size=2),
    "emailSender": st.just("from@example.com") | WEIRD_TEXT,
}
ANYTHING = JSON | TEXT | _strings() | DEEP
# Always there (plausible or not), so that many bodies get past the first checks.
ALWAYS = {"channels", "recipients", "messageContent"}


@st.composite
def valid_ish_bodies(draw: st.DrawFn) -> bytes:
    body: dict[str, Any] = {}
    for name, plausible in PLAUSIBLE.items():
        if name in ALWAYS or draw(st.booleans()):
            body[name] = draw(ANYTHING if draw(st.integers(0, 4)) == 4 else plausible)
    if draw(st.integers(0, 4)) == 4:
        body.update(draw(st.dictionaries(WEIRD_TEXT, JSON, max_size=2)))
    return _encode(body)


def _encode(value: Any) -> bytes:
    # ensure_ascii: lone surrogates travel as \ud800 escapes, as a JavaScript client sends them.
    return json.dumps(value).encode()


BODIES = (
    valid_ish_bodies()
    | JSON.map(_encode)
    | st.binary(max_size=2_000)
    | DEEP_BODIES
    | st.builds(
        lambda n: b'{"channels": ["sms"], "recipients": ["u1"], "messageContent": "' + b"x" * n + b'"}',
        st.integers(0, 1_040_000),
    )
)


@pytest.fixture
def seeded(database: Any) -> None:
    database.users.insert_many(
        [
            {
                "_id": "u1",
                "name": "Ada",
                "emailAddress": "u1@example.com",
                "phoneNumber": "+15550000001",
                "deviceToken": "tok-1",
                "clusters": ["beta"],
            },
            {"_id": "u2", "emailAddress": "u2@example.com", "clusters": ["beta"]},
        ]
    )
    database.message_templates.insert_one(
        {
            "_id": "65a000000000000000000001",
            "emailTitle": "T {{ data.x }}",
            "emailMessage": "M",
            "smsMessage": "S",
            "pushTitle": "P",
            "voiceMessage": "V",
        }
    )


def _sent(outbox: Path) -> int:
    return sum(1 for path in outbox.rglob("*") if path.is_file()) if outbox.exists() else 0


async def _check(settings: Settings, outbox: Path, raw: bytes) -> None:
    async with open_dispatcher(settings) as dispatcher, create_app(dispatcher).test_app() as app:
        client = app.test_client()
        before = _sent(outbox)
        response = await client.post("/send", data=raw, headers={"content-type": "application/json"})
        status = response.status_code
        assert status in (200, 400, 413), (status, await response.get_data())
        assert response.content_type == "application/json"
        body = await response.get_json()
        if status == 200:
            assert {"failures", "summary"} <= set(body)
        else:
            assert set(body) == {"statusCode", "error", "message"}
            assert body["statusCode"] == status
            assert body["error"] == HTTPStatus(status).phrase
            assert isinstance(body["message"], str) and 0 < len(body["message"]) < 1_000
            body["message"].encode("utf-8")
            assert _sent(outbox) == before, "a rejected request sent something"
        assert (await client.get("/-/healthz")).status_code == 200


@pytest.fixture
def settings_for_fuzz(make_settings: Any, seeded: None) -> Settings:
    # No drain wait on leaving each example's dispatcher: every send has finished by then.
    return make_settings(dispatcher={"drain_timeout_seconds": 1})


@FUZZ
@given(raw=BODIES)
def test_any_body_is_answered_in_the_documented_shape(settings_for_fuzz: Settings, outbox: Path, raw: bytes) -> None:
    trio.run(_check, settings_for_fuzz, outbox, raw)


@FUZZ
@given(body=valid_ish_bodies())
def test_valid_ish_bodies_are_answered_in_the_documented_shape(
    settings_for_fuzz: Settings, outbox: Path, body: bytes
) -> None:
    trio.run(_check, settings_for_fuzz, outbox, body)
