"""The HTTP layer: a thin Quart-Trio app over `Dispatcher`, whose typed answers it writes as JSON
(`wire.py`).

Every error, including 404/405 and anything unexpected, is answered as JSON in the predecessor's
shape `{"statusCode", "error", "message"}`, never as HTML or a stack trace.

The status line carries no reason phrase (`HTTP/1.1 400 `): hypercorn's HTTP/1.1 protocol builds
its `h11.Response` without one and offers no hook to add it, and HTTP/2 has none at all. RFC 9112
makes the phrase optional and tells clients to ignore it; the phrase is in the body's `error`.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import Any

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGIReceiveEvent, ASGISendCallable, Scope
from quart import Response, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .checkup import install_checkup
from .core import Dispatcher
from .callback_outbox import CALLBACK_STATES
from .errors import Interrupted, RequestError, StillRunning, StoreError
from .listing import EVERYONE, JobQuery, Viewer
from .models import SendRequest, check_idempotency_key
from .web import STORE_DOWN, error_body, error_response, parse_json_body, status_of
from .wire import (
    callback_json,
    callback_page_json,
    deliveries_json,
    dry_run_json,
    failure_page_json,
    job_json,
    job_page_json,
    send_result_json,
)
from .ops import install_ops
from .ui import install_ui
from .providers.twilio import STATUS_CALLBACK_PATH
from .receipts import TwilioSignature
from .twilio_status import TwilioStatus, answer
from .saga import install_saga

log = logging.getLogger(__name__)


async def finish_early_answers(app: Any, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Run the ASGI `app` on one exchange so that an answer sent before the request body was read
    (a 413, a 401, a 404 to a POST) does not leave the connection wedged.

    hypercorn (0.18) ends such an exchange by closing the connection from inside the app's last
    `send`: it first puts an `http.disconnect` in the app's (bounded) receive queue, then closes the
    socket. Quart-Trio cancels the request as soon as it reads that disconnect, which interrupts
    the close halfway: the socket stays open, hypercorn's HTTP/1.1 state machine never starts a
    new cycle, and the client's next request on the keep-alive connection is never answered. So
    that last `send` runs shielded (hypercorn already shields its socket writes, so this waits no
    longer than they do), with the rest of the queue drained meanwhile so the disconnect fits. The
    answer carries `Connection: close` (HTTP/1.x) so that clients do not count on the connection.
    Nothing waits for the rest of the body: the connection is closed instead.
    """
    if scope["type"] != "http":
        await app(scope, receive, send)
        return
    # HTTP/1.x says in its headers whether a body follows; a GET without one is never "early"
    # (deciding on the body messages alone would race hypercorn queueing the empty one).
    body_done = scope.get("http_version") in ("1.0", "1.1") and not any(
        name == b"transfer-encoding" or (name == b"content-length" and value.strip() != b"0")
        for name, value in scope.get("headers", ())
    )

    async def tracked_receive() -> ASGIReceiveEvent:
        nonlocal body_done
        message = await receive()
        body_done = message["type"] == "http.disconnect" or not message.get("more_body", False)
        return message

    async def drain() -> None:
        while not body_done:
            await tracked_receive()

    async def guarded_send(message: Any) -> None:
        if body_done:
            await send(message)
        elif message["type"] == "http.response.start":
            if scope.get("http_version") in ("1.0", "1.1"):
                message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                with trio.CancelScope(shield=True):
                    await send(message)
                nursery.cancel_scope.cancel()
        else:
            await send(message)

    try:
        await app(scope, tracked_receive, guarded_send)
    except Exception:
        await drain()
        raise
    # Without an answer from the app hypercorn writes a 500 itself once we return; it needs the
    # queue emptied the same way. After an answer the disconnect is already queued: this is quick.
    await drain()


