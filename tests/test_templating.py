"""Interpolation in the sandbox: the predecessor's syntax, helpers, escaping and limits."""

from __future__ import annotations

import re
from datetime import datetime, UTC
from pathlib import Path
from typing import Any

import pytest

from dispatcher import Dispatcher, RequestError
from dispatcher.errors import RenderError
from dispatcher.templating import Renderer

from outbox_files import outbox_mails, outbox_records


@pytest.fixture
def renderer() -> Renderer:
    return Renderer(default_locale="en-US", max_template_chars=1000, max_rendered_chars=200)


def render(renderer: Renderer, source: str, html: bool = False, **context: Any) -> str:
    ctx = {"user": context.get("user", {}), "data": context.get("data", {})}
    return renderer.compile(source, html=html).render_here(ctx)


def test_handlebars_style_and_spaced_expressions(renderer: Renderer) -> None:
    assert render(renderer, "{{user.name}} / {{ data.x }}", user={"name": "Ada"}, data={"x": 3}) == "Ada / 3"


def test_missing_values_render_empty(renderer: Renderer) -> None:
    assert render(renderer, "[{{ user.nope }}][{{ data.a.b.c }}][{{ nothing }}]") == "[][][]"


def test_html_is_escaped_only_when_asked(renderer: Renderer) -> None:
    user = {"name": "<b>&</b>"}
    assert render(renderer, "{{ user.name }}", user=user) == "<b>&</b>"
    assert render(renderer, "<p>{{ user.name }}</p>", html=True, user=user) == "<p>&lt;b&gt;&amp;&lt;/b&gt;</p>"


@pytest.mark.parametrize(
    "source",
    [
        "{{ user.__class__ }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ dateNow.__globals__ }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    ],
)
def test_sandbox_blocks_escapes(renderer: Renderer, source: str) -> None:
    with pytest.raises(RenderError):
        render(renderer, source, user={"name": "x"})


def test_output_size_is_limited(renderer: Renderer) -> None:
    with pytest.raises(RenderError, match="exceeds"):
        render(renderer, "{% for i in range(1000) %}xxxxx{% endfor %}")
    with pytest.raises(RenderError, match="repetition"):
        render(renderer, "{{ 'a' * 10000000 }}")
    with pytest.raises(RenderError, match="exponent"):
        render(renderer, "{{ 10 ** 100000000 }}")
    assert render(renderer, "{{ 'ab' * 3 }}{{ 2 ** 10 }}") == "ababab1024"


def test_template_size_is_limited(renderer: Renderer) -> None:
    with pytest.raises(RequestError, match="longer than 1000"):
        renderer.compile("x" * 1001)


def test_date_now_is_current_utc_iso(renderer: Renderer) -> None:
    text = render(renderer, "{{ dateNow() }}")
    moment = datetime.fromisoformat(text)
    assert moment.tzinfo is not None
    assert abs((moment - datetime.now(UTC)).total_seconds()) < 60


@pytest.mark.parametrize(
    "value, fmt, tz, expected",
    [
        ("2026-03-05T14:07:09Z", "DD/MM/YYYY HH:mm", None, "05/03/2026 14:07"),
        ("2026-03-05T14:07:09Z", "DD/MM/YYYY HH:mm", "Europe/Rome", "05/03/2026 15:07"),
        ("2026-07-05T14:07:09Z", "D/M/YY H:m:s", "America/New_York", "5/7/26 10:7:9"),
        ("2026-03-05T14:07:09.250Z", "hh:mm A [at] SSS Z", "Asia/Kolkata", "07:37 PM at 250 +05:30"),
        ("2026-03-05T14:07:09Z", "dddd, MMMM D", None, "Thursday, March 5"),
        ("2026-03-05T14:07:09Z", "ddd MMM", None, "Thu Mar"),
        (1772719629000, "YYYY-MM-DD HH:mm:ss", None, "2026-03-05 14:07:09"),
        (1772719629, "YYYY-MM-DD HH:mm:ss", None, "2026-03-05 14:07:09"),
    ],
)
def test_date_format_uses_dayjs_tokens(renderer: Renderer, value: Any, fmt: str, tz: str | None, expected: str) -> None:
    call = "dateFormat(data.v, data.f)" if tz is None else "dateFormat(data.v, data.f, data.tz)"
    assert render(renderer, "{{ " + call + " }}", data={"v": value, "f": fmt, "tz": tz}) == expected


def test_date_format_of_missing_value_is_empty(renderer: Renderer) -> None:
    assert render(renderer, "[{{ dateFormat(data.nope, 'YYYY') }}]") == "[]"


def test_date_format_bad_zone_fails_the_render(renderer: Renderer) -> None:
    with pytest.raises(RenderError, match="time zone"):
        render(renderer, "{{ dateFormat('2026-01-01', 'YYYY', 'Mars/Olympus') }}")


def test_to_locale_formats_numbers_and_dates(renderer: Renderer) -> None:
    assert render(renderer, "{{ toLocale(1234567.891) }}") == "1,234,567.891"
    assert render(renderer, "{{ toLocale(1234567.891, 'de-DE') }}") == "1.234.567,891"
    assert render(renderer, "{{ toLocale(1234.5, 'fr-FR') }}").replace("\u202f", " ") == "1 234,5"
    assert re.match(r"Mar 5, 2026", render(renderer, "{{ toLocale('2026-03-05T14:07:09Z') }}"))


def test_default_locale_is_configurable() -> None:
    german = Renderer(default_locale="de-DE", max_template_chars=100, max_rendered_chars=100)
    assert german.compile("{{ toLocale(1234.5) }}")({}) == "1.234,5"


async def test_sandbox_violation_is_a_failure_not_a_500(client: Any, database: Any, outbox: Path) -> None:
    database.users.insert_many([{"_id": "u1", "phoneNumber": "+15550000001"}])
    response = await client.post(
        "/send", json={"channels": ["sms"], "recipients": ["u1"], "messageContent": "{{ user.__class__.__mro__ }}"}
    )
    assert response.status_code == 200
    [failure] = (await response.get_json())["failures"]
    assert failure["userId"] == "u1" and "unsafe" in failure["error"]
    assert not (outbox / "sms").exists()


async def test_rendered_output_over_limit_fails_that_delivery(make_settings: Any, database: Any, outbox: Path) -> None:
    from dispatcher import open_dispatcher

    database.users.insert_many(
        [
            {"_id": "short", "name": "Al", "phoneNumber": "+15550000001"},
            {"_id": "long", "name": "A" * 100, "phoneNumber": "+15550000002"},
        ]
    )
    async with open_dispatcher(make_settings(templates={"max_rendered_chars": 50})) as d:
        result = await d.send(
            {"channels": ["sms"], "recipients": ["short", "long"], "messageContent": "Hi {{ user.name }}"}
        )
    assert [(f.user_id, "exceeds 50" in f.error) for f in result.failures] == [("long", True)]
    assert [r["body"] for r in outbox_records(outbox, "sms")] == ["Hi Al"]


async def test_interpolation_end_to_end(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_one(
        {"_id": "u1", "name": "<Ada>", "emailAddress": "ada@example.com", "profile": {"city": "Pisa"}}
    )
    template_id = database.message_templates.insert_one(
        {
            "engine": "jinja",
            "emailTitle": "Hi {{user.name}}",
            "emailMessage": "{{ user.name }} from {{ user.profile.city }} owes {{ toLocale(data.amount) }}"
            " by {{ dateFormat(data.due, 'DD/MM/YYYY') }}{{ user.missing }}",
            "emailHtmlMessage": "<p>{{ user.name }}</p>",
        }
    ).inserted_id
    result = await dispatcher.send(
        {
            "channels": ["email"],
            "recipients": ["u1"],
            "templateId": str(template_id),
            "data": {"amount": 1234.5, "due": "2026-12-24T10:00:00Z"},
        }
    )
    assert result.failures == []
    [mail] = outbox_mails(outbox)
    assert mail["Subject"] == "Hi <Ada>"
    assert mail.get_body(("plain",)).get_content().strip() == "<Ada> from Pisa owes 1,234.5 by 24/12/2026"
    assert mail.get_body(("html",)).get_content().strip() == "<p>&lt;Ada&gt;</p>"


async def test_subject_cannot_inject_headers(dispatcher: Dispatcher, database: Any, outbox: Path) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "u1@example.com", "name": "x\r\nBcc: evil@example.com"})
    await dispatcher.send(
        {"channels": ["email"], "recipients": ["u1"], "messageTitle": "Hi {{ user.name }}", "messageContent": "C"}
    )
    [mail] = outbox_mails(outbox)
    assert "Bcc" not in mail and "X-Envelope-Bcc" not in mail
    assert "evil@example.com" in mail["Subject"]


