"""The page's routes, as a Quart blueprint under `[ui].prefix` (see the package docstring)."""

from __future__ import annotations

import json
import time
from importlib.resources import files
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, StrictUndefined
from quart import Blueprint, Response, g, request

from ..auth import ApiKeys, presented_key
from ..errors import NotFound, RequestError
from ..ledger import FINAL_STATES
from ..listing import EVERYONE, JOB_STATES, MAX_LIMIT, JobQuery, Viewer
from ..wire import deliveries_json, failure_page_json
from .chart import deliveries_chart
from .progress import STATES
from .queries import Queries, age, parse_time

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from ..core import Dispatcher

FAILURES_PER_PAGE = 50
MAX_POLLED = 200

# Only the page's own files: no inline script or style, nothing from elsewhere, no framing.
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
    "form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
_STATIC = {"ui.js": "text/javascript; charset=utf-8", "ui.css": "text/css; charset=utf-8"}


def environment() -> Environment:
    """The page's templates; autoescaping on for everything they render."""
    env = Environment(
        loader=PackageLoader("dispatcher.ui", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["age"] = age
    env.globals["STATES"] = STATES
    env.globals["query"] = _query
    return env


def install_ui(app: QuartTrio, dispatcher: Dispatcher) -> None:
    """Serve the page under `[ui].prefix` unless `[ui].enabled` is false. Call after
    `install_ops` (it reads the API keys that installed)."""
    settings = dispatcher.settings.ui
    if not settings.enabled:
        return
    keys: ApiKeys = app.extensions["dispatcher.api_keys"]
    prefix = settings.prefix
    env = environment()
    queries = Queries(dispatcher)
    # Bytes read once from the package: a request never names a file.
    static = {
        name: (files("dispatcher.ui").joinpath("static", name).read_bytes(), kind) for name, kind in _STATIC.items()
    }
    bp = Blueprint("ui", __name__, url_prefix=prefix)
    # From a page at depth `root`, the service's root is this many levels further up.
    up = "../" * prefix.count("/")

    def render(name: str, root: str, code: int = 200, **context: Any) -> Response:
        body = env.get_template(name).render(
            root=root,
            api=(root if root != "./" else "") + up,
            keys_on=keys.enabled,
            poll_seconds=settings.poll_seconds,
            channels=dispatcher.channels,
            **context,
        )
        return Response(body, status=code, content_type="text/html; charset=utf-8")

    @bp.before_request
    async def authenticate() -> Response | None:
        # ops.py set g.viewer = EVERYONE: right without keys. With keys, the page's own files
        # and its entry redirect are open; everything else shows what the key may see.
        if not keys.enabled or request.endpoint in ("ui.asset", "ui.entry"):
            return None
        presented = presented_key(request.headers)
        key = keys.authenticate_key(presented)
        if key is not None:
            g.api_key_id = key.id
            g.viewer = EVERYONE if key.admin else Viewer(key.id)
            return None
        g.viewer = None  # nothing may be shown
        if request.endpoint == "ui.progress":
            from ..web import error_response

            return error_response(401, "invalid API key" if presented else "an API key is required")
        root = "../" if request.endpoint == "ui.job" else "./"
        return render("key.html", root, code=401, page="key", refused=presented is not None)

    @bp.after_request
    async def headers(response: Response) -> Response:
        response.headers["Content-Security-Policy"] = _CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        # Pages carry what a key may see: never kept by a cache. The two files may be.
        if request.endpoint != "ui.asset":
            response.headers["Cache-Control"] = "no-store"
        # The pages differ by key: a cache in front must not give one key's page to another.
        response.headers["Vary"] = "Authorization, X-API-Key"
        return response

    @bp.get("", strict_slashes=False)
    async def entry() -> Response:
        # `/-/ui` to `/-/ui/`: relative links resolve from the trailing slash. A relative Location
        # keeps a path prefix a proxy added.
        response = Response("", status=308)
        response.headers["Location"] = prefix.rsplit("/", 1)[1] + "/"
        return response

    @bp.get("/")
    async def jobs() -> Response:
        channel = request.args.get("channel") or None
        if channel is not None and channel not in dispatcher.channels:
            raise RequestError(f"channel: one of {', '.join(dispatcher.channels)}")
        limit = _int_arg("limit", settings.page_size, 1, MAX_LIMIT)
        query = JobQuery(
            status=request.args.get("state") or None,
            channel=channel,
            limit=limit,
            cursor=request.args.get("cursor") or None,
        )
        rows, next_cursor = (await queries.jobs(query, g.viewer)) if queries.recorded else ([], None)
        return render(
            "jobs.html",
            "./",
            page="jobs",
            rows=rows,
            state=query.status,
            channel=channel,
            job_states=JOB_STATES,
            cursor=query.cursor,
            next_cursor=next_cursor,
            limit=limit if limit != settings.page_size else None,
            recorded=queries.recorded,
            now=time.time(),
        )

    @bp.get("/jobs/<id>")
    async def job(id: str) -> Response:  # noqa: A002
        viewer = g.viewer
        try:
            status, row = await queries.job(id, viewer)
        except NotFound as exc:
            return render("missing.html", "../", code=404, page="job", message=str(exc))
        after = request.args.get("after") or None
        user = (request.args.get("user") or "").strip() or None
        failures = failure_page_json(await dispatcher.failures(id, after, FAILURES_PER_PAGE, viewer))
        deliveries = deliveries_json(await dispatcher.deliveries(id, user, viewer))["deliveries"] if user else None
        start = parse_time(status.get("startedAt") or status.get("createdAt")) or time.time()
        end = parse_time(status.get("finishedAt")) or time.time()
        chart = deliveries_chart(await queries.delivery_times(id), start, end)
        callbacks = await queries.job_callbacks(id)
        return render(
            "job.html",
            "../",
            page="job",
            status=status,
            row=row,
            failures=failures,
            after=after,
            user=user,
            deliveries=deliveries,
            chart=chart,
            callbacks=callbacks,
            final=status["status"] in FINAL_STATES,
            now=time.time(),
        )

    @bp.get("/service")
    async def service() -> Response:
        dead = await queries.dead_callbacks(g.viewer, request.args.get("cursor") or None)
        return render(
            "service.html",
            "./",
            page="service",
            service=await queries.service(),
            dead=dead,
            cursor=request.args.get("cursor"),
        )

    @bp.get("/progress")
    async def progress() -> Response:
        """The live part of the jobs asked for (`?id=...&id=...`): state and the progress HTML."""
        ids = request.args.getlist("id")[:MAX_POLLED]
        rows = await queries.progress(ids, g.viewer) if ids and queries.recorded else []
        # A job page shows the counts table under its bars: `detail=1` renders both.
        fragment = env.get_template("progress.html" if request.args.get("detail") else "bars.html")
        body = {
            "jobs": [
                {"id": row.id, "state": row.state, "final": row.final, "html": fragment.render(row=row)} for row in rows
            ]
        }
        return Response(json.dumps(body), status=200, content_type="application/json")

    @bp.get("/static/<name>")
    async def asset(name: str) -> Response:
        if name not in static:
            raise NotFound(f"no file {name}")
        body, kind = static[name]
        response = Response(body, status=200, content_type=kind)
        response.headers["Cache-Control"] = "max-age=300"
        return response

    app.register_blueprint(bp)


def _query(**params: str | int | None) -> str:
    """`?a=1&b=2` of the parameters that have a value ("" for none): links keep their filters."""
    kept = {name: value for name, value in params.items() if value not in (None, "")}
    return "?" + urlencode(kept) if kept else ""


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise RequestError(f"{name}: must be an integer") from None
    if not low <= value <= high:
        raise RequestError(f"{name}: must be between {low} and {high}")
    return value


__all__ = ["environment", "install_ui"]
