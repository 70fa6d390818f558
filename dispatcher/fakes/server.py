"""Serving a fake's ASGI app on 127.0.0.1 with hypercorn's trio worker."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

ASGIApp = Callable[..., Awaitable[None]]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


async def serve_asgi(
    app: ASGIApp, *, port: int = 0, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve `app` until cancelled; `await nursery.start(serve_asgi, app)` returns its base URL."""
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 0

    async def with_lifespan(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        # The fakes have nothing to start or stop: answer the lifespan protocol for them.
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
        elif scope["type"] == "http":
            await app(scope, receive, send)

    async with trio.open_nursery() as nursery:
        # sleep_forever as the trigger: no signal handlers, the fake stops when cancelled.
        urls = await nursery.start(
            partial(serve, with_lifespan, config, shutdown_trigger=trio.sleep_forever, mode="asgi")
        )
        task_status.started(urls[0])


async def read_body(receive: Receive) -> bytes:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            return body


async def respond(
    send: Send,
    status: int,
    body: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
    content_type: bytes = b"application/json",
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), *(headers or [])],
        }
    )
    await send({"type": "http.response.body", "body": body})
