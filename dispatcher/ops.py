"""What operators need around the HTTP app, installed by `install_ops(app, dispatcher)`:

- `X-Request-ID` on every request (the client's when well formed, else a new one), echoed in the
  answer and bound for every log line the request causes, including those of the send it starts;
- one access log line per request (`dispatcher.access`), and the HTTP metrics;
- optional API keys on `/send` and `/send/...` (and `/-/metrics` with `[auth].protect_metrics`);
- `GET /-/metrics`, `GET /-/openapi.json`, `GET /-/docs`.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from quart import Response, g, request

from . import metrics
from .auth import ApiKeys, is_protected, load_api_keys, presented_key
from .listing import EVERYONE, Viewer
from .web import error_response
from .logs import request_id_from, request_id_var
from .openapi import docs_page, openapi_for, route_template

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .core import Dispatcher

access_log = logging.getLogger("dispatcher.access")

# nginx's code for a client that went away before the answer; never sent, only logged.
CLIENT_CLOSED = 499


def install_ops(app: QuartTrio, dispatcher: Dispatcher, api_keys: ApiKeys | None = None) -> None:
    """Add the hooks and routes above. `api_keys` defaults to `load_api_keys(settings)`, which
    raises `ConfigError` for an unreadable `[auth].keys_file`."""
    settings = dispatcher.settings
    keys = api_keys if api_keys is not None else load_api_keys(settings.auth)
    protect_metrics = settings.auth.protect_metrics
    app.extensions["dispatcher.api_keys"] = keys

    async def start_request() -> Response | None:
        g.ops_started = time.perf_counter()
        g.ops_accounted = False
        g.request_id = request_id_from(request.headers.get("X-Request-ID"))
        g.ops_token = request_id_var.set(g.request_id)
        g.api_key_id = None
        g.viewer = EVERYONE  # who may see which jobs (listing.py): everyone without keys
        if keys.enabled and is_protected(request.path, protect_metrics):
            presented = presented_key(request.headers)
            key = keys.authenticate_key(presented)
            g.api_key_id = key.id if key is not None else None
            if key is not None:
                g.viewer = EVERYONE if key.admin else Viewer(key.id)
            if g.api_key_id is None:
                if presented is None:
                    response = error_response(
                        401, "an API key is required (Authorization: Bearer <key> or X-API-Key: <key>)"
                    )
                    response.headers["WWW-Authenticate"] = "Bearer"
                else:
                    response = error_response(401, "invalid API key")
                    response.headers["WWW-Authenticate"] = 'Bearer error="invalid_token"'
                return response
        return None

    async def finish_request(response: Response) -> Response:
        if "ops_started" in g:
            response.headers["X-Request-ID"] = g.request_id
            _account(response.status_code)
        return response

    async def teardown(exc: BaseException | None) -> None:
        # A client that disconnects cancels the handler: no answer, so no after_request.
        if "ops_started" in g and not g.get("ops_accounted"):
            _account(CLIENT_CLOSED)
        token = g.pop("ops_token", None)
        if token is not None:
            try:
                request_id_var.reset(token)
            except ValueError:  # set in another context: nothing of ours to undo here
                pass

    # First in, last out: the request id and the key check precede every other hook of the app
    # (an idempotency hook reads g.api_key_id), and the answer is accounted once it is final.
    app.before_request_funcs.setdefault(None, []).insert(0, start_request)
    app.after_request_funcs.setdefault(None, []).insert(0, finish_request)
    app.teardown_request_funcs.setdefault(None, []).insert(0, teardown)

    @app.get("/-/metrics")
    async def prometheus_metrics() -> Response:
        body, content_type = metrics.render(request.headers.get("Accept"))
        return Response(body, status=200, content_type=content_type)

    document: dict[str, Any] = {}

    @app.get("/-/openapi.json")
    async def openapi_json() -> Response:
        if not document:  # built on first use: every route of the app is registered by then
            document.update(openapi_for(app, settings, keys.enabled))
        return Response(json.dumps(document), status=200, content_type="application/json")

    @app.get("/-/docs")
    async def docs() -> Response:
        return Response(docs_page("/-/openapi.json"), status=200, content_type="text/html; charset=utf-8")

    if metrics.multiprocess_dir():

        @app.before_serving
        async def sample_queues() -> None:
            app.nursery.start_soon(metrics.sample_queues_forever)


def _account(status: int) -> None:
    """One access log line and the HTTP metrics, once per request."""
    g.ops_accounted = True
    rule = request.url_rule
    route = route_template(rule.rule) if rule is not None else "unmatched"
    account(request.method, request.path, route, status, g.ops_started, g.get("api_key_id"))


def account(method: str, raw_path: str, route: str, status: int, started: float, api_key_id: str | None) -> None:
    """The access log line and HTTP metrics of a request that began at `started` (perf_counter);
    also for routes answered outside Quart (`twilio_status.py`)."""
    seconds = time.perf_counter() - started
    metrics.observe_http(method, route, status, seconds)
    level = logging.WARNING if status >= 500 and status != CLIENT_CLOSED else logging.INFO
    path = _printable(raw_path)
    duration_ms = round(seconds * 1000, 1)
    access_log.log(
        level,
        "%s %s %d %.1fms",
        method,
        path,
        status,
        duration_ms,
        extra={
            "method": method,
            "path": path,
            "route": route,
            "status": status,
            "duration_ms": duration_ms,
            "api_key_id": api_key_id,
        },
    )


def _printable(path: str, limit: int = 512) -> str:
    """A client-chosen path cannot forge a log line: controls escaped, length capped."""
    if len(path) > limit:
        path = path[:limit] + "…"
    if path.isprintable():
        return path
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in path)


__all__ = ["account", "install_ops"]
