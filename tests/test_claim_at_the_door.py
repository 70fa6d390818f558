"""Claim at the door, shown with a real kill: a 3,000-user SMS + e-mail send (fake Twilio at 30 ms
per call, a real SMTP server) SIGKILLed at 10 %. Deliveries are claimed `sending` only once they
hold their slot and token, and their outcome is written right after the call, so what the kill
leaves ambiguous on a channel is bounded by twice its concurrency (the calls in flight and the
outcomes not yet written), not by what was queued. After the restart: nothing received twice,
nothing lost, every unknown counted."""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import trio
from kill_runs import post_send, seed_users, kill_config, wait_until_done
from service_process import Service

from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.smtp import SmtpSink
from dispatcher.fakes.twilio import FakeTwilio

USERS = 3000
CONCURRENCY = {"sms": 16, "email": 16}
LATENCY = 0.03


async def test_sigkill_at_ten_percent_leaves_at_most_the_calls_in_flight_ambiguous(
    mongo_url: str, database: Any, tmp_path: Path
) -> None:
    seed_users(database, USERS)
    fake = FakeTwilio("AC123", "secret", Faults(latency=LATENCY))
    with SmtpSink(faults=Faults(latency=LATENCY), record_data=False) as sink:
        async with trio.open_nursery() as nursery:
            twilio_url = await nursery.start(serve_asgi, fake)
            config = kill_config(tmp_path / "config.toml", twilio_url, CONCURRENCY["sms"], sink.port)
            service = Service(config, mongo_url, database.name, tmp_path / "service.log")
            try:
                await service.start()

                nursery.start_soon(post_send, service.port, ["sms", "email"])
                with trio.fail_after(60):
                    while len(fake.received) + len(sink.received) < 0.1 * 2 * USERS:
                        await trio.sleep(0.005)
                service.kill()
                left = await trio.to_thread.run_sync(
                    lambda: Counter(d["channel"] for d in database.dispatch_deliveries.find({"state": "sending"}))
                )
                await service.start()
                job = await wait_until_done(database, 120)
            finally:
                service.stop()
                nursery.cancel_scope.cancel()
        mails = sink.messages()

    received = {
        "sms": Counter(r.form["To"].removeprefix("+1555") for r in fake.received),
        "email": Counter(m.rcpt_tos[0].removeprefix("u").removesuffix("@example.com") for m in mails),
    }
    deliveries = list(database.dispatch_deliveries.find({"job": job["_id"]}))
    print(f"left sending by the kill: {dict(left)}")
    for channel, concurrency in CONCURRENCY.items():
        got = {int(k): n for k, n in received[channel].items()}
        docs = {int(d["user"][1:]): d for d in deliveries if d["channel"] == channel}
        assert len(docs) == USERS
        assert max(got.values()) == 1, f"{channel}: a user received it twice"
        sent = {u for u, d in docs.items() if d["state"] == "sent"}
        unknown = {u for u, d in docs.items() if (d.get("error") or "").startswith("outcome unknown")}
        assert all(got.get(u) == 1 for u in sent), f"{channel}: reported sent, never received"
        assert set(got) - sent <= unknown, f"{channel}: received, reported neither sent nor unknown"
        assert sent | unknown == set(docs), f"{channel}: a delivery neither sent nor unknown"
        # The bound of claim at the door: the calls in flight, and the outcomes not written yet.
        assert left[channel] <= 2 * concurrency
        assert len(unknown) <= 2 * concurrency
        assert job["summary"]["sent"][channel] == len(sent)
        print(
            f"{channel}: received {len(got)}, sent {len(sent)}, unknown {len(unknown)} (of which received "
            f"{len(unknown & set(got))})"
        )
