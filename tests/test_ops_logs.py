"""Log lines: JSON or text, each carrying its request id (also inside the send it started), one
access line per request, addresses masked."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    bind,
    configure_logging,
    current_context,
    mask_address,
    mask_email,
    mask_phone,
    request_id_var,
)
from dispatcher.settings import LoggingSettings, settings_from_dict

SEND = {"channels": ["email", "sms"], "recipients": ["u1", "ghost"], "messageTitle": "Hi", "messageContent": "Hello"}


class Lines:
    """What the service logged, as parsed JSON objects."""

    def __init__(self, stream: io.StringIO) -> None:
        self._stream = stream

    def all(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self._stream.getvalue().splitlines() if line.strip()]

    def access(self) -> list[dict[str, Any]]:
        return [line for line in self.all() if line["logger"] == "dispatcher.access"]


@pytest.fixture
def json_log() -> Iterator[Lines]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield Lines(stream)
    root.removeHandler(handler)
    root.setLevel(level)


def _record(message: str = "hello %s", *args: Any, **extra: Any) -> logging.LogRecord:
    record = logging.getLogger("dispatcher.test").makeRecord(
        "dispatcher.test", logging.INFO, __file__, 1, message, args or ("world",), None, extra=extra or None
    )
    ContextFilter().filter(record)
    return record


# --- masking


@pytest.mark.parametrize(
    "value, masked",
    [
        ("ada@example.com", "a***@example.com"),
        ("x@y.org", "x***@y.org"),
        ("not-an-address", "***"),
        ("@example.com", "***"),
    ],
)
def test_mask_email_keeps_first_letter_and_domain(value: str, masked: str) -> None:
    assert mask_email(value) == masked


def test_mask_phone_keeps_prefix_and_last_three_with_a_fixed_mask() -> None:
    assert mask_phone("+391234567123") == "+39******123"
    assert mask_phone("+15550000001") == "+15******001"
    assert mask_phone("123") == "******"


def test_mask_address_by_channel() -> None:
    assert mask_address("email", "ada@example.com") == "a***@example.com"
    assert mask_address("sms", "+391234567123") == "+39******123"
    assert mask_address("voice", "+391234567123") == "+39******123"
    token = "ada-phone-token-0123456789"
    assert mask_address("push", token) == "ada-…6789"
    assert token not in mask_address("push", token)
    assert mask_address("fax", "anything") == "***"


# --- formatters


def test_json_line_has_timestamp_level_logger_message_and_bound_context() -> None:
    with bind(request_id="req-1", job_id="job-9", channel="sms"):
        record = _record(method="POST", status=200)
    line = json.loads(JsonFormatter().format(record))
    assert line["message"] == "hello world"
    assert line["level"] == "INFO"
    assert line["logger"] == "dispatcher.test"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["timestamp"])
    assert (line["request_id"], line["job_id"], line["channel"]) == ("req-1", "job-9", "sms")
    assert (line["method"], line["status"]) == ("POST", 200)


def test_json_line_omits_unset_context_and_carries_the_traceback() -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        record = logging.getLogger("x").makeRecord(
            "x", logging.ERROR, __file__, 1, "failed", (), __import__("sys").exc_info()
        )
    ContextFilter().filter(record)
    line = json.loads(JsonFormatter().format(record))
    assert "request_id" not in line and "job_id" not in line and "channel" not in line
    assert "RuntimeError: boom" in line["exception"]
    assert "\n" not in JsonFormatter().format(record)  # one object per line


def test_text_line_appends_request_id_only_when_set() -> None:
    assert "request_id" not in TextFormatter().format(_record())
    with bind(request_id="abc.123"):
        text = TextFormatter().format(_record())
    assert text.endswith("dispatcher.test: hello world request_id=abc.123")


def test_bind_restores_the_previous_values() -> None:
    with bind(request_id="outer"):
        with bind(request_id="inner", channel="email"):
            assert current_context() == {"request_id": "inner", "channel": "email"}
        assert current_context() == {"request_id": "outer"}
    assert current_context() == {}
    with pytest.raises(TypeError):
        with bind(user="ada"):
            pass


def test_configure_logging_json_writes_one_object_per_line() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        configure_logging(settings_from_dict({"logging": {"format": "json"}}), "debug", stream=stream)
        with bind(request_id="r-7"):
            logging.getLogger("dispatcher.core").info("send done: %d users", 3)
        logging.getLogger("httpx").info("per-request noise")
        assert logging.getLogger("httpx").level == logging.WARNING
        [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
        assert line["message"] == "send done: 3 users" and line["request_id"] == "r-7" and line["level"] == "INFO"

        stream.truncate(0), stream.seek(0)
        configure_logging(LoggingSettings(format="text"), logging.INFO, stream=stream)
        logging.getLogger("dispatcher.core").debug("hidden")
        with bind(request_id="r-8"):
            logging.getLogger("dispatcher.core").info("shown")
        assert stream.getvalue().rstrip().endswith("INFO dispatcher.core: shown request_id=r-8")
        assert "hidden" not in stream.getvalue()
    finally:
        for handler in root.handlers[:]:
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


async def test_tasks_started_inside_bind_inherit_the_request_id(json_log: Lines) -> None:
    log = logging.getLogger("dispatcher.test")

    async def task(message: str) -> None:
        await trio.sleep(0)
        log.info(message)

    async with trio.open_nursery() as nursery:  # opened outside the binding, like the dispatcher's
        with bind(request_id="req-task"):
            nursery.start_soon(partial(trio.to_thread.run_sync, log.info, "from a thread"))
            nursery.start_soon(task, "from a task")
        log.info("after the block")
    lines = {line["message"]: line for line in json_log.all()}
    assert lines["from a task"]["request_id"] == "req-task"
    assert lines["from a thread"]["request_id"] == "req-task"  # pymongo calls run in threads
    assert "request_id" not in lines["after the block"]


# --- the HTTP layer


async def test_request_id_is_generated_echoed_and_never_leaks_into_the_next_request(
    client: Any, json_log: Lines
) -> None:
    first = await client.get("/-/healthz")
    second = await client.get("/-/healthz")
    ids = [first.headers["X-Request-ID"], second.headers["X-Request-ID"]]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids) and ids[0] != ids[1]
    assert [line["request_id"] for line in json_log.access()] == ids
    assert request_id_var.get() is None


@pytest.mark.parametrize(
    "sent, reused",
    [
        ("abc-DEF_1.2", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
    ],
)
async def test_client_request_id_reused_only_when_well_formed(
    client: Any, json_log: Lines, sent: str, reused: bool
) -> None:
    response = await client.get("/-/healthz", headers={"X-Request-ID": sent})
    echoed = response.headers["X-Request-ID"]
    assert (echoed == sent) is reused
    assert re.fullmatch(r"[A-Za-z0-9._-]{1,128}", echoed)
    [line] = json_log.access()
    assert line["request_id"] == echoed


async def test_send_logs_carry_the_request_id_of_the_request_that_started_them(
    client: Any, database: Any, json_log: Lines
) -> None:
    database.users.insert_one({"_id": "u1", "emailAddress": "ada@example.com", "phoneNumber": "+391234567123"})
    response = await client.post("/send", json=SEND, headers={"X-Request-ID": "campaign-42"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "campaign-42"
    lines = json_log.all()
    # The pipeline runs in the dispatcher's nursery, not the handler's task: its lines still say
    # which request they belong to.
    pipeline = [line for line in lines if line["logger"] != "dispatcher.access"]
    assert pipeline, lines
    assert all(line.get("request_id") == "campaign-42" for line in pipeline), pipeline
    assert any(line["logger"].startswith(("dispatcher.core", "dispatcher.jobs", "actors")) for line in pipeline), pipeline
    # No address in clear anywhere.
    assert "ada@example.com" not in json.dumps(lines) and "+391234567123" not in json.dumps(lines)


async def test_one_access_line_per_request_rejected_ones_included(client: Any, json_log: Lines) -> None:
    await client.post("/send", json={"channels": ["fax"], "recipients": ["u1"], "messageContent": "x"})
    await client.get("/nowhere/u42")
    await client.get("/-/ready")
    access = json_log.access()
    assert [(a["method"], a["path"], a["status"], a["level"]) for a in access] == [
        ("POST", "/send", 400, "INFO"),
        ("GET", "/nowhere/u42", 404, "INFO"),
        ("GET", "/-/ready", 200, "INFO"),
    ]
    assert [a["route"] for a in access] == ["/send", "unmatched", "/-/ready"]
    for line in access:
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert re.fullmatch(rf"{line['method']} {line['path']} {line['status']} \d+\.\dms", line["message"])


async def test_a_path_cannot_forge_a_log_line(client: Any, json_log: Lines) -> None:
    await client.get("/x%0AINFO%20forged")
    [line] = json_log.access()
    assert "\n" not in line["path"] and "\\n" in line["path"]


async def test_client_that_goes_away_is_logged_as_499(
    make_settings: Callable[..., Any], database: Any, outbox: Path, json_log: Lines
) -> None:
    database.users.insert_many(
        [{"_id": f"u{i}", "phoneNumber": f"+1555000{i:04d}", "clusters": ["all"]} for i in range(12)]
    )
    settings = make_settings(channels={"sms": {"rate_per_second": 20, "burst": 1, "concurrency": 2}})
    async with open_dispatcher(settings) as d:
        async with create_app(d).test_app() as app:
            client = app.test_client()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(
                    partial(
                        client.post,
                        "/send",
                        headers={"X-Request-ID": "gone-1"},
                        json={"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"},
                    )
                )
                with trio.fail_after(10):
                    while not (outbox / "sms").exists() or not any((outbox / "sms").iterdir()):
                        await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
            [line] = json_log.access()
            assert (line["status"], line["request_id"]) == (499, "gone-1")
    # The deliveries went on after the client left, still tagged with its request id.
    done = [line for line in json_log.all() if line["logger"] != "dispatcher.access"]
    assert done and all(line.get("request_id") == "gone-1" for line in done)
