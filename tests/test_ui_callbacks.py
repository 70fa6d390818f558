"""The operations page's callback panels: a send's callbacks with their attempts, the service's
dead letters, and Retry, against a receiver on loopback that verifies signatures."""

from __future__ import annotations

import base64
import re
from urllib.parse import urljoin
from typing import Any

import pytest
import trio

from dispatcher import open_dispatcher
from dispatcher.app import create_app
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.webhooks import WebhookReceiver

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
FAST = {"allow_http": True, "allow_private": True, "batch_ms": 100, "poll_seconds": 0.05, "timeout_seconds": 2}


@pytest.fixture
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISPATCHER_CALLBACK_SECRET", SECRET)


async def test_a_dead_callback_is_shown_on_its_send_and_the_service_and_retried_from_there(
    make_settings: Any, database: Any, secret_env: None
) -> None:
    database.users.insert_one({"_id": "u1", "phoneNumber": "+15550000001"})
    receiver = WebhookReceiver(SECRET, script=[400])
    async with trio.open_nursery() as nursery:
        url = await nursery.start(serve_asgi, receiver)
        settings = make_settings(callbacks={**FAST, "secret": SECRET})
        async with open_dispatcher(settings) as d, create_app(d).test_app() as app:
            client = app.test_client()
            body = {
                "channels": ["sms"],
                "recipients": ["u1"],
                "messageContent": "hi",
                "callbackUrl": f"{url}/hooks?t=x",
            }
            job_id = (await (await client.post("/send", json=body)).get_json())["id"]
            with trio.fail_after(15):
                while "HTTP 400" not in (html := (await (await client.get("/-/ui/service")).get_data()).decode()):
                    await trio.sleep(0.05)
            assert "<dt>Dead letters</dt><dd>1</dd>" in html
            [retry] = re.findall(r'data-retry="([^"]+)"', html)
            assert retry == f"../../callbacks/{job_id}.finished/retry"  # the API's route, relative
            assert f'href="./jobs/{job_id}"' in html and "t=x" not in html  # no query string shown

            job_page = (await (await client.get(f"/-/ui/jobs/{job_id}")).get_data()).decode()
            row = re.search(r'<table class="callbacks">.*?</table>', job_page, re.S).group(0)
            assert "job.finished" in row and "state-dead" in row and "HTTP 400" in row
            assert "data-retry" not in row

            # What the Retry button does: POST the API's route from the page's address.
            answer = await client.post(urljoin("/-/ui/service", retry))
            assert answer.status_code == 200 and (await answer.get_json())["state"] == "pending"
            with trio.fail_after(15):
                while not receiver.received:
                    await trio.sleep(0.05)
            html = (await (await client.get("/-/ui/service")).get_data()).decode()
            assert "No dead letters." in html and "<dt>Dead letters</dt><dd>0</dd>" in html
        nursery.cancel_scope.cancel()
    assert receiver.received[0].body["jobId"] == job_id
