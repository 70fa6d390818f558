"""Embedding the dispatcher in a Trio program, without HTTP.

    dispatcher seed examples/seed.json     # once: example users and a template
    python examples/embed.py

It reads ./config.toml (or $DISPATCHER_CONFIG; the embedded defaults when neither exists), sends
the example template to the `beta` cluster on e-mail and SMS and prints the result, then submits
a job and prints its status. With the
default `outbox` provider the messages land as files under var/outbox/.
"""

from __future__ import annotations

import json

import trio

import dispatcher
from dispatcher.wire import job_json, send_result_json


async def main() -> None:
    settings = dispatcher.load_settings()
    async with dispatcher.open_dispatcher(settings) as d:
        try:
            result = await d.send(
                {
                    "channels": ["email", "sms"],
                    "clusters": ["beta"],
                    "templateId": "65a000000000000000000001",
                    "data": {"plan": "Pro", "start": "2026-12-01T09:00:00Z"},
                }
            )
        except dispatcher.RequestError as exc:  # e.g. the store was not seeded
            raise SystemExit(f"request refused ({exc.status_code}): {exc}") from None
        print(json.dumps(send_result_json(result), indent=2))
        # The same as a job: the id at once, then its status (idempotent: a second submit with
        # the same key and request names the same job and sends nothing).
        job_id = await d.submit(
            {
                "channels": ["sms"],
                "clusters": ["beta"],
                "messageTitle": "Hi",
                "messageContent": "Hello {{ user.name }}",
            },
            idempotency_key="example-1",
        )
        while (status := await d.status(job_id)).state in ("queued", "running"):
            await trio.sleep(0.1)
        # A typed `JobStatus` (dispatcher/job_views.py), printed as GET /send/{id} would answer it
        # (as the result above is printed as POST /send answers it).
        print(json.dumps(job_json(status), indent=2))


if __name__ == "__main__":
    trio.run(main)