async def test_a_stored_template_without_engine_is_handlebars_as_in_the_predecessor(
    dispatcher: Dispatcher, database: Any, outbox: Path
) -> None:
    database.users.insert_one(
        {"_id": "u1", "name": "<Ada>", "emailAddress": "ada@example.com", "profile": {"city": "Pisa"}}
    )
    template_id = database.message_templates.insert_one(
        {
            "emailTitle": "Hi {{user.name}}",
            "emailMessage": "{{user.name}} from {{user.profile.city}} owes {{toLocale data.amount}}"
            " by {{dateFormat data.due 'DD/MM/YYYY'}}{{#if user.missing}} never{{/if}}",
            "emailHtmlMessage": "<p>{{user.name}} {{{data.badge}}}</p>",
        }
    ).inserted_id
    result = await dispatcher.send(
        {
            "channels": ["email"],
            "recipients": ["u1"],
            "templateId": str(template_id),
            "data": {"amount": 1234.5, "due": "2026-12-24T10:00:00Z", "badge": "<b>VIP</b>"},
        }
    )
    assert result.failures == []
    [mail] = outbox_mails(outbox)
    assert mail["Subject"] == "Hi <Ada>"
    assert mail.get_body(("plain",)).get_content().strip() == "<Ada> from Pisa owes 1,234.5 by 24/12/2026"
    assert mail.get_body(("html",)).get_content().strip() == "<p>&lt;Ada&gt; <b>VIP</b></p>"


async def test_an_unknown_engine_is_a_400_naming_it(client: Any, database: Any) -> None:
    template_id = database.message_templates.insert_one({"engine": "mustache", "smsMessage": "x"}).inserted_id
    response = await client.post(
        "/send", json={"channels": ["sms"], "recipients": ["u1"], "templateId": str(template_id)}
    )
    assert response.status_code == 400
    assert "'mustache' is not one of handlebars, jinja" in (await response.get_json())["message"]
