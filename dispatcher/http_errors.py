"""The error shape of every HTTP answer that is not a success: `{"statusCode", "error",
"message"}`, the predecessor's."""

from __future__ import annotations

import json
from http import HTTPStatus

from quart import Response


def error_response(status: int, message: str) -> Response:
    body = {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}
    return Response(json.dumps(body), status=status, content_type="application/json")
