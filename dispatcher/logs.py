"""Log lines: text or JSON (`[logging].format`), each carrying the request, job and channel it
belongs to, and helpers that mask addresses before they reach a log.

The request id, job id and channel live in context variables. Trio copies the context of the
task that calls `start_soon`, so a send started from a request handler keeps the request's id on
every line it logs, even though it runs in the dispatcher's nursery:

```python
with bind(job_id=job.id):
    nursery.start_soon(run_job, job)      # run_job's log lines carry job_id
```
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
import re
import socket
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, UTC
from typing import Any, TextIO

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("dispatcher_request_id", default=None)
job_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("dispatcher_job_id", default=None)
channel_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("dispatcher_channel", default=None)

# The order in which the context fields appear on a line.
CONTEXT_FIELDS: dict[str, contextvars.ContextVar[str | None]] = {
    "request_id": request_id_var,
    "job_id": job_id_var,
    "channel": channel_var,
}

# A client's X-Request-ID is reused only when it cannot break a log line or a header.
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")

# Libraries that log one INFO line per HTTP request: per delivery, far too much for a service log.
_NOISY_LOGGERS = ("httpx", "httpcore", "hpack")


def valid_request_id(value: str | None) -> bool:
    return value is not None and _REQUEST_ID.fullmatch(value) is not None


def new_request_id() -> str:
    return uuid.uuid4().hex


def request_id_from(header: str | None) -> str:
    """The client's `X-Request-ID` when well formed (1-128 of `[A-Za-z0-9._-]`), else a new one."""
    return header if header is not None and valid_request_id(header) else new_request_id()


@contextmanager
def bind(**fields: str | None) -> Iterator[None]:
    """Set `request_id`, `job_id` and/or `channel` for the lines logged inside the block (and
    by the tasks started from it); the previous values come back on exit."""
    tokens = []
    try:
        for name, value in fields.items():
            var = CONTEXT_FIELDS.get(name)
            if var is None:
                raise TypeError(f"bind() got an unknown field {name!r} (one of {', '.join(CONTEXT_FIELDS)})")
            tokens.append((var, var.set(value)))
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_context() -> dict[str, str]:
    """The context fields that are set, e.g. `{"request_id": "abc"}`."""
    return {name: value for name, var in CONTEXT_FIELDS.items() if (value := var.get()) is not None}


