"""`GET /-/check-up`: the platform's third health route, the state of every dependency.

`/-/healthz` says the process runs, `/-/ready` that it can take sends (the store, and Redis in
cluster mode). `/-/check-up` names each dependency that is configured and its state: the store
(a ping), Redis (a ping, cluster mode only), the Files Service (`GET {files.url}/-/healthz`, the
platform's health route; any answer below 500 counts as up: the service is there, whatever it
serves at that path). 200 when all are up; 503 in the error shape, with the same checks, when one
is down. Each check has `CHECK_TIMEOUT_SECONDS`; they run concurrently.
"""

from __future__ import annotations

import json
import logging
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import httpx
import trio

if TYPE_CHECKING:
    from quart_trio import QuartTrio

    from .core import Dispatcher

log = logging.getLogger(__name__)

CHECK_TIMEOUT_SECONDS = 5.0


async def check_up(dispatcher: Dispatcher) -> dict[str, dict[str, Any]]:
    """`{dependency: {"status": "OK"|"KO", "error"?: str}}` for every configured dependency."""
    checks: dict[str, dict[str, Any]] = {}
    probes: dict[str, Any] = {"store": dispatcher.store.ping}
    if dispatcher.cluster is not None:
        probes["redis"] = dispatcher.cluster.ping
    if dispatcher.settings.files.url:
        probes["files"] = lambda: _files_up(dispatcher.settings.files.url)

    async def probe(name: str) -> None:
        error = None
        with trio.move_on_after(CHECK_TIMEOUT_SECONDS) as timer:
            try:
                up = await probes[name]()
            except Exception as exc:  # noqa: BLE001 - any failure of a probe is "down", with its reason
                up, error = False, f"{type(exc).__name__}: {exc}"
        if timer.cancelled_caught:
            up, error = False, f"no answer within {CHECK_TIMEOUT_SECONDS:g}s"
        checks[name] = {"status": "OK"} if up else {"status": "KO", "error": error or "does not answer"}

    async with trio.open_nursery() as nursery:
        for name in probes:
            nursery.start_soon(probe, name)
    return {name: checks[name] for name in probes}


async def _files_up(base_url: str) -> bool:
    async with httpx.AsyncClient(timeout=CHECK_TIMEOUT_SECONDS, follow_redirects=False) as http:
        response = await http.get(base_url.rstrip("/") + "/-/healthz")
    if response.status_code >= 500:
        raise RuntimeError(f"HTTP {response.status_code}")
    return True


def install_checkup(app: QuartTrio, dispatcher: Dispatcher) -> None:
    from quart import Response

    from . import __version__

    @app.get("/-/check-up")
    async def checkup() -> Any:
        checks = await check_up(dispatcher)
        body: dict[str, Any] = {"status": "OK", "name": "trio-dispatcher", "version": __version__, "checks": checks}
        down = [name for name, check in checks.items() if check["status"] != "OK"]
        if not down:
            return body
        for name in down:
            log.warning("check-up: %s is down: %s", name, checks[name]["error"])
        body.update(
            status="KO",
            statusCode=503,
            error=HTTPStatus(503).phrase,
            message=f"{', '.join(down)} {'is' if len(down) == 1 else 'are'} down",
        )
        return Response(json.dumps(body), status=503, content_type="application/json")


__all__ = ["check_up", "install_checkup"]
