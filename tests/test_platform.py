"""The platform's conventions: pino-shaped JSON logs and `GET /-/check-up`."""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

import trio

from dispatcher import Settings, logs, open_dispatcher
from dispatcher.app import create_app
from dispatcher.embedded_store import free_port
from dispatcher.fakes import serve_asgi
from dispatcher.fakes.files import FakeFilesService
from dispatcher.settings import settings_from_dict


def test_pino_lines_carry_numeric_levels_ms_time_msg_and_req_id() -> None:
    stream = io.StringIO()
    handler = logs.configure_logging(settings_from_dict({"logging": {"format": "pino"}}), "DEBUG", stream)
    try:
        before = int(time.time() * 1000)
        log = logging.getLogger("dispatcher.test")
        with logs.bind(request_id="req-1", job_id="job-9"):
            log.debug("debugging")
            log.info("sent %d", 3, extra={"status": 200})
            log.warning("careful")
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("failed")
            log.critical("down")
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [line["level"] for line in lines] == [20, 30, 40, 50, 60]
    info = lines[1]
    assert info["msg"] == "sent 3" and info["reqId"] == "req-1" and info["jobId"] == "job-9"
    assert info["status"] == 200 and isinstance(info["pid"], int)
    assert before <= info["time"] <= int(time.time() * 1000) and isinstance(info["time"], int)
    assert lines[3]["err"]["message"] == "boom" and "ValueError" in lines[3]["err"]["stack"]


def test_pino_level_names_are_accepted_as_the_level() -> None:
    assert logs.python_level("warn") == "WARNING" and logs.python_level("trace") == "DEBUG"
    assert logs.python_level("INFO") == "INFO" and logs.python_level("loud") is None


async def test_check_up_names_each_dependency_and_its_state(
    make_settings: Callable[..., Settings], redis_url: str, nursery: trio.Nursery
) -> None:
    files_url = await nursery.start(serve_asgi, FakeFilesService())
    settings = make_settings(files={"url": files_url}, cluster={"redis_url": redis_url, "namespace": "checkup"})
    async with open_dispatcher(settings) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            response = await test_app.test_client().get("/-/check-up")
            body = await response.get_json()
    assert response.status_code == 200
    assert body["status"] == "OK" and body["name"] == "trio-dispatcher"
    assert body["checks"] == {"store": {"status": "OK"}, "redis": {"status": "OK"}, "files": {"status": "OK"}}


async def test_check_up_answers_503_naming_what_is_down(make_settings: Callable[..., Settings]) -> None:
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    async with open_dispatcher(make_settings(files={"url": dead})) as d:
        app = create_app(d)
        async with app.test_app() as test_app:
            response = await test_app.test_client().get("/-/check-up")
            body = await response.get_json()
    assert response.status_code == 503
    assert (body["statusCode"], body["error"], body["message"]) == (503, "Service Unavailable", "files is down")
    assert body["status"] == "KO" and body["checks"]["store"] == {"status": "OK"}
    assert body["checks"]["files"]["status"] == "KO" and "Connect" in body["checks"]["files"]["error"]
