"""What the SIGKILL tests of a send share: the users, the service's configuration (the fake
Twilio, and a real SMTP server for e-mail), the send posted under the kill, waiting for the
resumed job to end, and (`kill_and_resume`) the whole run of an SMS + e-mail send killed and
resumed, with what the fakes received, which `benchmarks/kill_reconcile.py` runs at the issue's
size."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import trio

from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.smtp import SmtpSink
from dispatcher.fakes.twilio import FakeTwilio
from service_process import Service


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


@dataclass
class KillRun:
    """A killed and resumed SMS + e-mail send: its deliveries by channel and user, and what the
    fakes received (users by how many messages each got)."""

    users: int
    left_sending: int  # in the ledger between the kill and the restart, both channels
    deliveries: dict[str, dict[str, dict[str, Any]]]
    received: dict[str, Counter[str]]
    sid_of: dict[str, str]  # Twilio's SID -> the user it went to

    def unknown(self, channel: str) -> set[str]:
        return {u for u, d in self.deliveries[channel].items() if (d.get("error") or "").startswith("outcome unknown")}

    def duplicates(self, channel: str) -> int:
        return sum(n - 1 for n in self.received[channel].values())

    def lost(self, channel: str) -> set[str]:
        """Users missing from the ledger, reported sent but never received, or neither sent nor
        reported unknown (a silent loss)."""
        every = {f"u{i:04d}" for i in range(self.users)}
        docs = self.deliveries[channel]
        sent = {u for u, d in docs.items() if d["state"] == "sent"}
        return (
            (every - set(docs))
            | {u for u in sent if not self.received[channel][u]}
            | (set(docs) - sent - self.unknown(channel))
        )

    def reconciled(self) -> Counter[str | None]:
        return Counter(d.get("reconciled") for d in self.deliveries["sms"].values())


async def kill_and_resume(
    mongo_url: str, database: Any, tmp_path: Path, users: int, kill_at: float, concurrency: int, latency: float
) -> KillRun:
    """Send SMS (fake Twilio) + e-mail (aiosmtpd sink) to `users` users, each call taking `latency`
    seconds, `concurrency` calls at a time per channel; SIGKILL the service once `kill_at` of the
    SMS reached Twilio, start it again and wait for the job to end."""
    seed_users(database, users)
    fake = FakeTwilio("AC123", "secret", Faults(latency=latency))
    with SmtpSink(faults=Faults(latency=latency), record_data=False) as sink:
        async with trio.open_nursery() as nursery:
            twilio_url = await nursery.start(serve_asgi, fake)
            config = kill_config(tmp_path / "config.toml", twilio_url, concurrency, sink.port)
            service = Service(config, mongo_url, database.name, tmp_path / "service.log")
            try:
                await service.start()
                nursery.start_soon(post_send, service.port, ["email", "sms"])
                with trio.fail_after(60):
                    while len(fake.received) < kill_at * users:
                        await trio.sleep(0.005)
                service.kill()
                left_sending = await trio.to_thread.run_sync(
                    database.dispatch_deliveries.count_documents, {"state": "sending"}
                )
                await service.start()
                job = await wait_until_done(database, 90)
            finally:
                service.stop()
                nursery.cancel_scope.cancel()
        mails = list(sink.received)
    docs = list(database.dispatch_deliveries.find({"job": job["_id"]}))
    phone_of = {f"+1555{i:07d}": f"u{i:04d}" for i in range(users)}
    return KillRun(
        users,
        left_sending,
        {c: {d["user"]: d for d in docs if d["channel"] == c} for c in ("sms", "email")},
        {
            "sms": Counter(phone_of[r.form["To"]] for r in fake.received),
            "email": Counter(rcpt.split("@")[0] for m in mails for rcpt in m.rcpt_tos),
        },
        {r.sid: phone_of[r.form["To"]] for r in fake.received if r.sid},
    )
