"""Black-box: what a cancel and a 429 on one number cost, against a real `dispatcher serve`
process (its own embedded store) and the fake Twilio, counting at the fake.

    python benchmarks/cancel_and_pauses.py [ROUNDS]      # default 3; prints each round and medians

1. Paced cancel: 40 SMS at 2/s (async job); `DELETE /send/{id}` at 4 s; the SMS that reach the
   fake after the DELETE answered, over the next 4 s.
2. Cancel behind a pause: the fake answers the next request 429 (code 20429, the account's
   limit) with `Retry-After: 20`, pausing the channel; `DELETE` at 4 s; SMS that reach
   the fake after it, and how long until the job reads `cancelled`.
3. A 429 on one number: job A to a number the fake answers 429 code 14107 (that destination's
   limit) with `Retry-After: 60`; job B to another user posted 2 s later: time from B's POST to
   B's SMS at the fake.

Issue 17 item 3 measured before: 16 SMS after a cancel behind a pause (A `running` 57 s), 8 SMS in
the 4 s after a paced cancel, and B held 57 s by A's 429.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pymongo
import trio

from dispatcher.embedded_store import free_port, open_embedded_store
from dispatcher.fakes.faults import Faults
from dispatcher.fakes.server import serve_asgi
from dispatcher.fakes.twilio import FakeTwilio

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 3
USERS = 40
THROTTLED = "+15550000000"  # user u0000


async def start_service(config: Path, store_url: str, log: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "MONGODB_URL": store_url, "TWILIO_AUTH_TOKEN": "secret"}
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "dispatcher", "--config", str(config), "serve"], env=env, stdout=out, stderr=out
        )
    async with httpx.AsyncClient() as client:
        with trio.fail_after(60):
            while True:
                try:
                    if (await client.get(f"http://127.0.0.1:{port}/-/ready")).status_code == 200:
                        return process
                except httpx.TransportError:
                    pass
                assert process.poll() is None, log.read_text()
                await trio.sleep(0.1)


async def round_(n: int, work: Path) -> dict[str, float]:
    fake = FakeTwilio("AC123", "secret", Faults(latency=0.03))
    figures: dict[str, float] = {}
    async with trio.open_nursery() as nursery, open_embedded_store(None) as store_url:
        twilio_url = await nursery.start(serve_asgi, fake)
        database = f"bench{n}"
        with pymongo.MongoClient(store_url) as client:
            client[database].users.insert_many(
                [{"_id": f"u{i:04d}", "phoneNumber": f"+1555{i:07d}", "clusters": ["all"]} for i in range(USERS)]
            )
        port = free_port()
        config = work / f"config{n}.toml"
        config.write_text(f"""
[server]
port = {port}
[dispatcher]
drain_timeout_seconds = 1
[store]
database = "{database}"
[channels]
active = ["sms"]
[channels.sms]
provider = "twilio"
concurrency = 4
rate_per_second = 2
max_retry_after_seconds = 120
[providers.twilio]
account_sid = "AC123"
api_base_url = "{twilio_url}"
[sender]
sms = "+15559999999"
""")
        service = await start_service(config, store_url, work / f"service{n}.log", port)
        base = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=120) as http:
                every = {"channels": ["sms"], "clusters": ["all"], "messageContent": "hi"}
                async_ = {"Prefer": "respond-async"}

                # 1. paced cancel
                job = (await http.post("/send", json=every, headers=async_)).json()["id"]
                await trio.sleep(4)
                await http.delete(f"/send/{job}")
                at = len(fake.attempts)
                await trio.sleep(4)
                figures["paced: SMS after cancel"] = len(fake.attempts) - at

                # 2. cancel behind an account-wide 429 pause
                fake.faults.script.extend(["throttle"])
                fake.faults.retry_after = 20
                job = (await http.post("/send", json=every, headers=async_)).json()["id"]
                await trio.sleep(4)
                cancelled_at = trio.current_time()
                await http.delete(f"/send/{job}")
                at = len(fake.attempts)
                while (await http.get(f"/send/{job}")).json()["status"] != "cancelled":
                    await trio.sleep(0.05)
                figures["paused: s until cancelled"] = trio.current_time() - cancelled_at
                await trio.sleep(4)
                figures["paused: SMS after cancel"] = len(fake.attempts) - at
                await trio.sleep(20)  # let the channel's pause end before the next measurement

                # 3. a 429 on one number
                fake.throttled_numbers[THROTTLED] = 60
                await http.post("/send", json={**every, "clusters": [], "recipients": ["u0000"]}, headers=async_)
                await trio.sleep(2)
                other = "+15550000007"
                before = len([r for r in fake.received if r.form["To"] == other])
                posted = trio.current_time()
                await http.post("/send", json={**every, "clusters": [], "recipients": ["u0007"]}, headers=async_)
                while len([r for r in fake.received if r.form["To"] == other]) == before:
                    await trio.sleep(0.01)
                figures["429 on one number: other user's delay s"] = trio.current_time() - posted
        finally:
            service.kill()
            service.wait()
            nursery.cancel_scope.cancel()
    return figures


async def main() -> None:
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in range(ROUNDS):
            figures = await round_(n, Path(tmp))
            rounds.append(figures)
            print(f"round {n + 1}: " + "; ".join(f"{k} {v:.2f}" for k, v in figures.items()), flush=True)
    print("medians: " + "; ".join(f"{k} {statistics.median(r[k] for r in rounds):.2f}" for k in rounds[0]))


if __name__ == "__main__":
    trio.run(main)
