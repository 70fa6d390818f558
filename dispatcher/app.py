"""The HTTP layer: a thin Quart-Trio app over `Dispatcher`.

Every error, including 404/405 and anything unexpected, is answered as JSON in the predecessor's
shape `{"statusCode", "error", "message"}`, never as HTML or a stack trace.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

from quart import Response, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .core import Dispatcher
from .errors import RequestError, StoreError
from .models import SendRequest

log = logging.getLogger(__name__)


def error_response(status: int, message: str) -> Response:
    body = {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}
    return Response(json.dumps(body), status=status, content_type="application/json")


def create_app(dispatcher: Dispatcher) -> QuartTrio:
    app = QuartTrio(__name__)
    app.config["MAX_CONTENT_LENGTH"] = dispatcher.settings.server.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.post("/send")
    async def send() -> Any:
        # Parse the body ourselves: Quart's get_json answers malformed JSON with an HTML 400.
        raw = await request.get_data(cache=False)
        try:
            payload = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise RequestError(f"malformed JSON body: {exc}") from None
        result = await dispatcher.send(SendRequest.parse(payload))
        return result.to_json()

    @app.get("/-/healthz")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/-/ready")
    async def ready() -> Any:
        if await dispatcher.store.ping():
            return {"status": "ready"}
        return error_response(503, "the store does not answer")

    @app.errorhandler(RequestError)
    async def request_error(exc: RequestError) -> Response:
        return error_response(exc.status_code, str(exc))

    @app.errorhandler(StoreError)
    async def store_error(exc: StoreError) -> Response:
        log.error("store unavailable: %s", exc)
        return error_response(503, "the user and template store is unavailable")

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {
            404: f"no route {request.method} {request.path}",
            405: f"method {request.method} not allowed on {request.path}",
            413: f"body larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }.get(status, exc.description or HTTPStatus(status).phrase)
        return error_response(status, message)

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return error_response(500, "internal error; see the service log")

    return app
