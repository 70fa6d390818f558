"""Cancel means cancel, and a synchronous request is bounded, against real service processes and
the fake Twilio (counting what it receives): a paced send cancelled through ANOTHER process than
the one running it sends nothing more than what was in flight; a synchronous request answers 202
with its job once `[server].sync_timeout_seconds` ran out."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import trio
from service_process import Service

from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

USERS = 30
RATE = 4.0  # SMS per second: the deliveries wait for tokens


def _config(path: Path, twilio_url: str) -> Path:
    path.write_text(f"""
[server]
sync_timeout_seconds = 1.5
[channels]
active = ["sms"]
[channels.sms]
provider = "twilio"
concurrency = 4
rate_per_second = {RATE}
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio_url}"
[sender]
sms = "+15550009999"
""")
    return path


async def test_cancel_through_another_process_and_the_sync_timeout(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    database.users.insert_many(
        [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(USERS)]
    )
    fake = FakeTwilio("AC123", "secret", Faults(latency=0.03))
    body = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
    async with trio.open_nursery() as nursery:
        twilio_url = await nursery.start(serve_asgi, fake)
        config = _config(tmp_path / "config.toml", twilio_url)
        runner = Service(config, mongo_url, database.name, tmp_path / "runner.log")
        other = Service(config, mongo_url, database.name, tmp_path / "other.log")
        try:
            await runner.start()
            await other.start()
            async with httpx.AsyncClient(timeout=30) as client:
                # Synchronous, 30 SMS at 4/s: longer than the 1.5 s the request may wait.
                started = trio.current_time()
                answer = await client.post(f"http://127.0.0.1:{runner.port}/send", json=body)
                waited = trio.current_time() - started
                assert answer.status_code == 202, answer.text
                job = answer.json()
                assert job["status"] == "running" and answer.headers["Location"] == f"/send/{job['id']}"
                assert waited < 10  # bounded by the setting (1.5 s), not by the send (7.5 s)
                assert len(fake.received) < USERS

                # The job runs in `runner`; the cancel goes to `other`.
                with trio.fail_after(20):
                    while len(fake.received) < 8:
                        await trio.sleep(0.01)
                cancelled = await client.delete(f"http://127.0.0.1:{other.port}/send/{job['id']}")
                assert cancelled.status_code == 200
                at_cancel = len(fake.attempts)
                await trio.sleep(3.0)  # at 4/s, twelve more would have gone out
                after = len(fake.attempts) - at_cancel
                # Within the watch's poll (0.5 s) at most two tokens, plus the calls in flight.
                assert after <= 2 + 4, f"{after} SMS sent after the cancel"
                with trio.fail_after(10):
                    while True:
                        state = (await client.get(f"http://127.0.0.1:{other.port}/send/{job['id']}")).json()
                        if state["status"] == "cancelled":
                            break
                        await trio.sleep(0.1)
                print(f"sent after the cancel: {after}; cancelled: {state['summary'].get('cancelled')}")
                assert sum(state["summary"]["cancelled"].values()) == USERS - len(fake.received)
        finally:
            runner.stop()
            other.stop()
            nursery.cancel_scope.cancel()
