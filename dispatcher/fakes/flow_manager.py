"""A fake Flow Manager: `POST /event` records the saga events it receives."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from .faults import Faults
from .server import read_body, respond

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class FakeFlowManager:
    """A raw ASGI app; serve it with `url = await nursery.start(serve_asgi, fake)`.

    `events` lists the JSON bodies accepted on `POST /event` that have the event shape
    (`{"key": str, "value": {"messageLabel": str, "messagePayload": {...}}}`), in arrival order;
    `attempts` counts every request, `stray` holds the method and path of anything else.
    Outcomes from `faults`: "ok" answers 200, "transient" 503, "permanent" 400.
    """

    def __init__(self, faults: Faults | None = None) -> None:
        self.faults = faults if faults is not None else Faults()
        self.events: list[dict[str, Any]] = []
        self.attempts = 0
        self.stray: list[str] = []
        self.received = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await read_body(receive)
        self.attempts += 1
        if scope["method"] != "POST" or scope["path"] != "/event":
            self.stray.append(f"{scope['method']} {scope['path']}")
            await respond(send, 404, b'{"error": "not found"}')
            return
        outcome = self.faults.next_outcome()
        await self.faults.wait(outcome)
        if outcome != "ok":
            await respond(send, 503 if outcome in ("transient", "throttle") else 400, b'{"error": "fault"}')
            return
        try:
            event = json.loads(body)
            valid = (
                isinstance(event.get("key"), str)
                and isinstance(event["value"]["messageLabel"], str)
                and isinstance(event["value"]["messagePayload"], dict)
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            valid = False
        if not valid:
            self.stray.append(f"POST /event with {body[:200]!r}")
            await respond(send, 400, b'{"error": "not an event"}')
            return
        self.events.append(event)
        self.received.set()
        self.received = trio.Event()
        await respond(send, 200, b"{}")
