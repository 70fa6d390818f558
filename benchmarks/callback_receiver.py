"""The customer's callback receiver for callbacks_overhead.py, in a process of its own: the
service's fake receiver (dispatcher/fakes/webhooks.py, every POST verified with
`standardwebhooks`) served on 127.0.0.1, so that what verifying costs is charged to the receiver
and not to the service it would otherwise share an event loop with.

    CALLBACK_SECRET=whsec_... python benchmarks/callback_receiver.py

Prints its base URL on the first line of stdout, then serves until stdin closes (the benchmark
exiting, however it exits, ends the receiver too). Besides the POSTs it answers:
- `GET /wait?path=/r2&events=N`: once N distinct `delivery.updated` events and a `job.finished`
  arrived on `path` (duplicates dropped by webhook-id), or 120 s passed: `{"events", "finished"}`.
- `GET /stats`: `{"posts", "rejected"}` so far (every POST, and those whose signature failed).
"""

import json
import os
import sys
from typing import Any
from urllib.parse import parse_qs

import trio

from dispatcher.fakes.server import Receive, Send, respond, serve_asgi
from dispatcher.fakes.webhooks import WebhookReceiver


def counts(receiver: WebhookReceiver, path: str) -> dict[str, Any]:
    events = 0
    finished = False
    for r in receiver.unique().values():
        if r.path != path:
            continue
        if r.body["type"] == "delivery.updated":
            events += len(r.body["data"]["deliveries"])
        elif r.body["type"] == "job.finished":
            finished = True
    return {"events": events, "finished": finished}


class Receiver:
    def __init__(self, secret: str) -> None:
        self.hooks = WebhookReceiver(secret)

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["method"] != "GET":
            await self.hooks(scope, receive, send)
            return
        if scope["path"] == "/stats":
            answer = {"posts": self.hooks.posts, "rejected": self.hooks.rejected}
        else:
            query = parse_qs(scope["query_string"].decode())
            path, wanted = query["path"][0], int(query["events"][0])
            with trio.move_on_after(120):
                while True:
                    arrived = self.hooks.arrived  # before counting: an arrival meanwhile sets it
                    answer = counts(self.hooks, path)
                    if answer["events"] >= wanted and answer["finished"]:
                        break
                    await arrived.wait()
        await respond(send, 200, json.dumps(answer).encode())


async def main() -> None:
    app = Receiver(os.environ["CALLBACK_SECRET"])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, app)
        print(url, flush=True)
        await trio.to_thread.run_sync(sys.stdin.read)
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    trio.run(main)