class _App(QuartTrio):
    # Twilio's receipts, answered before Quart (twilio_status.py); None: receipts are off.
    twilio_status: TwilioStatus | None = None

    async def __call__(self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if self.twilio_status is not None and scope["type"] == "http" and self.twilio_status.takes(scope):
            await self.twilio_status(scope, receive, send)
            return
        # Around `asgi_app` rather than inside it, so that middleware installed later with
        # `app.asgi_app = middleware(app.asgi_app)` is covered too.
        await finish_early_answers(super().__call__, scope, receive, send)

    async def make_default_options_response(self) -> Response:
        # Quart's default is an empty 200 labelled text/html.
        response = await super().make_default_options_response()
        response.status_code = 204
        del response.headers["Content-Type"]
        return response


# A query flag's values, as the OpenAPI document lists them; anything else is a 400.
QUERY_FLAG_VALUES = {"true": True, "1": True, "false": False, "0": False}


def _query_flag(name: str) -> bool:
    if not request.query_string:  # most requests: no query string to parse
        return False
    raw = request.args.get(name)
    if raw is None:
        return False
    if raw not in QUERY_FLAG_VALUES:
        raise RequestError(f"{name}: must be true or false")
    return QUERY_FLAG_VALUES[raw]


def _wants_async() -> bool:
    """RFC 7240 `Prefer: respond-async`, or `?async=true`."""
    if _query_flag("async"):
        return True
    prefer = request.headers.getlist("Prefer")
    return bool(prefer) and "respond-async" in {token.strip().lower() for value in prefer for token in value.split(",")}


def _wants_dry_run(payload: Any) -> bool:
    """`?dryRun=true` (or 1), or `"dryRun": true` in the body."""
    return _query_flag("dryRun") or payload.get("dryRun") is True


def _viewer() -> Viewer:
    """Who the request's API key lets see which jobs (set by ops.py's key check)."""
    return g.get("viewer") or EVERYONE


def _located(job_id: str | None) -> dict[str, str]:
    return {"Location": f"/send/{job_id}"} if job_id else {}


def create_app(dispatcher: Dispatcher) -> QuartTrio:
    app = _App(__name__)
    app.config["MAX_CONTENT_LENGTH"] = dispatcher.settings.server.max_body_bytes
    app.config["PROVIDE_AUTOMATIC_OPTIONS"] = True

    @app.post("/send")
    async def send() -> Any:
        # Parse the body ourselves: Quart's get_json answers malformed JSON with an HTML 400.
        payload = parse_json_body(await request.get_data(cache=False, as_text=False, parse_form_data=False))
        send_request = SendRequest.parse(payload)
        if _wants_dry_run(payload):
            return dry_run_json(await dispatcher.dry_run(send_request))
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            key = check_idempotency_key(key, "Idempotency-Key")
        # Idempotency keys are scoped per API key: two clients cannot collide.
        scope = g.get("api_key_id") or ""
        if _wants_async():
            job_id = await dispatcher.submit(send_request, idempotency_key=key, key_scope=scope)
            # Accepted, nothing reported yet: the contract's "queued" (GET /send/{id} follows it).
            body = {"id": job_id, "status": "queued"}
            return body, 202, {"Location": f"/send/{job_id}", "Preference-Applied": "respond-async"}
        try:
            result = await dispatcher.send(
                send_request,
                idempotency_key=key,
                key_scope=scope,
                wait_seconds=dispatcher.settings.server.sync_timeout_seconds,
            )
        except StillRunning as exc:
            # [server].sync_timeout_seconds ran out: the job goes on; say where to follow it.
            return job_json(await dispatcher.status(exc.job_id, _viewer())), 202, _located(exc.job_id)
        return send_result_json(result), 200, _located(result.job_id)

    @app.get("/send")
    async def job_list() -> Any:
        return job_page_json(await dispatcher.jobs(JobQuery.from_args(request.args), _viewer()))

    # `<id>`, as the OpenAPI document names it.
    @app.get("/send/<id>")
    async def job_status(id: str) -> Any:  # noqa: A002
        return job_json(await dispatcher.status(id, _viewer()))

    @app.delete("/send/<id>")
    async def job_cancel(id: str) -> Any:  # noqa: A002
        return job_json(await dispatcher.cancel(id, _viewer()))

    @app.get("/send/<id>/failures")
    async def job_failures(id: str) -> Any:  # noqa: A002
        try:
            limit = int(request.args.get("limit", "100"))
        except ValueError:
            raise RequestError("limit: must be an integer") from None
        if not 1 <= limit <= 1000:
            raise RequestError("limit: must be between 1 and 1000")
        return failure_page_json(await dispatcher.failures(id, request.args.get("after") or None, limit, _viewer()))

    @app.get("/callbacks")
    async def callback_list() -> Any:
        state = request.args.get("state") or "dead"
        if state not in CALLBACK_STATES:
            raise RequestError(f"state: must be one of {', '.join(CALLBACK_STATES)}")
        try:
            limit = int(request.args.get("limit") or "50")
        except ValueError:
            raise RequestError("limit: must be an integer") from None
        if not 1 <= limit <= 200:
            raise RequestError("limit: must be between 1 and 200")
        cursor = request.args.get("cursor") or None
        return callback_page_json(await dispatcher.list_callbacks(state, _viewer(), limit, cursor))

    @app.post("/callbacks/<id>/retry")
    async def callback_retry(id: str) -> Any:  # noqa: A002
        return callback_json(await dispatcher.retry_callback(id, _viewer()))

    @app.get("/send/<id>/deliveries")
    async def job_deliveries(id: str) -> Any:  # noqa: A002
        user_id = request.args.get("userId")
        if not user_id:
            raise RequestError("userId: required (the user whose deliveries to show)")
        return deliveries_json(await dispatcher.deliveries(id, user_id, _viewer()))

    twilio = dispatcher.settings.providers.twilio
    signature = (
        TwilioSignature(twilio.auth_token.get_secret_value(), twilio.status_callback_base_url)
        if twilio.status_callback_base_url and twilio.auth_token.get_secret_value()
        else None
    )

    if signature is not None and dispatcher.receipts is not None:
        app.twilio_status = TwilioStatus(signature, dispatcher.receipts, dispatcher.settings.server.max_body_bytes)

    # No API key here: Twilio cannot send one. The signature is the authentication. Only what
    # `TwilioStatus.takes` leaves (no form, a chunked or oversized body, receipts off) comes here.
    @app.post(STATUS_CALLBACK_PATH)
    async def twilio_status() -> Any:
        if signature is None or dispatcher.receipts is None:
            return error_response(404, "Twilio receipts are off ([providers.twilio].status_callback_base_url)")
        form = {key: value for key, value in (await request.form).items()}
        query = request.query_string.decode("latin-1")
        status, message = await answer(
            signature, dispatcher.receipts, query, form, request.headers.get("X-Twilio-Signature")
        )
        return Response("", status=204) if status == 204 else error_response(status, message)

    @app.get("/-/healthz")
    async def healthz() -> Any:
        # Liveness: fails only for what restarting this process repairs (see embedded_store.py).
        store = dispatcher.embedded_store
        if store is not None and not store.alive:
            return error_response(503, f"not alive: the embedded store has been down for {store.down_for():.0f}s")
        return {"status": "ok"}

    @app.get("/-/ready")
    async def ready() -> Any:
        checks = await dispatcher.readiness()
        if all(checks.values()):
            return {"status": "ready", **checks}
        down = "; ".join(
            {
                "store": "the store does not answer",
                "redis": "Redis (rate-limited channels wait, then fail) does not answer",
                "outbox": "the outbox directory cannot be written",
            }.get(name, f"the {name} provider cannot deliver")
            for name, ok in checks.items()
            if not ok
        )
        return error_response(503, f"not ready: {down}")

    @app.errorhandler(RequestError)
    async def request_error(exc: RequestError) -> Response:
        return error_response(status_of(exc), str(exc))

    @app.errorhandler(Interrupted)
    async def interrupted(exc: Interrupted) -> Response:
        # The error shape, plus what was attempted: the client must not resend blindly.
        status = status_of(exc)
        body = {
            **error_body(status, str(exc)),
            **send_result_json(exc.partial),
            "id": exc.job_id,
        }
        return Response(json.dumps(body), status=status, content_type="application/json", headers=_located(exc.job_id))

    @app.errorhandler(StoreError)
    async def store_error(exc: StoreError) -> Response:
        log.error("store unavailable: %s", exc)
        return error_response(status_of(exc), STORE_DOWN)

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {
            404: f"no route {request.method} {request.path}",
            405: f"method {request.method} not allowed on {request.path}",
            413: f"body larger than {app.config['MAX_CONTENT_LENGTH']} bytes",
        }.get(status, exc.description or HTTPStatus(status).phrase)
        response = error_response(status, message)
        allowed = getattr(exc, "valid_methods", None)
        if status == 405 and allowed:  # RFC 9110: a 405 lists the methods the resource has
            response.headers["Allow"] = ", ".join(sorted(allowed))
        return response

    @app.errorhandler(Exception)
    async def unexpected(exc: Exception) -> Response:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return error_response(500, "internal error; see the service log")

    install_ops(app, dispatcher)
    install_ui(app, dispatcher)
    install_saga(app, dispatcher)
    install_checkup(app, dispatcher)
    return app