class ContextFilter(logging.Filter):
    """Copies the context fields onto each record (unless the call passed them in `extra`), so
    that formatters see them even if a record is formatted elsewhere (a queue handler)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, var in CONTEXT_FIELDS.items():
            if getattr(record, name, None) is None:
                setattr(record, name, var.get())
        return True


def _context_of(record: logging.LogRecord) -> dict[str, str]:
    fields = {}
    for name, var in CONTEXT_FIELDS.items():
        value = getattr(record, name, None)
        if value is None:
            value = var.get()
        if value is not None:
            fields[name] = str(value)
    return fields


# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: `timestamp` (UTC, ISO 8601), `level`, `logger`, `message`, the
    context fields that are set, the `extra=` fields of the call, and `exception` (the
    formatted traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(_context_of(record))
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in CONTEXT_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


# pino's numeric levels, which the platform's log parser reads: trace 10 ... fatal 60.
PINO_LEVELS = {"trace": 10, "debug": 20, "info": 30, "warn": 40, "error": 50, "fatal": 60}
_PINO_TO_PYTHON = {"trace": "DEBUG", "warn": "WARNING", "fatal": "CRITICAL", "silent": "CRITICAL"}


def python_level(name: str) -> str | None:
    """A level name, Python's or pino's (the predecessor's `LOG_LEVEL`), as Python's; None if
    neither."""
    lowered = name.strip().lower()
    if lowered in _PINO_TO_PYTHON:
        return _PINO_TO_PYTHON[lowered]
    upper = lowered.upper()
    return upper if upper in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") else None


def pino_level(levelno: int) -> int:
    """Python's DEBUG 10 ... CRITICAL 50 as pino's debug 20 ... fatal 60 (below DEBUG: trace)."""
    if levelno < logging.DEBUG:
        return 10
    return min(60, (levelno // 10) * 10 + 10)


class PinoFormatter(logging.Formatter):
    """The platform's JSON log shape (pino's): numeric `level`, `time` in epoch milliseconds,
    `pid`, `hostname`, `msg`, `reqId` (the request id), then `jobId`, `channel`, the `extra=`
    fields of the call and `err` (`{"message", "stack"}`) when there is an exception."""

    _NAMES = {"request_id": "reqId", "job_id": "jobId", "channel": "channel"}

    def __init__(self) -> None:
        super().__init__()
        self._pid = os.getpid()
        self._hostname = socket.gethostname()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "level": pino_level(record.levelno),
            "time": int(record.created * 1000),
            "pid": self._pid,
            "hostname": self._hostname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, value in _context_of(record).items():
            entry[self._NAMES[name]] = value
        for key, value in vars(record).items():
            if key not in _RECORD_ATTRIBUTES and key not in CONTEXT_FIELDS and key not in entry:
                entry[key] = value
        if record.exc_info:
            exc = record.exc_info[1]
            entry["err"] = {"message": str(exc), "stack": self.formatException(record.exc_info)}
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: message`, then ` request_id=... job_id=... channel=...` for the
    context fields that are set."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        context = _context_of(record)
        if not context:
            return line
        suffix = " ".join(f"{name}={value}" for name, value in context.items())
        # Keep the context on the first line: a traceback follows the message.
        first, sep, rest = line.partition("\n")
        return f"{first} {suffix}{sep}{rest}"


def configure_logging(settings: Any, level: int | str = "INFO", stream: TextIO | None = None) -> logging.Handler:
    """Send every log line to `stream` (stderr) in the configured format, replacing the root
    logger's handlers. `settings` is the whole `Settings` or its `LoggingSettings`. Returns the
    handler (tests attach it elsewhere or remove it)."""
    logging_settings = getattr(settings, "logging", settings)
    fmt = getattr(logging_settings, "format", "text")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    formatters = {"json": JsonFormatter, "pino": PinoFormatter}
    handler.setFormatter(formatters.get(fmt, TextFormatter)())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for noisy in _NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return handler


# --- masking: addresses are personal data; a log line needs only enough to tell them apart.


def mask_email(address: str) -> str:
    """`ada@example.com` -> `a***@example.com` (the domain helps diagnose delivery problems)."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return "***"
    return f"{local[0]}***@{domain}"


def mask_phone(number: str) -> str:
    """`+391234567123` -> `+39******123`: the country prefix and the last three digits; the
    mask has a fixed length so it does not reveal the number's."""
    number = number.strip()
    if len(number) < 8:
        return "******"
    return f"{number[:3]}******{number[-3:]}"


def mask_token(token: str) -> str:
    """A device token: `abcd…wxyz` (first and last four characters)."""
    if len(token) < 12:
        return "***"
    return f"{token[:4]}…{token[-4:]}"


def mask_address(channel: str, value: str) -> str:
    """Mask one address of `channel`: e-mail addresses, phone numbers (sms, voice) or device
    tokens (push); anything else is hidden entirely."""
    if channel == "email":
        return mask_email(value)
    if channel in ("sms", "voice"):
        return mask_phone(value)
    if channel == "push":
        return mask_token(value)
    return "***"


__all__ = [
    "ContextFilter",
    "JsonFormatter",
    "PinoFormatter",
    "TextFormatter",
    "bind",
    "channel_var",
    "configure_logging",
    "current_context",
    "job_id_var",
    "mask_address",
    "mask_email",
    "mask_phone",
    "mask_token",
    "new_request_id",
    "request_id_from",
    "request_id_var",
    "valid_request_id",
]
