"""A fake callback receiver: verifies every POST with `standardwebhooks` (as a client's receiver
would), keeps what it received, and answers what it is told to (a list of statuses to answer
first, then 200), so tests and benchmarks can count, de-duplicate and break deliveries.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import trio
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from .server import Receive, Send, read_body, respond


@dataclass
class Received:
    webhook_id: str
    timestamp: str
    body: dict[str, Any]
    path: str


@dataclass
class WebhookReceiver:
    secret: str
    # Statuses answered to the first POSTs, in order (e.g. [503, 503]); 200 afterwards.
    script: list[int] = field(default_factory=list)
    # Seconds each answer waits (a slow receiver).
    delay: float = 0.0
    received: list[Received] = field(default_factory=list)
    rejected: int = 0  # POSTs whose signature did not verify (answered 401)
    posts: int = 0
    tries: list[str] = field(default_factory=list)  # the webhook-id of every verified POST
    arrived: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        self.posts += 1
        try:
            body = Webhook(self.secret).verify(raw, headers)
        except WebhookVerificationError:
            self.rejected += 1
            await respond(send, 401, b'{"error": "bad signature"}')
            return
        self.tries.append(headers["webhook-id"])
        if self.delay:
            await trio.sleep(self.delay)
        status = self.script.pop(0) if self.script else 200
        if 200 <= status < 300:
            self.received.append(Received(headers["webhook-id"], headers["webhook-timestamp"], body, scope["path"]))
            self.arrived.set()
            self.arrived = trio.Event()
        await respond(send, status, json.dumps({"status": status}).encode())

    def unique(self) -> dict[str, Received]:
        """What a receiver that drops duplicates by `webhook-id` kept."""
        return {r.webhook_id: r for r in self.received}

    def of_type(self, event: str) -> list[Received]:
        return [r for r in self.unique().values() if r.body["type"] == event]

    def deliveries(self) -> list[dict[str, Any]]:
        """Every delivery.updated event received (duplicates dropped)."""
        return [d for r in self.of_type("delivery.updated") for d in r.body["data"]["deliveries"]]


__all__ = ["Received", "WebhookReceiver"]
