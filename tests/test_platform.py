"""The platform's conventions: pino-shaped JSON logs and `GET /-/check-up`."""

from __future__ import annotations

import io
import json
import logging
import time

from dispatcher import logs
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
