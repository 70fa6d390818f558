"""What the SIGKILL tests of a send share: the users, the service's configuration (the fake
Twilio, and a real SMTP server for e-mail), the send posted under the kill, and waiting for the
resumed job to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import trio


def seed_users(database: Any, count: int) -> None:
    """`count` users in cluster `all`, each with a phone and an e-mail address derived from its id."""
    database.users.insert_many(
        [
            {
                "_id": f"u{i:04d}",
                "phoneNumber": f"+1555{i:07d}",
                "emailAddress": f"u{i:04d}@example.com",
                "clusters": ["all"],
            }
            for i in range(count)
        ]
    )


def kill_config(path: Path, twilio_url: str, concurrency: int, smtp_port: int | None = None, extra: str = "") -> Path:
    """SMS on the fake Twilio, and e-mail on the SMTP server at `smtp_port` when there is one,
    `concurrency` each; `extra`: more TOML sections.

    Two waits of the resumed run are cut short, with what they wait for unchanged: a delivery the
    killed run left `sending` is waited for until its claim is older than the attempt's timeout
    plus 5 s (the run that claimed it might still be alive): a 5 s timeout (10 s by default) is
    still a hundred times the fakes' latency; and the fake Twilio lists a message as soon as it
    has taken it, so the reconciliation's settling wait (for the real Twilio's listing delay, 30 s
    by default) is 0.5 s."""
    channels = ["sms"] if smtp_port is None else ["sms", "email"]
    email = f"""
[channels.email]
provider = "smtp"
concurrency = {concurrency}
timeout_seconds = 5
[providers.smtp]
host = "127.0.0.1"
port = {smtp_port}
security = "none"
"""
    path.write_text(f"""
[channels]
active = {json.dumps(channels)}
[channels.sms]
provider = "twilio"
concurrency = {concurrency}
timeout_seconds = 5
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio_url}"
reconcile_settle_seconds = 0.5
[sender]
sms = "+15550009999"
email = "noreply@example.com"
[store]
lease_seconds = 1.5
{email if smtp_port is not None else ""}{extra}""")
    return path


async def post_send(port: int, channels: list[str]) -> None:
    """The send to cluster `all`; the service may be killed under it."""
    async with httpx.AsyncClient(timeout=120) as client:
        try:
            await client.post(
                f"http://127.0.0.1:{port}/send",
                json={"channels": channels, "clusters": ["all"], "messageTitle": "hello", "messageContent": "hi"},
            )
        except httpx.TransportError:
            pass


async def wait_until_done(database: Any, seconds: float) -> dict[str, Any]:
    """The (only) job, once the resumed run has finished it."""
    with trio.fail_after(seconds):
        while True:
            job = await trio.to_thread.run_sync(database.dispatch_jobs.find_one, {})
            if job["state"] == "done":
                return job
            await trio.sleep(0.1)
