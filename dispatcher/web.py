"""What every HTTP route shares (`app.py`, `ops.py`, `saga.py`, `ui/`): the status each of the
service's exceptions answers with (`STATUS`, the one place that maps them), the error shape of every
answer that is not a success, `{"statusCode", "error", "message"}` (the predecessor's), and the
parsing of a JSON body."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from quart import Response

from .errors import (
    Conflict,
    DispatcherError,
    Interrupted,
    NotFound,
    PayloadTooLarge,
    RequestError,
    ShuttingDown,
    StoreError,
    UpstreamError,
)
from .models import MAX_DEPTH

# By exception class; a subclass not listed answers as its nearest listed base.
STATUS: dict[type[DispatcherError], int] = {
    RequestError: 400,
    NotFound: 404,
    PayloadTooLarge: 413,
    Conflict: 422,
    UpstreamError: 502,
    ShuttingDown: 503,
    StoreError: 503,
    Interrupted: 503,
}


# The message of every 503 for a store that does not answer.
STORE_DOWN = "the user and template store is unavailable"


def status_of(exc: DispatcherError) -> int:
    """The HTTP status `exc` answers with (500 for what `STATUS` does not know: a bug)."""
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def error_body(status: int, message: str) -> dict[str, Any]:
    """The error shape (see the module's docstring); callers may add fields to it."""
    return {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}


def error_response(status: int, message: str) -> Response:
    return Response(json.dumps(error_body(status, message)), status=status, content_type="application/json")


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not a JSON value")


def parse_json_body(raw: bytes) -> Any:
    """A request body as JSON; `RequestError` for malformed JSON (Quart's get_json would answer
    it with an HTML 400), NaN/Infinity, or nesting too deep to decode."""
    try:
        return json.loads(raw, parse_constant=_not_json)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"malformed JSON body: {exc}") from None
    except RecursionError:
        raise RequestError(f"the body is nested too deeply (at most {MAX_DEPTH} levels)") from None
